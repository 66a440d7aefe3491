"""An LLM as judge: rubric prompts, tolerant verdict parsers, and a local model that answers them.

A judge is anything with `complete(prompts, n=..., temperature=..., top_p=..., max_new_tokens=..., seed=...)`
returning n texts per chat prompt: `ModelJudge` wraps any model source the project loads (and batches through
`posttrain.generate`); synth's teachers are judges too. Rubrics: the recipe's 3-point general quality (accuracy,
instruction following, tone), 2-point code quality (bugs, intent), 3-point difficulty. A judge that ignores the
format yields an unparseable verdict (counted), never an exception.

As a reward source (`{kind: judge, path: MODEL}`, docs/rejection-sampling.md) the judge scores each response with a
rubric, normalised to [0, 1] (the points over the rubric's maximum; unparseable: 0), so it can rank RS samples,
label preference pairs where no verifier exists (`prefs.labeler: judge`) and score evals.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Protocol


class Judge(Protocol):
    name: str

    def complete(self, prompts: Sequence[list[dict]], *, n: int = 1, temperature: float = 0.7, top_p: float = 0.95,
                 max_new_tokens: int = 512, seed: int = 0) -> list[list[str]]:
        """n completions for each chat prompt, in prompt order."""


class ModelJudge:
    """A local model (any load_model source, or a LoRA adapter dir) answering chat prompts through the generator."""

    def __init__(self, source: str, *, dtype: str = "auto", batch_size: int = 16):
        from posttrain.backbone import resolve_dtype
        from posttrain.generate import load_policy

        self.name = source
        self.batch_size = batch_size
        self.model, self.tokenizer = load_policy(source, resolve_dtype(dtype))

    def complete(self, prompts: Sequence[list[dict]], *, n: int = 1, temperature: float = 0.7, top_p: float = 0.95,
                 max_new_tokens: int = 512, seed: int = 0) -> list[list[str]]:
        from posttrain.generate import generate

        if not prompts:
            return []
        done = generate(self.model, self.tokenizer, list(prompts), k=n, seed=seed, temperature=temperature,
                        top_p=top_p, max_new_tokens=max_new_tokens, batch_size=max(self.batch_size, n),
                        progress=False)
        return [[c.text for c in completions] for completions in done]


def dialog_text(messages: list[dict]) -> str:
    """A dialog as plain text (`Role: content` blocks, tool calls as JSON), for judges, embeddings and n-grams."""
    blocks = []
    for m in messages:
        if m["role"] == "system":
            continue
        calls = f"\n[tool calls: {json.dumps(m['tool_calls'], ensure_ascii=False)}]" if m.get("tool_calls") else ""
        blocks.append(f"{m['role'].capitalize()}: {m.get('content') or ''}{calls}")
    return "\n\n".join(blocks)


@dataclasses.dataclass(frozen=True)
class Rubric:
    """A judge question: criteria worth one point each (score 0..len), or a plain scale `low..high` under `key`."""

    name: str
    template: str
    key: str = "score"
    criteria: tuple[str, ...] = ()
    low: int = 0
    high: int = 0


_GENERAL = """You are grading the last assistant reply in a conversation.
Give 1 point for each criterion it meets, else 0:
- Accuracy: the reply is factually and logically correct.
- Instruction following: the reply does what the user asked, completely.
- Tone: the reply is clear, helpful and well presented.

<conversation>
{dialog}
</conversation>

Answer in exactly this format, nothing else:
Accuracy: <0 or 1>
Instruction following: <0 or 1>
Tone: <0 or 1>
Score: <total>/3"""

_CODE = """You are grading the code in the last assistant reply of a conversation.
Give 1 point for each criterion it meets, else 0:
- Bugs: the code is correct and free of bugs.
- Intent: the code does what the user intended.

<conversation>
{dialog}
</conversation>

Answer in exactly this format, nothing else:
Bugs: <0 or 1>
Intent: <0 or 1>
Score: <total>/2"""

_DIFFICULTY = """How difficult is the user's request below to answer well?
1 = easy (common knowledge, one step), 2 = medium (several steps or some expertise),
3 = hard (deep expertise or long reasoning).

<conversation>
{dialog}
</conversation>

Answer in exactly this format, nothing else:
Difficulty: <1, 2 or 3>"""

GENERAL_QUALITY = Rubric("quality", _GENERAL, criteria=("accuracy", "instruction following", "tone"), high=3)
CODE_QUALITY = Rubric("quality", _CODE, criteria=("bugs", "intent"), high=2)
DIFFICULTY = Rubric("difficulty", _DIFFICULTY, key="difficulty", low=1, high=3)


def quality_rubric(record: dict) -> Rubric:
    """The 2-point code rubric for code dialogs, the 3-point general one otherwise."""
    return CODE_QUALITY if str(record.get("source", "")).endswith(":code") else GENERAL_QUALITY


def norm_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", key.lower()).strip()


def json_objects(text: str) -> list[tuple[int, dict]]:
    """(position, object) of every JSON object embedded in `text` (the judge may wrap it in prose)."""
    decoder, found = json.JSONDecoder(), []
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found.append((start, obj))
    return found


def _to_points(value, low: int, high: int) -> int | None:
    """An integer in [low, high] from 2, "2", "2/3" (denominator must be `high`), "yes"/"no"; else None."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("yes", "pass", "true"):
            value = 1
        elif text in ("no", "fail", "false"):
            value = 0
        else:
            m = re.fullmatch(r"(\d+)\s*(?:(?:/|out of)\s*(\d+))?", text)
            if not m or (m.group(2) and int(m.group(2)) != high):
                return None
            value = int(m.group(1))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def _labelled(text: str, label: str) -> list[tuple[int, str]]:
    """(position, value) written after `label:` (markdown bold, bullets and `=` tolerated), in order."""
    words = r"[\s_*-]+".join(map(re.escape, label.split()))
    value = r"(\d+\s*(?:/|out of)\s*\d+|\d+(?:\.\d+)?|yes|no|pass|fail)\b"
    pattern = rf"(?<![a-z])\**{words}\**\s*\**[:=]\**\s*\**\s*{value}"
    return [(m.start(), m.group(1)) for m in re.finditer(pattern, text, re.IGNORECASE)]


def _strip_quoted(text: str, rubric: Rubric) -> str:
    """Blank out what the judge quoted rather than concluded: an echoed conversation, code fences (except a JSON
    verdict), block quotes, and inline quotes that themselves hold a `label: value`. Positions are preserved."""
    def blank(m: re.Match) -> str:
        return " " * len(m.group(0))

    def fence(m: re.Match) -> str:
        return m.group(0) if m.group(1).lstrip().startswith("{") else blank(m)

    text = re.sub(r"<conversation>.*?(?:</conversation>|$)", blank, text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(r"```[\w-]*\n?(.*?)(?:```|$)", fence, text, flags=re.DOTALL)
    text = re.sub(r"(?m)^[ \t]*>.*$", blank, text)
    labels = "|".join(re.escape(k) for k in (rubric.key, *rubric.criteria))
    quoted = rf"[\"\u201c][^\"\u201d\n]*?(?:{labels})\s*[:=][^\"\u201d\n]*[\"\u201d]"
    return re.sub(quoted, blank, text, flags=re.IGNORECASE)


def _json_verdicts(body: str, rubric: Rubric) -> list[tuple[int, int | None, dict[str, int]]]:
    """(position, score, parts) of each JSON object that names the score or every criterion."""
    out = []
    for pos, obj in json_objects(body):
        fields = {norm_key(str(k)): v for k, v in obj.items()}
        parts = {c: _to_points(fields.get(c), 0, 1) for c in rubric.criteria if c in fields}
        if rubric.key in fields:
            out.append((pos, _to_points(fields[rubric.key], rubric.low, rubric.high),
                        {c: p for c, p in parts.items() if p is not None}))
        elif rubric.criteria and len(parts) == len(rubric.criteria):
            valid = None not in parts.values()
            out.append((pos, sum(parts.values()) if valid else None, parts if valid else {}))
    return out


def parse_score(text: str, rubric: Rubric) -> tuple[int | None, dict[str, int]]:
    """(score, per-criterion points) from a judge verdict; score None when no valid verdict is found.

    Quoted material is ignored; the last verdict wins: a JSON object naming the score (or every criterion) or a
    `Score: N[/max]` line. Without either, the sum of the last `Criterion: points` of every criterion. An
    out-of-range value, a denominator other than the rubric's maximum, or a missing criterion is unparseable.
    """
    if not isinstance(text, str):
        return None, {}
    body = _strip_quoted(text, rubric)
    parts = {}
    for criterion in rubric.criteria:
        values = [v for _, v in _labelled(body, criterion)]
        if values and _to_points(values[-1], 0, 1) is not None:
            parts[criterion] = _to_points(values[-1], 0, 1)
    verdicts = _json_verdicts(body, rubric)
    verdicts += [(pos, _to_points(v, rubric.low, rubric.high), parts) for pos, v in _labelled(body, rubric.key)]
    if verdicts:
        _, score, verdict_parts = max(verdicts, key=lambda v: v[0])
        return score, verdict_parts
    if rubric.criteria and len(parts) == len(rubric.criteria):
        return sum(parts.values()), parts
    return None, parts


def judge_scores(judge: Judge, dialogs: list[list[dict]], rubrics: list[Rubric], *,
                 max_new_tokens: int, seed: int = 0) -> list[tuple[int | None, dict[str, int], str]]:
    """(score, per-criterion points, raw verdict) of each dialog under its rubric; the judge decodes greedily."""
    prompts = [[{"role": "user", "content": r.template.format(dialog=dialog_text(d))}]
               for d, r in zip(dialogs, rubrics, strict=True)]
    verdicts = judge.complete(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    return [(*parse_score(v, r), v) for (v,), r in zip(verdicts, rubrics, strict=True)]


RUBRICS = {"general": GENERAL_QUALITY, "code": CODE_QUALITY}


def rubric_scores(judge: Judge, prompts: list[list[dict]], responses: list[dict], *, rubric: str = "general",
                  max_new_tokens: int = 64, tools: list[list | None] | None = None) -> list[float]:
    """Each response to its prompt, judged greedily under the named rubric and normalised to [0, 1] (the points
    over the rubric's maximum; an unparseable verdict scores 0). A prompt's tools are shown to the judge first."""
    tools = tools or [None] * len(prompts)
    dialogs = [[*([{"role": "user", "content": f"[tools available: {json.dumps(t, ensure_ascii=False)}]"}] if t else []),
                *prompt, response] for prompt, response, t in zip(prompts, responses, tools, strict=True)]
    chosen = RUBRICS[rubric]
    verdicts = judge_scores(judge, dialogs, [chosen] * len(dialogs), max_new_tokens=max_new_tokens)
    return [0.0 if score is None else (score - chosen.low) / (chosen.high - chosen.low) for score, _, _ in verdicts]
