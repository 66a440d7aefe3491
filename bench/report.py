"""Tables of bench/run.py's JSON runs: the ratio table run.py prints last, and bench/RESULTS.md (every run in a dir)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

# workload -> (figure key, unit, target: ("x", ratio vs stock) or ("abs", value))
FIGURES = {
    "sft": ("tokens_per_s", "real tok/s", ("x", 3.0)),
    "dpo": ("pairs_per_s", "pairs/s", ("x", 2.0)),
    "gen": ("tokens_per_s", "new tok/s", ("x", 4.0)),
    "rm": ("tokens_per_s", "tok/s", ("abs", 30000)),
    "sft_ddp": ("tokens_per_s", "real tok/s", ("x", 1.8)),
}
TITLES = {"sft": "LoRA SFT, lengths 128-2048 packed to 2048, 8 rows per step",
          "dpo": "LoRA DPO, prompt 256 + chosen/rejected 384, 4 pairs per step, sigmoid + 0.2 NLL",
          "gen": "Sampling, 32 prompts x K=8, 128-token prompts, 256 new tokens",
          "rm": "RM scoring, ~1k-token sequences (+-10%), forward only",
          "sft_ddp": "SFT on 2 GPUs vs 1, same global batch (ratio vs the same variant on 1 GPU in a run in the dir)"}
HEADER = ["workload", "variant", "figure", "vs stock", "peak GiB", "target", "note"]
CHECK = "losses, levers off vs on"


def load_runs(out: Path) -> list[dict]:
    """Every run JSON in `out` (bench.json, bench_ddp.json, earlier runs kept beside them), by file name."""
    runs = []
    for path in sorted(out.glob("*.json")):
        run = json.loads(path.read_text())
        if "workloads" in run:
            runs.append({**run, "name": path.stem})
    return runs


def _ddp_base(runs: list[dict], run: dict, variant: str) -> float | None:
    """The 1-GPU SFT figure of `variant` on the same card taken nearest in time to `run` (the same machine, in
    practice)."""
    when = datetime.datetime.fromisoformat(run["date"]) if run.get("date") else None
    candidates = []
    for other in runs:
        value = other["workloads"].get("sft", {}).get(variant, {}).get("tokens_per_s")
        if other.get("card") == run.get("card") and other.get("world_size", 1) == 1 and value:
            gap = abs(datetime.datetime.fromisoformat(other["date"]) - when) if when and other.get("date") else None
            candidates.append((gap if gap is not None else datetime.timedelta.max, value))
    return min(candidates)[1] if candidates else None


def rows(run: dict, runs: list[dict] = ()) -> list[dict]:
    """One row per variant: figure, ratio to stock (sft_ddp: to the variant on 1 GPU), peak memory, target met."""
    out = []
    for workload, (key, unit, (kind, target)) in FIGURES.items():
        variants = run.get("workloads", {}).get(workload, {})
        for name, figures in variants.items():
            base = variants.get("stock", {}).get(key) if workload != "sft_ddp" else _ddp_base(runs, run, name)
            value = figures.get(key)
            ratio = value / base if value and base else None
            met = None
            if name != "stock" and value:
                met = (ratio is not None and ratio >= target) if kind == "x" else value >= target
            goal = f"{target}x" if kind == "x" else f">= {target:,}"
            out.append({"workload": workload, "variant": name, "unit": unit, "value": value, "ratio": ratio,
                        "peak_gib": figures.get("peak_gib"), "target": goal, "met": met,
                        "note": figures.get("error") or figures.get("skipped") or ""})
    return out


def _cells(row: dict) -> list[str]:
    value = "-" if row["value"] is None else f"{row['value']:,}"
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    met = {True: "met", False: "NOT met", None: ""}[row["met"]]
    peak = "-" if row["peak_gib"] is None else str(row["peak_gib"])
    return [row["workload"], row["variant"], f"{value} {row['unit']}", ratio, peak,
            f"{row['target']} {met}".strip(), row["note"][:80]]


def _checks(run: dict) -> list[str]:
    lines = []
    for name, check in run.get("workloads", {}).get("check", {}).get(CHECK, {}).items():
        if isinstance(check, dict) and "max_abs_diff" in check:
            lines.append(f"check {name}: {check['steps']} steps, max |loss diff| {check['max_abs_diff']} "
                         f"(relative {check['max_rel_diff']})")
        elif name == "error":
            lines.append(f"check: {check}")
    return lines


def table(run: dict, runs: list[dict] = ()) -> str:
    """Plain-text ratio table of one run (what run.py prints last)."""
    lines = [_cells(r) for r in rows(run, runs)]
    widths = [max(len(x) for x in column) for column in zip(HEADER, *lines)]
    text = [f"card: {run.get('card')}  date: {run.get('date')}"]
    text += ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [HEADER, *lines]]
    return "\n".join(text + _checks(run))


def _run_markdown(run: dict, runs: list[dict]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    lines = [f"## {run['name']}: {run.get('card')}, {run.get('date')}", "",
             f"Versions: {versions}." + (" Dry run on CPU: tiny sizes, the figures mean nothing." if run.get("dry")
                                         else "")]
    if run.get("note"):
        lines += ["", run["note"]]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows(run, runs)]
    lines += ["", "All figures per variant (warm-up: `first_step_s`, `warmup_s`; DPO `build_s` = model init + "
                  "the reference pass over every pair):", ""]
    for workload, variants in run.get("workloads", {}).items():
        if workload == "check":
            continue
        lines.append(f"- {TITLES.get(workload, workload)}")
        lines += [f"  - {name}: `{json.dumps({k: v for k, v in figures.items() if k != 'losses'})}`"
                  for name, figures in variants.items()]
    checks = run.get("workloads", {}).get("check", {}).get(CHECK, {})
    if checks:
        lines += ["", "Loss per step with every lever off vs on (same data, seed, init; a 1B-shaped model):", ""]
        for name, check in checks.items():
            if isinstance(check, dict) and "max_abs_diff" in check:
                lines.append(f"- {name}: {check['steps']} steps, max |diff| {check['max_abs_diff']}, max relative "
                             f"{check['max_rel_diff']}; off {[round(x, 3) for x in check['losses_off']]}, "
                             f"on {[round(x, 3) for x in check['losses_on']]}")
            elif name != "wall_s":
                lines.append(f"- {name}: {check}")
    return lines + [""]


def markdown(runs: list[dict]) -> str:
    """bench/RESULTS.md: per run its card, versions, date, ratio table, every figure and the loss checks."""
    lines = ["# Bench results", "",
             "Generated by `python bench/run.py` (or `--report DIR`) from the run JSONs in its --out dir; do not edit. "
             "Within a run, stock and ours ran in one process on one card; compare ratios within a run, not "
             "figures across runs (different machines).", ""]
    for run in runs:
        lines += _run_markdown(run, runs)
    return "\n".join(lines)
