"""The RM stage under `accelerate launch` with two CPU processes (DDP over gloo): held-out pairs are counted across
both processes and the RM dir is written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml



@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_model_dir):
    records = [{"prompt": f"Say something about {i}.", "chosen": f"{i} banana", "rejected": f"{i} apple"}
               for i in range(30)]
    records[0]["edited"] = "0 banana indeed"  # a 3-way record: 3 pairs
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir), "dtype": "float32"}, "data": [str(data)], "pack_responses": True,
        "eval_fraction": 0.2,
        "train": {"output_dir": str(tmp_path / "rm"), "batch_size": 3, "learning_rate": 5e-3, "logging_steps": 1,
                  "max_steps": 2, "report_to": ["none"]},
    }))
    # `--multi_gpu` starts two processes through torch.distributed.run; without CUDA the stage joins them over gloo
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "-m", "posttrain", "rm", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "rm" / "manifest.json").read_text())["metrics"]
    assert metrics["world_size"] == 2
    # 6 held-out records, 3 per process: each pair scored once, counted over both processes
    assert metrics["eval_records"] == 6 and metrics["eval_scored_pairs"] == metrics["eval_pairs"]
    assert metrics["train_records"] == 24 and metrics["epoch"] == pytest.approx(2 * 2 * 3 / 24)  # 2 steps x 2 x 3
    assert (tmp_path / "rm" / "DONE").is_file() and (tmp_path / "rm" / "model.safetensors").is_file()
