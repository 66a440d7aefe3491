"""`posttrain run` on a tiny random Llama 3 model with the real tokenizer: the CLI writes every stage, the eval and
the report; the RM carries every round's pairs over while DPO sees only the latest; a run killed at every stage
boundary and in the middle of RS and SFT resumes to exactly what an uninterrupted run produces.

The tiny model never answers a sum, so the task's verifier would label nothing: preferences are labelled by a rule
that splits its random text (the response starts with a space), and six hand-written pairs are given for round 1.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from posttrain import sft
from posttrain.cli import main
from posttrain.config import from_dict, load_config, to_dict
from rounds import orchestrator, rejection
from rounds.run_config import RunConfig

STAGE_DIRS = ("prefs", "rm", "samples", "sft", "dpo")
RECORD_FILES = ("prefs/pairs.jsonl", "samples/sft.jsonl", "samples/pairs.jsonl", "samples/samples/shard-00000.jsonl",
                "samples/samples/shard-00001.jsonl")


def tiny_run_config(model_dir: Path, runs_dir: Path, given: Path, rounds: int = 2) -> dict:
    return {
        "name": "tiny",
        "runs_dir": str(runs_dir),
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "rounds": rounds,
        "task": {"rs_prompts": 4, "pref_prompts": 4, "eval_prompts": 8},
        "prefs": {"rounds": [1, 2], "labeler": "judge", "judge": [{"kind": "regex", "options": {"pattern": "^ "}}],
                  "k": 3, "max_new_tokens": 8, "keep_truncated": True, "given": {1: [str(given)]}},
        "rm": {"train": {"max_steps": 2, "batch_size": 2, "report_to": ["none"]}},
        # the tiny model never answers a sum: the task verifier only audits RS (as a gate it would reject every sample)
        "rs": {"k": 3, "max_new_tokens": 8, "keep_truncated": True, "shard_size": 2, "task_verifier": "audit"},
        "sft": {"train": {"max_steps": 2, "save_steps": 1, "batch_size": 2, "max_length": 128, "learning_rate": 1e-3,
                          "report_to": ["none"]}},
        "dpo": {"train": {"max_steps": 2, "batch_size": 2, "max_length": 128, "report_to": ["none"]}},
        "evals": [{"max_new_tokens": 8}],
    }


def write_given_prefs(path: Path) -> Path:
    records = [{"id": f"given-{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
                "chosen": [{"role": "assistant", "content": str(2 * i)}],
                "rejected": [{"role": "assistant", "content": str(2 * i + 1)}]} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_without_timing(path: Path) -> dict:
    data = json.loads(path.read_text())
    data["evals"] = {name: {k: v for k, v in m.items() if k != "seconds"} for name, m in data["evals"].items()}
    return {k: v for k, v in data.items() if k not in ("seconds", "policy")}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    """Two uninterrupted rounds through the CLI: (run dir, printed output, exit code)."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny_run_config(tiny_model_dir, tmp / "runs", write_given_prefs(tmp / "given.jsonl"))
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", str(path)])
    return tmp / "runs" / "tiny", out.getvalue(), code


@pytest.mark.slow  # two tiny rounds end to end, > 20 s on 2 cores
def test_cli_writes_config_stage_dirs_evals_report_and_prints_the_table(reference_run):
    root, printed, code = reference_run
    assert code == 0
    resolved = yaml.safe_load((root / "config.yaml").read_text())
    assert resolved["rounds"] == 2 and resolved["rs"]["k"] == 3 and resolved["task"]["eval_prompts"] == 8
    for r in (1, 2):
        for stage in STAGE_DIRS:
            assert (root / f"round_{r:02d}" / stage / "DONE").is_file(), (r, stage)
            assert json.loads((root / f"round_{r:02d}" / stage / "manifest.json").read_text())
        assert not (root / f"round_{r:02d}" / "average").exists()  # the round soup is off
    evals = [json.loads((root / f"round_{r:02d}" / "eval.json").read_text()) for r in (0, 1, 2)]
    assert [e["num_prompts"] for e in evals] == [8, 8, 8]
    assert [e["policy"] for e in evals] == [resolved["model"]["path"], str(root / "round_01" / "dpo" / "model"),
                                            str(root / "round_02" / "dpo" / "model")]
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (root / "report.html").read_text()
    table = printed[printed.index("   round  eval acc"):].splitlines()
    base, one, two = table[2:5]
    assert base.split()[:3] == ["0", "(base)", f"{evals[0]['accuracy']:.1%}"]
    assert one.split()[:2] == ["1", f"{evals[1]['accuracy']:.1%}"]
    assert two.split()[:2] == ["2", f"{evals[2]['accuracy']:.1%}"]
    rs = json.loads((root / "round_02" / "samples" / "manifest.json").read_text())["metrics"]
    assert two.split()[6:8] == [str(rs["kept"]), str(rs["pairs"])]


@pytest.mark.slow  # two tiny rounds end to end, > 20 s on 2 cores
def test_each_round_samples_from_the_last_policy_and_trains_sft_from_the_base(reference_run):
    root, _, _ = reference_run
    base = yaml.safe_load((root / "config.yaml").read_text())["model"]["path"]
    manifest = {(r, s): json.loads((root / f"round_{r:02d}" / s / "manifest.json").read_text())
                for r in (1, 2) for s in STAGE_DIRS}
    assert manifest[1, "samples"]["inputs"]["policy"] == base
    assert manifest[2, "samples"]["inputs"]["policy"] == str(root / "round_01" / "dpo" / "model")
    assert manifest[2, "prefs"]["inputs"]["policy"] == str(root / "round_01" / "dpo" / "model")
    assert manifest[2, "samples"]["config"]["rewards"][0]["path"] == str(root / "round_02" / "rm")
    assert manifest[1, "sft"]["model"]["path"] == manifest[2, "sft"]["model"]["path"] == base
    sft_2 = str(root / "round_02" / "sft")
    assert manifest[2, "dpo"]["inputs"]["model"] == manifest[2, "dpo"]["inputs"]["reference"] == sft_2
    assert [i["path"] for i in manifest[2, "sft"]["inputs"]] == [str(root / "round_01" / "samples" / "sft.jsonl"),
                                                               str(root / "round_02" / "samples" / "sft.jsonl")]


@pytest.mark.slow  # two tiny rounds end to end, > 20 s on 2 cores
def test_rm_sees_all_pairs_so_far_and_dpo_only_this_rounds(reference_run):
    root, _, _ = reference_run
    given = str(Path(root).parents[1] / "given.jsonl")
    pairs = {(r, s): str(root / f"round_{r:02d}" / s / "pairs.jsonl") for r in (1, 2) for s in ("prefs", "samples")}
    for key, path in pairs.items():
        assert read_jsonl(Path(path)), f"{key} has pairs"  # otherwise the run skips the file
    rm = {r: json.loads((root / f"round_{r:02d}" / "rm" / "manifest.json").read_text()) for r in (1, 2)}
    assert list(rm[1]["inputs"]) == [given, pairs[1, "prefs"]]
    assert list(rm[2]["inputs"]) == [given, pairs[1, "prefs"], pairs[1, "samples"], pairs[2, "prefs"]]
    dpo = {r: json.loads((root / f"round_{r:02d}" / "dpo" / "manifest.json").read_text()) for r in (1, 2)}
    assert [d["path"] for d in dpo[1]["inputs"]["data"]] == [given, pairs[1, "prefs"], pairs[1, "samples"]]
    assert [d["path"] for d in dpo[2]["inputs"]["data"]] == [pairs[2, "prefs"], pairs[2, "samples"]]


class Killed(Exception):
    """A kill injected by the test."""


class KillAtFirstCheckpoint(TrainerCallback):
    def __init__(self, kills: list):
        self.kills = kills

    def on_save(self, args, state, control, **kwargs):
        if "mid-sft" not in self.kills:
            self.kills.append("mid-sft")
            raise Killed(f"killed after checkpoint-{state.global_step}")


def inject_kills(monkeypatch, kills: list) -> None:
    """Kill once after each stage of rounds 0-1, after the first RS shard, and after SFT's first checkpoint."""
    for stage, step in list(orchestrator.ROUND_STEPS.items()):
        def after(run, rcfg, r, stage=stage, step=step):
            step(run, rcfg, r)
            if (r, stage) not in kills:
                kills.append((r, stage))
                raise Killed(f"killed after round {r} {stage}")
        monkeypatch.setitem(orchestrator.ROUND_STEPS, stage, after)

    real_shard = rejection._sample_shard

    def shard(cfg, model, tokenizer, composer, records, path):
        real_shard(cfg, model, tokenizer, composer, records, path)
        if Path(cfg.output_dir).name == "samples" and "mid-rs" not in kills:
            kills.append("mid-rs")
            raise Killed(f"killed after {path.name}")

    real_build = sft._build_trainer

    def build(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        trainer.add_callback(KillAtFirstCheckpoint(kills))
        return trainer

    monkeypatch.setattr(rejection, "_sample_shard", shard)
    monkeypatch.setattr(sft, "_build_trainer", build)


@pytest.mark.slow  # two tiny rounds end to end, > 20 s on 2 cores
def test_killed_at_every_boundary_and_mid_stage_resumes_to_the_uninterrupted_result(reference_run, tiny_model_dir,
                                                                                   tmp_path, monkeypatch, capsys):
    reference, _, _ = reference_run
    given = write_given_prefs(tmp_path / "given.jsonl")
    cfg = from_dict(RunConfig, tiny_run_config(tiny_model_dir, tmp_path / "runs", given, rounds=1))
    # The reference's round 1 read its given pairs from another path; the records are the same.
    kills: list = []
    inject_kills(monkeypatch, kills)
    for _ in range(12):
        try:
            assert orchestrator.run(cfg) == 0
            break
        except Killed:
            continue
    assert kills == [(0, "eval"), (1, "prefs"), (1, "rm"), "mid-rs", (1, "samples"), "mid-sft", (1, "sft"),
                     (1, "dpo"), (1, "eval")]
    root = tmp_path / "runs" / "tiny"
    r1, ref1 = root / "round_01", reference / "round_01"
    assert json.loads((r1 / "sft" / "manifest.json").read_text())["metrics"]["start_step"] == 1  # resumed
    for name in RECORD_FILES:
        assert (r1 / name).read_text() == (ref1 / name).read_text(), name
    prompt_ids = [p["id"] for p in read_jsonl(r1 / "samples" / "prompts.jsonl")]
    assert [r["id"] for r in read_jsonl(r1 / "samples" / "sft.jsonl")] == prompt_ids  # none lost, none twice
    pair_ids = [r["id"] for r in read_jsonl(r1 / "samples" / "pairs.jsonl")]
    assert len(set(pair_ids)) == len(pair_ids) and set(pair_ids) <= set(prompt_ids)
    for r in (0, 1):
        assert eval_without_timing(root / f"round_{r:02d}" / "eval.json") == \
            eval_without_timing(reference / f"round_{r:02d}" / "eval.json")
    for model in ("rm/model.safetensors", "sft/model.safetensors", "dpo/model/model.safetensors"):
        ours, theirs = load_file(r1 / model), load_file(ref1 / model)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=f"{model}: {key}")

    capsys.readouterr()
    monkeypatch.undo()
    assert orchestrator.run(cfg) == 0  # finished: a rerun keeps every stage
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, kept") == 7


def test_a_run_config_compares_numbers_by_value_and_names_the_changed_key(tmp_path):
    # a section of free settings keeps 2e-4 as YAML 1.1 reads it: the string '2e-4'
    started = {"name": "tiny", "rounds": 1, "rm": {"train": {"learning_rate": "2e-4", "max_steps": 1}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(started))
    run_dir = orchestrator.RunDir(tmp_path)
    run_dir.check({**started, "rm": {"train": {"learning_rate": 2.0e-4, "max_steps": 1.0}}}, [])
    with pytest.raises(ValueError, match=r"\(changed: rm.train.learning_rate\); pass --force"):
        run_dir.check({**started, "rounds": 2, "rm": {"train": {"learning_rate": 3e-4, "max_steps": 1}}}, [])


def test_changed_config_is_refused_and_force_redoes_the_named_stages(tiny_model_dir, tmp_path, capsys):
    given = write_given_prefs(tmp_path / "given.jsonl")
    config = tiny_run_config(tiny_model_dir, tmp_path / "runs", given, rounds=2)
    root = tmp_path / "runs" / "tiny"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(to_dict(from_dict(RunConfig, config)), sort_keys=False))
    for r in (1, 2):
        for stage in STAGE_DIRS:
            (root / f"round_{r:02d}" / stage).mkdir(parents=True)
            (root / f"round_{r:02d}" / stage / "DONE").write_text("")
        (root / f"round_{r:02d}" / "eval.json").write_text("{}")
    (root / "round_00").mkdir()
    (root / "round_00" / "eval.json").write_text("{}")
    changed = from_dict(RunConfig, {**config, "rs": {**config["rs"], "temperature": 0.6}})
    assert orchestrator.run(changed) == 2
    assert "changed: rs" in capsys.readouterr().out
    orchestrator.RunDir(root).check(to_dict(from_dict(RunConfig, {**config, "rounds": 3})), [])  # more rounds: fine

    orchestrator.RunDir(root).prepare(to_dict(changed), ["eval"])
    assert not (root / "round_00" / "eval.json").exists()
    assert [sorted(p.name for p in (root / f"round_{r:02d}").iterdir()) for r in (1, 2)] == [sorted(STAGE_DIRS)] * 2
    (root / "round_00" / "eval.json").write_text("{}")
    orchestrator.RunDir(root).prepare(to_dict(changed), ["samples"])
    assert (root / "round_00" / "eval.json").is_file()  # the base model's eval stands
    # round 1 keeps what came before RS; round 2 sampled from round 1's policy, which changes: it is redone whole
    assert sorted(p.name for p in (root / "round_01").iterdir()) == ["prefs", "rm"]
    assert list((root / "round_02").iterdir()) == []
    assert load_config(RunConfig, root / "config.yaml").rs["temperature"] == 0.6
