"""The settings of `posttrain run`: RunConfig (the YAML file), the settings of one round (round_overrides merged
in), and the checks that make a bad config fail at load, before any stage runs (docs/tasks.md, docs/run-dir.md)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, LoRAConfig, ModelConfig, check_range, field, to_dict
from rounds import stage_configs, synth_step
from rounds.collect import PrefsConfig
from rounds.evaluate import EvalConfig, check_unique_names
from rounds.stage_configs import PAIR_SOURCES, build, deep_merge, rs_uses_run_rm
from rounds.tasks import Task, TaskConfig

ROUND_OVERRIDE_KEYS = ("stages", "prefs", "rm", "rs", "synth", "sft", "dpo", "average")


@dataclasses.dataclass
class StagesConfig:
    rm: bool = field(True, help="train a reward model this round")
    rs: bool = field(True, help="rejection-sample this round")
    sft: bool = field(True, help="fine-tune this round")
    dpo: bool = field(True, help="run DPO this round")


@dataclasses.dataclass
class AverageConfig:
    members: list[str] = field(default_factory=list, help="round soup: average these models of the round (sft, dpo) "
                                                          "into the round's policy; [] = off")
    weights: list[float] | None = field(None, help="one weight per member (null: uniform)")

    def __post_init__(self):
        if any(m not in ("sft", "dpo") for m in self.members) or len(set(self.members)) != len(self.members):
            raise ConfigError(f"members: {self.members}; list distinct stages among sft, dpo")
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ConfigError(f"weights: {len(self.weights)} weights for {len(self.members)} members")


@dataclasses.dataclass
class RunConfig:
    name: str = field("", help="run name: the run lives in runs_dir/name")
    runs_dir: str = field("runs", help="parent dir of runs")
    model: ModelConfig = field(default_factory=ModelConfig, help="the base (pre-trained) checkpoint: RM and SFT start "
                                                                 "from it every round")
    lora: LoRAConfig = field(default_factory=LoRAConfig, help="LoRA for every training stage (a section may override)")
    rounds: int = field(1, help="rounds to run; raising it on a finished run continues it")
    seed: int = field(0, help="seed of prompt selection, sampling and training (a section may override)")
    task: TaskConfig = field(default_factory=TaskConfig, help="the task: its prompts (a generator or data files), "
                                                             "held-out split, verifier; prompts per round")
    prefs: PrefsConfig = field(default_factory=PrefsConfig, help="preference collection and given preference files")
    stages: StagesConfig = field(default_factory=StagesConfig, help="stage on/off switches (per round: "
                                                                    "round_overrides)")
    rm: dict[str, Any] = field(default_factory=dict, help="RMStageConfig settings; pairs_from: rs, prefs and/or given "
                                                          "(default all); variants: [partial overrides] trains each "
                                                          "and averages them (variant_weights)")
    rs: dict[str, Any] = field(default_factory=dict, help="SampleStageConfig settings (k, temperature, rewards, ...); "
                                                          "rewards default [{kind: rm}] = this round's RM")
    synth: synth_step.SynthStepConfig = field(default_factory=synth_step.SynthStepConfig,
                                              help="teacher-made SFT data each round: builders, teacher, judge")
    sft: dict[str, Any] = field(default_factory=dict, help="SFTStageConfig settings; data: given SFT sources; "
                                                           "continue_from_policy: start from the last policy, not "
                                                           "the base; recent_rounds: N = RS data of the last N "
                                                           "rounds only (default every round); mix: weights by "
                                                           "source (rs, synth, synth:<kind>, given)")
    dpo: dict[str, Any] = field(default_factory=dict, help="DPOStageConfig settings; pairs_from: this round's rs, "
                                                           "prefs and/or given pairs (default all three)")
    average: AverageConfig = field(default_factory=AverageConfig, help="optional soup of the round's models")
    evals: list[EvalConfig] = field(default_factory=lambda: [EvalConfig()], help="what is measured on the base and "
                                    "after every round (the first eval is the run's headline figure)")
    round_overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict, help="round -> partial settings for that round, e.g. {3: {rs: {temperature: 0.6}}}")

    def __post_init__(self):
        if not self.name:
            raise ConfigError("name: missing; the run is written to runs_dir/name")
        check_model_path("model.path", self.model.path)
        check_range("rounds", self.rounds, low=1)
        check_unique_names(self.evals)
        for r, override in self.round_overrides.items():
            check_round_override(self, r, override)
        for r in range(1, self.rounds + 1):
            validate_round(self, r)


def check_model_path(key: str, path: str) -> None:
    from posttrain.backbone import CONFIGS, SMOLLM2

    if not path:
        raise ConfigError(f"{key}: missing; name the base checkpoint: an HF dir, Meta dir, .gguf file or a config "
                          f"name ({SMOLLM2}, llama3.1-8b, tiny, ...)")
    if path not in CONFIGS and path != SMOLLM2 and not Path(path).exists():
        raise ConfigError(f"{key}: {path}: no such file or directory, and not a config name ({SMOLLM2}, tiny, ...)")


def _override(cfg: RunConfig, r: int) -> dict:
    return next((o for k, o in cfg.round_overrides.items() if str(k) == str(r)), {})


def check_round_override(cfg: RunConfig, r: str, override: dict) -> None:
    if not str(r).isdigit() or not 1 <= int(r) <= cfg.rounds:
        raise ConfigError(f"round_overrides.{r}: not a round of this run (1..{cfg.rounds})")
    for key in override:
        if key not in ROUND_OVERRIDE_KEYS:
            raise ConfigError(f"round_overrides.{r}.{key}: cannot change per round (allowed: "
                              f"{', '.join(ROUND_OVERRIDE_KEYS)})")


def check_task(cfg: RunConfig) -> None:
    """Read the task's records now, so that a bad file, line or field, too few eval prompts, or a train pool that
    every round's fresh prompts would exhaust, fails before anything runs."""
    from posttrain.data import RecordError

    task = Task(cfg.task, cfg.seed)
    needed = cfg.rounds * (cfg.task.pref_prompts + cfg.task.rs_prompts)  # fresh prompts only: retries reuse them
    try:
        for e in cfg.evals:
            (Task(e.task, cfg.seed) if e.task else task).eval_prompts(e.num_prompts)
        task.train_prompts(needed - 1, 1)
    except (RecordError, ValueError, OSError) as e:
        raise ConfigError(f"task: {e}" if not str(e).startswith("task") else str(e)) from None


def round_config(cfg: RunConfig, r: int) -> RunConfig:
    """The settings of round r: the run's, with round_overrides[r] merged in (sections checked as they merge)."""
    override = _override(cfg, r)
    if not override:
        return cfg
    out = copy.copy(cfg)
    for key, value in override.items():
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            value = build(type(current), deep_merge(to_dict(current), value), f"round_overrides.{r}.{key}")
        else:
            value = deep_merge(current, value)
        setattr(out, key, value)
    out.round_overrides = {}
    return out


def validate_round(cfg: RunConfig, r: int) -> None:
    rcfg = round_config(cfg, r)
    try:
        stage_configs.validate(rcfg)
        synth_step.validate(rcfg)
    except ConfigError as e:
        raise ConfigError(f"round_overrides.{r}.{e}" if _override(cfg, r) else str(e)) from None
    if rcfg.prefs.collects(r) and rcfg.prefs.labeler == "verifier" and rcfg.task.verifier_name is None:
        raise ConfigError("prefs.labeler: verifier, but the task has no verifier (task.verifier: none); label with "
                          "a judge (labeler: judge) or people (labeler: human), or give pairs (prefs.given)")
    if r > 1:
        return
    check_task(rcfg)
    if rcfg.stages.rm and not (rcfg.prefs.collects(1) or given_prefs(rcfg, 1) or rcfg.rm.get("data")):
        raise ConfigError("prefs.rounds: round 1 trains a reward model but has no preference data; collect "
                          "preferences in round 1, give files (prefs.given, rm.data) or set stages.rm: false")
    if rcfg.stages.rs and rs_uses_run_rm(rcfg) and not rcfg.stages.rm:
        raise ConfigError("rs.rewards: {kind: rm} scores with the run's reward model, but stages.rm is off in "
                          "round 1; give the rm source a path or score with a verifier ({kind: answer})")


def given_prefs(cfg: RunConfig, r: int) -> list[str]:
    return [p for k, files in cfg.prefs.given.items() if str(k) == str(r) for p in files]


def prefs_unused(cfg: RunConfig, r: int) -> str:
    """Why round r's collected pairs would feed nothing ('' when some stage reads them): DPO reads them in round r
    only, a reward model in round r or any later one (rm.pairs_from and dpo.pairs_from name the sources)."""
    def reads(rcfg: RunConfig, section: str) -> bool:
        return "prefs" in (getattr(rcfg, section).get("pairs_from") or PAIR_SOURCES)

    this = round_config(cfg, r)
    if this.stages.dpo and reads(this, "dpo"):
        return ""
    if any((rc := round_config(cfg, r_)).stages.rm and reads(rc, "rm") for r_ in range(r, cfg.rounds + 1)):
        return ""
    return (f"no stage reads its pairs (DPO in round {r} and every reward model from round {r} on are off or leave "
            "prefs out of pairs_from)")
