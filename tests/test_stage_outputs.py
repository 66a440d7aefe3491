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


def test_a_finished_rm_is_reused_with_its_config_and_refused_with_another(tmp_path, capsys):
    config = _config("rm", tmp_path, "rm", max_steps=1)
    assert main(["rm", str(config)]) == 0
    out = tmp_path / "rm"
    finished = _snapshot(out)

    assert main(["rm", str(config)]) == 0  # the same run: returned as is, nothing rewritten
    assert _snapshot(out) == finished
    assert main(["rm", str(config), "train.learning_rate=0.01"]) == 2
    assert "finished RM run of another config or other data (changed: train.learning_rate)" in capsys.readouterr().err
    _write(tmp_path / "data.jsonl", PAIRS[:4])
    assert main(["rm", str(config)]) == 2
    assert "(changed: the contents of the data files)" in capsys.readouterr().err
    assert _snapshot(out) == finished


def test_a_failed_sft_rerun_keeps_the_finished_model_and_a_good_one_replaces_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sft"
    assert main(["sft", str(_config("sft", tmp_path, "sft", max_steps=1)), "lora.merge=false"]) == 0
    finished = _snapshot(out)
    assert {"adapter_config.json", "manifest.json", "DONE", ".posttrain.json"} <= set(finished)
    assert main(["sft", str(_config("sft", tmp_path, "sft", max_steps=1)), "lora.merge=false"]) == 0
    assert _snapshot(out) == finished  # the same config and data: the finished run is returned as is

    def crash(self, *args, **kwargs):
        raise RuntimeError("the machine went away")

    config = _config("sft", tmp_path, "sft", max_steps=2)
    monkeypatch.setattr(sft._SFTTrainer, "train", crash)
    with pytest.raises(RuntimeError, match="went away"):  # not a user error: the traceback stays
        main(["sft", str(config)])
    after = _snapshot(out)
    assert {name: after.get(name) for name in finished} == finished  # model, manifest and DONE untouched
    monkeypatch.undo()

    assert main(["sft", str(config)]) == 0  # merged weights now: the old adapter must not linger beside them
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "manifest.json", "DONE"} <= names and "adapter_config.json" not in names
    assert json.loads((out / "manifest.json").read_text())["metrics"]["steps"] == 2


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
