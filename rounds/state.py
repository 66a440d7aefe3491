"""The run directory: resolved config, per-round stage dirs, DONE markers, and the resume rules.

```
runs/<name>/config.yaml              resolved config, as run
runs/<name>/round_00/eval.json       the starting policy, measured before round 1
runs/<name>/round_NN/<stage>/        manifest.json, then DONE written last
runs/<name>/round_NN/eval.json
```
A stage dir with DONE is finished and skipped on resume; one without it is handed back to its stage, which resumes
from its own last complete shard or checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from posttrain.data import atomic_write_json, atomic_write_text
from posttrain.outdir import changed_keys

STAGES = ("prefs", "rm", "samples", "synth", "sft", "dpo", "average", "eval")
FREE_KEYS = ("rounds",)  # config keys a run may change without --force


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def round_dir(self, round_idx: int) -> Path:
        return self.root / f"round_{round_idx:02d}"

    def stage_dir(self, round_idx: int, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        return self.round_dir(round_idx) / stage

    def eval_path(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / "eval.json"

    @staticmethod
    def is_done(stage_dir: Path) -> bool:
        return (stage_dir / "DONE").is_file()

    @staticmethod
    def mark_done(stage_dir: Path, manifest: dict) -> None:
        """Write the manifest, then DONE: a stage is finished only once both are on disk."""
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stage_dir / "manifest.json", manifest)
        atomic_write_text(stage_dir / "DONE", "")

    @staticmethod
    def manifest(stage_dir: Path) -> dict:
        return json.loads((stage_dir / "manifest.json").read_text())

    def check(self, resolved: dict, force: list[str]) -> None:
        """Refuse a config that differs from the one this run started with, unless `force` names stages to redo.

        `rounds` may change freely: raising it continues a finished run. Reads only, so every process may call it.
        """
        unknown = [s for s in force if s not in STAGES and s != "all"]
        if unknown:
            raise ValueError(f"--force: unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)}, or all)")
        path = self.root / "config.yaml"
        if not path.is_file() or force:
            return
        previous = yaml.safe_load(path.read_text())
        changed = [k for k in changed_keys(previous, resolved) if k.split(".")[0] not in FREE_KEYS]
        if changed:
            raise ValueError(
                f"{path}: the config differs from the one this run started with (changed: {', '.join(changed)}); "
                f"pass --force STAGES (comma-separated, or all) to redo stages with the new config"
            )

    def prepare(self, resolved: dict, force: list[str]) -> None:
        """Write config.yaml on a new run; on an existing one refuse a changed config unless `force` names stages.

        A forced stage loses its DONE marker and output in round 1, and so do the stages after it (their inputs
        changed); every stage but eval shapes the policy that later rounds start from, so those rounds are redone
        whole (forcing eval alone redoes every round's eval, the base's too). `force=["all"]` redoes everything.
        """
        self.check(resolved, force)
        if force:
            first = 0 if "all" in force else min(STAGES.index(s) for s in force)
            for round_dir in sorted(self.root.glob("round_*")):
                index = int(round_dir.name.removeprefix("round_"))
                if index == 0 and STAGES[first] != "eval" and "all" not in force:
                    continue  # round_00 holds the base model's eval, which no stage changes
                later = index > 1 and STAGES[first] != "eval"
                for stage in STAGES if later else STAGES[first:]:
                    shutil.rmtree(round_dir / stage, ignore_errors=True)
                if "eval" in STAGES[first:]:
                    (round_dir / "eval.json").unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
