"""Tasks: where a run's prompts come from, how its held-out eval is kept apart, and what checks an answer.

A task is data + YAML (docs/tasks.md), one of:
- a generator: `name: addition` (built in) or `name: my_module:make_prompts`, a function `fn(split, seed)` on the
  Python path that yields prompt records (or flat records, with a `template`) for split "train" or "eval";
- data: `train:` files of records (JSONL, parquet or a `datasets` dir), `eval:` files (or none: the eval prompts are
  held out of the train files), a `template` that builds the user turn from a record's fields, the record field with
  the reference answer, an optional system prompt.
Either way the held-out split is by the rendered prompt (a hash of messages and tools): no train prompt equals an
eval prompt, however the files duplicate them. Train prompts come from one seeded stream; each round takes the next
slice, and a run that needs more prompts than the pool holds stops and says so.
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, check_range, field
from posttrain.data import RecordError, iter_raw, validate_record
from posttrain.keys import prompt_key, seeded_rank

NO_VERIFIER = "none"
RESERVED = ("id", "messages", "tools", "meta")  # record fields that are not copied into meta


def addition(split: str, seed: int, *, heldout_size: int = 256) -> Iterator[dict]:
    """Two-digit addition, "What is 37 + 45?" -> 82. The eval split is a fixed draw of `heldout_size` problems (seed
    0, whatever the run's seed); the train split, the other problems in the run seed's order."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    heldout = list(pairs)
    random.Random("addition-heldout-0").shuffle(heldout)
    heldout = heldout[:heldout_size]
    if split == "eval":
        chosen = heldout
    else:
        held = set(heldout)
        chosen = [p for p in pairs if p not in held]
        random.Random(f"addition-train-{seed}").shuffle(chosen)
    for a, b in chosen:
        yield {"id": f"addition-{split}-{a}-{b}", "messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
               "meta": {"answer": a + b, "task": "addition", "tag": "math"}}


GENERATORS: dict[str, tuple[Callable[[str, int], Iterable[dict]], str]] = {"addition": (addition, "answer")}


def load_callable(spec: str, key: str) -> Callable:
    """`module:function` on the Python path; a ConfigError naming `key` when it does not resolve."""
    from posttrain import plugins

    try:
        return plugins.load_callable(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclasses.dataclass
class TaskConfig:
    name: str = field("", help="a generator: addition (built in) or module:function yielding records; with train "
                               "files, only the task's label (default: addition when no train files are given)")
    train: list[str] = field(default_factory=list, help="train record files: JSONL, parquet or datasets dirs")
    eval: list[str] = field(default_factory=list, help="held-out record files ([]: eval_prompts are held out of "
                                                       "the train records)")
    template: str = field("", help="the user turn built from record fields, e.g. 'Solve: {question}' (''): the "
                                   "records are prompt records with messages)")
    answer_field: str = field("answer", help="record field with the reference answer -> meta.answer")
    system_prompt: str = field("", help="system prompt put before every prompt of the task ('': none)")
    verifier: str = field("", help="what checks an answer: a verifier name, module:function, or none ('': the "
                                   "generator's own; answer for data)")
    verifier_options: dict[str, Any] = field(default_factory=dict, help="verifier options; a record's meta "
                                                                        "overrides them")
    rs_prompts: int = field(64, help="fresh train prompts per round for rejection sampling")
    pref_prompts: int = field(32, help="fresh train prompts per round for preference collection")
    eval_prompts: int = field(128, help="held-out prompts scored after every round (128 or more for a usable estimate)")
    retry_rejected: int = field(0, help="later rounds in which an RS prompt with no accepted sample is tried again, "
                                        "on top of that round's fresh prompts (0: never)")

    def __post_init__(self):
        check_range("rs_prompts", self.rs_prompts, low=1)
        check_range("pref_prompts", self.pref_prompts, low=1)
        check_range("eval_prompts", self.eval_prompts, low=1)
        check_range("retry_rejected", self.retry_rejected, low=0)
        if self.train and (self.name in GENERATORS or ":" in self.name):
            raise ConfigError(f"name: {self.name!r} is a generator, and train files are given too; keep one")
        for key in ("train", "eval"):
            for i, path in enumerate(getattr(self, key)):
                if not Path(path).exists():
                    raise ConfigError(f"{key}[{i}]: {path}: no such file or directory")
        if self.eval and not self.train:
            raise ConfigError("eval: held-out files need train files beside them (train: [...])")
        if not self.train:
            self.name = self.name or "addition"
            if self.name not in GENERATORS:
                load_callable(self.name, "name")
        if self.verifier and self.verifier != NO_VERIFIER:
            from rewards.verifiable import get_verifier

            try:
                get_verifier(self.verifier)
            except ValueError as e:
                raise ConfigError(f"verifier: {e}") from None
        if self.template and not _template_fields(self.template):
            raise ConfigError(f"template: {self.template!r} names no record field (write fields as {{field}})")

    @property
    def label(self) -> str:
        return self.name or "data"

    @property
    def verifier_name(self) -> str | None:
        """The verifier that checks this task's answers, or None for a task without one."""
        if self.verifier == NO_VERIFIER:
            return None
        if self.verifier:
            return self.verifier
        return GENERATORS[self.name][1] if self.name in GENERATORS else "answer"


class Task:
    """A task's records: the held-out eval prompts, the train stream, and the answer check."""

    def __init__(self, cfg: TaskConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed

    # ---- records

    def _shape(self, raw: Any, where: str, split: str) -> dict:
        """A prompt record from a raw record: its own messages, or the template filled from its fields."""
        cfg = self.cfg
        if not isinstance(raw, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if cfg.template:
            missing = [f for f in _template_fields(cfg.template) if f not in raw]
            if missing:
                raise RecordError(f"{where}: {missing[0]}: missing; the task's template uses it")
            meta = {**{k: v for k, v in raw.items() if k not in RESERVED}, **(raw.get("meta") or {})}
            record = {"messages": [{"role": "user", "content": cfg.template.format_map(raw)}], "meta": meta}
            if raw.get("tools"):
                record["tools"] = raw["tools"]
        else:
            record = {k: raw[k] for k in ("messages", "tools", "meta") if k in raw}
            record["meta"] = dict(record.get("meta") or {})
        if cfg.answer_field in raw and cfg.answer_field not in RESERVED:
            record["meta"]["answer"] = raw[cfg.answer_field]
        if self.cfg.verifier_name in ("answer", "exact") and "answer" not in record["meta"]:
            raise RecordError(f"{where}: {cfg.answer_field}: missing; the {self.cfg.verifier_name!r} verifier needs "
                              "the reference answer (set task.answer_field to the record's field)")
        if cfg.system_prompt and not any(m.get("role") == "system" for m in record.get("messages") or []):
            record["messages"] = [{"role": "system", "content": cfg.system_prompt}, *record["messages"]]
        record = validate_record({"id": "-", **record}, "prompt", where)
        record["id"] = str(raw["id"]) if "id" in raw else f"{self.cfg.label}-{split}-{self.key(record)[:12]}"
        return record

    @staticmethod
    def key(record: dict) -> str:
        return prompt_key(record["messages"], record.get("tools"))

    def _generated(self, split: str) -> Iterator[dict]:
        fn = GENERATORS[self.cfg.name][0] if self.cfg.name in GENERATORS else load_callable(self.cfg.name, "task.name")
        seed = 0 if split == "eval" else self.seed
        for i, raw in enumerate(fn(split, seed)):
            yield self._shape(raw, f"{self.cfg.name}({split!r}) record {i}", split)

    def _from_files(self, paths: list[str], split: str) -> Iterator[dict]:
        for path in paths:
            for where, raw in iter_raw(path):
                yield self._shape(raw, where, split)

    @staticmethod
    def _unique(records: Iterable[dict], exclude: set[str]) -> Iterator[dict]:
        """Records whose rendered prompt is new: not excluded, not seen earlier in the stream."""
        seen = set(exclude)
        for record in records:
            key = Task.key(record)
            if key not in seen:
                seen.add(key)
                yield record

    @cached_property
    def _eval_pool(self) -> list[dict]:
        """Every held-out record (deduplicated): the eval files, the generator's eval split (up to eval_prompts), or
        the eval_prompts train records of lowest seeded rank."""
        cfg = self.cfg
        if not cfg.train:
            return list(islice(self._unique(self._generated("eval"), set()), cfg.eval_prompts))
        if cfg.eval:
            return list(self._unique(self._from_files(cfg.eval, "eval"), set()))
        records = list(self._unique(self._from_files(cfg.train, "train"), set()))
        return sorted(records, key=lambda r: seeded_rank(self.key(r), 0))[:cfg.eval_prompts]

    @cached_property
    def eval_keys(self) -> set[str]:
        return {self.key(r) for r in self._eval_pool}

    @cached_property
    def _train_pool(self) -> list[dict]:
        """The train records of a data task, none held out, in the run seed's order."""
        records = list(self._unique(self._from_files(self.cfg.train, "train"), self.eval_keys))
        random.Random(f"{self.cfg.label}-train-{self.seed}").shuffle(records)
        return records

    def eval_prompts(self, n: int | None = None) -> list[dict]:
        """The first `n` held-out prompts (default eval_prompts); an error when the task holds fewer."""
        n = n or self.cfg.eval_prompts
        pool = self._eval_pool
        if len(pool) < n:
            raise ValueError(f"task.eval_prompts: {n} eval prompts asked, the task {self.cfg.label!r} holds "
                             f"{len(pool)} distinct ones")
        return pool[:n]

    def train_prompts(self, offset: int, n: int) -> list[dict]:
        """Train prompts offset..offset+n-1 of the seeded stream: none of them renders like an eval prompt."""
        if self.cfg.train:
            stream = self._train_pool
        else:  # the generator's stream up to the end of this slice (shorter when it runs dry)
            stream = list(islice(self._unique(self._generated("train"), self.eval_keys), offset + n))
        records = stream[offset:offset + n]
        if len(records) < n:
            raise ValueError(f"task: the train prompts run out: prompts {offset}..{offset + n - 1} of the seeded "
                             f"stream are needed, the task {self.cfg.label!r} holds {len(stream)} (after "
                             "holding out its eval prompts); every round takes task.pref_prompts + task.rs_prompts "
                             "fresh ones: lower them, run fewer rounds or add train records")
        return records

    # ---- answers

    def reward_source(self) -> dict | None:
        """The task's verifier as a reward-source mapping (options included), or None without one."""
        name = self.cfg.verifier_name
        return None if name is None else {"kind": name, "options": dict(self.cfg.verifier_options)}

    def check(self, message: dict | str, meta: dict) -> float:
        """The verifier's score of one answer (its options overlaid by the record's meta)."""
        from rewards.verifiable import get_verifier

        name = self.cfg.verifier_name
        if name is None:
            raise ValueError(f"task {self.cfg.label!r} has no verifier (task.verifier: none); score it with an "
                             "eval scorer")
        return get_verifier(name)(message, {**self.cfg.verifier_options, **meta})
