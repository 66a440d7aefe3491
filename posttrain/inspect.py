"""`posttrain inspect FILE.jsonl`: print a record as the model sees it, trained tokens highlighted.

On a terminal trained tokens are green and format tokens (headers, end tokens) dim; otherwise trained spans are
wrapped in `[[...]]`. The last line counts tokens and trained tokens.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.chat import Rendered, render
from posttrain.data import RecordError, iter_raw, validate_record
from posttrain.tokenizer import load_tokenizer
from posttrain.tools import CUSTOM_FORMATS

KINDS = ("sft", "preference", "prompt")
_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain inspect", description="print a record as the model sees it")
    p.add_argument("file", help="JSONL, parquet or HF datasets dir of records")
    p.add_argument("--index", type=int, default=0, help="which record, counting from 0 (default 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (HF dir, Meta dir, .gguf); default: Llama 3")
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
        rec = validate_record(raw, kind, where)
        if count == index:
            return where, rec
        count += 1
    raise RecordError(f"{path}: no record at index {index} ({count} records)")


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
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        sections = _sections(rec, args.kind, tokenizer, args.train_on, args.tool_format)
    except (ValueError, FileNotFoundError) as e:
        print(f"posttrain inspect: error: {where}: {e}", file=sys.stderr)
        return 2
    color = sys.stdout.isatty()
    print(f"== {where} (id {rec.get('id', '-')}, {args.kind}) ==")
    counts = []
    for name, r in sections:
        if name:
            print(f"-- {name} --")
        print(format_tokens(r, tokenizer) if args.tokens else format_rendered(r, tokenizer, color=color))
        counts.append(f"{name + ': ' if name else ''}{len(r.ids)} tokens, {sum(r.mask)} trained")
    print(" | ".join(counts))
    return 0
