"""What the training stages (SFT, DPO, RM) share: trainer arguments, metrics kept on the device, checkpoints, versions.

TRL's trainers gather and `.item()` their metrics inside every `compute_loss`. Each such read makes the host wait
until the device has finished the micro-step, so the host cannot queue the next micro-step's kernels meanwhile, and
under DDP every rank also waits for the slowest one several times a micro-step. `DeviceMetrics` keeps running sums
on the device instead and reduces them over processes in one collective when the trainer logs.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from posttrain.config import ConfigError

# Passed to every stage's TRL config. find_unused_parameters=False: every trainable parameter (LoRA matrices, a score
# head, or all weights) gets a gradient in every micro-step, so DDP need not walk the autograd graph each backward
# (the transformers default walks it whenever activation checkpointing is off). No NaN filter: it reads each
# micro-step's loss on the host; a NaN loss is logged as NaN.
TRAINER_KWARGS = {"ddp_find_unused_parameters": False, "logging_nan_inf_filter": False}


def check_devices() -> None:
    """Refuse a single (not launched) process that sees several GPUs: the trainer would wrap the model in
    torch.nn.DataParallel, which the stages do not support."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if count > 1:
        raise ConfigError(f"{count} GPUs are visible to one process: use them all with `accelerate launch --config_file "
                          "configs/accelerate/ddp.yaml -m posttrain ...`, or one with CUDA_VISIBLE_DEVICES=0")


class DeviceMetrics:
    """Trainer mixin: `defer(mode, name=value)` adds to per-mode running sums on the device; `log` reduces them over
    processes (one collective) and passes the totals to `summarize(mode, sums)`, which fills TRL's `_metrics` lists.

    `count_tokens(n)` does the same for `state.num_input_tokens_seen` (the trainer's own count reads the host every
    micro-step); the count is brought up to date before each log and each checkpoint.
    """

    def defer(self, mode: str, **sums) -> None:
        pending = self.__dict__.setdefault("_device_sums", {}).setdefault(mode, {})
        for key, value in sums.items():
            # a 0-d float64 sum: exact for token counts far beyond float32's 2^24
            value = torch.as_tensor(value, device=self.args.device).detach().double().sum()
            pending[key] = pending[key] + value if key in pending else value

    def pending(self, mode: str) -> bool:
        """Whether `mode` has sums that no log has reported yet."""
        return bool(self.__dict__.get("_device_sums", {}).get(mode))

    def count_tokens(self, tokens: torch.Tensor) -> None:
        self.defer("_tokens", seen=tokens)

    def summarize(self, mode: str, sums: dict[str, float]) -> None:
        """Turn the reduced sums of `mode` into entries of `self._metrics[mode]` (per trainer)."""

    def _reduce(self, mode: str) -> dict[str, float]:
        pending = self.__dict__.get("_device_sums", {}).pop(mode, {})
        if not pending:
            return {}
        keys = sorted(pending)  # every rank defers the same keys in the same micro-steps
        totals = torch.stack([pending[key] for key in keys])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return dict(zip(keys, totals.tolist()))

    def _update_token_count(self) -> None:
        seen = self._reduce("_tokens").get("seen")
        if seen is not None:
            self.state.num_input_tokens_seen += int(seen)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        self._update_token_count()
        sums = self._reduce(mode)
        if sums:
            self.summarize(mode, sums)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self._update_token_count()
        super()._save_checkpoint(model, trial)

    def _finalize_training(self, trial, num_train_samples, start_time):
        # The trainer averages the loss over processes at each log, but adds the steps after the last log to
        # train_loss as this process's own loss: make those every process's mean too.
        if self.accelerator.num_processes > 1:
            self._tr_loss = self.accelerator.reduce(self._tr_loss.detach(), reduction="mean")
        return super()._finalize_training(trial, num_train_samples, start_time)


def versions() -> dict[str, str]:
    """Versions of the packages a stage's result depends on, for its manifest."""
    found = {}
    for name in ("posttrain", "torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def tensorboard(report_to: list[str], logging_dir: Path) -> list:
    """A TensorBoard callback writing to `logging_dir` (the stock one picks output_dir/runs/<date>), if asked for."""
    if "tensorboard" not in report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(logging_dir)
    return [callback]


def last_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint the trainer finished writing (its trainer_state.json is written last)."""
    done = [p for p in Path(directory).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None
