"""Stock TRL/HF stack vs ours, same process, same card: LoRA SFT, LoRA DPO, sampling, RM scoring, loss checks.

    python bench/run.py [--workloads sft,dpo,gen,rm,check] [--out DIR] [--budget-s S] [--dry]
    accelerate launch --num_processes 2 bench/run.py --workloads sft_ddp --out DIR     (after a 1-GPU run in DIR)

Models are random-init Llama-3.1-8B shapes in bf16 with LoRA r=16 on every linear layer (--dry: the 2-layer `tiny`
config on CPU, tiny sizes, so a CPU test keeps this script alive). "Stock" is configured the way
the stock-baseline script behind the targets configures it; "ours" runs the stage code (posttrain.sft / posttrain.dpo trainers,
posttrain.generate, rewards.model.RewardModel) with the levers of posttrain.accel. Every variant builds a fresh model
(seed 0), so no lever leaks into the next. Writes DIR/bench.json, regenerates bench/RESULTS.md from every run JSON
in DIR, and prints a table of ratios last. Timings are medians over steps after the first two (warm-up reported apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.workloads import (  # noqa: E402
    DPO_VARIANTS,
    DRY,
    GEN_VARIANTS,
    RM_VARIANTS,
    SFT_VARIANTS,
    Sizes,
    device,
    dpo_ours,
    dpo_stock,
    gen_ours,
    gen_stock,
    loss_check,
    rm_ours,
    rm_stock,
    sft_ours,
    sft_stock,
)

WORKLOADS = ("sft", "dpo", "gen", "rm", "check")


def run_variant(results: dict, workload: str, name: str, fn, deadline: float) -> None:
    """Run one variant into results[workload][name]; an error or the time budget is recorded, not raised."""
    entry = results.setdefault(workload, {})
    if time.perf_counter() > deadline:
        entry[name] = {"skipped": "time budget"}
        return
    print(f"== {workload}: {name}", flush=True)
    start = time.perf_counter()
    try:
        entry[name] = fn()
    except Exception as e:  # noqa: BLE001  (one failing variant must not lose the others' figures)
        traceback.print_exc()
        entry[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
    entry[name]["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"   {json.dumps(entry[name])[:400]}", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan(sizes: Sizes, workloads: list[str], tmp: Path, max_variants: int = 0,
         profile: Path | None = None) -> list[tuple]:
    """(workload, variant, thunk) in the order of `workloads`: stock first, then ours and the attribution variants
    (the first `max_variants` of them all when set). With `profile`, "ours" (and SFT's stock) are also profiled."""
    def traced(name: str) -> Path | None:
        return profile / f"{name}.txt" if profile else None

    def ours(workload: str, table: dict, run) -> list[tuple]:
        chosen = table if sizes.attribution else {"ours": table["ours"]}
        return [(workload, name, lambda kw=kw, i=i, name=name: run(
                    tmp / f"{workload}-{i}", {**kw, "profile": traced(f"{workload}-ours")} if name == "ours" else kw))
                for i, (name, kw) in enumerate(chosen.items())]

    steps = {
        "sft": [("sft", "stock", lambda: sft_stock(sizes, tmp / "sft-stock", traced("sft-stock")))]
        + ours("sft", SFT_VARIANTS, lambda out, kw: sft_ours(sizes, out, **kw)),
        "dpo": [("dpo", "stock", lambda: dpo_stock(sizes, tmp / "dpo-stock"))]
        + ours("dpo", DPO_VARIANTS, lambda out, kw: dpo_ours(sizes, out, **kw)),
        "gen": [("gen", "stock", lambda: gen_stock(sizes))]
        + ours("gen", GEN_VARIANTS, lambda _, kw: gen_ours(sizes, **kw)),
        "gen_compile": [("gen", "ours, torch.compile", lambda: gen_ours(sizes, compile=True))],
        "rm": [("rm", "stock", lambda: rm_stock(sizes))]
        + ours("rm", RM_VARIANTS, lambda _, kw: rm_ours(sizes, **kw)),
        "check": [("check", "losses, levers off vs on", lambda: loss_check(sizes, tmp / "check"))],
        "sft_ddp": [("sft_ddp", name, lambda kw=kw, i=i, name=name: sft_ours(
                        sizes, tmp / f"sft-ddp-{i}", traced("sft_ddp-ours") if name == "ours" else None, **kw))
                    for i, (name, kw) in enumerate(SFT_VARIANTS.items())],
    }
    chosen = []
    for item in workloads:  # "gen" or "gen:2" (its first two variants, stock included)
        workload, _, count = item.partition(":")
        if workload not in steps:
            raise ValueError(f"--workloads: unknown {workload!r}; known: {', '.join(steps)}")
        chosen += steps[workload][:int(count or max_variants) or None]
    return chosen


def environment() -> dict:
    import peft
    import transformers
    import trl

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                "peft": peft.__version__, "python": sys.version.split()[0]}
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        versions["liger_kernel"] = version("liger-kernel")
    except ImportError:
        versions["liger_kernel"] = "not installed"
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"card": card, "versions": versions, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "world_size": int(os.environ.get("WORLD_SIZE", 1))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="sft,dpo,gen,rm,check",
                        help=f"comma list of {', '.join(WORKLOADS)}, gen_compile, sft_ddp; "
                             "name:N runs the first N variants (stock included)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="dir of the run JSONs")
    parser.add_argument("--budget-s", type=float, default=0, help="skip variants that would start after this")
    parser.add_argument("--max-variants", type=int, default=0, help="per workload, stock included (0 = all)")
    parser.add_argument("--dry", action="store_true", help="tiny sizes on CPU (checks the script, not the speed)")
    parser.add_argument("--profile", metavar="DIR", help="also profile stock SFT and every 'ours'; summaries in DIR")
    parser.add_argument("--report", action="store_true", help="only regenerate --results from the JSONs in --out")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="RESULTS.md to regenerate")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        Path(args.results).write_text(report.markdown(report.load_runs(out)))
        return 0
    sizes = DRY if args.dry else Sizes()
    if args.dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif torch.cuda.is_available():
        torch.cuda.set_device(device())
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    name = "bench_ddp.json" if any(w.startswith("sft_ddp") for w in workloads) else "bench.json"
    results = {**environment(), "dry": args.dry, "sizes": dataclasses.asdict(sizes), "workloads": {}}
    deadline = time.perf_counter() + (args.budget_s or float("inf"))
    rank0 = int(os.environ.get("RANK", 0)) == 0
    with tempfile.TemporaryDirectory() as tmp:
        for workload, variant, thunk in plan(sizes, workloads, Path(tmp), args.max_variants,
                                           Path(args.profile) if args.profile else None):
            run_variant(results["workloads"], workload, variant, thunk, deadline)
            if rank0:
                (out / name).write_text(json.dumps(results, indent=1))
    if not rank0:
        return 0
    runs = report.load_runs(out)
    Path(args.results).write_text(report.markdown(runs))
    print(report.table({**results, "name": Path(name).stem}, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
