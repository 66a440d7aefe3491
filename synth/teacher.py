"""Teachers and teacher responses (Llama 3.3-style distillation): K samples per prompt, one kept by RM and/or judge.

A teacher is anything with `complete(prompts, n=..., **sampling) -> list[list[str]]` (n texts per prompt). A prompt is
a chat dialog (a message list; the teacher answers as the assistant) or raw prefix token ids (the teacher continues
them until its end-of-turn token: how Magpie makes an aligned model write a user turn). `ModelTeacher` wraps a local
model; `ScriptedTeacher` replays fixed outputs, for tests.

A teacher also judges: rubric prompts (3-point general, 2-point code, 3-point difficulty, intent tags) and tolerant
verdict parsers. A judge that ignores the format yields an unparseable verdict (counted), never an exception.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from posttrain.config import ConfigError, check_choice, check_range, field

Prompt = list[dict] | list[int]  # a chat dialog, or raw prefix token ids
SELECTORS = ("first", "rm", "judge", "rm+judge")


@dataclasses.dataclass
class SamplingConfig:
    temperature: float = field(0.7, help="sampling temperature (0 = greedy)")
    top_p: float = field(0.95, help="nucleus sampling mass")
    max_new_tokens: int = field(512, help="tokens per completion")

    def __post_init__(self):
        check_range("temperature", self.temperature, low=0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: {self.top_p!r} is outside (0, 1]")
        check_range("max_new_tokens", self.max_new_tokens, low=1)


@dataclasses.dataclass
class ResponseConfig:
    k: int = field(4, help="teacher samples per prompt")
    select: str = field("first", help="which sample is kept: first, rm, judge, rm+judge (judge first, RM breaks ties)")
    reward_model: str = field("", help="reward model dir for select=rm / rm+judge")
    sampling: SamplingConfig = field(default_factory=SamplingConfig, help="teacher sampling for responses")

    def __post_init__(self):
        check_range("k", self.k, low=1)
        check_choice("select", self.select, SELECTORS)
        if "rm" in self.select and not self.reward_model:
            raise ConfigError(f"reward_model: select={self.select} needs a reward model dir")


class Teacher(Protocol):
    name: str

    def complete(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.7, top_p: float = 0.95,
                 max_new_tokens: int = 512, seed: int = 0) -> list[list[str]]:
        """n completions for each prompt, in prompt order."""

    def user_prefix(self) -> list[int]:
        """Token ids that open a user turn in the teacher's chat format (the Magpie prefix)."""


class ScriptedTeacher:
    """Replays `outputs` in order, one per requested completion (prompt-major); records every call in `calls`."""

    def __init__(self, outputs: Iterable[str], *, name: str = "scripted", user_prefix: Sequence[int] = (1,)):
        self.name = name
        self.outputs = list(outputs)
        self.calls: list[tuple[list[Prompt], int]] = []
        self._prefix = list(user_prefix)
        self._next = 0

    def complete(self, prompts: Sequence[Prompt], *, n: int = 1, **sampling) -> list[list[str]]:
        prompts = list(prompts)
        if self._next + len(prompts) * n > len(self.outputs):
            raise RuntimeError(f"ScriptedTeacher: script exhausted ({len(self.outputs)} outputs) at call "
                               f"{len(self.calls) + 1} asking for {len(prompts) * n} more")
        self.calls.append((prompts, n))
        out = []
        for _ in prompts:
            out.append(self.outputs[self._next:self._next + n])
            self._next += n
        return out

    def user_prefix(self) -> list[int]:
        return list(self._prefix)

    @property
    def remaining(self) -> int:
        return len(self.outputs) - self._next


def user_turn_prefix(tokenizer) -> list[int]:
    """The ids that open a user turn: Llama 3 `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`,
    ChatML `<|im_start|>user\\n`."""
    from posttrain.tokenizer import BEGIN_OF_TEXT, END_HEADER, START_HEADER, is_llama3

    if is_llama3(tokenizer):
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        return [BEGIN_OF_TEXT, START_HEADER, *encode("user"), END_HEADER, *encode("\n\n")]
    if "<|im_start|>" in tokenizer.get_vocab():
        return tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    raise ValueError(f"Magpie: no known user-turn header for {type(tokenizer).__name__} (neither Llama 3 nor ChatML)")


def sample_from_ids(model, tokenizer, prefixes: list[list[int]], *, n: int, temperature: float, top_p: float,
                    max_new_tokens: int, seed: int) -> list[list[str]]:
    """n continuations of each raw id prefix, each cut at the first stop token (eot / im_end / eos)."""
    from posttrain.chat import stop_token_ids

    stops = list(stop_token_ids(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    out: list[list[str]] = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for ids in prefixes:
            generated = model.generate(
                input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                dtype=torch.long), do_sample=temperature > 0, temperature=temperature or None,
                top_p=top_p if temperature > 0 else None, max_new_tokens=max_new_tokens, num_return_sequences=n,
                eos_token_id=stops, pad_token_id=pad_id)
            texts = []
            for row in generated[:, len(ids):].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
            out.append(texts)
    return out


class ModelTeacher:
    """A local model as teacher: chat prompts through `posttrain.generate`, raw prefixes through `sample_from_ids`."""

    def __init__(self, source: str, *, dtype: str = "auto", batch_size: int = 16):
        from posttrain.backbone import resolve_dtype
        from posttrain.generate import load_policy

        self.name = source
        self.batch_size = batch_size
        self.model, self.tokenizer = load_policy(source, resolve_dtype(dtype))

    def complete(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.7, top_p: float = 0.95,
                 max_new_tokens: int = 512, seed: int = 0) -> list[list[str]]:
        from posttrain.generate import generate

        sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
        chats = [i for i, p in enumerate(prompts) if p and isinstance(p[0], dict)]
        raws = [i for i, p in enumerate(prompts) if not (p and isinstance(p[0], dict))]
        out: list[list[str]] = [[] for _ in prompts]
        if chats:
            done = generate(self.model, self.tokenizer, [prompts[i] for i in chats], k=n, seed=seed,
                            batch_size=max(self.batch_size, n), progress=False, **sampling)
            for i, completions in zip(chats, done):
                out[i] = [c.text for c in completions]
        if raws:
            prefixes = [list(prompts[i]) for i in raws]
            done = sample_from_ids(self.model, self.tokenizer, prefixes, n=n, seed=seed, **sampling)
            for i, texts in zip(raws, done):
                out[i] = texts
        return out

    def user_prefix(self) -> list[int]:
        return user_turn_prefix(self.tokenizer)


# ---------------------------------------------------------------- the teacher as judge: prompts and verdict parsers


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

TAGS = """Tag the user's request below with its topic and the fine-grained intents it expresses
(what the user wants done, e.g. "explain concept", "write code", "compare options"). Use short lowercase tags.

<conversation>
{dialog}
</conversation>

Answer with JSON only: {{"topic": "<topic>", "intents": ["<intent>", ...]}}"""

GENERAL_QUALITY = Rubric("quality", _GENERAL, criteria=("accuracy", "instruction following", "tone"), high=3)
CODE_QUALITY = Rubric("quality", _CODE, criteria=("bugs", "intent"), high=2)
DIFFICULTY = Rubric("difficulty", _DIFFICULTY, key="difficulty", low=1, high=3)


def quality_rubric(record: dict) -> Rubric:
    """The 2-point code rubric for code dialogs, the 3-point general one otherwise."""
    return CODE_QUALITY if str(record.get("source", "")).endswith(":code") else GENERAL_QUALITY


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", key.lower()).strip()


def _json_objects(text: str) -> list[tuple[int, dict]]:
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
    for pos, obj in _json_objects(body):
        fields = {_norm_key(str(k)): v for k, v in obj.items()}
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


def _clean_tag(tag) -> str:
    tag = re.sub(r"[\"'`*_#\[\]{}]", "", str(tag)).strip().lower().rstrip(".")
    return re.sub(r"\s+", " ", tag)[:60]


def parse_tags(text: str, max_tags: int = 10) -> dict | None:
    """{"topic": str | None, "intents": [...]} from a tagging verdict (JSON, `Topic:`/`Intents:` lines or a bullet
    list); None when nothing usable is found."""
    if not isinstance(text, str):
        return None
    topic, intents = None, None
    for _, obj in reversed(_json_objects(text)):
        fields = {_norm_key(str(k)): v for k, v in obj.items()}
        raw = fields.get("intents", fields.get("tags"))
        raw = re.split(r"[,;]", raw) if isinstance(raw, str) else raw
        if isinstance(raw, list) or isinstance(fields.get("topic"), str):
            topic, intents = fields.get("topic"), raw if isinstance(raw, list) else []
            break
    if intents is None:
        m = re.search(r"(?im)^\W*topic\W*[:=]\s*(.+)$", text)
        topic = m.group(1) if m else None
        m = re.search(r"(?im)^\W*(?:intents?|tags?)\W*[:=]\s*(.*)$", text)
        if m and m.group(1).strip():
            intents = re.split(r"[,;]", m.group(1))
        else:
            intents = re.findall(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s+(.+)$", text)
    clean = [t for t in dict.fromkeys(_clean_tag(t) for t in intents if isinstance(t, (str, int))) if t]
    topic = _clean_tag(topic) if isinstance(topic, str) and _clean_tag(topic) else None
    if not clean and topic is None:
        return None
    return {"topic": topic, "intents": clean[:max_tags]}


def judge_scores(judge: Teacher, dialogs: list[list[dict]], rubrics: list[Rubric], *,
                 max_new_tokens: int, seed: int = 0) -> list[tuple[int | None, dict[str, int], str]]:
    """(score, per-criterion points, raw verdict) of each dialog under its rubric; the judge decodes greedily."""
    prompts = [[{"role": "user", "content": r.template.format(dialog=dialog_text(d))}]
               for d, r in zip(dialogs, rubrics, strict=True)]
    verdicts = judge.complete(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    return [(*parse_score(v, r), v) for (v,), r in zip(verdicts, rubrics, strict=True)]


# ---------------------------------------------------------------- distillation


def rm_scores(reward_model: str, prompts: list[list[dict]], candidates: list[list[str]]) -> list[list[float]]:
    """Reward of every candidate: [prompt][sample]."""
    from rewards.model import RewardModel  # written alongside; loaded only when an RM selects

    rm = RewardModel.from_pretrained(reward_model)
    flat_prompts = [p for p, cands in zip(prompts, candidates) for _ in cands]
    flat = rm.score(flat_prompts, [{"role": "assistant", "content": c} for cands in candidates for c in cands])
    out, at = [], 0
    for cands in candidates:
        out.append([float(s) for s in flat[at:at + len(cands)]])
        at += len(cands)
    return out


def _pick(cands: list[str], rm: list[float] | None, judged: list[int | None] | None) -> int:
    """Index of the kept sample: best judge score, then best RM score, then first; empty samples last."""
    def key(j: int) -> tuple:
        judge_score = judged[j] if judged and judged[j] is not None else -1
        return (bool(cands[j].strip()), judge_score, rm[j] if rm else 0.0, -j)

    return max(range(len(cands)), key=key)


def distill(prompts: list[dict], teacher: Teacher, cfg: ResponseConfig, *, kind: str, seed: int,
            judge: Teacher | None = None, judge_max_new_tokens: int = 256) -> tuple[list[dict], dict]:
    """SFT records from prompt records: K teacher samples each, one kept. Returns (records, stats)."""
    dialogs = [p["messages"] for p in prompts]
    s = cfg.sampling
    candidates = teacher.complete(dialogs, n=cfg.k, temperature=s.temperature, top_p=s.top_p,
                                  max_new_tokens=s.max_new_tokens, seed=seed)
    rm = rm_scores(cfg.reward_model, dialogs, candidates) if "rm" in cfg.select else None
    judged, unparseable = None, 0
    if "judge" in cfg.select:
        flat = [(d, c) for d, cands in zip(dialogs, candidates) for c in cands]
        verdicts = judge_scores(judge or teacher, [d + [{"role": "assistant", "content": c}] for d, c in flat],
                                [GENERAL_QUALITY] * len(flat), max_new_tokens=judge_max_new_tokens, seed=seed)
        unparseable = sum(v[0] is None for v in verdicts)
        judged = [[v[0] for v in verdicts[i * cfg.k:(i + 1) * cfg.k]] for i in range(len(dialogs))]
    records = []
    for i, (prompt, cands) in enumerate(zip(prompts, candidates, strict=True)):
        best = _pick(cands, rm[i] if rm else None, judged[i] if judged else None)
        qc = {"select": {"method": cfg.select, "k": len(cands), "chosen": best}}
        if rm:
            qc["rm"] = {"score": rm[i][best], "candidates": rm[i]}
        if judged:
            qc["select"]["judge_scores"] = judged[i]
        records.append({
            "id": f"synth-{kind}-{prompt.get('id', i)}",
            "messages": [*prompt["messages"], {"role": "assistant", "content": cands[best].strip()}],
            "source": f"synth:{kind}",
            "meta": {"teacher": teacher.name, "prompt": prompt.get("meta", {}), "qc": qc, "filters_passed": []},
        })
    return records, {"samples": sum(map(len, candidates)), "select_judge_unparseable": unparseable}
