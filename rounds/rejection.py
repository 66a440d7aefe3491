"""The rejection-sampling (RS) stage: K samples per prompt, scored; the accepted best -> SFT data, pairs for DPO/RM.

`posttrain sample CONFIG.yaml` writes into `output_dir`:
```
samples/shard-00000.jsonl   Samples records (docs/rejection-sampling.md), one per prompt, written shard by shard
sft.jsonl                   the best accepted sample(s) of each prompt as SFT records (source "rs", reward)
pairs.jsonl                 preference pairs: an accepted sample against a rejected one, or best vs worst by reward
rejected.jsonl              the prompt records for which no sample was accepted (a run may retry them later)
manifest.json, DONE         counts and pass rates (metrics); DONE last
```
Rejection comes first: a sample is eligible for SFT only if it finished (not cut at max_new_tokens, unless
keep_truncated), passes every gate source (a verifier, by default) and reaches min_reward; the reward then ranks the
eligible ones. A prompt with no eligible sample gives no SFT record. With top_fraction < 1 only that share of the
accepted prompts, ranked by their best reward, is kept (the recipe's quality filter for RM-only scoring).

A rerun skips shards already on disk (same prompts, same policy), so a killed stage resumes without losing or
duplicating a prompt. Under `accelerate launch` process r samples shards r, r + world, ...; after a barrier process 0
merges every shard in shard order, so the outputs do not depend on the number of processes. Each prompt's sampling
seed comes from (seed, prompt id): a prompt gets the same samples whichever shard or process draws it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections import Counter
from pathlib import Path

from posttrain.config import ConfigError, ModelConfig, check_choice, check_range, field, to_dict
from posttrain.data import RecordError, atomic_write_json, file_sha256, iter_raw, read_records, write_jsonl
from posttrain.outdir import changed_keys
from posttrain.tools import CUSTOM_FORMATS
from rewards.sources import JUDGE_KIND, MODEL_KINDS, RM_KIND, RewardComposer, RewardSourceConfig
from rounds.state import RunDir


@dataclasses.dataclass
class SampleStageConfig:
    policy: ModelConfig = field(default_factory=ModelConfig,
                                help="the policy that samples: any load_model source, or a LoRA adapter dir")
    prompts: list[str] = field(default_factory=list, help="prompt record files: JSONL, parquet or HF datasets dirs")
    output_dir: str = field("", help="where samples/, sft.jsonl, pairs.jsonl, manifest.json and DONE go")
    k: int = field(8, help="samples per prompt (the recipe uses 10-30)")
    temperature: float = field(0.8, help="sampling temperature (Llama 3: 0.2-1 for multilingual RS, 0.6 at the end)")
    top_p: float = field(1.0, help="nucleus sampling mass, in (0, 1]")
    max_new_tokens: int = field(512, help="tokens generated per sample at most")
    seed: int = field(0, help="sampling seed; each prompt's stream comes from (seed, prompt id)")
    batch_size: int = field(64, help="sequences decoded together (batch_size // k prompts per prefill)")
    rewards: list[RewardSourceConfig] = field(default_factory=list, help="reward sources, summed with their weights")
    min_margin: float = field(0.0, help="smallest reward gap of a pair ranked by reward alone (both samples "
                                        "accepted, or neither); ties never make one")
    min_reward: float | None = field(None, help="an eligible sample's summed reward is at least this (null: no "
                                                "minimum)")
    top_fraction: float = field(1.0, help="keep the SFT records of this share of the accepted prompts, those with "
                                          "the highest best reward (1: all)")
    max_per_prompt: int = field(1, help="SFT records per prompt at most: its distinct accepted samples, best first")
    system_prompts: dict[str, str] = field(default_factory=dict,
                                           help="capability tag (a prompt's meta.tag) -> steering system prompt")
    keep_system_prompt: bool = field(False, help="keep the steering prompt in SFT and pair records (False: train "
                                                 "without it, so that the style is learnt)")
    keep_truncated: bool = field(False, help="let a sample cut at max_new_tokens be the kept one (its SFT record "
                                             "would end in an eot it never produced)")
    tool_format: str = field("json", help="how prompts with custom tools ask for calls: json, function_tag, pythonic")
    shard_size: int = field(64, help="prompts per shard; a rerun resumes after the last finished shard")
    compile: bool = field(False, help="static KV cache + torch.compile of the decode step (CUDA only)")

    def __post_init__(self):
        if not self.policy.path:
            raise ConfigError("policy.path: missing; name a model dir, .gguf file, config name or LoRA adapter dir")
        if not self.prompts:
            raise ConfigError("prompts: no prompt files; list at least one JSONL/parquet/datasets path")
        if not self.output_dir:
            raise ConfigError("output_dir: missing; where should the samples go?")
        if self.k < 2:
            raise ConfigError(f"k: {self.k} samples per prompt; rejection sampling needs at least 2 to pick a best "
                              "from (the Llama 3 recipe uses 10-30)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature}; greedy decoding makes the K samples identical, "
                              "use > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: {self.top_p} is outside (0, 1]")
        if not self.rewards:
            raise ConfigError("rewards: no reward source; add e.g. {kind: rm, path: ...} or {kind: answer}")
        check_range("max_new_tokens", self.max_new_tokens, low=1)
        check_range("batch_size", self.batch_size, low=1)
        check_range("min_margin", self.min_margin, low=0.0)
        check_range("max_per_prompt", self.max_per_prompt, low=1)
        if not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction: {self.top_fraction} is outside (0, 1]")
        check_range("shard_size", self.shard_size, low=1)
        check_choice("tool_format", self.tool_format, CUSTOM_FORMATS)


def prompt_seed(seed: int, prompt_id) -> int:
    """A 32-bit sampling seed for one prompt, stable across runs, shards and processes."""
    return int(hashlib.sha256(f"{seed}/{prompt_id}".encode()).hexdigest()[:8], 16)


def load_prompts(paths: list[str]) -> list[dict]:
    """Every prompt record of every file, in order; a repeated id is an error naming both places."""
    records, seen = [], {}
    for path in paths:
        for (where, _), record in zip(iter_raw(path), read_records(path, "prompt")):
            if record["id"] in seen:
                raise RecordError(f"{where}: id: {record['id']!r} already used at {seen[record['id']]}")
            seen[record["id"]] = where
            records.append(record)
    return records


def shard_path(output_dir: Path, index: int) -> Path:
    return output_dir / "samples" / f"shard-{index:05d}.jsonl"


def _shard_done(path: Path, records: list[dict], policy: str) -> bool:
    """A shard on disk counts only if it holds exactly these prompts, sampled from this policy."""
    if not path.is_file():
        return False
    samples = read_records(path, "samples")
    same_prompts = [s["prompt_id"] for s in samples] == [r["id"] for r in records]
    return same_prompts and all(s["policy"] == policy for s in samples)


def _steering(cfg: SampleStageConfig, record: dict) -> str | None:
    return cfg.system_prompts.get((record.get("meta") or {}).get("tag"))


def _sample_shard(cfg: SampleStageConfig, model, tokenizer, composer: RewardComposer, records: list[dict],
                  path: Path) -> None:
    """Sample, score and write one shard (its stats file first, the shard itself last and atomically)."""
    from posttrain.generate import generate

    systems = [_steering(cfg, r) for r in records]
    start = time.perf_counter()
    completions = generate(model, tokenizer, [r["messages"] for r in records], k=cfg.k, temperature=cfg.temperature,
                           top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                           seed=[prompt_seed(cfg.seed, r["id"]) for r in records],
                           tools=[r.get("tools") for r in records], system_prompt=systems,
                           tool_format=cfg.tool_format, compile=cfg.compile)
    seconds = time.perf_counter() - start
    scored = composer.score(records, [[c.message for c in group] for group in completions])
    samples = []
    for record, system, group, group_scores in zip(records, systems, completions, scored):
        comps = [{"message": c.message, **s, "num_tokens": c.num_tokens, "stop_reason": c.stop_reason}
                 for c, s in zip(group, group_scores)]
        samples.append({"prompt_id": record["id"], "completions": comps, "policy": cfg.policy.path,
                        **({"system_prompt": system} if system else {})})
    tokens = sum(c.num_tokens for group in completions for c in group)
    atomic_write_json(path.with_suffix(".stats.json"), {"tokens": tokens, "seconds": seconds})
    write_jsonl(path, samples)


def _usable(completion: dict) -> bool:
    message = completion["message"]
    return bool((message.get("content") or "").strip() or message.get("tool_calls"))


def _text(completion: dict) -> str:
    """What tells two samples apart: the content, or the tool calls."""
    message = completion["message"]
    calls = message.get("tool_calls")
    return (message.get("content") or "").strip() + (json.dumps(calls, sort_keys=True) if calls else "")


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """Which samples may become SFT data: finished, passing every gate, at least min_reward."""

    gates: dict[str, float]  # source name -> the raw score that passes it
    min_reward: float | None = None
    keep_truncated: bool = False

    def passes(self, completion: dict) -> bool:
        """Passes the gates and the reward minimum (finished or not)."""
        scores = completion.get("scores") or {}
        gated = all(scores.get(name, float("-inf")) >= low for name, low in self.gates.items())
        return gated and (self.min_reward is None or completion["reward"] >= self.min_reward)

    def eligible(self, completion: dict) -> bool:
        finished = self.keep_truncated or completion["stop_reason"] != "length"
        return _usable(completion) and finished and self.passes(completion)


def select(completions: list[dict], acceptance: Acceptance, *, min_margin: float, max_per_prompt: int = 1
           ) -> tuple[list[dict], dict | None]:
    """(kept, rejected) of one prompt's scored samples.

    kept: up to max_per_prompt distinct eligible samples, highest reward first (the first on ties); [] when none is
    eligible. rejected: the pair's other side, or None. When some non-empty sample fails the gates or min_reward,
    the lowest-reward one of those (acceptance is the label, so no margin applies); otherwise the lowest-reward
    non-empty sample, if the best's reward beats it by more than 0 and by at least min_margin.
    """
    ranked = sorted((c for c in completions if acceptance.eligible(c)), key=lambda c: -c["reward"])
    kept, seen = [], set()
    for c in ranked:
        if _text(c) not in seen and len(kept) < max_per_prompt:
            kept.append(c)
            seen.add(_text(c))
    if not kept:
        return [], None
    usable = [c for c in completions if _usable(c)]
    failed = [c for c in usable if not acceptance.passes(c)]
    if failed:
        return kept, min(failed, key=lambda c: c["reward"])
    worst = min(usable, key=lambda c: c["reward"])
    gap = kept[0]["reward"] - worst["reward"]
    return kept, (worst if gap > 0 and gap >= min_margin else None)


def _records_for(cfg: SampleStageConfig, acceptance: Acceptance, prompt: dict, sample: dict
                 ) -> tuple[list[dict], dict | None]:
    """The SFT records and the preference record (or None) that one prompt's samples give."""
    kept, rejected = select(sample["completions"], acceptance, min_margin=cfg.min_margin,
                            max_per_prompt=cfg.max_per_prompt)
    if not kept:
        return [], None
    messages = prompt["messages"]
    if cfg.keep_system_prompt and sample.get("system_prompt"):
        from posttrain.generate import with_system_prompt

        messages = with_system_prompt(messages, sample["system_prompt"])
    tools = {"tools": prompt["tools"]} if prompt.get("tools") else {}
    sft = [{"id": prompt["id"] if i == 0 else f"{prompt['id']}/{i}", "messages": [*messages, c["message"]], **tools,
            "source": "rs", "reward": c["reward"], "scores": c.get("scores") or {}} for i, c in enumerate(kept)]
    if rejected is None:
        return sft, None
    best = kept[0]
    # a pair decided by the gates carries no reward margin: the RM's margin filter must not drop a verified pair
    ranked = acceptance.passes(rejected)
    margin = {"margin": best["reward"] - rejected["reward"]} if ranked else {}
    pair = {"id": prompt["id"], "prompt": messages, "chosen": [best["message"]], "rejected": [rejected["message"]],
            **tools, **margin, "source": "rs"}
    return sft, pair


def _pass_rates(samples: list[dict], kept: dict[str, list[dict]], names: list[str], acceptance: Acceptance,
                pass_score: dict[str, float]) -> dict:
    """Per pass/fail source: the share of SFT records that pass it, and how well the reward alone picks.

    picked: prompts whose highest-reward finished sample passes (the reward's pick, gates ignored); random: finished
    samples that pass; oracle: prompts with any finished sample that passes. Over prompts with a finished sample.
    """
    finished = Acceptance(gates={}, keep_truncated=acceptance.keep_truncated)
    groups = [[c for c in s["completions"] if finished.eligible(c)] for s in samples]
    groups = [g for g in groups if g]
    records = [c for cs in kept.values() for c in cs]
    flat = [c for g in groups for c in g]

    def share(hits: list[bool]) -> float | None:
        return sum(hits) / len(hits) if hits else None

    out = {}
    for name in names:
        def ok(c: dict) -> bool:
            return c["scores"][name] >= pass_score[name]

        out[name] = {"kept_pass_rate": share([ok(c) for c in records]),
                     "picked": share([ok(max(g, key=lambda c: c["reward"])) for g in groups]),
                     "random": share([ok(c) for c in flat]),
                     "oracle": share([any(map(ok, g)) for g in groups])}
    return out


def _metrics(cfg: SampleStageConfig, samples: list[dict], kept: dict[str, list[dict]], top: set[str],
             sft: list[dict], pairs: list[dict], stats: list[dict], acceptance: Acceptance) -> dict:
    comps = [c for s in samples for c in s["completions"]]
    rewards = [c["reward"] for c in comps]
    seconds = sum(s["seconds"] for s in stats)
    checks = [r.name for r in cfg.rewards if r.kind != RM_KIND]
    verifiers = [r for r in cfg.rewards if r.kind not in MODEL_KINDS]
    return {
        "prompts": len(samples),
        "samples": len(comps),
        "accepted_samples": sum(acceptance.eligible(c) for c in comps),
        "prompts_accepted": len(kept),
        "prompts_rejected": len(samples) - len(kept),
        "prompts_below_top_fraction": len(kept) - len(top),
        "kept": len(sft),
        "pairs": len(pairs),
        "gates": acceptance.gates,
        "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
        "max_reward": max(rewards, default=0.0),
        "mean_kept_reward": sum(r["reward"] for r in sft) / len(sft) if sft else 0.0,
        "checks": _pass_rates(samples, {p: kept[p] for p in top}, checks, acceptance, {r.name: r.pass_score for r in cfg.rewards}),
        "judge_agreement": {f"{j.name} vs {v.name}": _agreement(comps, j, v)
                            for j in cfg.rewards if j.kind == JUDGE_KIND for v in verifiers},
        "mean_length_tokens": sum(c["num_tokens"] for c in comps) / len(comps) if comps else 0.0,
        "tokens_per_s": sum(s["tokens"] for s in stats) / seconds if seconds else 0.0,
        "stop_reasons": dict(Counter(c["stop_reason"] for c in comps)),
    }


def _agreement(comps: list[dict], judge: RewardSourceConfig, verifier: RewardSourceConfig) -> float | None:
    """The share of samples on which a judge and a verifier agree: both pass them, or both fail them."""
    same = [judge.passes(c["scores"][judge.name]) == verifier.passes(c["scores"][verifier.name]) for c in comps]
    return sum(same) / len(same) if same else None


def _top_share(kept: dict[str, list[dict]], fraction: float) -> set[str]:
    """The prompt ids of the top `fraction` of accepted prompts by their best reward (ceil; ties by prompt order)."""
    n = math.ceil(len(kept) * fraction)
    order = sorted(kept, key=lambda pid: -kept[pid][0]["reward"])
    return set(order[:n])


def acceptance(cfg: SampleStageConfig) -> Acceptance:
    return Acceptance(gates={r.name: r.pass_score for r in cfg.rewards if r.gate}, min_reward=cfg.min_reward,
                      keep_truncated=cfg.keep_truncated)


def merge(cfg: SampleStageConfig, prompts: list[dict], num_shards: int) -> dict:
    """Read every shard in order; write sft.jsonl, pairs.jsonl, rejected.jsonl, then manifest.json and DONE."""
    out = Path(cfg.output_dir)
    accept = acceptance(cfg)
    by_id = {p["id"]: p for p in prompts}
    samples, kept, pairs, stats = [], {}, [], []
    for index in range(num_shards):
        path = shard_path(out, index)
        for sample in read_records(path, "samples"):
            samples.append(sample)
            records, pair = _records_for(cfg, accept, by_id[sample["prompt_id"]], sample)
            if records:
                kept[sample["prompt_id"]] = records
            pairs += [pair] if pair else []
        stats_path = path.with_suffix(".stats.json")
        if stats_path.is_file():
            stats.append(json.loads(stats_path.read_text()))
    top = _top_share(kept, cfg.top_fraction)
    sft = [r for pid, records in kept.items() if pid in top for r in records]
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "rejected.jsonl", [by_id[s["prompt_id"]] for s in samples if s["prompt_id"] not in kept])
    manifest = {
        "stage": "sample",
        "inputs": {"policy": cfg.policy.path, "prompts": {p: file_sha256(p) for p in cfg.prompts}},
        "config": to_dict(cfg),
        "metrics": _metrics(cfg, samples, kept, top, sft, pairs, stats, accept),
        "outputs": {"samples": f"samples/shard-*.jsonl ({num_shards})", "sft": "sft.jsonl", "pairs": "pairs.jsonl",
                    "rejected": "rejected.jsonl"},
    }
    RunDir.mark_done(out, manifest)
    return manifest


def run(cfg: SampleStageConfig) -> dict:
    """Sample the shards this process owns, skip finished ones, then (process 0) merge. Returns the manifest."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    out = Path(cfg.output_dir)
    if RunDir.is_done(out):
        manifest = RunDir.manifest(out)
        changed = changed_keys(manifest.get("config") or {}, to_dict(cfg))
        if changed:
            raise ValueError(f"{out}: finished with other settings (changed: {', '.join(changed)}); delete the dir "
                             "or choose another output_dir to sample with these")
        print(f"sample: {out} is done (DONE present) with these settings; delete it to sample again")
        return manifest
    # cpu=True lets processes started by torch.distributed.run on a host without CUDA join over gloo.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    prompts = load_prompts(cfg.prompts)
    shards = [prompts[i:i + cfg.shard_size] for i in range(0, len(prompts), cfg.shard_size)]
    mine = range(state.process_index, len(shards), state.num_processes)
    todo = [i for i in mine if not _shard_done(shard_path(out, i), shards[i], cfg.policy.path)]
    if todo:
        from posttrain.backbone import resolve_dtype
        from posttrain.generate import load_policy

        model, tokenizer = load_policy(cfg.policy.path, resolve_dtype(cfg.policy.dtype),
                                       attn_implementation=cfg.policy.attn_implementation)
        model.to(state.device)
        composer = RewardComposer(cfg.rewards)
        for index in todo:
            _sample_shard(cfg, model, tokenizer, composer, shards[index], shard_path(out, index))
            print(f"sample: shard {index + 1}/{len(shards)} written (process {state.process_index})")
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = merge(cfg, prompts, len(shards))
        m = manifest["metrics"]
        print(f"sample: {m['prompts']} prompts x {cfg.k}: {m['prompts_accepted']} with an accepted sample, "
              f"{m['prompts_rejected']} without -> {m['kept']} SFT records, {m['pairs']} pairs; "
              f"mean reward {m['mean_reward']:.3f}, {m['tokens_per_s']:.1f} tokens/s")
        for name, rates in m["checks"].items():
            if rates["kept_pass_rate"] is not None:
                print(f"sample: {rates['kept_pass_rate']:.1%} of the SFT records pass {name}; the reward's pick "
                      f"passes for {rates['picked']:.1%} of prompts, a random sample {rates['random']:.1%}, "
                      f"any sample {rates['oracle']:.1%}")
    state.wait_for_everyone()
    return RunDir.manifest(out)
