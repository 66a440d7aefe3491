"""SFT training on CPU with the tiny Llama 3 model: the loss falls, LoRA touches only adapters, resume continues the
step count, the CLI writes a complete stage dir."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain import backbone, sft
from posttrain.config import LoRAConfig, ModelConfig, TrainConfig
from posttrain.data import file_sha256
from posttrain.sft import DataSourceConfig, SFTStageConfig


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on the shared 2-core machine two threads contend and a step runs ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def addition_records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"{i} + {i}?"},
                                         {"role": "assistant", "content": f"{2 * i}"}]} for i in range(n)]


@pytest.fixture
def data_path(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in addition_records(8)))
    return path


def make_cfg(model_dir, data_path, out, *, lora=True, merge=True, **train_kw) -> SFTStageConfig:
    train_kw = {"output_dir": str(out), "learning_rate": 1e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                "batch_size": 1, "max_length": 64, "logging_steps": 1, "report_to": ["none"], **train_kw}
    return SFTStageConfig(model=ModelConfig(path=str(model_dir), dtype="float32"),
                          lora=LoRAConfig(enabled=lora, r=8, alpha=16, merge=merge),
                          train=TrainConfig(**train_kw), data=[DataSourceConfig(path=str(data_path))])


def test_full_finetune_loss_falls(tiny_model_dir, data_path, tmp_path):
    metrics = sft.train(make_cfg(tiny_model_dir, data_path, tmp_path / "out", lora=False, max_steps=24))
    assert metrics["steps"] == 24 and metrics["start_step"] == 0
    assert metrics["first_loss"] > 10.0  # ln(128256) = 11.76 at random init
    assert metrics["final_loss"] < metrics["first_loss"] - 2.0
    assert metrics["tokens_trained"] > 0 and metrics["tokens_per_s"] > 0


def test_token_count_and_logged_metrics_cover_every_trained_token(tiny_model_dir, tmp_path):
    records = [{"messages": [{"role": "user", "content": "add" + " please" * i},
                             {"role": "assistant", "content": str(i)}]} for i in range(8)]  # 8 lengths: padding
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "out", num_epochs=1, save_steps=1, batch_size=2)
    cfg = dataclasses.replace(cfg, packing=False)
    (stats,) = sft.render_sources(cfg, backbone.load_tokenizer_for(str(tiny_model_dir)))[2]
    metrics = sft.train(cfg)
    assert metrics["tokens_trained"] == stats["train_tokens"]  # every real token once, no padding
    state = json.loads((tmp_path / "out" / f"checkpoint-{metrics['steps']}" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == metrics["steps"] and logged[-1]["num_tokens"] == stats["train_tokens"]
    assert all(0.0 <= e["mean_token_accuracy"] <= 1.0 and e["entropy"] > 0 for e in logged)


def test_lora_changes_only_adapter_weights(tiny_model_dir, data_path, tmp_path, monkeypatch):
    trained, apply_lora = {}, backbone.apply_lora

    def spy(model, lora_cfg):
        trained["model"] = apply_lora(model, lora_cfg)
        return trained["model"]

    monkeypatch.setattr(backbone, "apply_lora", spy)
    out = tmp_path / "out"
    sft.train(make_cfg(tiny_model_dir, data_path, out, merge=False, max_steps=3))
    base = load_file(tiny_model_dir / "model.safetensors")
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in trained["model"].state_dict().items()}
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # PEFT starts B at zero
    for name, tensor in base.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)

    # merge=False saves the adapter, pointing at the base, and it reloads to the trained model
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(backbone.load_model(tiny_model_dir, torch.float32), out).eval()
    ids = torch.tensor([[128000, 128006, 882, 128007, 271, 13347]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained["model"].eval()(ids).logits)


def test_resume_continues_the_step_count(tiny_model_dir, data_path, tmp_path):
    out = tmp_path / "out"
    first = sft.train(make_cfg(tiny_model_dir, data_path, out, max_steps=2, save_steps=2))
    assert first["steps"] == 2 and (out / "checkpoint-2").is_dir() and (out / "DONE").is_file()
    (out / "DONE").unlink()  # a finished dir with another config is refused; without DONE it trains on
    second = sft.train(make_cfg(tiny_model_dir, data_path, out, max_steps=4, save_steps=2))
    assert second["start_step"] == 2 and second["steps"] == 4
    assert second["tokens_trained"] > second["session_tokens"] > 0  # the token count carried over as well
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert json.loads((out / "manifest.json").read_text())["metrics"]["start_step"] == 2


def test_cli_writes_a_complete_stage_dir(tiny_model_dir, data_path, tmp_path):
    from posttrain.cli import main

    out = tmp_path / "out"
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{path: {tiny_model_dir}, dtype: float32}}\n"
                      f"train: {{output_dir: {out}, max_steps: 50, batch_size: 2, max_length: 64}}\n"
                      f"data: [{{path: {data_path}}}]\n")
    assert main(["sft", str(config), "train.max_steps=2", "lora.enabled=false", "train.learning_rate=0.001",
                 "eval_fraction=0.25"]) == 0

    for name in ("config.json", "model.safetensors", "tokenizer.json", "manifest.json", "DONE"):
        assert (out / name).is_file(), name
    assert list((out / "logs").iterdir())  # TensorBoard events
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["sha256"] == file_sha256(data_path) and manifest["inputs"][0]["records"] == 8
    assert manifest["config"]["train"]["max_steps"] == 2 and manifest["config"]["lora"]["enabled"] is False
    assert manifest["metrics"]["steps"] == 2 and manifest["metrics"]["tokens_trained"] > 0
    assert manifest["inputs"][0]["eval_examples"] == 2 and manifest["metrics"]["eval_loss"] > 0
    assert set(manifest["versions"]) >= {"torch", "transformers", "trl", "peft"}
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed
