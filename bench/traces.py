"""`bench/run.py --profile DIR`: where a variant's time goes, from torch.profiler over part of its timed window.

Training variants are profiled over optimizer steps 3-4 (after the warm-up), sampling over its whole timed call. The
trace is reduced to a few figures that land in the variant's results (`profile`) and a text summary in
DIR/<workload>-<variant>.txt: how much of the wall time the GPU was busy, how often the host waited for the device,
the time in NCCL kernels, and the kernels and host ops that took longest.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

# Host calls that block until the device catches up (a `.item()`, `.tolist()` or `bool(tensor)` ends in one of them)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(trace: dict, wall_s: float, steps: int) -> tuple[dict, str]:
    """(figures, text) from a chrome trace of `steps` steps taking `wall_s` seconds."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    kernels = [e for e in device if e.get("cat") == "kernel"]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    syncs = collections.Counter(e["name"] for e in runtime if e["name"].startswith(SYNC_CALLS))
    busy_s = _busy_us([(e["ts"], e["ts"] + e["dur"]) for e in device]) / 1e6
    nccl_s = sum(e["dur"] for e in kernels if "nccl" in e["name"].lower()) / 1e6
    per = max(steps, 1)
    figures = {
        "window_s": round(wall_s, 3), "steps": steps,
        "gpu_busy_pct": round(100 * busy_s / wall_s, 1) if device and wall_s > 0 else None,
        "kernels_per_step": round(len(kernels) / per), "host_syncs_per_step": round(sum(syncs.values()) / per, 1),
        "nccl_ms_per_step": round(1e3 * nccl_s / per, 1),
        "host_wait_ms_per_step": round(sum(e["dur"] for e in runtime if e["name"].startswith(SYNC_CALLS))
                                       / 1e3 / per, 1),
    }
    lines = [json.dumps(figures), "", "host calls waiting for the device, per window:"]
    lines += [f"  {count:7d}  {name}" for name, count in syncs.most_common()] or ["  none"]
    lines += ["", _top("device kernels, by total time", kernels, per), "",
              _top("host ops, by total time (nested ops counted in their parents too)", ops, per)]
    return figures, "\n".join(lines) + "\n"


def _top(title: str, events: list[dict], steps: int, rows: int = 20) -> str:
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        name = re.sub(r"\s+", " ", e["name"])[:100]
        totals[name] += e["dur"]
        counts[name] += 1
    whole = sum(totals.values()) or 1
    lines = [f"{title}: ms/step, share, calls/step, name"]
    for name, us in totals.most_common(rows):
        lines.append(f"  {us / 1e3 / steps:9.2f}  {100 * us / whole:5.1f}%  {counts[name] / steps:8.1f}  {name}")
    return "\n".join(lines)


class _Session:
    """One profiler run; `stop` writes the summary and returns the figures."""

    def __init__(self, path: Path):
        self.path = path
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.start()
        self.started = time.perf_counter()

    def stop(self, steps: int) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - self.started
        self.profiler.stop()
        with tempfile.TemporaryDirectory() as tmp:
            trace_path = Path(tmp) / "trace.json"
            self.profiler.export_chrome_trace(str(trace_path))
            trace = json.loads(trace_path.read_text())
        figures, text = summarize(trace, wall_s, steps)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text)
        return figures


class ProfileSteps(TrainerCallback):
    """Profiles optimizer steps first..last (1-based, or to the end of a shorter run) of a trainer; the figures end
    up in `self.figures`."""

    def __init__(self, path: Path, first: int = 3, last: int = 4):
        self.session, self.first, self.last, self.figures = _Session(path), first, last, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first:
            self.session.start()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last and self.figures is None:
            self.figures = self.session.stop(self.last - self.first + 1)

    def on_train_end(self, args, state, control, **kwargs):
        if self.figures is None and state.global_step >= self.first:  # a run shorter than `last` steps
            self.figures = self.session.stop(state.global_step - self.first + 1)


@contextlib.contextmanager
def profile_call(path: Path, steps: int, figures: dict):
    """Profiles the body as `steps` steps; puts the figures under figures['profile']."""
    session = _Session(path)
    session.start()
    yield
    figures["profile"] = session.stop(steps)
