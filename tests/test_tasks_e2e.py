"""A task a user brings as YAML + JSONL, with their own verifier as module:function, runs a whole round of the loop
on the real SmolLM2: every stage finishes, RS keeps only what the user's verifier passes, and no train prompt is an
eval prompt."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main

VERIFIER = '''
def says_the_product(message, meta):
    """1.0 when the reply contains the product as a whole number."""
    import re
    return float(str(meta["answer"]) in re.findall(r"\\d+", message["content"]))
'''


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # one round on SmolLM2 on the CPU
def test_a_yaml_and_jsonl_task_with_a_user_verifier_runs_a_round(smollm2_dir, tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    records = [{"question": f"What is {a} times {b}?", "product": a * b} for a in (2, 3, 4) for b in (5, 6, 7, 8)]
    data = tmp_path / "times.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "name": "times", "runs_dir": str(tmp_path / "runs"), "model": {"path": str(smollm2_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8}, "rounds": 1,
        "task": {"name": "times", "train": [str(data)], "template": "{question} Reply with just the number.",
                 "answer_field": "product", "verifier": "my_checks:says_the_product",
                 "eval_prompts": 4, "pref_prompts": 4, "rs_prompts": 4},
        "prefs": {"k": 4, "temperature": 1.0, "max_new_tokens": 8},
        "rm": {"train": {"max_steps": 1, "batch_size": 2, "report_to": ["none"]}, "eval_fraction": 0.0},
        "rs": {"k": 4, "temperature": 1.0, "max_new_tokens": 8, "shard_size": 4},
        "sft": {"train": {"max_steps": 1, "batch_size": 2, "max_length": 64, "report_to": ["none"]}},
        "dpo": {"train": {"max_steps": 1, "batch_size": 2, "max_length": 64, "report_to": ["none"]}},
        "evals": [{"name": "heldout", "max_new_tokens": 8}],
    }
    path = tmp_path / "times.yaml"
    path.write_text(yaml.safe_dump(config))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(path)]) == 0
    root = tmp_path / "runs" / "times" / "round_01"
    for stage in ("prefs", "rm", "samples", "sft", "dpo"):
        assert (root / stage / "DONE").is_file(), stage
    rs = json.loads((root / "samples" / "manifest.json").read_text())["metrics"]
    assert rs["gates"] == {"task_verifier": 1.0} and rs["prompts"] == 4
    kept = _read_jsonl(root / "samples" / "sft.jsonl")
    products = {r["question"]: r["product"] for r in records}
    for record in kept:  # only replies the user's verifier passed
        question = record["messages"][0]["content"].removesuffix(" Reply with just the number.")
        assert str(products[question]) in record["messages"][-1]["content"]
    evals = [json.loads((tmp_path / "runs" / "times" / f"round_0{r}" / "eval.json").read_text()) for r in (0, 1)]
    assert all(e["evals"]["heldout"]["num_prompts"] == 4 and 0 <= e["accuracy"] <= 1 for e in evals)
    trained = [p for stage in ("prefs", "samples") for p in _read_jsonl(root / stage / "prompts.jsonl")]
    assert len(trained) == 8
    # ids end in the rendered prompt's hash: an eval prompt trained on would share it
    held = {res["id"].rsplit("-", 1)[1] for res in evals[0]["results"]}
    assert len(held) == 4 and not held & {p["id"].rsplit("-", 1)[1] for p in trained}
