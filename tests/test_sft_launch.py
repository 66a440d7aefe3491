"""SFT under `accelerate launch` with 2 CPU processes (configs/accelerate/ddp.yaml, DDP over gloo) against one process
with the same global batch, LoRA and full fine-tuning: the data order, losses, token count and final weights match the
one-process run; only process 0 writes the stage's manifest, markers and model.

FSDP is not run here: accelerate turns FSDP on only for GPU process groups, and launched with
configs/accelerate/fsdp.yaml on a host without CUDA the stage trains under DDP.

Eight unpacked examples, four steps of a global batch of 2: one process takes batches of 2, each of two processes
batches of 1 (process p takes the p-th example of every global batch, in the same seeded order).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multiproc import launch
from posttrain import outdir, sft
from posttrain.config import from_dict
from posttrain.sft import SFTStageConfig

# Two processes sum the halves of a global batch in another order than one: float32 noise, nothing more.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5
RANK_0_ONLY = ("manifest.json", "DONE", ".posttrain.json", "model.safetensors", "config.json")


def config(tmp_path, model_dir, out, *, lora: bool, batch_size: int) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "messages": [
        {"role": "user", "content": f"{i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
        for i in range(8)))
    return {"model": {"path": str(model_dir), "dtype": "float32"}, "lora": {"enabled": lora, "r": 8, "alpha": 16},
            "data": [{"path": str(data)}], "packing": False,
            "train": {"output_dir": str(out), "learning_rate": 1e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                      "batch_size": batch_size, "max_length": 64, "max_steps": 4, "logging_steps": 1,
                      "report_to": ["none"]}}


def assert_launched_like_one(tmp_path, model_dir, *, lora: bool) -> None:
    one = sft.train(from_dict(SFTStageConfig, config(tmp_path, model_dir, tmp_path / "one", lora=lora, batch_size=2)))
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, model_dir, tmp_path / "two", lora=lora, batch_size=1)))
    writes = launch(["sft", str(path)], tmp_path / "writes")

    two = json.loads((tmp_path / "two" / "manifest.json").read_text())["metrics"]
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 4
    assert two["tokens_trained"] == one["tokens_trained"]  # every example once, in both
    for key in ("first_loss", "final_loss", "mean_loss"):
        assert two[key] == pytest.approx(one[key], abs=LOSS_TOLERANCE), key
    assert one["final_loss"] < one["first_loss"]  # it trained: equal losses are not two untouched models
    ours, theirs = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=WEIGHT_TOLERANCE, msg=key)

    out = (tmp_path / "two").resolve()
    assert out / "DONE" in writes[0] and out / "manifest.json" in writes[0]
    by_rank_1 = [p for p in writes[1] if p.is_relative_to(out) and p.name in RANK_0_ONLY]
    assert by_rank_1 == [], by_rank_1
    assert (tmp_path / "two" / "DONE").is_file() and not (tmp_path / "two" / outdir.TMP_MODEL_DIR).exists()


@pytest.mark.slow  # one launch of 2 processes: ~35 s on 2 cores
def test_lora_under_ddp_trains_like_one_process(tmp_path, tiny_model_dir):
    assert_launched_like_one(tmp_path, tiny_model_dir, lora=True)


@pytest.mark.slow  # one launch of 2 processes: ~35 s on 2 cores
def test_full_finetuning_under_ddp_trains_like_one_process(tmp_path, tiny_model_dir):
    assert_launched_like_one(tmp_path, tiny_model_dir, lora=False)
