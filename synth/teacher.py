"""Teachers and teacher responses (Llama 3.3-style distillation): K samples per prompt, one kept by RM and/or judge.

A teacher is anything with `complete(prompts, n=..., **sampling) -> list[list[str]]` (n texts per prompt). A prompt is
a chat dialog (a message list; the teacher answers as the assistant) or raw prefix token ids (the teacher continues
them until its end-of-turn token: how Magpie makes an aligned model write a user turn). `ModelTeacher` wraps a local
model; `ScriptedTeacher` replays fixed outputs, for tests.

A teacher also judges (rewards/judge.py: rubric prompts and tolerant verdict parsers) and tags intents (below).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from posttrain.config import ConfigError, check_choice, check_range, field
from rewards.judge import GENERAL_QUALITY, ModelJudge, json_objects, judge_scores, norm_key

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


class ModelTeacher(ModelJudge):
    """A local model as teacher: chat prompts as a judge answers them, raw prefixes through `sample_from_ids`."""

    def complete(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.7, top_p: float = 0.95,
                 max_new_tokens: int = 512, seed: int = 0) -> list[list[str]]:
        sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
        chats = [i for i, p in enumerate(prompts) if p and isinstance(p[0], dict)]
        raws = [i for i, p in enumerate(prompts) if not (p and isinstance(p[0], dict))]
        out: list[list[str]] = [[] for _ in prompts]
        for i, texts in zip(chats, super().complete([prompts[i] for i in chats], n=n, seed=seed, **sampling)):
            out[i] = texts
        if raws:
            prefixes = [list(prompts[i]) for i in raws]
            done = sample_from_ids(self.model, self.tokenizer, prefixes, n=n, seed=seed, **sampling)
            for i, texts in zip(raws, done):
                out[i] = texts
        return out

    def user_prefix(self) -> list[int]:
        return user_turn_prefix(self.tokenizer)


# ---------------------------------------------------------------- intent tags

TAGS = """Tag the user's request below with its topic and the fine-grained intents it expresses
(what the user wants done, e.g. "explain concept", "write code", "compare options"). Use short lowercase tags.

<conversation>
{dialog}
</conversation>

Answer with JSON only: {{"topic": "<topic>", "intents": ["<intent>", ...]}}"""


def _clean_tag(tag) -> str:
    tag = re.sub(r"[\"'`*_#\[\]{}]", "", str(tag)).strip().lower().rstrip(".")
    return re.sub(r"\s+", " ", tag)[:60]


def parse_tags(text: str, max_tags: int = 10) -> dict | None:
    """{"topic": str | None, "intents": [...]} from a tagging verdict (JSON, `Topic:`/`Intents:` lines or a bullet
    list); None when nothing usable is found."""
    if not isinstance(text, str):
        return None
    topic, intents = None, None
    for _, obj in reversed(json_objects(text)):
        fields = {norm_key(str(k)): v for k, v in obj.items()}
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
