"""Evals: a policy's answers to held-out prompts, scored by a verifier (docs/tasks.md "Evals").

An eval names its prompts (a task's held-out split: the run's task, or a task of its own), how many samples each
prompt gets (k = 1 greedy by default) and the verifier that scores them. Its metrics: `accuracy` (the share of
samples that pass: pass@1), `pass@k` (prompts with a passing sample, when k > 1), `mean_reward`, `mean_length`.
`posttrain eval CONFIG.yaml` writes one JSON file: every eval's metrics and every response.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from posttrain.config import ConfigError, ModelConfig, check_choice, check_range, field
from posttrain.data import atomic_write_json
from rounds.tasks import Task, TaskConfig


@dataclasses.dataclass
class EvalConfig:
    name: str = field("heldout", help="the eval's name in eval.json and the report")
    task: TaskConfig | None = field(None, help="the task whose held-out prompts are scored (null: the run's task)")
    num_prompts: int | None = field(None, help="held-out prompts to score (null: the task's eval_prompts)")
    verifier: str = field("", help="scores an answer ('': the task's verifier); passing = a score of at least "
                                   "pass_score")
    pass_score: float = field(1.0, help="the score that counts as a pass")
    judge: str = field("", help="score with an LLM judge instead of a verifier: the judge model (any model source); "
                                "its rubric score is normalised to [0, 1] (rewards/judge.py)")
    judge_rubric: str = field("general", help="the judge's rubric: general (accuracy, instruction following, "
                                              "tone) or code (bugs, intent)")
    k: int = field(1, help="samples per prompt (1 with temperature 0: greedy)")
    temperature: float = field(0.0, help="sampling temperature (0: greedy, needs k = 1)")
    top_p: float = field(1.0, help="nucleus sampling mass, in (0, 1]")
    max_new_tokens: int = field(48, help="tokens generated per response")
    batch_size: int = field(32, help="sequences decoded together")
    system_prompt: str | None = field(None, help="system prompt for every eval prompt (null: the task's own)")
    seed: int = field(0, help="sampling seed (k > 1)")

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: {self.name!r}; give each eval a plain name (it names its results)")
        if self.num_prompts is not None:
            check_range("num_prompts", self.num_prompts, low=1)
        check_range("k", self.k, low=1)
        check_range("max_new_tokens", self.max_new_tokens, low=1)
        check_range("batch_size", self.batch_size, low=1)
        if self.temperature < 0 or (self.temperature == 0 and self.k > 1):
            raise ConfigError(f"temperature: {self.temperature} with k: {self.k}; greedy decoding (0) gives one "
                              "answer per prompt, sample k > 1 at a temperature > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: {self.top_p} is outside (0, 1]")
        if self.judge and self.verifier:
            raise ConfigError("judge: an eval scores with a judge or a verifier, not both")
        from rewards.judge import RUBRICS

        check_choice("judge_rubric", self.judge_rubric, tuple(RUBRICS))
        if self.verifier:
            from rewards.verifiable import get_verifier

            try:
                get_verifier(self.verifier)
            except ValueError as e:
                raise ConfigError(f"verifier: {e}") from None


@dataclasses.dataclass
class EvalStageConfig:
    policy: ModelConfig = field(default_factory=ModelConfig, help="the model to evaluate (any load_model source)")
    task: TaskConfig = field(default_factory=TaskConfig, help="the task whose held-out prompts the evals score")
    evals: list[EvalConfig] = field(default_factory=lambda: [EvalConfig()], help="what to measure")
    output: str = field("", help="the JSON file the results go to")

    def __post_init__(self):
        if not self.policy.path:
            raise ConfigError("policy.path: missing; name a model dir, .gguf file or config name")
        if not self.output:
            raise ConfigError("output: missing; name the JSON file the results go to")
        check_unique_names(self.evals)


def check_unique_names(evals: list[EvalConfig]) -> None:
    if not evals:
        raise ConfigError("evals: empty; list at least one eval (e.g. [{name: heldout}])")
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        raise ConfigError(f"evals: two evals named {next(n for n in names if names.count(n) > 1)!r}")


def _scores(cfg: EvalConfig, task: Task, prompts: list[dict], outs: list[list]) -> list[list[float]]:
    """Every sample's score: the judge's (normalised rubric points), the eval's verifier, or the task's."""
    if cfg.judge:
        from rewards.judge import ModelJudge, rubric_scores

        flat = [(p, c) for p, group in zip(prompts, outs) for c in group]
        scores = iter(rubric_scores(ModelJudge(cfg.judge, batch_size=cfg.batch_size), [p["messages"] for p, _ in flat],
                                    [c.message for _, c in flat], rubric=cfg.judge_rubric,
                                    tools=[p.get("tools") for p, _ in flat]))
        return [[next(scores) for _ in group] for group in outs]
    if cfg.verifier:
        from rewards.verifiable import get_verifier

        verify = get_verifier(cfg.verifier)

        def score(message, meta):
            return verify(message, {**task.cfg.verifier_options, **meta})
    else:
        score = task.check
    return [[float(score(c.message, p.get("meta") or {})) for c in group] for p, group in zip(prompts, outs)]


def evaluate(model, tokenizer, cfg: EvalConfig, task: Task) -> dict:
    """The eval's responses to the task's held-out prompts, scored; returns its metrics and per-prompt results."""
    from posttrain.generate import generate

    if not (cfg.verifier or cfg.judge) and task.cfg.verifier_name is None:
        raise ValueError(f"evals.{cfg.name}.verifier: the task {task.cfg.label!r} has none; name one or a judge")
    prompts = task.eval_prompts(cfg.num_prompts)
    system = cfg.system_prompt
    messages = [([{"role": "system", "content": system}] if system else []) + p["messages"] for p in prompts]
    start = time.perf_counter()
    outs = generate(model, tokenizer, messages, k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                    tools=[p.get("tools") for p in prompts])
    seconds = time.perf_counter() - start
    results = []
    for prompt, group, rewards in zip(prompts, outs, _scores(cfg, task, prompts, outs)):
        results.append({"id": prompt["id"], "responses": [c.message.get("content", "") for c in group],
                        "rewards": rewards, "passed": sum(r >= cfg.pass_score for r in rewards),
                        "num_tokens": [c.num_tokens for c in group], "stop_reasons": [c.stop_reason for c in group]})
    n, samples = len(results), len(results) * cfg.k
    metrics = {
        "name": cfg.name,
        "task": task.cfg.label,
        "num_prompts": n,
        "k": cfg.k,
        "accuracy": sum(r["passed"] for r in results) / samples,
        "mean_reward": sum(sum(r["rewards"]) for r in results) / samples,
        "mean_length": sum(sum(r["num_tokens"]) for r in results) / samples,
        "seconds": round(seconds, 2),
    }
    if cfg.k > 1:
        metrics[f"pass@{cfg.k}"] = sum(r["passed"] > 0 for r in results) / n
    return {**metrics, "results": results}


def evaluate_all(model, tokenizer, evals: list[EvalConfig], task_cfg: TaskConfig, seed: int = 0) -> dict:
    """Every eval in order: {"evals": {name: metrics}}, with the first eval's metrics and results at the top level."""
    results = {}
    for cfg in evals:
        task = Task(cfg.task or task_cfg, seed)
        results[cfg.name] = evaluate(model, tokenizer, cfg, task)
        m = results[cfg.name]
        print(f"eval {cfg.name}: accuracy {m['accuracy']:.1%} on {m['num_prompts']} held-out prompts of "
              f"{m['task']}" + (f", pass@{cfg.k} {m[f'pass@{cfg.k}']:.1%}" if cfg.k > 1 else ""))
    first = results[evals[0].name]
    return {**first, "evals": {name: {k: v for k, v in m.items() if k != "results"} for name, m in results.items()},
            "all_results": {name: m["results"] for name, m in results.items() if name != evals[0].name}}


def run(cfg: EvalStageConfig) -> dict:
    from posttrain.backbone import load_model, load_tokenizer_for, resolve_dtype

    model = load_model(cfg.policy.path, dtype=resolve_dtype(cfg.policy.dtype),
                       attn_implementation=cfg.policy.attn_implementation)
    metrics = evaluate_all(model.eval(), load_tokenizer_for(cfg.policy.path), cfg.evals, cfg.task)
    metrics["policy"] = cfg.policy.path
    atomic_write_json(Path(cfg.output), metrics)
    return metrics
