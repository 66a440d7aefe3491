"""`posttrain run CONFIG.yaml`: the Llama 3 loop for N rounds, resumable, with a report of what each round changed.

Round r, every step a stage dir under `runs/<name>/round_NN/` (docs/run-dir.md; layout in rounds/state.py):
  prefs    K responses per prompt from the policy of round r-1, labelled (rounds/collect.py)
  rm       a reward model from the BASE on all preference data so far: given + collected + earlier RS pairs
  samples  rejection sampling from the policy of round r-1, scored by this round's RM and/or verifiers
  synth    teacher-made SFT data, decontaminated against every eval (rounds/synth_step.py), when configured
  sft      from the base (or, with sft.continue_from_policy, the policy of round r-1) on all RS picks and synth
           records so far (or, with sft.recent_rounds, of the last rounds) plus the given SFT data, mixed by sft.mix
  dpo      from this round's SFT model (also the reference) on this round's pairs only
  average  optional soup of this round's SFT and DPO models
  eval     greedy, held-out -> round_NN/eval.json; the round's policy samples in round r+1
The base is measured too, before round 1 (round_00/eval.json). Stages talk only through files in the run dir.
The `rm`, `rs`, `sft` and `dpo` sections hold partial stage settings merged into the stage configs
(RMStageConfig, SampleStageConfig, SFTStageConfig, DPOStageConfig); the run fills in models, data and dirs.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from posttrain.config import ModelConfig, to_dict
from rounds import synth_step
from rounds.collect import LabelsNeeded
from rounds.run_config import RunConfig, given_prefs, prefs_unused, round_config
from rounds.stage_configs import PAIR_SOURCES, dpo_config, rm_config, rs_config, rs_uses_run_rm, sft_config, variants
from rounds.state import RunDir
from rounds.tasks import Task

# ---------------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    cfg: RunConfig
    dir: RunDir
    state: Any  # accelerate.PartialState: every process runs the stages, process 0 alone writes the run's own files

    def say(self, text: str) -> None:
        if self.state.is_main_process:
            print(text)

    def main_then_wait(self, fn, *args) -> None:
        if self.state.is_main_process:
            fn(*args)
        self.state.wait_for_everyone()


def model_dir(stage: str, stage_dir: Path) -> Path:
    """Where a stage keeps its model: DPO in model/, the RM, SFT and the round soup at the top of their dir."""
    return stage_dir / "model" if stage == "dpo" else stage_dir


def stage_model(run: Run, r: int, stage: str) -> str | None:
    """The finished model of a stage of round r, or None (stage off, skipped for lack of data, or not done)."""
    d = run.dir.stage_dir(r, stage)
    model = model_dir(stage, d)
    has_model = (model / "config.json").is_file() or (model / "adapter_config.json").is_file()
    return str(model) if RunDir.is_done(d) and has_model else None


def policy_after(run: Run, r: int) -> str:
    """The policy that round r leaves: its soup, else its DPO model, else its SFT model, else round r-1's."""
    for r_ in range(r, 0, -1):
        for stage in ("average", "dpo", "sft"):
            if found := stage_model(run, r_, stage):
                return found
    return run.cfg.model.path


def latest_rm(run: Run, r: int) -> str | None:
    return next((m for r_ in range(r, 0, -1) if (m := stage_model(run, r_, "rm"))), None)


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def preference_files(run: Run, rcfg: RunConfig, r: int) -> list[str]:
    """The RM's data in round r (from the sources rm.pairs_from names): pairs given and collected up to round r, and
    RS pairs of the rounds before r."""
    sources = rcfg.rm.get("pairs_from") or PAIR_SOURCES
    files = []
    for r_ in range(1, r + 1):
        files += given_prefs(rcfg, r_) if "given" in sources else []
        collected, sampled = (run.dir.stage_dir(r_, s) / "pairs.jsonl" for s in ("prefs", "samples"))
        files += [str(collected)] if "prefs" in sources and _nonempty(collected) else []
        files += [str(sampled)] if "rs" in sources and r_ < r and _nonempty(sampled) else []
    return files


def latest_pairs(run: Run, rcfg: RunConfig, r: int) -> list[str]:
    """This round's pairs for DPO, from the sources dpo.pairs_from names."""
    sources = rcfg.dpo.get("pairs_from") or PAIR_SOURCES
    files = given_prefs(rcfg, r) if "given" in sources else []
    for source, stage in (("prefs", "prefs"), ("rs", "samples")):
        path = run.dir.stage_dir(r, stage) / "pairs.jsonl"
        files += [str(path)] if source in sources and _nonempty(path) else []
    return files


def sft_files(run: Run, rcfg: RunConfig, r: int) -> list[dict]:
    """The run's SFT sources of round r, weighted by sft.mix: the RS picks and the synth step's records of rounds
    1..r (or of the last sft.recent_rounds of them)."""
    recent = rcfg.sft.get("recent_rounds")
    mix = rcfg.sft.get("mix") or {}
    found = []
    for r_ in range(max(1, r - recent + 1) if recent else 1, r + 1):
        picks = run.dir.stage_dir(r_, "samples") / "sft.jsonl"
        found += [("rs", str(picks))] if _nonempty(picks) else []
        found += synth_step.synth_files(run.dir.stage_dir(r_, "synth"))
    return [{"path": path, "weight": synth_step.mix_weight(mix, tag)} for tag, path in found]


def round_prompts(cfg: RunConfig, r: int, kind: str) -> list[dict]:
    """This round's slice of one seeded stream of train prompts: preference prompts, then RS prompts."""
    n_pref, n_rs = cfg.task.pref_prompts, cfg.task.rs_prompts
    offset = (r - 1) * (n_pref + n_rs) + (n_pref if kind == "rs" else 0)
    return Task(cfg.task, cfg.seed).train_prompts(offset, n_rs if kind == "rs" else n_pref)


def retried_prompts(run: Run, cfg: RunConfig, r: int) -> list[dict]:
    """RS prompts of round r-1 that no sample passed, unless they have already been tried task.retry_rejected times
    after their first round (each round that rejects a prompt counts one try)."""
    from posttrain.data import read_records

    def rejected_ids(r_: int) -> set[str]:
        path = run.dir.stage_dir(r_, "samples") / "rejected.jsonl"
        return {p["id"] for p in read_records(path, "prompt")} if r_ >= 1 and _nonempty(path) else set()

    path = run.dir.stage_dir(r - 1, "samples") / "rejected.jsonl"
    if cfg.task.retry_rejected < 1 or r < 2 or not _nonempty(path):
        return []
    earlier = [rejected_ids(r_) for r_ in range(r - 2, 0, -1)]  # round r-2 first

    def retries_so_far(pid: str) -> int:  # consecutive rounds before r-1 that rejected it too
        return next((i for i, ids in enumerate(earlier) if pid not in ids), len(earlier))

    return [p for p in read_records(path, "prompt") if retries_so_far(p["id"]) < cfg.task.retry_rejected]


def write_prompts(run: Run, rcfg: RunConfig, r: int, kind: str, out: Path) -> Path:
    from posttrain.data import write_jsonl

    path = out / "prompts.jsonl"
    prompts = round_prompts(rcfg, r, kind)
    if kind == "rs" and (retried := retried_prompts(run, rcfg, r)):
        run.say(f"round {r:02d} samples: {len(retried)} prompts without an accepted sample in round {r - 1} are "
                "tried again")
        prompts = retried + prompts
    run.main_then_wait(write_jsonl, path, prompts)
    return path


def mark_skipped(run: Run, out: Path, stage: str, reason: str) -> None:
    run.say(f"{out.parent.name} {stage}: skipped: {reason}")
    run.main_then_wait(RunDir.mark_done, out, {"stage": stage, "skipped": reason})


# ---------------------------------------------------------------------------------------------------- steps


def soup(stage: str, out: Path, sources: list[str], weights: list[float] | None, manifest: dict) -> None:
    """Average `sources` into the stage's model dir, then write its manifest and DONE."""
    from posttrain.averaging import average_checkpoints

    tmp = out / ".soup"
    average_checkpoints(sources, tmp, weights)
    target = model_dir(stage, out)
    target.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        if item.name not in ("manifest.json", "DONE"):  # a variant's own markers, copied along by the averaging
            item.replace(target / item.name)
    shutil.rmtree(tmp)
    RunDir.mark_done(out, {"stage": stage, "sources": sources, "weights": weights, **manifest})


def train_stage(run: Run, stage: str, out: Path, configs: list, train, weights: list[float] | None) -> None:
    """Train the stage once into `out`, or each variant into out/variants/vN (each resumable) and average them."""
    if len(configs) == 1:
        train(configs[0])
        return
    for cfg in configs:
        if not RunDir.is_done(Path(cfg.train.output_dir)):
            train(cfg)
    dirs = [Path(cfg.train.output_dir) for cfg in configs]
    manifests = [RunDir.manifest(d) for d in dirs]
    numeric = {k for k, v in manifests[0].get("metrics", {}).items() if isinstance(v, (int, float))}
    metrics = {k: sum(m["metrics"][k] for m in manifests) / len(manifests)
               for k in numeric if all(isinstance(m.get("metrics", {}).get(k), (int, float)) for m in manifests)}
    summary = {"inputs": manifests[0].get("inputs"), "metrics": metrics,
               "variants": [{"dir": str(d), "metrics": m.get("metrics")} for d, m in zip(dirs, manifests)]}
    run.main_then_wait(soup, stage, out, [str(model_dir(stage, d)) for d in dirs], weights, summary)


def _stage_configs(rcfg: RunConfig, section: str, out: Path, build) -> list:
    """One stage config, or one per variant (each in out/variants/vN)."""
    return [build(out / "variants" / f"v{i}", v) for i, v in enumerate(variants(rcfg, section))] or [build(out, None)]


def step_prefs(run: Run, rcfg: RunConfig, r: int) -> None:
    from rounds.collect import collect

    out = run.dir.stage_dir(r, "prefs")
    if reason := prefs_unused(run.cfg, r):
        return mark_skipped(run, out, "prefs", reason)
    prompts = write_prompts(run, rcfg, r, "prefs", out)
    policy = ModelConfig(**{**to_dict(rcfg.model), "path": policy_after(run, r - 1)})
    collect(rcfg.prefs, policy, prompts, out, round_idx=r, verifier=Task(rcfg.task).reward_source(), seed=rcfg.seed)


def step_rm(run: Run, rcfg: RunConfig, r: int) -> None:
    from rewards.model import train

    out = run.dir.stage_dir(r, "rm")
    data = preference_files(run, rcfg, r)
    if not data and not rcfg.rm.get("data"):
        return mark_skipped(run, out, "rm", "no preference data (no pairs collected, none given)")
    configs = _stage_configs(rcfg, "rm", out, lambda d, v: rm_config(rcfg, d, data, v))
    train_stage(run, "rm", out, configs, train, rcfg.rm.get("variant_weights"))


def step_samples(run: Run, rcfg: RunConfig, r: int) -> None:
    from rounds.rejection import run as sample

    out = run.dir.stage_dir(r, "samples")
    rm = latest_rm(run, r)
    if rs_uses_run_rm(rcfg) and rm is None:
        raise ValueError(f"rs.rewards: {{kind: rm}} scores with the latest reward model, but no round up to {r} "
                         "trained one (the RM stage was off or had no preference data)")
    prompts = write_prompts(run, rcfg, r, "rs", out)
    sample(rs_config(rcfg, policy_after(run, r - 1), prompts, out, rm))


def step_synth(run: Run, rcfg: RunConfig, r: int) -> None:
    synth_step.step_synth(run, rcfg, r, rcfg.synth.teacher.path or policy_after(run, r - 1))


def step_sft(run: Run, rcfg: RunConfig, r: int) -> None:
    from posttrain.sft import train

    out = run.dir.stage_dir(r, "sft")
    data = sft_files(run, rcfg, r)
    if not data and not rcfg.sft.get("data"):
        return mark_skipped(run, out, "sft", "no SFT data (no RS record kept, no synth record, no sft.data)")
    start = policy_after(run, r - 1) if rcfg.sft.get("continue_from_policy") else rcfg.model.path
    configs = _stage_configs(rcfg, "sft", out, lambda d, v: sft_config(rcfg, start, d, data, v))
    train_stage(run, "sft", out, configs, train, rcfg.sft.get("variant_weights"))


def step_dpo(run: Run, rcfg: RunConfig, r: int) -> None:
    from posttrain.dpo import train

    out = run.dir.stage_dir(r, "dpo")
    pairs = latest_pairs(run, rcfg, r)
    if not pairs and not rcfg.dpo.get("data"):
        return mark_skipped(run, out, "dpo", "no preference pairs this round")
    start = stage_model(run, r, "sft") or policy_after(run, r - 1)
    configs = _stage_configs(rcfg, "dpo", out, lambda d, v: dpo_config(rcfg, start, d, pairs, v))
    train_stage(run, "dpo", out, configs, train, rcfg.dpo.get("variant_weights"))


def step_average(run: Run, rcfg: RunConfig, r: int) -> None:
    out = run.dir.stage_dir(r, "average")
    members = [stage_model(run, r, m) for m in rcfg.average.members]
    if any(m is None for m in members):
        return mark_skipped(run, out, "average", f"a member of {rcfg.average.members} has no model this round")
    run.main_then_wait(soup, "average", out, members, rcfg.average.weights, {"members": rcfg.average.members})


def evaluate_policy(rcfg: RunConfig, policy: str, path: Path, device) -> None:
    from posttrain.backbone import resolve_dtype
    from posttrain.data import atomic_write_json
    from posttrain.generate import load_policy
    from rounds.evaluate import evaluate_all

    model, tokenizer = load_policy(policy, resolve_dtype(rcfg.model.dtype),
                                   attn_implementation=rcfg.model.attn_implementation)
    metrics = evaluate_all(model.to(device), tokenizer, rcfg.evals, rcfg.task, rcfg.seed)
    atomic_write_json(path, {**metrics, "policy": policy})
    print(f"{path.parent.name}: held-out accuracy {metrics['accuracy']:.1%} on {metrics['num_prompts']} prompts")


def step_eval(run: Run, rcfg: RunConfig, r: int) -> None:
    run.main_then_wait(evaluate_policy, rcfg, policy_after(run, r), run.dir.eval_path(r), run.state.device)


ROUND_STEPS = {"prefs": step_prefs, "rm": step_rm, "samples": step_samples, "synth": step_synth, "sft": step_sft,
               "dpo": step_dpo, "average": step_average, "eval": step_eval}


def enabled(rcfg: RunConfig, r: int, stage: str) -> bool:
    switches = {"prefs": rcfg.prefs.collects(r), "rm": rcfg.stages.rm, "samples": rcfg.stages.rs,
                "synth": rcfg.synth.runs_in(r),
                "sft": rcfg.stages.sft, "dpo": rcfg.stages.dpo, "average": bool(rcfg.average.members)}
    return switches.get(stage, True)


def finished(run: Run, r: int, stage: str) -> bool:
    return run.dir.eval_path(r).is_file() if stage == "eval" else RunDir.is_done(run.dir.stage_dir(r, stage))


def run(cfg: RunConfig, force: str = "") -> int:
    """Run (or resume) every round, then write the report and print the per-round table. Returns the exit code."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from rounds import report

    # cpu=True lets processes started by torch.distributed.run on a host without CUDA join over gloo (as RS does).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    run_ = Run(cfg, RunDir(Path(cfg.runs_dir).resolve() / cfg.name), state)
    forced = [s.strip() for s in force.split(",") if s.strip()]
    try:
        run_.dir.check(to_dict(cfg), forced)
    except ValueError as e:
        run_.say(f"posttrain run: {e}")
        return 2
    run_.main_then_wait(run_.dir.prepare, to_dict(cfg), forced)
    try:
        for r in range(cfg.rounds + 1):
            rcfg = round_config(cfg, r) if r else cfg
            for stage in (ROUND_STEPS if r else ["eval"]):
                if not enabled(rcfg, r, stage):
                    continue
                if finished(run_, r, stage):
                    run_.say(f"round {r:02d} {stage}: finished earlier, kept")
                    continue
                run_.say(f"round {r:02d} {stage}")
                ROUND_STEPS[stage](run_, rcfg, r)
    except LabelsNeeded as e:
        run_.say(f"posttrain run: paused for labels: {e}")
        return 3
    if state.is_main_process:
        rows = report.write_report(run_.dir.root)
        print(report.format_table(rows))
        print(f"report: {run_.dir.root / 'report.html'}")
    state.wait_for_everyone()
    return 0
