"""DPO training on CPU: the margin grows, the reference stays frozen, LoRA trains only adapters, the CLI writes model,
manifest and DONE and resumes; SmolLM2 trains through its ChatML template."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.cli import main as cli_main
from posttrain.config import from_dict
from posttrain.data import file_sha256
from posttrain.dpo import DPOStageConfig, PairCollator, build_pairs, build_trainer

PAIRS = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
         {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
FAST = {"learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "batch_size": 2,
        "logging_steps": 1, "report_to": ["none"]}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _raw(tmp_path, model_dir, **overrides) -> dict:
    train_cfg = {**FAST, "output_dir": str(tmp_path / "out"), **overrides.pop("train", {})}
    return {"model": {"path": str(model_dir)}, "data": [{"path": str(_write(tmp_path / "p.jsonl", PAIRS))}],
            "train": train_cfg, **overrides}


def _trainer(tmp_path, model_dir, tokenizer, **overrides):
    cfg = from_dict(DPOStageConfig, _raw(tmp_path, model_dir, **overrides))
    pairs, _ = build_pairs(cfg, tokenizer)
    return build_trainer(cfg, pairs, tokenizer, tmp_path / "out"), PairCollator(tokenizer.pad_token_id)(pairs)


def _margins(trainer, batch) -> list[float]:
    with torch.no_grad():
        _, metrics = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    return metrics["rewards/margins"].tolist()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_full_training_grows_the_margin_and_leaves_the_reference_frozen(tmp_path, tiny_model_dir, llama3_tokenizer):
    trainer, batch = _trainer(tmp_path, tiny_model_dir, llama3_tokenizer, lora={"enabled": False},
                              train={"max_steps": 3})
    ref_before, policy_before = _snapshot(trainer.ref_model), _snapshot(trainer.model)
    assert _margins(trainer, batch) == [0.0, 0.0]
    trainer.train()
    assert min(_margins(trainer, batch)) > 0.05
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())
    assert not torch.equal(trainer.model.model.embed_tokens.weight, policy_before["model.embed_tokens.weight"])
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert margins[0] == 0.0 and margins[-1] > margins[0]


def test_logged_metrics_are_means_over_the_pairs(tmp_path, tiny_model_dir, llama3_tokenizer):
    trainer, batch = _trainer(tmp_path, tiny_model_dir, llama3_tokenizer, train={"max_steps": 1})
    trainer.train()  # one step on both pairs, logged: the metrics are those of the pairs before the update
    logged = next(h for h in trainer.state.log_history if "rewards/accuracies" in h)
    assert logged["rewards/accuracies"] == 0.0 and logged["rewards/margins"] == 0.0  # policy = reference at step 1
    assert logged["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)  # ln 2 per pair, not summed over the pairs
    assert logged["loss"] == pytest.approx(logged["loss/dpo"] + 0.2 * logged["nll"], rel=1e-3)


def test_lora_trains_only_the_adapters_against_the_disabled_base(tmp_path, tiny_model_dir, llama3_tokenizer):
    trainer, batch = _trainer(tmp_path, tiny_model_dir, llama3_tokenizer, train={"max_steps": 2})
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    before = _snapshot(trainer.model)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n in before if "lora_B" in n} <= changed
    assert min(_margins(trainer, batch)) > 0


def _files(out):
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def test_cli_writes_model_manifest_done_and_resumes(tmp_path, tiny_model_dir, capsys):
    raw = _raw(tmp_path, tiny_model_dir, lora={"enabled": False}, train={"report_to": ["tensorboard"]})
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    out, data = tmp_path / "out", tmp_path / "p.jsonl"
    assert cli_main(["dpo", str(config), "train.max_steps=2", "train.save_steps=2"]) == 0
    files = _files(out)
    assert {"DONE", "manifest.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json",
            "checkpoints/checkpoint-2/trainer_state.json"} <= files
    assert any(f.startswith("logs/") and "tfevents" in f for f in files)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["data"][0]["sha256"] == file_sha256(data)
    assert manifest["config"]["train"]["max_steps"] == 2 and manifest["outputs"]["model_kind"] == "full"
    assert manifest["metrics"]["steps"] == 2 and manifest["metrics"]["pairs"] == 2
    assert set(manifest["metrics"]) >= {"loss", "loss/dpo", "nll", "rewards/margins", "rewards/accuracies",
                                        "logps/chosen", "logps/rejected"}
    assert set(manifest["versions"]) >= {"torch", "transformers", "trl", "peft"}
    first_run = json.loads((out / "checkpoints/checkpoint-2/trainer_state.json").read_text())["log_history"]

    # A finished stage is returned as is, and refused with other data; an unfinished one resumes from its last
    # checkpoint: swapping chosen and rejected would change every logged step of a fresh run, but steps 1-2 come
    # from the checkpoint.
    assert cli_main(["dpo", str(config), "train.max_steps=2", "train.save_steps=2"]) == 0
    _write(data, [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in PAIRS])
    assert cli_main(["dpo", str(config), "train.max_steps=2", "train.save_steps=2"]) == 2
    assert "finished DPO run of another config or other data (changed: the contents" in capsys.readouterr().err
    for name in ("DONE", "manifest.json"):
        (out / name).unlink()
    assert cli_main(["dpo", str(config), "train.max_steps=4", "train.save_steps=2"]) == 0
    resumed = json.loads((out / "checkpoints/checkpoint-4/trainer_state.json").read_text())["log_history"]
    assert [h for h in resumed if h["step"] <= 2] == [h for h in first_run if h["step"] <= 2]
    assert json.loads((out / "manifest.json").read_text())["metrics"]["steps"] == 4


def test_smollm2_chatml_masks_and_a_few_lora_steps(tmp_path, smollm2_dir):
    from posttrain.backbone import load_tokenizer_for

    tok = load_tokenizer_for(smollm2_dir)
    multi_turn = {"prompt": "What is 2+3?", "rejected": "It is 6.", "chosen": [
        {"role": "assistant", "content": "Let me check."}, {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "It is 5."}]}
    raw = _raw(tmp_path, smollm2_dir, train={"max_steps": 2, "batch_size": 1, "learning_rate": 1e-4},
               lora={"r": 4, "merge": False})
    _write(tmp_path / "p.jsonl", [*PAIRS, multi_turn])
    (_, _, pair), _ = build_pairs(from_dict(DPOStageConfig, raw), tok)
    assert tok.decode(pair["prompt_ids"]).endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = pair["chosen_ids"], pair["chosen_mask"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Let me check.It is 5."
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<|im_end|>\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli_main(["dpo", str(config)]) == 0
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["outputs"]["model_kind"] == "adapter" and manifest["metrics"]["steps"] == 2
    assert manifest["metrics"]["pairs"] == 3 and manifest["metrics"]["rewards/accuracies"] in (0.0, 1.0)
    adapter = load_file(tmp_path / "out/model/adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # B starts at zero: every adapter was trained
