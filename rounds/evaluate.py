"""Eval: a policy on a task's held-out prompts, greedy, scored by the task's verifier.

`posttrain eval CONFIG.yaml` writes `eval.json`: accuracy, mean reward, mean response length, and every response.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from posttrain.config import ConfigError, ModelConfig, check_range, field
from posttrain.data import atomic_write_json


@dataclasses.dataclass
class EvalConfig:
    task: str = field("addition", help="task name from rounds.tasks.TASKS")
    num_prompts: int = field(128, help="held-out prompts to score")
    max_new_tokens: int = field(48, help="tokens generated per response")
    batch_size: int = field(32, help="prompts decoded together")
    system_prompt: str | None = field(None, help="optional system prompt for every eval prompt")

    def __post_init__(self):
        check_range("num_prompts", self.num_prompts, low=1)
        check_range("max_new_tokens", self.max_new_tokens, low=1)


@dataclasses.dataclass
class EvalStageConfig:
    policy: ModelConfig = field(default_factory=ModelConfig, help="the model to evaluate (any load_model source)")
    eval: EvalConfig = field(default_factory=EvalConfig, help="what to measure")
    output: str = field("eval.json", help="where the results go")

    def __post_init__(self):
        if not self.policy.path:
            raise ConfigError("policy.path: missing; name a model dir, .gguf file or config name")


def evaluate(model, tokenizer, cfg: EvalConfig) -> dict:
    """Greedy responses to the held-out prompts; returns metrics and per-prompt results."""
    from posttrain.generate import generate
    from rounds.tasks import get_task

    task = get_task(cfg.task)
    prompts = task.prompts("eval", cfg.num_prompts)
    messages = [
        ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + p["messages"] for p in prompts
    ]
    start = time.perf_counter()
    outs = generate(model, tokenizer, messages, k=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.batch_size, seed=0)
    seconds = time.perf_counter() - start
    results = []
    for prompt, (completion,) in zip(prompts, outs):
        reward = task.check(completion.message, prompt["meta"])
        results.append({"id": prompt["id"], "response": completion.message.get("content", ""), "reward": reward,
                        "num_tokens": completion.num_tokens, "stop_reason": completion.stop_reason})
    n = len(results)
    return {
        "task": cfg.task,
        "num_prompts": n,
        "accuracy": sum(r["reward"] >= 1.0 for r in results) / n,
        "mean_reward": sum(r["reward"] for r in results) / n,
        "mean_length": sum(r["num_tokens"] for r in results) / n,
        "seconds": round(seconds, 2),
        "results": results,
    }


def run(cfg: EvalStageConfig) -> dict:
    from posttrain.backbone import load_model, load_tokenizer_for, resolve_dtype

    model = load_model(cfg.policy.path, dtype=resolve_dtype(cfg.policy.dtype), attn_implementation=cfg.policy.attn_implementation)
    metrics = evaluate(model.eval(), load_tokenizer_for(cfg.policy.path), cfg.eval)
    metrics["policy"] = cfg.policy.path
    atomic_write_json(Path(cfg.output), metrics)
    print(f"{cfg.eval.task}: accuracy {metrics['accuracy']:.1%} on {metrics['num_prompts']} held-out prompts "
          f"(mean length {metrics['mean_length']:.1f} tokens)")
    return metrics
