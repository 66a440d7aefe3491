"""A whole tiny `posttrain run` round under `accelerate launch` with 2 CPU processes (DDP over gloo) against the same
round in one process: every record file byte-identical, every stage finished, the training losses equal within
float32 reduction noise, and only process 0 writing the run's config, manifests, markers, evals and report. The
2-process run is killed first: process 1 dies as it writes its RS shard, and the same command, run again, resumes.

RS scores with a rule (does the response start with a space) rather than the round's reward model: two processes
reduce the RM's gradients in another order, and rewards a few ulps apart would change the bytes of every shard.
Each process takes half of every global batch (per-device batch 1 against 2 in the one-process run).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from multiproc import launch
from posttrain.cli import main
from test_orchestrator import STAGE_DIRS, eval_without_timing, tiny_run_config, write_given_prefs

# Loss of the same step in one process and in two: the two sum their halves of a global batch in another order.
LOSS_TOLERANCE = 1e-4
HALF_BATCH = [f"{stage}.train.batch_size=1" for stage in ("rm", "sft", "dpo")]
RANK_0_ONLY = ("manifest.json", "DONE", ".posttrain.json", "config.yaml", "eval.json", "report.html", "report.png")


def one_round_config(tmp: Path, model_dir: Path) -> Path:
    tmp.mkdir()
    config = tiny_run_config(model_dir, tmp / "runs", write_given_prefs(tmp / "given.jsonl"), rounds=1)
    config["rs"]["rewards"] = [{"kind": "regex", "options": {"pattern": "^ "}}]
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.jsonl"))}


def losses(stage_dir: Path) -> dict[str, float]:
    """The loss metrics of a stage's manifest (train, eval, first and last logged, DPO's parts)."""
    metrics = json.loads((stage_dir / "manifest.json").read_text())["metrics"]
    return {k: v for k, v in metrics.items() if "loss" in k or k == "nll"}


@pytest.mark.slow  # a round in one process, then in two launched ones: ~90-120 s on 2 cores
def test_two_processes_run_a_round_like_one(tmp_path, tiny_model_dir):
    one = tmp_path / "one"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(one_round_config(one, tiny_model_dir))]) == 0
    two = tmp_path / "two"
    argv = ["run", str(one_round_config(two, tiny_model_dir)), *HALF_BATCH]
    killed = launch(argv, tmp_path / "killed", kill=(1, "round_01/samples/samples/shard-00001"))
    ref, got = one / "runs" / "tiny", two / "runs" / "tiny"
    assert not (got / "round_01" / "samples" / "DONE").exists()
    kept = {p: p.stat().st_mtime_ns for stage in ("prefs", "rm") for p in (got / "round_01" / stage).rglob("*")}
    writes = launch(argv, tmp_path / "writes")

    assert kept and {p: p.stat().st_mtime_ns for p in kept} == kept  # stages finished before the kill: kept as they are
    assert records(got) == records(ref) and "round_01/samples/sft.jsonl" in records(ref)
    for stage in STAGE_DIRS:
        assert (got / "round_01" / stage / "DONE").is_file(), stage
    for stage in ("rm", "sft", "dpo"):
        manifest = json.loads((got / "round_01" / stage / "manifest.json").read_text())
        assert manifest["metrics"]["world_size"] == 2, stage
        expected = losses(ref / "round_01" / stage)
        assert expected and losses(got / "round_01" / stage) == pytest.approx(expected, abs=LOSS_TOLERANCE), stage
    assert eval_without_timing(got / "round_00" / "eval.json") == eval_without_timing(ref / "round_00" / "eval.json")
    assert (got / "round_01" / "eval.json").is_file() and (got / "report.html").is_file()

    assert any(p.name == "DONE" for p in writes[0])
    by_rank_1 = [p for p in killed[1] + writes[1] if p.name in RANK_0_ONLY]
    assert by_rank_1 == [], by_rank_1
    # process 1 samples every other RS shard itself
    assert got.resolve() / "round_01/samples/samples/shard-00001.jsonl" in writes[1]
