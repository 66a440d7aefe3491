"""Prompt synthesis from a teacher: Magpie (the aligned teacher writes the user turn) and self-instruct from seed tasks.

Magpie (Xu et al. 2024): give the teacher only the user-turn header of its chat format; what it samples up to its
end-of-turn token is a user request. Self-instruct (Wang et al. 2023): show the teacher a few seed tasks with a topic
and capability, ask for new ones, parse them from its answer. Both return prompt records
`{"id", "messages": [user], "meta": {"method", "topic", "capability"}}`; `file` reads existing prompt records.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from pathlib import Path

from posttrain.config import check_choice, check_range, field
from posttrain.data import iter_raw, read_records
from synth.teacher import SamplingConfig, Teacher

METHODS = ("magpie", "self_instruct", "file")

SELF_INSTRUCT = """You are helping build a diverse set of tasks for an AI assistant. Here are some example tasks:

{examples}

Write {count} new tasks{focus}. Each task must be self-contained, realistic and different from the examples and from
each other. Write each task on its own line starting with "Task:" and nothing else."""


@dataclasses.dataclass
class PromptConfig:
    method: str = field("magpie", help="magpie, self_instruct (from seed_tasks) or file (records at prompts_path)")
    num_prompts: int = field(16, help="prompts to synthesise (magpie, self_instruct)")
    seed_tasks: str = field("", help="self_instruct seeds: .txt lines, or records with instruction, topic, capability")
    prompts_path: str = field("", help="method=file: prompt records to answer")
    num_shots: int = field(4, help="self_instruct: seed tasks shown per request")
    tasks_per_request: int = field(5, help="self_instruct: new tasks asked for per request")
    min_chars: int = field(8, help="drop synthesised prompts shorter than this (after stripping)")
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0),
                                     help="teacher sampling for prompt synthesis")

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_range("num_prompts", self.num_prompts, low=1)
        check_range("num_shots", self.num_shots, low=1)
        check_range("tasks_per_request", self.tasks_per_request, low=1)


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _prompt_record(idx: str, text: str, meta: dict) -> dict:
    return {"id": idx, "messages": [{"role": "user", "content": text}], "meta": meta}


def _unique(texts: list[str], *, min_chars: int, seen: set[str]) -> list[str]:
    """Stripped texts of at least min_chars whose normalised form is not in `seen` (which grows)."""
    out = []
    for text in (t.strip() for t in texts):
        key = _norm(text)
        if len(text) >= min_chars and key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def magpie(teacher: Teacher, cfg: PromptConfig, *, seed: int) -> tuple[list[dict], dict]:
    """num_prompts user turns sampled from the teacher's user-turn header; returns (prompt records, stats)."""
    s = cfg.sampling
    (texts,) = teacher.complete([teacher.user_prefix()], n=cfg.num_prompts, temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens, seed=seed)
    kept = _unique(texts, min_chars=cfg.min_chars, seen=set())
    records = [_prompt_record(f"magpie-{i}", t, {"method": "magpie"}) for i, t in enumerate(kept)]
    return records, {"sampled": len(texts), "kept": len(records)}


def _seed_field(raw: dict, key: str):
    return raw.get(key) if raw.get(key) is not None else (raw.get("meta") or {}).get(key)


def load_seed_tasks(path: str | Path) -> list[dict]:
    """Seed tasks `{"instruction", "topic", "capability"}` from .txt lines or records with instruction / task / prompt
    / messages (the last user turn) and optional topic, capability (top level or under meta)."""
    path = Path(path)
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [{"instruction": line, "topic": None, "capability": None} for line in lines if line]
    tasks = []
    for where, raw in iter_raw(path):
        text = next((raw[k] for k in ("instruction", "task", "prompt", "text") if isinstance(raw.get(k), str)), None)
        if text is None and isinstance(raw.get("messages"), list):
            text = next((m.get("content") for m in reversed(raw["messages"]) if m.get("role") == "user"), None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: instruction: missing (expected instruction, task, prompt, text or messages)")
        tasks.append({"instruction": text.strip(), "topic": _seed_field(raw, "topic"),
                      "capability": _seed_field(raw, "capability")})
    return tasks


def _self_instruct_request(seeds: list[dict], focus: tuple, cfg: PromptConfig, rng: random.Random) -> str:
    """The few-shot request for one (topic, capability); shots come from seeds with those tags when there are enough."""
    matching = [s for s in seeds if (s["topic"], s["capability"]) == focus]
    pool = matching if len(matching) >= min(cfg.num_shots, 2) else seeds
    shots = rng.sample(pool, min(cfg.num_shots, len(pool)))
    topic, capability = focus
    focus_text = (f" about {topic}" if topic else "") + (f" that test {capability}" if capability else "")
    examples = "\n".join(f"Task: {s['instruction']}" for s in shots)
    return SELF_INSTRUCT.format(examples=examples, count=cfg.tasks_per_request, focus=focus_text)


_BULLET = r"(?:[-*\u2022]|\d+[.)])"
_TASK_LINE = re.compile(rf"^{_BULLET}?\s*\**task\s*\d*\**\s*[:.)]\**\s*(.*)$", re.IGNORECASE)
_LIST_LINE = re.compile(rf"^{_BULLET}\s+(.*)$")


def parse_tasks(text: str) -> list[str]:
    """New tasks from a self-instruct answer: `Task: ...` lines (numbering, bullets and bold tolerated); without any,
    numbered or bulleted lines."""
    lines = [line.strip() for line in str(text).splitlines()]
    tagged = [m.group(1) for m in map(_TASK_LINE.match, lines) if m]
    if tagged:
        return [t.strip() for t in tagged if t.strip()]
    listed = [m.group(1) for m in map(_LIST_LINE.match, lines) if m]
    return [t.strip() for t in listed if t.strip()]


def self_instruct(teacher: Teacher, cfg: PromptConfig, *, seed: int) -> tuple[list[dict], dict]:
    """New tasks from few-shot requests over the seed tasks, tagged with the topic/capability each request targeted."""
    if not cfg.seed_tasks:
        raise ValueError("prompts.seed_tasks: self_instruct needs a file of seed tasks")
    seeds = load_seed_tasks(cfg.seed_tasks)
    if not seeds:
        raise ValueError(f"{cfg.seed_tasks}: no seed tasks")
    rng = random.Random(seed)
    foci = sorted({(s["topic"], s["capability"]) for s in seeds}, key=str)
    num_requests = math.ceil(cfg.num_prompts / cfg.tasks_per_request)
    plan = [foci[r % len(foci)] for r in range(num_requests)]
    requests = [[{"role": "user", "content": _self_instruct_request(seeds, focus, cfg, rng)}] for focus in plan]
    s = cfg.sampling
    answers = teacher.complete(requests, n=1, temperature=s.temperature, top_p=s.top_p,
                               max_new_tokens=s.max_new_tokens, seed=seed)
    seen = {_norm(t["instruction"]) for t in seeds}
    records, parsed = [], 0
    for (topic, capability), (answer,) in zip(plan, answers, strict=True):
        tasks = parse_tasks(answer)
        parsed += len(tasks)
        for text in _unique(tasks, min_chars=cfg.min_chars, seen=seen):
            meta = {"method": "self_instruct", "topic": topic, "capability": capability}
            records.append(_prompt_record(f"self-instruct-{len(records)}", text, meta))
    records = records[:cfg.num_prompts]
    return records, {"requests": len(requests), "parsed": parsed, "kept": len(records)}


def synthesize_prompts(teacher: Teacher, cfg: PromptConfig, *, seed: int) -> tuple[list[dict], dict]:
    """Prompt records by `cfg.method`, with stats for the manifest."""
    if cfg.method == "magpie":
        return magpie(teacher, cfg, seed=seed)
    if cfg.method == "self_instruct":
        return self_instruct(teacher, cfg, seed=seed)
    if not cfg.prompts_path:
        raise ValueError("prompts.prompts_path: method=file needs a file of prompt records")
    records = read_records(cfg.prompts_path, "prompt")
    return records, {"read": len(records), "kept": len(records)}
