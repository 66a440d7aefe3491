"""Reward model end to end on the tiny Llama 3: it learns a signal, the CLI writes an RM dir, resume, scoring."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from posttrain.config import from_dict
from posttrain.data import file_sha256, read_records
from rewards.model import RewardModel, RMStageConfig, split_records, train

WORDS = "apple river stone cloud green quick table music paper light window orange".split()


def _signal_records(n: int, seed: int = 0) -> list[dict]:
    """Chosen responses say "banana" somewhere in the middle, rejected ones another word in its place."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        head, tail = " ".join(rng.choices(WORDS, k=3)), " ".join(rng.choices(WORDS, k=3))
        records.append({"id": f"s{i}", "prompt": f"Say something about the {rng.choice(WORDS)}.",
                        "chosen": f"{head} banana {tail}", "rejected": f"{head} {rng.choice(WORDS)} {tail}"})
    return records


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(tiny_model_dir, data, out, **train) -> dict:
    return {
        "model": {"path": str(tiny_model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": [str(data)],
        "train": {"output_dir": str(out), "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                  "batch_size": 16, "logging_steps": 4, **train},
    }


def test_tiny_rm_learns_a_signal_and_the_saved_rm_agrees(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "prefs.jsonl", _signal_records(160))
    cfg = from_dict(RMStageConfig, _config(tiny_model_dir, data, tmp_path / "rm", num_epochs=1))
    metrics = train(cfg)
    print(f"tiny RM held-out pairwise accuracy: {metrics['eval_accuracy']:.3f} on {metrics['eval_pairs']} pairs")
    # the merged RM on disk ranks the held-out pairs as the trainer measured; they are held out by prompt
    train_part, held_out = split_records(read_records(data, "preference"), cfg.eval_fraction, cfg.train.seed)
    assert (metrics["train_pairs"], metrics["eval_pairs"]) == (len(train_part), len(held_out))
    held_prompts, train_prompts = ({json.dumps(r["prompt"]) for r in part} for part in (held_out, train_part))
    assert len(held_out) >= 8 and not held_prompts & train_prompts
    assert metrics["eval_accuracy"] >= 0.9

    rm = RewardModel.from_pretrained(tmp_path / "rm")
    prompts = [r["prompt"] for r in held_out]
    chosen = rm.score(prompts, [r["chosen"] for r in held_out])
    rejected = rm.score(prompts, [r["rejected"] for r in held_out])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held_out)
    assert accuracy == pytest.approx(metrics["eval_accuracy"])


def test_cli_writes_adapter_rm_dir_manifest_and_done(tmp_path, tiny_model_dir):
    from posttrain.cli import main

    records = _signal_records(12) + [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "What?", "edited": "Hello! How can I help?"},
        {"prompt": "Hi", "chosen": "Hey.", "rejected": "Bye.", "margin": 0.1},  # below min_margin
        {"prompt": "Hi", "chosen": "Yo.", "rejected": "Hm.", "rating": "slightly better"},  # unclear preference
    ]
    data = _write(tmp_path / "prefs.jsonl", records)
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_model_dir, data, tmp_path / "rm", max_steps=2)))
    rc = main(["rm", str(config), "lora.merge=false", "pack_responses=true", "min_margin=0.5", "eval_fraction=0.25"])
    assert rc == 0
    out = tmp_path / "rm"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "rm" and manifest["format"] == "adapter"
    assert manifest["inputs"] == {str(data): file_sha256(data)}
    assert manifest["config"]["pack_responses"] is True and manifest["config"]["lora"]["merge"] is False
    metrics = manifest["metrics"]
    assert {k: metrics[k] for k in ("records_read", "filtered_margin", "filtered_label", "filtered_too_long")} == {
        "records_read": 15, "filtered_margin": 1, "filtered_label": 1, "filtered_too_long": 0}
    assert metrics["train_records"] + metrics["eval_records"] == 13 and metrics["eval_records"] >= 1
    assert metrics["train_pairs"] + metrics["eval_pairs"] == 15  # the 3-way record gives 3 pairs
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_loss" in metrics
    assert metrics["eval_scored_pairs"] == metrics["eval_pairs"] and metrics["world_size"] == 1
    assert set(manifest["versions"]) >= {"torch", "transformers", "trl", "peft"}
    assert (out / "DONE").stat().st_mtime_ns >= (out / "manifest.json").stat().st_mtime_ns
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert any((out / "logs").glob("events.out.tfevents.*"))
    assert not (out / "checkpoints").exists() and not (out / ".model.tmp").exists()

    # a finished stage is not trained again
    same = {**_config(tiny_model_dir, data, out, max_steps=2), "pack_responses": True, "min_margin": 0.5,
            "eval_fraction": 0.25}
    same["lora"]["merge"] = False
    assert train(from_dict(RMStageConfig, same)) == metrics

    # the adapter dir loads (base + adapter with its score head) and scores
    rm = RewardModel.from_pretrained(out)
    scores = rm.score([[{"role": "user", "content": "Hi"}]] * 2, [{"role": "assistant", "content": "Hello!"},
                                                               [{"role": "assistant", "content": "What?"}]])
    assert len(scores) == 2 and all(map(torch.isfinite, torch.tensor(scores)))


def test_resume_from_the_last_checkpoint_after_a_crash(tmp_path, tiny_model_dir, monkeypatch):
    import rewards.model as rm_module

    data = _write(tmp_path / "prefs.jsonl", _signal_records(20))
    cfg = from_dict(RMStageConfig, _config(tiny_model_dir, data, tmp_path / "rm", max_steps=2, save_steps=2))

    def crash(*args, **kwargs):
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(rm_module.outdir, "save_model", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    out = tmp_path / "rm"
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert not (out / "DONE").exists() and not (out / "manifest.json").exists()
    assert not (out / "model.safetensors").exists()
    monkeypatch.undo()

    resumed_from = []
    original_train = rm_module._RMTrainer.train

    def spy(self, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original_train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(rm_module._RMTrainer, "train", spy)
    train(cfg)
    assert resumed_from == [str(out / "checkpoints" / "checkpoint-2")]
    assert (out / "DONE").is_file() and (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir):
    torch.manual_seed(0)  # the fresh score head
    return RewardModel.from_pretrained(tiny_model_dir)


def test_batched_length_sorted_scores_equal_one_by_one_in_input_order(tiny_rm):
    prompts = [[{"role": "user", "content": "word " * n}] for n in (3, 40, 1, 17, 8, 25, 2)]
    completions = [{"role": "assistant", "content": f"answer {'x' * n}"} for n in (9, 1, 30, 4, 12, 2, 20)]
    batched = tiny_rm.score(prompts, completions, batch_size=3)
    one_by_one = [tiny_rm.score([p], [c])[0] for p, c in zip(prompts, completions)]
    assert len(set(batched)) == 7  # a real comparison: the scores differ
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(one_by_one), atol=1e-5, rtol=0)


def test_score_inputs(tiny_rm):
    prompt = [{"role": "user", "content": "Hi"}]
    reply = {"role": "assistant", "content": "Hello there, friend."}
    assert tiny_rm.score([prompt], [reply]) == tiny_rm.score([prompt], [[reply]])  # a message or a message list
    ids = tiny_rm.encode(prompt, reply)
    assert tiny_rm.encode(prompt, reply, max_length=5) == ids[-5:]  # the start is cut, the scored end kept
    with_tools = tiny_rm.encode(prompt, reply, tools=["brave_search"])  # rendered with the tool system prompt
    assert len(with_tools) > len(ids) and with_tools[-len(ids) + 1:] == ids[1:]
    assert tiny_rm.score([prompt], [reply], tools=[["brave_search"]]) != tiny_rm.score([prompt], [reply])
    with pytest.raises(ValueError, match="2 prompts, 1 completions, 2 tool lists"):
        tiny_rm.score([prompt, prompt], [reply])
