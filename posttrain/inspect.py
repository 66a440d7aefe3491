"""`posttrain inspect FILE.jsonl`: print a record as the model sees it, trained tokens highlighted.

The record is rendered with the chat template and special tokens of `--model` (a model source as posttrain.backbone
loads it, or a tokenizer dir/file; default Llama 3). On a terminal trained tokens are green and format tokens
(headers, end tokens) dim; otherwise trained spans are wrapped in `[[...]]`. The last line counts tokens and trained
tokens. `--kind samples` prints each completion of an RS samples record with its reward and scores
(docs/formats.md). A record that does not fit `--kind` is named by file:line, with the kinds it does fit.
"""

from __future__ import annotations

import argparse
import json
import sys

from posttrain.chat import Rendered, render
from posttrain.data import KINDS, RecordError, iter_raw, validate_record
from posttrain.tokenizer import load_tokenizer
from posttrain.tools import CUSTOM_FORMATS

_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain inspect", description="print a record as the model sees it")
    p.add_argument("file", help="JSONL, parquet or HF datasets dir of records")
    p.add_argument("--index", type=int, default=0, help="which record, counting from 0 (default 0)")
    p.add_argument("--model", "--tokenizer", dest="model", default=None,
                   help="whose chat template and special tokens to render with: a model (HF dir, Meta dir, .gguf, or a "
                        "name such as smollm2-135m-instruct) or a tokenizer dir/file; default: Llama 3")
    p.add_argument("--kind", choices=KINDS, default="sft", help="record kind (default sft)")
    p.add_argument("--train-on", choices=("all", "last"), default="all", help="assistant turns trained on")
    p.add_argument("--tool-format", choices=CUSTOM_FORMATS, default="json", help="how custom tool calls are written")
    p.add_argument("--tokens", action="store_true", help="one line per token: position, id, piece, flags")
    return p


def _find_record(path: str, index: int, kind: str) -> tuple[str, dict]:
    """(`file:line`, validated record) of the index-th record; every record up to it is validated."""
    if index < 0:
        raise RecordError(f"{path}: --index must be >= 0, got {index}")
    count = 0
    for where, raw in iter_raw(path):
        rec = _validate(raw, kind, where)
        if count == index:
            return where, rec
        count += 1
    raise RecordError(f"{path}: no record at index {index} ({count} records)")


def _validate(raw, kind: str, where: str) -> dict:
    """validate_record; a record that fails `kind` but fits another kind says so."""
    try:
        return validate_record(raw, kind, where)
    except RecordError as e:
        fits = [k for k in KINDS if k != kind and _fits(raw, k)]
        if not fits:
            raise
        raise RecordError(f"{e} (this record fits {' or '.join(f'--kind {k}' for k in fits)})") from None


def _fits(raw, kind: str) -> bool:
    try:
        validate_record(raw, kind)
    except RecordError:
        return False
    return True


def _tokenizer(model: str | None):
    """The tokenizer of a model source (names included); else a tokenizer dir or file; None: Llama 3."""
    if model is None:
        return load_tokenizer()
    from posttrain.backbone import load_tokenizer_for  # imports torch: only when a model is named

    try:
        return load_tokenizer_for(model)
    except ValueError as not_a_model:
        try:
            return load_tokenizer(model)
        except FileNotFoundError:
            raise FileNotFoundError(f"{not_a_model}; nor a tokenizer dir or tokenizer.model file") from None


def _number(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def format_samples(rec: dict) -> str:
    """Each completion of a samples record: reward, each source's score, tokens and stop reason, then its text."""
    out = [f"system prompt: {rec['system_prompt']}"] if rec.get("system_prompt") else []
    for j, c in enumerate(rec["completions"]):
        scores = ", ".join(f"{name} {_number(v)}" for name, v in (c.get("scores") or {}).items())
        stop = c.get("stop_reason", "-")
        facts = [f"reward {_number(c.get('reward', '-'))}", *([scores] if scores else []),
                 f"{c.get('num_tokens', '-')} tokens, stop {stop}{' (truncated)' if stop == 'length' else ''}"]
        out.append(f"-- completion {j}: {' | '.join(facts)} --")
        message = c["message"]
        out.append((message.get("content") or "") if isinstance(message, dict) else str(message))
        if isinstance(message, dict) and message.get("tool_calls"):
            out.append(f"tool_calls: {json.dumps(message['tool_calls'], ensure_ascii=False)}")
    rewards = [c["reward"] for c in rec["completions"] if isinstance(c.get("reward"), (int, float))]
    best = f", reward {_number(max(rewards))} best, {_number(min(rewards))} worst" if rewards else ""
    out.append(f"{len(rec['completions'])} completions{best}")
    return "\n".join(out)


def _sections(rec: dict, kind: str, tokenizer, train_on: str, tool_format: str) -> list[tuple[str, Rendered]]:
    options = {"tools": rec.get("tools"), "train_on": train_on, "tool_format": tool_format}
    if kind == "sft":
        return [("", render(rec["messages"], tokenizer, **options))]
    if kind == "prompt":
        return [("", render(rec["messages"], tokenizer, add_generation_prompt=True, **options))]
    return [(key, render(rec["prompt"] + rec[key], tokenizer, **options))
            for key in ("chosen", "rejected", "edited") if rec.get(key)]


def format_rendered(r: Rendered, tokenizer, *, color: bool) -> str:
    """The decoded text; runs of trained tokens highlighted (ANSI green) or wrapped in [[...]]."""
    def style(j: int) -> tuple[bool, bool]:
        return r.mask[j], color and r.format_mask[j] and not r.mask[j]

    out, start = [], 0
    for end in range(1, len(r.ids) + 1):
        if end < len(r.ids) and style(end) == style(start):
            continue
        text = tokenizer.decode(r.ids[start:end])
        if r.mask[start]:
            out.append(f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]")
        elif r.format_mask[start] and color:
            out.append(f"{_DIM}{text}{_RESET}")
        else:
            out.append(text)
        start = end
    return "".join(out)


def format_tokens(r: Rendered, tokenizer) -> str:
    """One line per token: position, id, the piece (repr), T = trained, F = format."""
    return "\n".join(f"{i:6d} {tok:7d} {tokenizer.decode([tok])!r:<24} {'T' if m else '.'}{'F' if f else '.'}"
                     for i, (tok, m, f) in enumerate(zip(r.ids, r.mask, r.format_mask)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        where, rec = _find_record(args.file, args.index, args.kind)
    except (RecordError, FileNotFoundError) as e:
        print(f"posttrain inspect: error: {e}", file=sys.stderr)
        return 2
    if args.kind == "samples":
        print(f"== {where} (prompt {rec['prompt_id']}, samples, policy {rec.get('policy', '-')}) ==")
        print(format_samples(rec))
        return 0
    try:
        tokenizer = _tokenizer(args.model)
        sections = _sections(rec, args.kind, tokenizer, args.train_on, args.tool_format)
    except (ValueError, FileNotFoundError) as e:
        print(f"posttrain inspect: error: {where}: {e}", file=sys.stderr)
        return 2
    color = sys.stdout.isatty()
    print(f"== {where} (id {rec.get('id', '-')}, {args.kind}, template of {args.model or 'Llama 3'}) ==")
    counts = []
    for name, r in sections:
        if name:
            print(f"-- {name} --")
        print(format_tokens(r, tokenizer) if args.tokens else format_rendered(r, tokenizer, color=color))
        counts.append(f"{name + ': ' if name else ''}{len(r.ids)} tokens, {sum(r.mask)} trained")
    print(" | ".join(counts))
    return 0
