"""Training stages and their output dirs: one seed gives byte-identical weights; a finished result is reused, refused
or replaced, never lost; Ctrl-C says where it stopped and how to resume. Every run is the tiny random model on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import sft
from posttrain.cli import main

SFT_RECORDS = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                             {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}
               for i in range(6)]
PAIRS = [{"id": f"p{i}", "prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}, I think."}
         for i in range(6)]
TRAIN = {"max_steps": 2, "batch_size": 2, "max_length": 64, "learning_rate": 1e-3, "logging_steps": 1,
         "report_to": ["none"], "seed": 7}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(stage: str, tmp_path: Path, out: str, **train) -> Path:
    """A config file for `stage` on the `tiny` random model (seeded), LoRA with dropout so the dropout RNG counts."""
    data = _write(tmp_path / "data.jsonl", SFT_RECORDS if stage == "sft" else PAIRS)
    cfg = {"model": {"path": "tiny", "dtype": "float32"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
           "train": {**TRAIN, **train, "output_dir": str(tmp_path / out)}}
    cfg["data"] = [str(data)] if stage == "rm" else [{"path": str(data)}]
    if stage == "rm":
        cfg["eval_fraction"] = 0.0
    path = tmp_path / f"{stage}-{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(out: Path) -> dict[str, torch.Tensor]:
    model_dir = out / "model" if (out / "model").is_dir() else out
    return load_file(model_dir / "model.safetensors")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_one_seed_gives_byte_identical_weights(stage, tmp_path):
    for out in ("a", "b"):
        assert main([stage, str(_config(stage, tmp_path, out))]) == 0
    assert main([stage, str(_config(stage, tmp_path, "c", seed=8))]) == 0
    a, b, c = (_weights(tmp_path / out) for out in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed does reach the weights


def _trainer(stage: str):
    """The trainer class whose `train` a stage calls."""
    from posttrain import dpo
    from rewards import model as rm

    return {"sft": sft._SFTTrainer, "dpo": dpo.LlamaDPOTrainer, "rm": rm._RMTrainer}[stage]


def _stat(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root`: its sha256 and its mtime, so that a file written again with the same bytes shows."""
    return {name: (digest, (root / name).stat().st_mtime_ns) for name, digest in _snapshot(root).items()}


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_a_finished_stage_is_returned_as_is_and_refused_with_another_config_or_data(stage, tmp_path, monkeypatch,
                                                                                   capsys):
    from posttrain.cli import STAGES
    from posttrain.config import load_config

    config = _config(stage, tmp_path, stage, max_steps=1)
    assert main([stage, str(config)]) == 0
    out, data = tmp_path / stage, tmp_path / "data.jsonl"
    finished, manifest = _stat(out), json.loads((out / "manifest.json").read_text())

    def retrain(self, *args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(_trainer(stage), "train", retrain)
    capsys.readouterr()
    # the same run, with the learning rate written as 1e-3, which YAML 1.1 reads as a string
    assert main([stage, str(config), "train.learning_rate=1e-3"]) == 0
    assert f"{stage}: {out} already holds this run, finished with the same config and data" in capsys.readouterr().out
    module, cls, entry, _ = STAGES[stage]
    cfg = load_config(getattr(__import__(module, fromlist=[cls]), cls), config)
    result = getattr(__import__(module, fromlist=[entry]), entry)(cfg)
    assert result == (manifest if stage == "dpo" else manifest["metrics"])
    assert _stat(out) == finished  # nothing retrained, rewritten or touched

    assert main([stage, str(config), "train.learning_rate=0.01", "lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert (f"holds a finished {stage.upper()} run of another config or other data (changed: lora.r, "
            "train.learning_rate); choose a new train.output_dir, or delete this one to redo it") in err
    _write(data, (SFT_RECORDS if stage == "sft" else PAIRS)[:4])
    assert main([stage, str(config)]) == 2
    assert f"(changed: the contents of {data});" in capsys.readouterr().err
    assert _stat(out) == finished


def test_a_finished_sft_without_done_trains_again_and_its_model_is_replaced_only_once_saved(tmp_path, monkeypatch):
    out = tmp_path / "sft"
    assert main(["sft", str(_config("sft", tmp_path, "sft", max_steps=1)), "lora.merge=false"]) == 0
    finished = _snapshot(out)
    assert {"adapter_config.json", "manifest.json", "DONE", ".posttrain.json"} <= set(finished)
    config = _config("sft", tmp_path, "sft", max_steps=2)
    assert main(["sft", str(config)]) == 2  # another config: refused while the dir is finished
    (out / "DONE").unlink()  # docs/errors-and-output-dirs.md: how a finished dir is trained further
    del finished["DONE"]

    def crash(self, *args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(sft._SFTTrainer, "train", crash)
    with pytest.raises(RuntimeError, match="went away"):  # not a user error: the traceback stays
        main(["sft", str(config)])
    after = _snapshot(out)
    assert {name: after.get(name) for name in finished} == finished  # model and manifest untouched
    monkeypatch.undo()

    assert main(["sft", str(config)]) == 0  # merged weights now: the old adapter must not linger beside them
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "manifest.json", "DONE"} <= names and "adapter_config.json" not in names
    assert ".model.tmp" not in names
    assert json.loads((out / "manifest.json").read_text())["metrics"]["steps"] == 2


@pytest.mark.parametrize(("old", "new"), [("1e-4", 0.0001), (1, 1.0), ("2e-4", 2.0e-4), ([1, "5e-1"], [1.0, 0.5]),
                                          ({"weight": 2}, {"weight": 2.0})])
def test_numbers_in_a_config_are_compared_by_value(old, new):
    from posttrain.outdir import changed_keys

    assert changed_keys({"train": {"learning_rate": old}}, {"train": {"learning_rate": new}}) == []


def test_a_changed_number_or_a_string_that_only_looks_like_one_is_a_change():
    from posttrain.outdir import changed_keys

    old = {"train": {"learning_rate": "1e-4", "seed": 1}, "name": "1e3", "data": [{"weight": 1}], "on": True}
    new = {"train": {"learning_rate": 0.001, "seed": 1}, "name": "1000", "data": [{"weight": 2}], "on": 1}
    assert changed_keys(old, new) == ["data", "name", "on", "train.learning_rate"]


def test_ctrl_c_names_the_dir_the_last_checkpoint_and_the_resume_command(tmp_path, monkeypatch, capsys):
    config = _config("sft", tmp_path, "sft", save_steps=1)

    def interrupted(self, *args, **kwargs):
        checkpoint = Path(self.args.output_dir) / "checkpoint-3"
        checkpoint.mkdir()
        (checkpoint / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(sft._SFTTrainer, "train", interrupted)
    assert main(["sft", str(config), "train.max_steps=5"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"posttrain sft: interrupted in {tmp_path / 'sft'}; last checkpoint: checkpoint-3; "
                        f"resume with: posttrain sft {config} train.max_steps=5")


def test_ctrl_c_in_a_run_names_its_first_unfinished_stage(tmp_path, monkeypatch, capsys):
    import rounds.orchestrator as orchestrator

    root = tmp_path / "runs" / "tiny"
    for stage, done in (("prefs", True), ("rm", True), ("samples", False)):
        (root / "round_01" / stage).mkdir(parents=True)
        if done:
            (root / "round_01" / stage / "DONE").write_text("")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "runs_dir": str(tmp_path / "runs"),
                                      "model": {"path": "tiny", "dtype": "float32"}}))

    def interrupted(cfg, force=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(orchestrator, "run", interrupted)
    assert main(["run", str(config), "rounds=2"]) == 130
    assert capsys.readouterr().err.strip().endswith(f"posttrain run: interrupted in {root}; unfinished: "
                                                    f"round_01/samples; resume with: posttrain run {config} rounds=2")
