"""`posttrain status RUN_DIR`: what a run dir holds, read from its files (no model is loaded, nothing runs).

Per round, each stage: done, skipped (with the reason its manifest gives), started (a dir without DONE, where a
resumed run carries on), not started, or off in the run's config; each round's eval scores (`accuracy` and every
eval in `evals`). Then the stage that runs next, the policy the run has produced so far (`policy_after` of the last
round: the latest soup, DPO model or SFT model; the base model before any), and the disk the run dir takes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from posttrain.config import ConfigError, from_dict
from rounds.orchestrator import ROUND_STEPS, Run, enabled, finished, policy_after
from rounds.run_config import RunConfig, round_config
from rounds.state import RunDir


def _stage_state(stage_dir: Path) -> str:
    if not stage_dir.is_dir():
        return "not started"
    if not RunDir.is_done(stage_dir):
        return "started, not finished"
    skipped = RunDir.manifest(stage_dir).get("skipped") if (stage_dir / "manifest.json").is_file() else None
    return f"skipped: {skipped}" if skipped else "done"


def _scores(eval_path: Path) -> str:
    if not eval_path.is_file():
        return "not started"
    data = json.loads(eval_path.read_text())
    parts = [f"accuracy {data['accuracy']:.1%}"] if data.get("accuracy") is not None else []
    parts += [f"{name} {m['accuracy']:.1%}" for name, m in (data.get("evals") or {}).items()
              if m.get("accuracy") is not None]
    return "done: " + ", ".join(parts) if parts else "done"


def disk_bytes(root: Path) -> int:
    """Bytes of the files under `root` (links not followed, a hard-linked file counted once)."""
    total, seen = 0, set()
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def human(n: float) -> str:
    """Decimal units: 999 B, 1.5 KB, 538.0 MB, 1.7 GB."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def load_run(root: Path) -> Run:
    """The run as it was configured (its resolved config.yaml); no process state, since this only reads files."""
    path = root / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no config.yaml, so not a run dir (posttrain run writes it first)")
    try:
        cfg = from_dict(RunConfig, yaml.safe_load(path.read_text()) or {}, source=str(path))
    except ConfigError as e:
        raise ValueError(f"{e}; status reads the config the run was started with") from None
    return Run(cfg, RunDir(root), state=None)


def status_lines(root: str | Path) -> list[str]:
    root = Path(root)
    run = load_run(root)
    lines = [f"run {root} ({run.cfg.rounds} round{'s' if run.cfg.rounds != 1 else ''})"]
    upcoming = None
    for r in range(run.cfg.rounds + 1):
        rcfg = round_config(run.cfg, r) if r else run.cfg
        lines.append(f"round {r:02d}" + (" (the base model)" if r == 0 else ""))
        for stage in ROUND_STEPS if r else ["eval"]:
            on = enabled(rcfg, r, stage)
            if on and upcoming is None and not finished(run, r, stage):
                upcoming = (r, stage)
            if stage == "eval":
                state = _scores(run.dir.eval_path(r))
            else:
                state = _stage_state(run.dir.stage_dir(r, stage)) if on else "off"
            lines.append(f"  {stage:<8} {state}")
    if upcoming is None:
        lines.append("next: nothing; every round is done (raise rounds to continue the run)")
    else:
        r, stage = upcoming
        where = run.dir.eval_path(r) if stage == "eval" else run.dir.stage_dir(r, stage)
        lines.append(f"next: round {r:02d} {stage} ({where})")
    lines.append(f"policy: {policy_after(run, run.cfg.rounds)}")
    per_round = ", ".join(f"{d.name} {human(disk_bytes(d))}" for d in sorted(root.glob("round_*")))
    lines.append(f"disk: {human(disk_bytes(root))}" + (f" ({per_round})" if per_round else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="posttrain status", description="what a run dir holds: stages done, what runs "
                                "next, eval scores so far, the latest policy, disk used")
    p.add_argument("run_dir", help="the run dir (runs_dir/name, e.g. runs/quickstart)")
    args = p.parse_args(argv)
    print("\n".join(status_lines(args.run_dir)))
    return 0
