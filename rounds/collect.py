"""Preference collection, the paper's human-annotation step: K >= 2 responses per prompt from the current policy,
labelled by the task's verifier (correct > wrong; `verifier` is its reward-source mapping), by judge reward sources, or by people through a labels file.

The stage dir (`round_NN/prefs/`):
```
prompts.jsonl          the prompts of this round (written by the orchestrator)
sampled/               the rejection-sampling stage run on them: samples/ shards, pairs.jsonl, manifest.json, DONE
pairs.jsonl            the labelled preference records (up to pairs_per_prompt each), source "prefs:<labeler>"
manifest.json, DONE    DONE last
```
With `labeler: human` the responses are sampled unscored; the run then stops and asks for a labels file (one JSON
line per labelled prompt: `{"prompt_id", "chosen": i, "rejected": j, "rating"?}`, indices into the prompt's
completions in `sampled/samples/`); running again picks the labels up.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from posttrain.config import ConfigError, ModelConfig, check_choice, check_range, field
from posttrain.data import RecordError, file_sha256, iter_raw, read_records, write_jsonl
from rewards.sources import RewardSourceConfig
from rounds import rejection
from rounds.state import RunDir

LABELERS = ("verifier", "judge", "human")


@dataclasses.dataclass
class PrefsConfig:
    rounds: list[int] | None = field(None, help="rounds that collect preferences (null: every round, []: none)")
    labeler: str = field("verifier", help="verifier (the task's checker: correct > wrong), judge (the judge reward "
                                          "sources) or human (a labels file per round)")
    k: int = field(4, help="responses sampled per prompt (at least 2)")
    temperature: float = field(1.0, help="sampling temperature of the responses")
    top_p: float = field(1.0, help="nucleus sampling mass, in (0, 1]")
    max_new_tokens: int = field(64, help="tokens per response at most")
    batch_size: int = field(64, help="sequences decoded together")
    min_margin: float = field(0.0, help="smallest label-score gap (chosen - rejected) that makes a pair")
    pairs_per_prompt: int = field(1, help="pairs per prompt at most: a top-scored response against each distinct "
                                          "lower-scored one, worst first (1 = best vs worst)")
    keep_truncated: bool = field(False, help="let a response cut at max_new_tokens be the chosen one")
    judge: list[RewardSourceConfig] = field(default_factory=list, help="labeler judge: reward sources that label, "
                                                                        "e.g. [{kind: rm, path: judge-rm-dir}]")
    labels: str = field("", help="labeler human: labels file per round, {round} filled in (labels/round_{round}.jsonl)")
    given: dict[str, list[str]] = field(default_factory=dict, help="round -> preference files given for that round: "
                                                                   "the RM uses them from then on, DPO in that round")

    def __post_init__(self):
        check_choice("labeler", self.labeler, LABELERS)
        if self.k < 2:
            raise ConfigError(f"k: {self.k} responses per prompt; a preference needs at least 2 to compare")
        check_range("max_new_tokens", self.max_new_tokens, low=1)
        check_range("pairs_per_prompt", self.pairs_per_prompt, low=1)
        if self.labeler == "judge" and not self.judge:
            raise ConfigError("judge: empty; labeler judge needs reward sources, e.g. [{kind: rm, path: judge-dir}]")
        if self.labeler == "human" and "{round" not in self.labels:
            raise ConfigError("labels: labeler human needs a labels file template with {round}, "
                              "e.g. labels/round_{round}.jsonl")

    def collects(self, round_idx: int) -> bool:
        return self.rounds is None or round_idx in self.rounds


class LabelsNeeded(RuntimeError):
    """The responses are sampled and wait for human labels; run again once the labels file exists."""


def _label_sources(cfg: PrefsConfig, verifier: dict | None) -> list[RewardSourceConfig]:
    if cfg.labeler == "verifier":
        if verifier is None:
            raise ConfigError("prefs.labeler: verifier, but the task has no verifier; label with a judge or people")
        return [RewardSourceConfig(**verifier)]
    if cfg.labeler == "judge":
        return cfg.judge
    # human: sample unscored (a weightless always-matching rule gives every response reward 0, so no pairs)
    return [RewardSourceConfig(kind="regex", name="unlabelled", weight=0.0, options={"pattern": ""})]


def sample_config(cfg: PrefsConfig, policy: ModelConfig, prompts: Path, out: Path, *, verifier: dict | None,
                  seed: int) -> rejection.SampleStageConfig:
    return rejection.SampleStageConfig(
        policy=policy, prompts=[str(prompts)], output_dir=str(out / "sampled"), k=cfg.k, temperature=cfg.temperature,
        top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.batch_size,
        rewards=_label_sources(cfg, verifier), min_margin=cfg.min_margin, keep_truncated=cfg.keep_truncated,
    )


def _samples(sampled: Path) -> list[dict]:
    return [s for shard in sorted((sampled / "samples").glob("shard-*.jsonl")) for s in read_records(shard, "samples")]


def _text(completion: dict) -> str:
    """What tells two responses apart: the content, or the tool calls."""
    message = completion["message"]
    calls = message.get("tool_calls")
    return (message.get("content") or "").strip() + (json.dumps(calls, sort_keys=True) if calls else "")


def _usable(completion: dict) -> bool:
    message = completion["message"]
    return bool((message.get("content") or "").strip() or message.get("tool_calls"))


def scored_pairs(completions: list[dict], cfg: PrefsConfig) -> list[tuple[dict, dict]]:
    """(chosen, rejected) of one prompt: a top-scored response (cycling through ties; not one cut at max_new_tokens
    unless keep_truncated) against each distinct response scored at least min_margin lower, worst first."""
    usable = [c for c in completions if _usable(c)]
    candidates = [c for c in usable if cfg.keep_truncated or c["stop_reason"] != "length"]
    if not candidates:
        return []
    best = max(c["reward"] for c in candidates)
    winners = [c for c in candidates if c["reward"] == best]
    losers, seen = [], {_text(w) for w in winners}
    for c in sorted(usable, key=lambda c: c["reward"]):
        if c["reward"] < best and best - c["reward"] >= cfg.min_margin and _text(c) not in seen:
            losers.append(c)
            seen.add(_text(c))
    return [(winners[i % len(winners)], loser) for i, loser in enumerate(losers[:cfg.pairs_per_prompt])]


def _tools(prompt: dict) -> dict:
    """The prompt's tool definitions for its pairs, so that the RM and DPO render them as sampling did."""
    return {"tools": prompt["tools"]} if prompt.get("tools") else {}


def _labelled_pairs(cfg: PrefsConfig, sampled: Path, prompts: dict[str, dict]) -> list[dict]:
    pairs = []
    for sample in _samples(sampled):
        prompt = prompts[sample["prompt_id"]]
        for i, (chosen, rejected) in enumerate(scored_pairs(sample["completions"], cfg)):
            pairs.append({"id": f"{prompt['id']}/{i}", "prompt": prompt["messages"], "chosen": [chosen["message"]],
                          "rejected": [rejected["message"]], "margin": chosen["reward"] - rejected["reward"],
                          **_tools(prompt), "source": f"prefs:{cfg.labeler}"})
    return pairs


def _human_pairs(labels_path: Path, sampled: Path, prompts: dict[str, dict]) -> list[dict]:
    """Preference records from a labels file: chosen/rejected are indices into a prompt's sampled completions."""
    samples = {s["prompt_id"]: s for s in _samples(sampled)}
    pairs = []
    for where, label in iter_raw(labels_path):
        if not isinstance(label, dict) or label.get("prompt_id") not in samples:
            raise RecordError(f"{where}: prompt_id: {label.get('prompt_id') if isinstance(label, dict) else label!r} "
                              "is not a sampled prompt of this round")
        completions = samples[label["prompt_id"]]["completions"]
        for key in ("chosen", "rejected"):
            if not isinstance(label.get(key), int) or not 0 <= label[key] < len(completions):
                raise RecordError(f"{where}: {key}: needs a completion index in 0..{len(completions) - 1}")
        if label["chosen"] == label["rejected"]:
            raise RecordError(f"{where}: rejected: the same completion as chosen")
        prompt = prompts[label["prompt_id"]]
        rating = {"rating": label["rating"]} if "rating" in label else {}
        pairs.append({"id": prompt["id"], "prompt": prompt["messages"], **rating,
                      "chosen": [completions[label["chosen"]]["message"]],
                      "rejected": [completions[label["rejected"]]["message"]], **_tools(prompt),
                      "source": "prefs:human"})
    return pairs


def collect(cfg: PrefsConfig, policy: ModelConfig, prompts: Path, out: Path, *, round_idx: int,
            verifier: dict | None, seed: int) -> None:
    """Sample, label, write pairs.jsonl, manifest.json and DONE (rank 0); every process takes part in sampling."""
    from accelerate import PartialState

    sampling = sample_config(cfg, policy, prompts, out, verifier=verifier, seed=seed)
    rejection.run(sampling)
    state = PartialState()
    labels_path = Path(cfg.labels.format(round=round_idx)) if cfg.labeler == "human" else None
    if labels_path is not None and not labels_path.is_file():
        raise LabelsNeeded(f"{out / 'sampled' / 'samples'}: {cfg.k} responses to each prompt wait for labels; write "
                           f"{labels_path} (one line per prompt: {{\"prompt_id\", \"chosen\": i, \"rejected\": j}}, "
                           "indices into its completions) and run again")
    if state.is_main_process:
        by_id = {p["id"]: p for p in read_records(prompts, "prompt")}
        if labels_path is not None:
            pairs = _human_pairs(labels_path, out / "sampled", by_id)
        else:
            pairs = _labelled_pairs(cfg, out / "sampled", by_id)
        write_jsonl(out / "pairs.jsonl", pairs)
        sampled = RunDir.manifest(out / "sampled")
        inputs = {"policy": policy.path, "prompts": {str(prompts): file_sha256(prompts)}}
        if labels_path is not None:
            inputs["labels"] = {str(labels_path): file_sha256(labels_path)}
        RunDir.mark_done(out, {"stage": "prefs", "labeler": cfg.labeler, "inputs": inputs,
                               "metrics": {"prompts": sampled["metrics"]["prompts"], "pairs": len(pairs),
                                           "mean_label_score": sampled["metrics"]["mean_reward"]},
                               "outputs": {"pairs": "pairs.jsonl", "samples": "sampled/"}})
    state.wait_for_everyone()
