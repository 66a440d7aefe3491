"""SFT end to end: two processes under `accelerate launch`, and the real SmolLM2 model trained and reloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import backbone, sft
from posttrain.config import LoRAConfig, ModelConfig, TrainConfig
from posttrain.sft import DataSourceConfig, SFTStageConfig

REPO = Path(__file__).resolve().parents[1]


def write_addition_data(path: Path, n: int, system: str = "") -> Path:
    head = [{"role": "system", "content": system}] if system else []
    records = [{"messages": [*head, {"role": "user", "content": f"{i} + {i}?"},
                             {"role": "assistant", "content": f"{2 * i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on the shared 2-core machine two threads contend and a step runs ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_model_dir, tmp_path):
    data_path = write_addition_data(tmp_path / "data.jsonl", 8)
    out = tmp_path / "out"
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{path: {tiny_model_dir}, dtype: float32}}\nlora: {{r: 4, alpha: 8}}\n"
                      f"train: {{output_dir: {out}, max_steps: 2, batch_size: 1, max_length: 64, "
                      f"report_to: [none], learning_rate: 1.0e-3}}\n"
                      f"data: [{{path: {data_path}}}]\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # `--cpu` makes accelerate 1.15 start one process (several CPU processes need mpirun); the torchrun launcher
    # behind `--multi_gpu` starts two, and on a machine without CUDA the stage runs them on CPU over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "posttrain", "sft", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["steps"] == 2
    assert (out / "DONE").is_file() and not list(out.glob(".model.tmp*"))
    name = "model.layers.0.self_attn.q_proj.weight"  # LoRA-targeted, so merged weights moved
    assert not torch.equal(load_file(out / "model.safetensors")[name],
                           load_file(tiny_model_dir / "model.safetensors")[name])


@pytest.mark.slow
def test_smollm2_trains_and_reloads(smollm2_dir, tmp_path):
    """ChatML masks through the template path; the merged model equals base + the checkpoint's adapter."""
    path = write_addition_data(tmp_path / "data.jsonl", 4, system="Add.")  # short: no default system prompt
    out = tmp_path / "out"
    cfg = SFTStageConfig(
        model=ModelConfig(path=str(smollm2_dir), dtype="float32"), lora=LoRAConfig(r=8, alpha=16),
        train=TrainConfig(output_dir=str(out), learning_rate=1e-3, max_steps=2, save_steps=2, batch_size=1,
                          max_length=64, report_to=["none"]),
        data=[DataSourceConfig(path=str(path))], packing=False)
    tokenizer = backbone.load_tokenizer_for(smollm2_dir)
    rows = sft.build_dataset(cfg, tokenizer)
    assert sorted(tokenizer.decode([t for t in lab if t != -100]) for lab in rows["labels"]) == [
        "0<|im_end|>", "2<|im_end|>", "4<|im_end|>", "6<|im_end|>"]

    assert sft.train(cfg)["steps"] == 2
    from peft import PeftModel

    merged = backbone.load_model(out, torch.float32).eval()
    adapter = PeftModel.from_pretrained(backbone.load_model(smollm2_dir, torch.float32), out / "checkpoint-2").eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "3 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = merged(ids).logits
        torch.testing.assert_close(logits, adapter(ids).logits, rtol=1e-4, atol=1e-3)  # merging rounds in fp32
        with adapter.disable_adapter():
            assert (logits - adapter(ids).logits).abs().max() > 0.1  # training moved the model
        generated = merged.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    reloaded = backbone.load_tokenizer_for(out)
    assert reloaded.apply_chat_template([{"role": "user", "content": "3 + 3?"}]) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "3 + 3?"}])
