"""Teacher-made data inside the rounds: the `synth` step of a round, and the SFT mix that weighs it.

A run config's `synth:` section lists builders (partial `posttrain synth` settings: kind general, code or tooluse,
their prompts, responses and curation). In each round that runs them, every builder writes
`round_NN/synth/bNN-<kind>/` (sft.jsonl, removed.jsonl, manifest.json, DONE: a rerun skips a finished builder, a
killed one starts again); the step's own manifest and DONE come last. The teacher is `synth.teacher.path`, or the
current policy when that is empty; a builder reading prompts from a file with no path answers this round's RS prompts
(so that a stronger teacher distils into them: the Llama 3.3 step). Every builder is decontaminated against every
eval of the run, automatically: the eval prompts are written to `round_NN/synth/eval_prompts.jsonl` and checked by
word n-grams (synth/curate.py).

`sft.mix` weighs the round's SFT sources by kind: `rs` (RS picks), `synth` or `synth:<kind>` (this step's records)
and `given` (the sft.data files); a weight of 2 trains every record twice, 0.5 a seeded half of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, ModelConfig, field
from rounds.stage_configs import PLACEHOLDER, build, deep_merge

MIX_KEYS = ("rs", "synth", "given")


@dataclasses.dataclass
class SynthStepConfig:
    rounds: list[int] | None = field(None, help="rounds that run the builders (null: every round)")
    teacher: ModelConfig = field(default_factory=ModelConfig, help="the teacher (path empty: the current policy)")
    judge: ModelConfig = field(default_factory=ModelConfig, help="the judge (path empty: the teacher judges)")
    builders: list[dict[str, Any]] = field(default_factory=list, help="partial `posttrain synth` settings, one per "
                                                                      "builder: kind, prompts, responses, code, "
                                                                      "tooluse, curate")

    def runs_in(self, r: int) -> bool:
        return bool(self.builders) and (self.rounds is None or r in self.rounds)


def builder_config(step: SynthStepConfig, i: int, *, out: Path, teacher: str, evals: str, prompts: str, seed: int):
    """The SynthConfig of builder i: its settings over the run's, the eval prompts added to its decontamination."""
    from synth.pipeline import SynthConfig

    d = deep_merge({"teacher": dataclasses.asdict(step.teacher), "judge": dataclasses.asdict(step.judge),
                    "seed": seed}, step.builders[i])
    d["teacher"]["path"] = d["teacher"].get("path") or teacher
    d["output_dir"] = str(out)
    decontam = d.setdefault("curate", {}).setdefault("decontam", {})
    decontam["eval_sets"] = [*(decontam.get("eval_sets") or []), evals]
    if (d.get("prompts") or {}).get("method") == "file" and not d["prompts"].get("prompts_path"):
        d["prompts"]["prompts_path"] = prompts
    return build(SynthConfig, d, f"synth.builders[{i}]")


def builder_dir(synth_dir: Path, i: int, step: SynthStepConfig) -> Path:
    return synth_dir / f"b{i:02d}-{step.builders[i].get('kind', 'general')}"


def validate(cfg) -> None:
    """Build every builder's config with placeholder paths, and check sft.mix, so a bad key fails at load."""
    step = cfg.synth
    for i in range(len(step.builders)):
        placeholder = f"{PLACEHOLDER}/x.jsonl"
        builder_config(step, i, out=Path(PLACEHOLDER), teacher="tiny", evals=placeholder, prompts=placeholder, seed=0)
    mix = cfg.sft.get("mix") or {}
    if not isinstance(mix, dict):
        raise ConfigError(f"sft.mix: expected a mapping of source -> weight, got {mix!r}")
    for key, weight in mix.items():
        if key not in MIX_KEYS and not str(key).startswith("synth:"):
            raise ConfigError(f"sft.mix.{key}: not a source (rs, synth, synth:<kind>, given)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"sft.mix.{key}: {weight!r}; give a weight > 0")


def mix_weight(mix: dict, tag: str) -> float:
    """The weight of a source tag (rs, given, synth:<kind>): its own entry, else synth's for a synth kind, else 1."""
    if tag in mix:
        return float(mix[tag])
    return float(mix.get("synth", 1.0)) if tag.startswith("synth:") else 1.0


def synth_files(synth_dir: Path) -> list[tuple[str, str]]:
    """(source tag, sft.jsonl) of every finished builder of one round's synth step that kept records."""
    found = []
    for d in sorted(synth_dir.glob("b*-*")):
        path = d / "sft.jsonl"
        if (d / "DONE").is_file() and path.is_file() and path.stat().st_size > 0:
            found.append((f"synth:{d.name.split('-', 1)[1]}", str(path)))
    return found


def write_eval_prompts(cfg, path: Path) -> None:
    """Every eval's held-out prompts, as prompt records: what the synth data is decontaminated against."""
    from posttrain.data import write_jsonl
    from rounds.tasks import Task

    records = []
    for e in cfg.evals:
        records += Task(e.task or cfg.task, cfg.seed).eval_prompts(e.num_prompts)
    write_jsonl(path, records)


def step_synth(run, rcfg, r: int, teacher: str) -> None:
    """Run every builder (process 0: teacher sampling is not split across processes), then the step's manifest."""
    from posttrain.data import atomic_write_json
    from rounds.state import RunDir
    from synth.pipeline import run as synthesize

    out = run.dir.stage_dir(r, "synth")
    evals, prompts = out / "eval_prompts.jsonl", run.dir.stage_dir(r, "samples") / "prompts.jsonl"
    step = rcfg.synth
    if run.state.is_main_process:
        write_eval_prompts(rcfg, evals)
        builders = []
        for i in range(len(step.builders)):
            cfg = builder_config(step, i, out=builder_dir(out, i, step), teacher=teacher, evals=str(evals),
                                 prompts=str(prompts), seed=rcfg.seed + r)
            manifest = synthesize(cfg)
            builders.append({"dir": cfg.output_dir, "kind": cfg.kind, "generated": manifest["generated"],
                             "kept": manifest["kept"], "removed": manifest["removed"]})
        metrics = {"kept": sum(b["kept"] for b in builders), "generated": sum(b["generated"] for b in builders),
                   "decontaminated": sum(b["removed"].get("decontam", 0) for b in builders)}
        atomic_write_json(out / "builders.json", builders)
        RunDir.mark_done(out, {"stage": "synth", "teacher": teacher, "metrics": metrics, "builders": builders})
    run.state.wait_for_everyone()


def source_tag(path: str) -> str:
    """What a round's SFT file is, from where the run keeps it: rs (round_NN/samples/), synth:<kind>
    (round_NN/synth/bNN-<kind>/), else given."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "samples" and parts[-3].startswith("round_"):
        return "rs"
    if len(parts) >= 4 and parts[-3] == "synth" and parts[-4].startswith("round_"):
        return f"synth:{parts[-2].split('-', 1)[-1]}"
    return "given"


def mix_as_trained(sft_manifest: dict) -> dict[str, int]:
    """Training examples per source tag, from an SFT stage manifest's inputs."""
    mix: dict[str, int] = {}
    for source in sft_manifest.get("inputs") or []:
        tag = source_tag(source["path"])
        mix[tag] = mix.get(tag, 0) + int(source.get("train_examples", 0))
    return mix
