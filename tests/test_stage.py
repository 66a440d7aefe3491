"""posttrain.stage: the device check every stage makes, metrics summed on the device, checkpoints, versions."""

from __future__ import annotations

import types

import pytest
import torch

from posttrain import dpo, sft, stage
from posttrain.config import ConfigError
from rewards import model as rm


@pytest.mark.parametrize("trainer_args", [sft._trainer_args, dpo._trainer_args, rm._trainer_args])
def test_a_single_process_seeing_two_gpus_is_refused_with_the_way_out(monkeypatch, trainer_args):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="2 GPUs are visible to one process.*accelerate launch.*CUDA_VISIBLE_DEVICES=0"):
        trainer_args(None, None)  # refused before the config is read


def test_launched_processes_and_a_single_gpu_pass_the_device_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    stage.check_devices()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    stage.check_devices()


class _Metrics(stage.DeviceMetrics):
    def __init__(self):
        self.args = types.SimpleNamespace(device=torch.device("cpu"))
        self.accelerator = types.SimpleNamespace(num_processes=1)
        self.state = types.SimpleNamespace(num_input_tokens_seen=10)


def test_deferred_sums_add_up_per_mode_and_are_gone_once_reduced():
    metrics = _Metrics()
    metrics.defer("train", loss=torch.tensor([1.0, 2.0]), pairs=2)
    metrics.defer("train", loss=torch.tensor(3.0), pairs=1)
    metrics.defer("eval", loss=torch.tensor(5.0))
    metrics.count_tokens(torch.tensor(7))
    metrics.count_tokens(torch.tensor(2**24 + 1))  # beyond float32's exact integers
    assert metrics.pending("train") and metrics.pending("eval")
    assert metrics._reduce("train") == {"loss": 6.0, "pairs": 3.0}
    assert not metrics.pending("train") and metrics._reduce("train") == {}
    metrics._update_token_count()
    assert metrics.state.num_input_tokens_seen == 10 + 7 + 2**24 + 1
    assert metrics._reduce("eval") == {"loss": 5.0}


def test_last_checkpoint_is_the_newest_one_finished(tmp_path):
    assert stage.last_checkpoint(tmp_path / "missing") is None
    for step, finished in ((5, True), (10, True), (15, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if finished:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert stage.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_versions_name_every_package_a_stage_depends_on():
    found = stage.versions()
    assert set(found) == {"posttrain", "torch", "transformers", "trl", "peft", "accelerate", "datasets"}
    assert found["torch"] != "not installed" and found["trl"] != "not installed"
