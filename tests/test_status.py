"""`posttrain status`: a hand-written run dir read back: stages, skips with reasons, what runs next, scores, the
latest policy, disk used."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from posttrain.cli import main
from posttrain.config import load_config, to_dict
from rounds.orchestrator import ROUND_STEPS
from rounds.run_config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def _config(root: Path, rounds: int) -> None:
    cfg = load_config(RunConfig, ROOT / "configs" / "quickstart.yaml",
                      [f"rounds={rounds}", "model.path=tiny", f"runs_dir={root.parent}", f"name={root.name}"])
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _stage(d: Path, manifest: dict, *, done: bool = True, model: str | None = None) -> None:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps(manifest))
    if model is not None:
        (d / model).mkdir(parents=True, exist_ok=True)
        (d / model / "config.json").write_text("{}")
    if done:
        (d / "DONE").write_text("")


def _eval(d: Path, accuracy: float, others: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    evals = {"heldout": {"accuracy": accuracy}, **{k: {"accuracy": v} for k, v in others.items()}}
    (d / "eval.json").write_text(json.dumps({"accuracy": accuracy, "evals": evals}))


def fake_run(root: Path) -> Path:
    _config(root, rounds=2)
    _eval(root / "round_00", 0.0859, {})
    r1 = root / "round_01"
    for stage in ("prefs", "rm", "samples"):
        _stage(r1 / stage, {"stage": stage, "metrics": {}})
    _stage(r1 / "sft", {"stage": "sft"}, model=".")
    _stage(r1 / "dpo", {"stage": "dpo"}, model="model")
    _eval(r1, 0.3125, {"pass8": 0.5})
    r2 = root / "round_02"
    _stage(r2 / "prefs", {"stage": "prefs", "skipped": "no prompts left to label"})
    _stage(r2 / "rm", {"stage": "rm"}, done=False)
    (r2 / "rm" / "weights.bin").write_bytes(b"\0" * 2_000_000)
    return root


def _rounds(lines: list[str]) -> dict[str, dict[str, str]]:
    """{round line: {stage: state}} from status output."""
    rounds: dict[str, dict[str, str]] = {}
    for line in lines:
        if line.startswith("round "):
            current = rounds.setdefault(line, {})
        elif line.startswith("  "):
            stage, state = line.strip().split(None, 1)
            current[stage] = state
    return rounds


def test_status_of_a_run_that_stopped_in_round_2(tmp_path, capsys):
    root = fake_run(tmp_path / "runs" / "fake")
    assert main(["status", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"run {root} (2 rounds)"
    rounds = _rounds(lines)
    assert list(rounds) == ["round 00 (the base model)", "round 01", "round 02"]
    assert rounds["round 00 (the base model)"] == {"eval": "done: accuracy 8.6%, heldout 8.6%"}
    assert all(list(stages) == list(ROUND_STEPS) for name, stages in rounds.items() if name != lines[1])
    assert {k: v for k, v in rounds["round 01"].items() if k != "synth"} == {
        "prefs": "done", "rm": "done", "samples": "done", "sft": "done", "dpo": "done", "average": "off",
        "eval": "done: accuracy 31.2%, heldout 31.2%, pass8 50.0%"}
    assert {k: v for k, v in rounds["round 02"].items() if k != "synth"} == {
        "prefs": "skipped: no prompts left to label", "rm": "started, not finished", "samples": "not started",
        "sft": "not started", "dpo": "not started", "average": "off", "eval": "not started"}
    tail = [line for line in lines if not line.startswith(("run ", "round ", "  "))]
    assert tail[:2] == [f"next: round 02 rm ({root / 'round_02' / 'rm'})",
                        f"policy: {root / 'round_01' / 'dpo' / 'model'}"]  # the latest DPO model, not SFT's
    assert tail[2].startswith("disk: 2.0 MB (round_00 ") and "round_02 2.0 MB" in tail[2]
    assert len(tail) == 3


def test_a_finished_run_says_nothing_runs_next_and_names_its_soup(tmp_path, capsys):
    root = tmp_path / "runs" / "done"
    _config(root, rounds=1)
    _eval(root / "round_00", 0.25, {})
    r1 = root / "round_01"
    for stage in ("prefs", "rm", "samples", "sft"):
        _stage(r1 / stage, {"stage": stage}, model="." if stage == "sft" else None)
    _stage(r1 / "dpo", {"stage": "dpo", "skipped": "no preference pairs this round"})
    _eval(r1, 0.5, {})
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  dpo      skipped: no preference pairs this round" in out
    assert out[-3:-1] == ["next: nothing; every round is done (raise rounds to continue the run)",
                          f"policy: {r1 / 'sft'}"]  # DPO skipped: the round's SFT model is its policy


def test_not_a_run_dir_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"posttrain status: error: {tmp_path}: no config.yaml, so not a run dir "
                                       "(posttrain run writes it first)\n")
