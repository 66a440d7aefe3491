"""From a run's partial stage settings to the stage configs: defaults, section, variant, then what the run fills in.

A run config's `rm`, `rs`, `sft` and `dpo` sections hold partial settings of RMStageConfig, SampleStageConfig,
SFTStageConfig and DPOStageConfig. Each stage config is built as: the run's defaults (model dtype, LoRA, seed) <-
the section <- a variant's overrides <- what the run owns (models, data files, output dirs). Building them with
placeholder paths at load time makes a bad key fail before anything runs, named from the run config's top
(`rm.train.learning_rat: unknown key (did you mean rm.train.learning_rate?)`).
"""

from __future__ import annotations

import copy
from pathlib import Path

from posttrain.config import ConfigError, from_dict, to_dict

PLACEHOLDER = "<filled in by the run>"  # what validation puts where the run fills in a path
# keys of a stage section that steer the run and are not fields of the stage config
RUN_KEYS = {"rm": ("variants", "variant_weights", "pairs_from"), "rs": ("task_verifier",),
            "sft": ("variants", "variant_weights", "continue_from_policy", "recent_rounds", "mix"),
            "dpo": ("variants", "variant_weights", "pairs_from")}
PAIR_SOURCES = ("rs", "prefs", "given")
TASK_VERIFIER_MODES = ("gate", "audit", "off")  # rs.task_verifier: how RS uses the task's own verifier


def deep_merge(base: dict, update: dict) -> dict:
    """`base` with `update` laid over it: mappings merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _rekey(message: str, key: str) -> str:
    """'rm: train.x: unknown key (did you mean train.y?)' -> 'rm.train.x: unknown key (did you mean rm.train.y?)'."""
    return f"{key}.{message.removeprefix(f'{key}: ')}".replace("did you mean ", f"did you mean {key}.")


def build(cls: type, data: dict, key: str):
    """`cls` from a mapping; a ConfigError names the key from the run config's top (`key.field`)."""
    try:
        return from_dict(cls, data, source=key)
    except ConfigError as e:
        raise ConfigError(_rekey(str(e), key)) from None


def stage_settings(cfg, section: str, variant: dict | None = None) -> dict:
    """The run's defaults (model, LoRA, seed), then the section's settings, then a variant's; run-only keys dropped."""
    own = {k: v for k, v in getattr(cfg, section).items() if k not in RUN_KEYS[section]}
    if section == "rs":
        defaults = {"policy": to_dict(cfg.model), "seed": cfg.seed, "rewards": [{"kind": "rm"}]}
    else:
        defaults = {"model": to_dict(cfg.model), "lora": to_dict(cfg.lora), "train": {"seed": cfg.seed}}
    return deep_merge(deep_merge(defaults, own), variant or {})


def variants(cfg, section: str) -> list[dict]:
    return list(getattr(cfg, section).get("variants") or [])


def rm_config(cfg, out: Path, data: list[str], variant: dict | None = None):
    """The RM from the run's base (or rm.model.path) on the given files plus `data`."""
    from rewards.model import RMStageConfig

    d = stage_settings(cfg, "rm", variant)
    d["train"]["output_dir"] = str(out)
    d["data"] = list(d.get("data") or []) + data
    return build(RMStageConfig, d, "rm")


def sft_config(cfg, model: str, out: Path, data: list[str | dict], variant: dict | None = None):
    """SFT on the given sources (sft.data, each weight times sft.mix.given) and the run's files (a path, or
    {path, weight})."""
    from posttrain.sft import SFTStageConfig

    d = stage_settings(cfg, "sft", variant)
    d["model"]["path"], d["train"]["output_dir"] = model, str(out)
    given = float((cfg.sft.get("mix") or {}).get("given", 1.0))
    own = [{**g, "weight": g.get("weight", 1.0) * given} if isinstance(g, dict) else g for g in d.get("data") or []]
    d["data"] = own + [{"path": p} if isinstance(p, str) else p for p in data]
    return build(SFTStageConfig, d, "sft")


def dpo_config(cfg, model: str, out: Path, data: list[str], variant: dict | None = None):
    from posttrain.dpo import DPOStageConfig

    d = stage_settings(cfg, "dpo", variant)
    d["model"]["path"], d["train"]["output_dir"] = model, str(out)
    d["data"] = list(d.get("data") or []) + [{"path": p} for p in data]
    return build(DPOStageConfig, d, "dpo")


def task_verifier_source(cfg) -> dict | None:
    """The task's verifier as an RS reward source (weight 0): a gate by default, an audit-only score with
    rs.task_verifier: audit (it still measures how often the kept samples pass), or None with off, for a task
    without a verifier, or when the sources already list a verifier of that kind."""
    from rounds.tasks import Task

    mode = cfg.rs.get("task_verifier", "gate")
    if mode not in TASK_VERIFIER_MODES:
        raise ConfigError(f"rs.task_verifier: {mode!r} is not one of {', '.join(TASK_VERIFIER_MODES)}")
    source = Task(cfg.task).reward_source()
    listed = stage_settings(cfg, "rs").get("rewards") or []
    if mode == "off" or source is None or any(isinstance(s, dict) and s.get("kind") == source["kind"]
                                              for s in listed):
        return None
    return {**source, "name": "task_verifier", "weight": 0.0, "gate": mode == "gate"}


def rs_config(cfg, policy: str, prompts: Path, out: Path, rm_path: str | None):
    """RS from `policy`; a reward source {kind: rm} without a path scores with `rm_path` (the latest RM); the task's
    verifier joins the sources (see task_verifier_source)."""
    from rounds.rejection import SampleStageConfig

    d = stage_settings(cfg, "rs")
    d["policy"]["path"], d["prompts"], d["output_dir"] = policy, [str(prompts)], str(out)
    for source in d.get("rewards") or []:
        if isinstance(source, dict) and source.get("kind") == "rm" and not source.get("path"):
            source["path"] = rm_path or ""
    if (verifier := task_verifier_source(cfg)) is not None:
        d["rewards"] = [*(d.get("rewards") or []), verifier]
    return build(SampleStageConfig, d, "rs")


def rs_uses_run_rm(cfg) -> bool:
    """Whether RS scores with the run's own reward model (a {kind: rm} source without a path)."""
    rewards = stage_settings(cfg, "rs").get("rewards") or []
    return any(isinstance(s, dict) and s.get("kind") == "rm" and not s.get("path") for s in rewards)


def validate(cfg) -> None:
    """Build every stage config (and variant) of a round's settings with placeholder paths."""
    model, out, data = f"{PLACEHOLDER}/model", Path(PLACEHOLDER) / "out", [f"{PLACEHOLDER}/data.jsonl"]
    builders = {"rm": lambda v: rm_config(cfg, out, data, v),
                "sft": lambda v: sft_config(cfg, model, out, data, v),
                "dpo": lambda v: dpo_config(cfg, model, out, data, v)}
    for section, make in builders.items():
        for variant in [None, *variants(cfg, section)]:
            stage = make(variant)
            if section != "rm" and stage.lora.enabled and not stage.lora.merge:
                raise ConfigError(f"{section}.lora.merge: false saves an adapter, but the next stage loads this "
                                  "stage's model as a checkpoint; keep merge: true in a run")
        weights = getattr(cfg, section).get("variant_weights")
        if weights is not None and len(weights) != len(variants(cfg, section)):
            raise ConfigError(f"{section}.variant_weights: {len(weights)} weights for "
                              f"{len(variants(cfg, section))} variants")
    rs_config(cfg, model, Path(data[0]), out, f"{PLACEHOLDER}/rm")
    switch = cfg.sft.get("continue_from_policy")
    if switch is not None and not isinstance(switch, bool):
        raise ConfigError(f"sft.continue_from_policy: expected true or false, got {type(switch).__name__} {switch!r}")
    recent = cfg.sft.get("recent_rounds")
    if recent is not None and (isinstance(recent, bool) or not isinstance(recent, int) or recent < 1):
        raise ConfigError(f"sft.recent_rounds: {recent!r}; give a whole number of rounds >= 1 (null: every round)")
    for section in ("rm", "dpo"):
        for source in getattr(cfg, section).get("pairs_from") or []:
            if source not in PAIR_SOURCES:
                raise ConfigError(f"{section}.pairs_from: {source!r} is not one of {', '.join(PAIR_SOURCES)}")
