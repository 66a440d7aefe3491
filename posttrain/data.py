"""Record schemas, reading (JSONL, parquet, HF datasets dirs), validation with file:line errors, atomic writes.

Records (docs/formats.md):
- sft:        {"id", "messages", "tools"?, "source"?}
- prompt:     {"id", "messages" (ends in a user/ipython turn), "tools"?, "meta"?}
- preference: {"id", "prompt", "chosen", "rejected", "edited"?, "margin"?, "source"?}
- samples:    {"prompt_id", "completions": [{"message", "reward", "scores"}], "policy"}
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "ipython")
ROLE_ALIASES = {"tool": "ipython"}
KINDS = ("sft", "prompt", "preference", "samples")
_UMASK = os.umask(0)
os.umask(_UMASK)


class RecordError(ValueError):
    """A bad record; the message starts with `file:line:` and names the field."""


def normalize_role(role: Any, where: str) -> str:
    if not isinstance(role, str):
        raise RecordError(f"{where}.role: expected a string, got {type(role).__name__}")
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise RecordError(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)} or 'tool')")
    return role


def validate_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise RecordError(f"{where}.tool_calls: expected a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise RecordError(f"{at}: expected an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(f"{at}.function.name: missing or not a string")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise RecordError(f"{at}.function.arguments: not valid JSON") from None
        if not isinstance(args, dict):
            raise RecordError(f"{at}.function.arguments: expected an object, got {type(args).__name__}")


def validate_messages(messages: Any, where: str = "messages", *, allow_empty: bool = False) -> list[dict]:
    """Check a message list; returns it with roles normalised ("tool" -> "ipython"). Errors name the index and field."""
    if not isinstance(messages, list):
        raise RecordError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    if not messages and not allow_empty:
        raise RecordError(f"{where}: empty dialog")
    out = []
    for i, msg in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(f"{at}: expected an object with role and content")
        role = normalize_role(msg.get("role"), at)
        content = msg.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RecordError(f"{at}.content: expected a string, got {type(content).__name__}")
        if "tool_calls" in msg and msg["tool_calls"]:
            if role != "assistant":
                raise RecordError(f"{at}.tool_calls: only assistant messages may carry tool calls (role is {role})")
            validate_tool_calls(msg["tool_calls"], at)
        if role == "system" and i != 0:
            raise RecordError(f"{at}.role: a system message must come first")
        out.append({**msg, "role": role, "content": content})
    return out


def _check_turn_order(messages: list[dict], where: str, *, ends_with: tuple[str, ...]) -> None:
    body = [m for m in messages if m["role"] != "system"]
    if not body:
        raise RecordError(f"{where}: no user turn")
    if body[0]["role"] != "user":
        raise RecordError(f"{where}[{messages.index(body[0])}].role: the dialog must open with a user turn")
    for prev, cur in zip(body, body[1:]):
        if prev["role"] == "user" and cur["role"] == "user":
            raise RecordError(f"{where}[{messages.index(cur)}].role: two user turns in a row")
    if messages[-1]["role"] not in ends_with:
        raise RecordError(f"{where}[{len(messages) - 1}].role: must be {' or '.join(ends_with)}, got {messages[-1]['role']}")


def _response(value: Any, where: str) -> list[dict]:
    """A preference response: a message list, or a bare string (one assistant message)."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    msgs = validate_messages(value, where)
    if msgs[0]["role"] != "assistant":
        raise RecordError(f"{where}[0].role: a response starts with an assistant turn")
    if not any(m["content"].strip() or m.get("tool_calls") for m in msgs if m["role"] == "assistant"):
        raise RecordError(f"{where}: empty response")
    return msgs


def validate_record(record: Any, kind: str, where: str = "record") -> dict:
    """Validate one record of `kind`; returns it normalised. Errors start with `where`."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    rec = dict(record)
    if kind in ("sft", "prompt", "preference") and "id" in rec and not isinstance(rec["id"], (str, int)):
        raise RecordError(f"{where}: id: expected a string or integer")
    if kind == "sft":
        if "messages" not in rec:
            raise RecordError(f"{where}: messages: missing field")
        rec["messages"] = validate_messages(rec["messages"], f"{where}: messages")
        _check_turn_order(rec["messages"], f"{where}: messages", ends_with=("assistant",))
    elif kind == "prompt":
        if "messages" not in rec:
            raise RecordError(f"{where}: messages: missing field")
        rec["messages"] = validate_messages(rec["messages"], f"{where}: messages")
        _check_turn_order(rec["messages"], f"{where}: messages", ends_with=("user", "ipython"))
    elif kind == "preference":
        for key in ("prompt", "chosen", "rejected"):
            if key not in rec:
                raise RecordError(f"{where}: {key}: missing field")
        if isinstance(rec["prompt"], str):
            rec["prompt"] = [{"role": "user", "content": rec["prompt"]}]
        rec["prompt"] = validate_messages(rec["prompt"], f"{where}: prompt")
        _check_turn_order(rec["prompt"], f"{where}: prompt", ends_with=("user", "ipython"))
        for key in ("chosen", "rejected", "edited"):
            if key in rec and rec[key] is not None:
                rec[key] = _response(rec[key], f"{where}: {key}")
        if _strip(rec["chosen"]) == _strip(rec["rejected"]):
            raise RecordError(f"{where}: rejected: identical to chosen")
        if rec.get("edited") is not None and _strip(rec["edited"]) == _strip(rec["chosen"]):
            raise RecordError(f"{where}: edited: identical to chosen")
        if "margin" in rec and rec["margin"] is not None and not isinstance(rec["margin"], (int, float)):
            raise RecordError(f"{where}: margin: expected a number")
    elif kind == "samples":
        if "prompt_id" not in rec:
            raise RecordError(f"{where}: prompt_id: missing field")
        comps = rec.get("completions")
        if not isinstance(comps, list) or not comps:
            raise RecordError(f"{where}: completions: expected a non-empty list")
        for j, c in enumerate(comps):
            if not isinstance(c, dict) or "message" not in c:
                raise RecordError(f"{where}: completions[{j}].message: missing field")
    return rec


def surely_longer_than(messages: list[dict], tokenizer, max_tokens: int) -> bool:
    """Whether `messages` must render to more than `max_tokens` tokens, judged from the UTF-8 size of their content
    alone (no token spells more bytes than the vocabulary's longest), so that a huge record is refused without
    tokenizing it whole."""
    size = sum(len(m.get("content") or "") for m in messages)  # characters <= bytes: cheap and still a lower bound
    return size > max_tokens * _longest_token_bytes(tokenizer)


def clip_contents(messages: list[dict], tokenizer, max_tokens: int) -> list[dict]:
    """`messages` with each content cut to a length that still spells more than `max_tokens` tokens, with a margin
    that keeps the cut's effect on tokenisation past them: the first `max_tokens` tokens of the render stay those
    of the whole dialog, which is then not tokenised whole."""
    limit = 2 * max_tokens * _longest_token_bytes(tokenizer)
    return [{**m, "content": m["content"][:limit]} if len(m.get("content") or "") > limit else m for m in messages]


@functools.lru_cache(maxsize=8)
def _longest_token_bytes(tokenizer) -> int:
    # token strings spell bytes with one char each (byte-level BPE) or as text (SentencePiece): either way their
    # UTF-8 length is at least the bytes they stand for
    return max(len(token.encode("utf-8")) for token in tokenizer.get_vocab())


def _strip(msgs: list[dict]) -> list[tuple]:
    return [(m["role"], m["content"].strip(), json.dumps(m.get("tool_calls") or [], sort_keys=True)) for m in msgs]


def iter_raw(path: str | Path, *, allow_empty: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, raw record) from a JSONL file, a parquet file or an HF datasets dir (row numbers from 1).

    Unreadable input (bytes that are not UTF-8, a corrupt parquet file or datasets dir) raises RecordError naming
    the file and, for JSONL, the line; so does a file without records unless `allow_empty`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    count = 0
    for count, item in enumerate(_dataset_rows(path) if path.is_dir() or path.suffix == ".parquet"
                                 else _jsonl_rows(path), start=1):
        yield item
    if not count and not allow_empty:
        raise RecordError(f"{path}: no records (the file is empty)")


def _dataset_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of an HF datasets dir or a parquet file, as plain dicts."""
    import datasets
    import pyarrow
    import pyarrow.parquet as pq

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            rows = ds.to_list()
        else:
            rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pyarrow.ArrowException) as e:
        kind = "HF datasets dir" if path.is_dir() else "parquet file"
        raise RecordError(f"{path}: not a readable {kind} ({' '.join(str(e).split())})") from None
    for i, row in enumerate(rows, start=1):
        yield f"{path}:row {i}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                  "of the line)") from None
            if i == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None


class UniqueIds:
    """Remembers each record id's `file:line`; `check(rec, where)` refuses an id seen before."""

    def __init__(self):
        self.seen: dict[Any, str] = {}

    def check(self, rec: dict, where: str) -> None:
        if "id" not in rec:
            return
        first = self.seen.setdefault(rec["id"], where)
        if first != where:
            raise RecordError(f"{where}: id: {rec['id']!r} is also the id of {first}")


def read_records(path: str | Path, kind: str, *, converter=None, strict: bool = False) -> list[dict]:
    """Read and validate every record of a file; the first bad one raises RecordError('file:line: field: ...').

    `converter(raw) -> record` maps another schema (ShareGPT, OpenAI) to ours before validation.
    Records without an id get `{file stem}-{line}`. `strict`: also refuse an empty file and a repeated id.
    """
    out, ids = [], UniqueIds()
    for where, raw in iter_raw(path, allow_empty=not strict):
        if converter is not None:
            try:
                raw = converter(raw)
            except (KeyError, TypeError, ValueError) as e:
                raise RecordError(f"{where}: {e}") from None
        rec = validate_record(raw, kind, where)
        if strict:
            ids.check(rec, where)
        if kind != "samples" and "id" not in rec:
            rec["id"] = f"{Path(path).stem}-{where.rsplit(':', 1)[1].replace('row ', '')}"
        out.append(rec)
    return out


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as JSONL atomically; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of every file under a dir (sorted by relative path)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def from_sharegpt(raw: dict) -> dict:
    """ShareGPT (`conversations: [{from, value}]`) -> SFT record."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
             "tool": "ipython", "function_call": "assistant", "observation": "ipython"}
    convo = raw.get("conversations") or raw.get("conversation")
    if not isinstance(convo, list):
        raise KeyError("conversations: missing field")
    msgs = []
    for i, turn in enumerate(convo):
        if turn.get("from") not in roles:
            raise ValueError(f"conversations[{i}].from: unknown speaker {turn.get('from')!r}")
        msgs.append({"role": roles[turn["from"]], "content": turn.get("value", "")})
    rec = {"messages": msgs}
    if "id" in raw:
        rec["id"] = raw["id"]
    return rec


def from_openai(raw: dict) -> dict:
    """OpenAI chat (`messages` with tool calls whose arguments are JSON strings) -> SFT record."""
    msgs = []
    for m in raw["messages"]:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", c))
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"])
                calls.append({"type": "function", "function": {"name": fn["name"], "arguments": fn.get("arguments", {})}})
            m["tool_calls"] = calls
        m.pop("tool_call_id", None)
        m.pop("name", None)
        msgs.append(m)
    rec = {k: v for k, v in raw.items() if k in ("id", "tools", "source")}
    rec["messages"] = msgs
    return rec


CONVERTERS = {"posttrain": None, "sharegpt": from_sharegpt, "openai": from_openai}
