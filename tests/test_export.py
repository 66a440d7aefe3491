"""`posttrain export`: every format loads back with load_model and gives the source's logits."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from posttrain.backbone import apply_lora, load_model
from posttrain.cli import main
from posttrain.config import LoRAConfig
from posttrain.generate import load_policy

IDS = torch.tensor([[128000, 9906, 11, 1917, 0, 128009]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model whose B matrices are non-zero, so merging it changes the logits."""
    torch.manual_seed(1)
    model = apply_lora(load_model(tiny_model_dir, dtype=torch.float32), LoRAConfig(r=4))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", ["hf", "merged", "meta"])
def test_a_full_model_round_trips(tmp_path, tiny_model_dir, fmt, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_model_dir), "--to", str(out), "--format", fmt]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / ("params.json" if fmt == "meta" else "config.json")).is_file()
    torch.testing.assert_close(_logits(load_model(out, dtype=torch.float32)),
                               _logits(load_model(tiny_model_dir, dtype=torch.float32)), rtol=1e-5, atol=1e-5)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "out"]  # no temp dir left behind


@pytest.mark.parametrize("fmt", ["merged", "meta"])
def test_an_adapter_is_merged_into_its_base(tmp_path, tiny_model_dir, adapter_dir, fmt):
    out = tmp_path / "out"
    assert main(["export", str(adapter_dir), "--to", str(out), "--format", fmt]) == 0
    assert not (out / "adapter_config.json").exists()
    merged = _logits(load_model(out, dtype=torch.float32))
    torch.testing.assert_close(merged, _logits(load_policy(adapter_dir, torch.float32)[0]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, _logits(load_model(tiny_model_dir, dtype=torch.float32)), atol=1e-3)


def test_hf_keeps_an_adapter_an_adapter_with_an_absolute_base(tmp_path, monkeypatch, tiny_model_dir, adapter_dir):
    source = tmp_path / "adapter"
    shutil.copytree(adapter_dir, source)
    config = json.loads((source / "adapter_config.json").read_text())
    monkeypatch.chdir(tmp_path)
    config["base_model_name_or_path"] = os.path.relpath(tiny_model_dir, tmp_path)  # a base relative to the cwd
    (source / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export", "adapter", "--to", "out", "--format", "hf"]) == 0
    exported = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path.parent)
    torch.testing.assert_close(_logits(load_policy(tmp_path / "out", torch.float32)[0]),
                               _logits(load_policy(adapter_dir, torch.float32)[0]))


def test_a_non_empty_target_is_refused_untouched(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_model_dir), "--to", str(out), "--format", "hf"]) == 2
    assert capsys.readouterr().err.startswith("posttrain export: error: --to: ")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_gguf_is_not_offered(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_model_dir), "--to", str(tmp_path / "out"), "--format", "gguf"])
    assert e.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err
