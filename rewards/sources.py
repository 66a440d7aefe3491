"""Reward sources composed into one reward: a reward model and/or rule-based verifiers, weighted.

Each source scores every (prompt record, completion message); its raw score is kept under `scores[name]`, and the
reward is the weighted sum of the sources' scores, each optionally normalised over the K samples of its prompt
(z-score or min-max) so that an RM logit and a 0/1 verifier can share one scale.

A source can also be a gate: a sample passes it when the source's raw score is at least `pass_score`, and only
samples that pass every gate are eligible for SFT (rounds/rejection.py). Verifiers are gates unless told otherwise,
so that a task with a verifier never trains on an answer that fails it; a reward model gates only when asked.
Every source sees the prompt's tool definitions: the RM renders the dialog with them, verifiers read them from meta.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from posttrain.config import ConfigError, check_choice, check_range, field

RM_KIND = "rm"
JUDGE_KIND = "judge"
MODEL_KINDS = (RM_KIND, JUDGE_KIND)  # sources that are models (a path), not rules
NORMALIZATIONS = ("none", "zscore", "minmax")


@dataclasses.dataclass
class RewardSourceConfig:
    kind: str = field("", help="rm (a trained reward model), judge (an LLM judge: rewards/judge.py) or a verifier: "
                               "a built-in (answer, exact, regex, unit_tests, tool_call, json_schema, constraints), "
                               "an entry point, or module:function (docs/verifiers.md)")
    weight: float = field(1.0, help="weight of this source in the summed reward")
    path: str = field("", help="the reward model dir (kind rm) or the judge model (kind judge: any model source)")
    name: str = field("", help="key of this source in each sample's scores (default: kind)")
    normalize: str = field("none", help="before weighting, over the K samples of a prompt: none, zscore or minmax")
    batch_size: int = field(8, help="sequences per reward-model forward or judge decode batch (rm, judge)")
    options: dict[str, Any] = field(default_factory=dict, help="verifier options, a prompt's meta overriding them "
                                                               "except the sandbox limits; judge: rubric (general or "
                                                               "code), max_new_tokens")
    gate: bool | None = field(None, help="only samples whose raw score here is >= pass_score may be kept for SFT "
                                         "(null: true for a verifier, false for an rm or a judge)")
    pass_score: float = field(1.0, help="the raw score that passes this source (a gate's threshold; also what the "
                                        "stage counts as passing in its metrics)")

    def __post_init__(self):
        from rewards.verifiable import get_verifier, verifier_names

        names = (*MODEL_KINDS, *verifier_names())
        known = f"{', '.join(names)}, or module:function on the Python path"
        if not self.kind:
            raise ConfigError(f"kind: missing; one of {known}")
        if self.kind not in names and ":" not in self.kind:
            raise ConfigError(f"kind: {self.kind!r} is not one of {known}")
        if self.kind not in MODEL_KINDS:
            try:
                get_verifier(self.kind)
            except ValueError as e:
                raise ConfigError(f"kind: {e}") from None
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_range("batch_size", self.batch_size, low=1)
        if self.kind in MODEL_KINDS and not self.path:
            raise ConfigError(f"path: missing; a reward source of kind {self.kind} needs its model")
        if self.kind == JUDGE_KIND:
            from rewards.judge import RUBRICS

            unknown = set(self.options) - {"rubric", "max_new_tokens"}
            if unknown:
                raise ConfigError(f"options.{sorted(unknown)[0]}: not a judge option (rubric, max_new_tokens)")
            check_choice("options.rubric", self.options.get("rubric", "general"), tuple(RUBRICS))
        self.name = self.name or self.kind
        if self.gate is None:
            self.gate = self.kind not in MODEL_KINDS

    def passes(self, score: float) -> bool:
        return score >= self.pass_score


def normalize(scores: list[float], how: str) -> list[float]:
    """Scores of one prompt's samples: z-score (population std) or min-max to [0, 1]; all-equal scores map to 0."""
    if how == "none":
        return list(scores)
    low, high = min(scores), max(scores)
    if high == low:
        return [0.0] * len(scores)
    if how == "minmax":
        return [(s - low) / (high - low) for s in scores]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / std for s in scores]


CONFIG_ONLY_OPTIONS = ("allow_unisolated", "timeout_s", "memory_mb")  # sandbox limits: never from a data file


def _verifier_meta(source: RewardSourceConfig, record: dict) -> dict:
    """The source's options, then the record's tools (for tool_call), then its meta: the later one wins.

    Sandbox limits are read from the options alone, so that a data file can never relax them.
    """
    tools = {"tools": record["tools"]} if record.get("tools") else {}
    meta = {k: v for k, v in (record.get("meta") or {}).items() if k not in CONFIG_ONLY_OPTIONS}
    return {**source.options, **tools, **meta}


class RewardComposer:
    """Scores groups of completions (the K samples of each prompt) with every configured source."""

    def __init__(self, sources: list[RewardSourceConfig]):
        if not sources:
            raise ConfigError("rewards: no reward source; add an rm or a verifier (answer, regex, ...)")
        names = [s.name for s in sources]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ConfigError(f"rewards: two sources named {duplicate!r}; give each a distinct name")
        self.sources = sources
        self._reward_models: dict[str, Any] = {}
        self._judges: dict[tuple[str, int], Any] = {}

    def _reward_model(self, source: RewardSourceConfig):
        if source.path not in self._reward_models:
            from rewards.model import RewardModel

            self._reward_models[source.path] = RewardModel.from_pretrained(source.path)
        return self._reward_models[source.path]

    def _raw_scores(self, source: RewardSourceConfig, records: list[dict], messages: list[dict]) -> list[float]:
        if source.kind == RM_KIND:
            prompts, tools = [r["messages"] for r in records], [r.get("tools") for r in records]
            scores = self._reward_model(source).score(prompts, messages, batch_size=source.batch_size, tools=tools)
            return [float(s) for s in scores]
        if source.kind == JUDGE_KIND:
            from rewards.judge import ModelJudge, rubric_scores

            key = (source.path, source.batch_size)
            if key not in self._judges:
                self._judges[key] = ModelJudge(source.path, batch_size=source.batch_size)
            return rubric_scores(self._judges[key], [r["messages"] for r in records], messages,
                                 rubric=source.options.get("rubric", "general"),
                                 max_new_tokens=source.options.get("max_new_tokens", 64),
                                 tools=[r.get("tools") for r in records])
        from rewards.verifiable import get_verifier

        verify = get_verifier(source.kind)
        return [float(verify(m, _verifier_meta(source, r))) for r, m in zip(records, messages)]

    def score(self, records: list[dict], groups: list[list[dict]]) -> list[list[dict]]:
        """For prompt records and their groups of completion messages: `{"reward", "scores"}` per completion."""
        if len(records) != len(groups):
            raise ValueError(f"{len(records)} prompt records but {len(groups)} groups of completions")
        flat_records = [r for r, group in zip(records, groups) for _ in group]
        flat_messages = [m for group in groups for m in group]
        out = [[{"reward": 0.0, "scores": {}} for _ in group] for group in groups]
        for source in self.sources:
            raw = iter(self._raw_scores(source, flat_records, flat_messages))
            for scored in out:
                group_raw = [next(raw) for _ in scored]
                for item, value, norm in zip(scored, group_raw, normalize(group_raw, source.normalize)):
                    item["scores"][source.name] = value
                    item["reward"] += source.weight * norm
        return out
