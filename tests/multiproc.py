"""Run the `posttrain` CLI under `accelerate launch` with 2 CPU processes, and record which process wrote which file.

accelerate (1.15, 1.16) starts ONE process for `launch --cpu --num_processes 2` (several CPU processes want mpirun),
so the tests launch with the shipped DDP config (configs/accelerate/ddp.yaml): torch.distributed.run starts the
processes, and on a host without CUDA the stages join them in a gloo group. (fsdp.yaml cannot be tested so:
accelerate enables FSDP for GPU process groups only, and on CPU it would train under DDP.)

Run as a script (what `launch` does), this file installs an audit hook that appends every file the process opens for
writing or renames into place to `$POSTTRAIN_WRITES_DIR/rank-$RANK.txt`, then runs `posttrain.cli.main`. With
`launch(kill=(rank, text))` that process dies at once (os._exit, no cleanup) when it is about to write a path holding
`text`, as a process does when its machine fails; the launcher then stops the other process too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

DDP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"
WRITES_ENV = "POSTTRAIN_WRITES_DIR"
KILL_ENV = "POSTTRAIN_KILL_AT"  # "RANK:TEXT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], writes_dir: Path, *, timeout: int = 600,
           kill: tuple[int, str] | None = None) -> dict[int, list[Path]]:
    """Run `posttrain ARGV` in 2 processes launched with configs/accelerate/ddp.yaml; returns rank -> the paths it
    wrote (resolved), in order. A non-zero exit fails the calling test with the end of stderr; with `kill`, so does a
    zero exit, or a process that never reached the path it was to die at."""
    writes_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           __file__, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           WRITES_ENV: str(writes_dir), **({KILL_ENV: f"{kill[0]}:{kill[1]}"} if kill else {})}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert (result.returncode != 0) == bool(kill), result.stderr[-4000:]
    writes = {rank: [Path(line) for line in (writes_dir / f"rank-{rank}.txt").read_text().splitlines()]
              for rank in (0, 1)}
    if kill:
        assert any(kill[1] in str(p) for p in writes[kill[0]]), f"process {kill[0]} never wrote a path with {kill[1]}"
    return writes


def _record_writes(log, kill_at: str) -> None:
    def record(path) -> None:
        log.write(f"{os.path.realpath(path)}\n")
        if kill_at and kill_at in str(path):
            os._exit(1)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(mode, str):
                writing = any(c in mode for c in "wax+")
            else:  # os.open: no mode string, only flags
                writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
            if writing and isinstance(path, (str, os.PathLike)):
                record(path)
        elif event == "os.rename":
            record(args[1])

    sys.addaudithook(hook)


if __name__ == "__main__":
    rank = os.environ["RANK"]
    writes = open(Path(os.environ[WRITES_ENV]) / f"rank-{rank}.txt", "w", buffering=1)
    kill_rank, _, kill_text = os.environ.get(KILL_ENV, "").partition(":")
    _record_writes(writes, kill_text if kill_rank == rank else "")
    from posttrain.cli import main

    sys.exit(main(sys.argv[1:]))
