"""The DPO stage under `accelerate launch` with two CPU processes (DDP over gloo): it trains, saves once, and the
manifest says both processes took part."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_model_dir):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n"
                    + json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir)}, "data": [{"path": str(data)}],
        "train": {"output_dir": str(tmp_path / "out"), "batch_size": 1, "learning_rate": 1e-3, "logging_steps": 1,
                  "report_to": ["none"]},
    }))
    # `--cpu --num_processes 2` runs one process (accelerate needs mpirun for several CPU ones); `--multi_gpu` starts
    # two through torch.distributed.run, and on a machine without CUDA the stage joins them in a gloo group.
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "-m", "posttrain", "dpo", str(config), "train.max_steps=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["steps"] == 2
    assert manifest["outputs"]["model_kind"] == "merged"  # LoRA (the default) merged into the weights
    assert (tmp_path / "out/DONE").is_file() and (tmp_path / "out/model/model.safetensors").is_file()
