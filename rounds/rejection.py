"""The rejection-sampling (RS) stage: K samples per prompt, scored; the best -> SFT data, best vs worst -> pairs.

`posttrain sample CONFIG.yaml` writes into `output_dir`:
```
samples/shard-00000.jsonl   Samples records (DESIGN.md), one per prompt, written atomically shard by shard
sft.jsonl                   the best sample of each prompt as an SFT record (source "rs", reward)
pairs.jsonl                 (best, worst) preference pairs whose reward gap is at least min_margin
manifest.json, DONE         summary; DONE last
```
A rerun skips shards already on disk (same prompts, same policy), so a killed stage resumes without losing or
duplicating a prompt. Under `accelerate launch` process r samples shards r, r + world, ...; after a barrier process 0
merges every shard in shard order, so the outputs do not depend on the number of processes. Each prompt's sampling
seed comes from (seed, prompt id): a prompt gets the same samples whichever shard or process draws it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from posttrain.config import ConfigError, ModelConfig, check_choice, check_range, field, to_dict
from posttrain.data import RecordError, atomic_write_json, file_sha256, iter_raw, read_records, write_jsonl
from posttrain.tools import CUSTOM_FORMATS
from rewards.sources import RewardComposer, RewardSourceConfig
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
    min_margin: float = field(0.0, help="smallest reward gap (best - worst) of a preference pair; ties never make one")
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
    return bool(message.get("content", "").strip() or message.get("tool_calls"))


def select(completions: list[dict], *, min_margin: float, keep_truncated: bool) -> tuple[dict | None, dict | None]:
    """(best, worst) of one prompt's scored samples; worst is None when no pair clears the margin.

    Best: the highest reward among non-empty samples (not cut at max_new_tokens unless keep_truncated), first on ties.
    Worst: the lowest reward among non-empty samples; a pair needs best - worst >= min_margin and > 0.
    """
    usable = [c for c in completions if _usable(c)]
    candidates = [c for c in usable if keep_truncated or c["stop_reason"] != "length"]
    if not candidates:
        return None, None
    best = max(candidates, key=lambda c: c["reward"])
    worst = min(usable, key=lambda c: c["reward"])
    gap = best["reward"] - worst["reward"]
    return best, (worst if gap > 0 and gap >= min_margin else None)


def _records_for(cfg: SampleStageConfig, prompt: dict, sample: dict) -> tuple[dict | None, dict | None]:
    """The SFT record and the preference record (either may be None) that one prompt's samples give."""
    best, worst = select(sample["completions"], min_margin=cfg.min_margin, keep_truncated=cfg.keep_truncated)
    if best is None:
        return None, None
    messages = prompt["messages"]
    if cfg.keep_system_prompt and sample.get("system_prompt"):
        from posttrain.generate import with_system_prompt

        messages = with_system_prompt(messages, sample["system_prompt"])
    tools = {"tools": prompt["tools"]} if prompt.get("tools") else {}
    sft = {"id": prompt["id"], "messages": [*messages, best["message"]], **tools, "source": "rs",
           "reward": best["reward"]}
    if worst is None:
        return sft, None
    pair = {"id": prompt["id"], "prompt": messages, "chosen": [best["message"]], "rejected": [worst["message"]],
            **tools, "margin": best["reward"] - worst["reward"], "source": "rs"}
    return sft, pair


def _metrics(samples: list[dict], sft: list[dict], pairs: list[dict], stats: list[dict]) -> dict:
    comps = [c for s in samples for c in s["completions"]]
    rewards = [c["reward"] for c in comps]
    seconds = sum(s["seconds"] for s in stats)
    return {
        "prompts": len(samples),
        "samples": len(comps),
        "kept": len(sft),
        "pairs": len(pairs),
        "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
        "max_reward": max(rewards, default=0.0),
        "mean_kept_reward": sum(r["reward"] for r in sft) / len(sft) if sft else 0.0,
        "mean_length_tokens": sum(c["num_tokens"] for c in comps) / len(comps) if comps else 0.0,
        "tokens_per_s": sum(s["tokens"] for s in stats) / seconds if seconds else 0.0,
        "stop_reasons": dict(Counter(c["stop_reason"] for c in comps)),
    }


def merge(cfg: SampleStageConfig, prompts: list[dict], num_shards: int) -> dict:
    """Read every shard in order; write sft.jsonl, pairs.jsonl, then manifest.json and DONE. Returns the manifest."""
    out = Path(cfg.output_dir)
    by_id = {p["id"]: p for p in prompts}
    samples, sft, pairs, stats = [], [], [], []
    for index in range(num_shards):
        path = shard_path(out, index)
        for sample in read_records(path, "samples"):
            samples.append(sample)
            sft_record, pair = _records_for(cfg, by_id[sample["prompt_id"]], sample)
            sft += [sft_record] if sft_record else []
            pairs += [pair] if pair else []
        stats_path = path.with_suffix(".stats.json")
        if stats_path.is_file():
            stats.append(json.loads(stats_path.read_text()))
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "pairs.jsonl", pairs)
    manifest = {
        "stage": "sample",
        "inputs": {"policy": cfg.policy.path, "prompts": {p: file_sha256(p) for p in cfg.prompts}},
        "config": to_dict(cfg),
        "metrics": _metrics(samples, sft, pairs, stats),
        "outputs": {"samples": f"samples/shard-*.jsonl ({num_shards})", "sft": "sft.jsonl", "pairs": "pairs.jsonl"},
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
        print(f"sample: {out} is done (DONE present); delete it to sample again")
        return RunDir.manifest(out)
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
        print(f"sample: {m['prompts']} prompts x {cfg.k} -> {m['kept']} kept, {m['pairs']} pairs, "
              f"mean reward {m['mean_reward']:.3f}, {m['tokens_per_s']:.1f} tokens/s")
    state.wait_for_everyone()
    return RunDir.manifest(out)
