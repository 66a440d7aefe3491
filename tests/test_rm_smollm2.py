"""Reward model end to end on the real SmolLM2-135M-Instruct: correct vs wrong two-digit sums, LoRA, packed rows."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.config import from_dict
from rewards.model import RewardModel, RMStageConfig, train

# LoRA on the last layers only: backward then stops there, which keeps this CPU test to about a forward's cost.
LAST_LAYERS = ["layers.28.mlp.down_proj", "layers.29.self_attn.q_proj", "layers.29.self_attn.v_proj",
               "layers.29.mlp.up_proj", "layers.29.mlp.down_proj"]


def addition_pairs(n: int, seed: int = 0) -> list[dict]:
    """"What is a + b?" -> chosen "a + b = a+b", rejected the same line with another sum in 20..198."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = rng.choice([s for s in range(20, 199) if s != a + b])
        records.append({"id": f"add-{i}", "prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}",
                        "rejected": f"{a} + {b} = {wrong}"})
    return records


@pytest.mark.slow
def test_smollm2_rm_on_addition_reports_held_out_accuracy(tmp_path, smollm2_dir):
    data = tmp_path / "addition.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_pairs(120)))
    cfg = from_dict(RMStageConfig, {
        "model": {"path": str(smollm2_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "target_modules": LAST_LAYERS},
        "data": [str(data)],
        "pack_responses": True,
        "eval_fraction": 0.2,
        "train": {"output_dir": str(tmp_path / "rm"), "learning_rate": 1e-2, "batch_size": 8, "max_steps": 12,
                  "warmup_ratio": 0.1, "logging_steps": 5},
    })
    metrics = train(cfg)
    print(f"SmolLM2 RM held-out pairwise accuracy: {metrics['eval_accuracy']:.3f} on {metrics['eval_pairs']} pairs "
          f"(train loss {metrics['train_loss']:.3f}, held-out loss {metrics['eval_loss']:.3f})")
    assert metrics["eval_pairs"] + metrics["train_pairs"] == 120 and 12 <= metrics["eval_pairs"] <= 36  # by prompt
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    manifest = json.loads((tmp_path / "rm" / "manifest.json").read_text())
    assert manifest["metrics"]["eval_accuracy"] == metrics["eval_accuracy"]

    rm = RewardModel.from_pretrained(tmp_path / "rm")
    prompt = [{"role": "user", "content": "What is 37 + 45?"}]
    scores = rm.score([prompt, prompt], [{"role": "assistant", "content": "37 + 45 = 82"},
                                         {"role": "assistant", "content": "37 + 45 = 83"}])
    print(f"rm('37 + 45 = 82') = {scores[0]:.3f}, rm('37 + 45 = 83') = {scores[1]:.3f}")
    assert len(scores) == 2
