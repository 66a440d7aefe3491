"""The `posttrain` command's own messages: an unknown command, and each stage's config keys under --help."""

from __future__ import annotations

import pytest

from posttrain.cli import STAGES, TOOLS, main
from posttrain.config_reference import config_keys
from posttrain.sft import SFTStageConfig


def test_an_unknown_command_is_one_line_naming_every_command(capsys):
    assert main(["trian", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == f"posttrain: error: unknown command 'trian'; commands: {', '.join([*STAGES, *TOOLS])}\n"


def test_no_command_prints_the_usage_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: posttrain COMMAND") and all(f"  {name} " in out for name in [*STAGES, *TOOLS])


def test_config_keys_walk_nested_sections_and_lists():
    keys = {k.key: k for k in config_keys(SFTStageConfig)}
    assert keys["train.learning_rate"].help == "peak learning rate, > 0 (the recipe's 1e-5)"
    assert (keys["train.learning_rate"].type, keys["train.learning_rate"].default) == ("float", "1e-05")
    assert keys["lora.target_modules"].default == "['all-linear']"
    assert keys["train"].default == ""  # a section: its keys follow
    assert "data[].path" in keys and keys["data"].type.startswith("list[")


@pytest.mark.parametrize("stage", ["sft", "run"])
def test_stage_help_lists_its_config_keys_with_help(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "config keys:" in out
    lines = {line.split()[0]: line for line in out.split("config keys:\n", 1)[1].splitlines() if line.strip()}
    assert "model.path" in lines and "HF dir, Meta-native dir" in lines["model.path"]
    if stage == "sft":
        assert lines["train.save_steps"].endswith("resume starts from the last one (int = 0)")
    else:
        assert "rounds to run; raising it on a finished run continues it (int = 1)" in lines["rounds"]
