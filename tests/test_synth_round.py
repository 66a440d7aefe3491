"""Teacher-made data inside a round, on the real SmolLM2 as teacher: every eval prompt planted among the synth
prompts is removed by decontamination, the SFT set holds the sources in the weights of sft.mix, and a round killed
inside the synth step resumes without redoing a finished builder."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from rounds import synth_step


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ask(a: int, b: int) -> str:
    return f"Please work out the product of {a} and {b} and reply with the number only."


def test_mix_weights_and_source_tags():
    assert synth_step.mix_weight({"rs": 2, "synth": 0.5}, "synth:code") == 0.5
    assert synth_step.mix_weight({"synth:code": 3, "synth": 0.5}, "synth:code") == 3.0
    assert synth_step.mix_weight({}, "given") == 1.0
    assert synth_step.source_tag("runs/x/round_02/samples/sft.jsonl") == "rs"
    assert synth_step.source_tag("runs/x/round_02/synth/b01-tooluse/sft.jsonl") == "synth:tooluse"
    assert synth_step.source_tag("data/mine.jsonl") == "given"


@pytest.mark.slow  # one round on SmolLM2 on the CPU, run twice around a kill
def test_a_round_with_a_synth_step_decontaminates_mixes_and_resumes(smollm2_dir, tmp_path, monkeypatch):
    pairs = [(a, b) for a in (3, 4, 6, 7) for b in (12, 13, 14, 15)]
    records = [{"question": _ask(a, b), "answer": a * b} for a, b in pairs]
    train, evals = _jsonl(tmp_path / "train.jsonl", records[4:]), _jsonl(tmp_path / "eval.jsonl", records[:4])
    planted = [{"id": f"planted-{i}", "messages": [{"role": "user", "content": r["question"]}]}
               for i, r in enumerate(records[:4])]
    fresh = [{"id": f"fresh-{i}", "messages": [{"role": "user", "content": text}]} for i, text in
             enumerate(["Name a colour.", "Say hello.", "Give one word for joy.", "Name a fruit."])]
    synth_prompts = _jsonl(tmp_path / "synth-prompts.jsonl", planted + fresh)
    builder = {"kind": "general", "prompts": {"method": "file", "prompts_path": str(synth_prompts)},
               "responses": {"k": 1, "sampling": {"temperature": 0.7, "max_new_tokens": 16}},
               "curate": {"judge": {"enabled": False, "require_high_quality": False}, "dedup": {"enabled": False}}}
    config = {
        "name": "synth", "runs_dir": str(tmp_path / "runs"), "model": {"path": str(smollm2_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8}, "rounds": 1,
        "task": {"train": [str(train)], "eval": [str(evals)], "template": "{question}", "eval_prompts": 4,
                 "pref_prompts": 4, "rs_prompts": 6},
        "stages": {"rm": False, "dpo": False}, "prefs": {"rounds": []},
        "rs": {"k": 2, "max_new_tokens": 8, "rewards": [{"kind": "regex", "options": {"pattern": "\\d"}}],
               "keep_truncated": True, "task_verifier": "audit"},
        "synth": {"builders": [builder, {**builder, "seed": 7}]},
        "sft": {"mix": {"rs": 2.0, "synth": 0.5}, "eval_fraction": 0.0,
                "train": {"max_steps": 1, "batch_size": 2, "max_length": 96, "report_to": ["none"]}},
        "evals": [{"name": "heldout", "max_new_tokens": 8}],
    }
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(config))

    import synth.pipeline as pipeline

    real, calls = pipeline.synthesize, []

    def killed_at_the_second_builder(cfg, teacher, judge=None):
        calls.append(Path(cfg.output_dir).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(cfg, teacher, judge)

    monkeypatch.setattr(pipeline, "synthesize", killed_at_the_second_builder)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(path)]) == 130
        root = tmp_path / "runs" / "synth" / "round_01"
        first = (root / "synth" / "b00-general" / "sft.jsonl").read_text()
        assert (root / "synth" / "b00-general" / "DONE").is_file() and not (root / "synth" / "DONE").exists()
        assert main(["run", str(path)]) == 0
    assert calls == ["b00-general", "b01-general", "b01-general"]  # the finished builder is not redone
    assert (root / "synth" / "b00-general" / "sft.jsonl").read_text() == first
    manifest = json.loads((root / "synth" / "manifest.json").read_text())
    assert manifest["metrics"]["decontaminated"] == 8  # both builders: all 4 planted eval prompts, none missed
    for b in ("b00-general", "b01-general"):
        kept = [json.loads(line) for line in (root / "synth" / b / "sft.jsonl").read_text().splitlines()]
        assert {r["messages"][0]["content"] for r in kept} <= {p["messages"][0]["content"] for p in fresh}
    sft = json.loads((root / "sft" / "manifest.json").read_text())
    by_tag = {}
    for source in sft["inputs"]:
        by_tag.setdefault(synth_step.source_tag(source["path"]), []).append(source)
    assert set(by_tag) == {"rs", "synth:general"}
    for tag, weight in (("rs", 2.0), ("synth:general", 0.5)):
        for source in by_tag[tag]:
            assert source["weight"] == weight
            assert abs(source["train_examples"] - weight * source["records"]) < 1  # within rounding
    assert synth_step.mix_as_trained(sft) == {tag: sum(s["train_examples"] for s in group)
                                              for tag, group in by_tag.items()}
