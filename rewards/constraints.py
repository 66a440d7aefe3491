"""Instruction constraints in the style of IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large
Language Models"): checks that a response follows verifiable instructions such as "answer in fewer than 100 words".

A constraint is a dict `{"type": ..., **parameters}`; `constraint_results(text, constraints)` says which hold and
`constraints_score` is the share that hold. Counted types take any of `count` (exactly), `min`, `max` (inclusive):
IFEval's "less than N" is `max: N - 1`, its "at least N" is `min: N`. docs/verifiers.md lists every type.

Where IFEval's rules are clear they are kept (words are runs of letters, digits and "_"; paragraphs are split by the
markdown divider ***; an empty response follows nothing). Deliberate differences: keywords match as whole words or
phrases, case-insensitive (IFEval matches included keywords as substrings); a bullet needs a space after its "*" or
"-"; sentences are split by rule, not by NLTK's punkt model; `case` does not also detect the language.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

_COUNT_KEYS = ("count", "min", "max")
_WORD = re.compile(r"\w+")
# A sentence ends at . ! or ? (and any closing quotes or brackets) before whitespace or the end, or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d)\]]*(?:\s+|$)|\n\s*\n")
# Words whose trailing dot does not end a sentence, besides initials ("J. Smith") and dotted letters ("e.g.", "p.m.").
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "fig"}
_DOTTED_LETTERS = re.compile(r"[a-z](?:\.[a-z])+")
# "* item" or "- item"; not "**bold**", a rule "---" or "-5".
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_DIVIDER = re.compile(r"\s?\*\*\*\s?")
_BLANK_LINE = re.compile(r"\n\s*\n")
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]*\w[^\[\]\n]*\]")
_HIGHLIGHT = re.compile(r"\*\*([^\n*]+)\*\*|\*([^\n*]+)\*")
_TITLE = re.compile(r"<<([^\n]+?)>>")
_CAPITAL_WORD = re.compile(r"\w+(?:[-']\w+)*")
_JSON_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def count_words(text: str) -> int:
    """Runs of word characters: "don't stop" is 3 words, "state-of-the-art" is 4 (IFEval's count)."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """The sentences of a text: pieces ending at . ! ? before whitespace or at a blank line, that hold a word.

    A dot after a known abbreviation ("Dr."), dotted letters ("e.g.", "U.S.") or an initial ("J.") does not end a
    sentence within a paragraph; one inside a number ("3.14") or a name ("example.com") is not followed by
    whitespace, so it never does.
    """
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        piece = text[start:end.start()].strip()
        last = piece.rsplit(None, 1)[-1] if piece else ""
        token = last.rstrip(".").lower()
        abbreviated = (token in _ABBREVIATIONS or _DOTTED_LETTERS.fullmatch(token)
                       or (len(token) == 1 and token.isalpha() and last[0].isupper()))
        if last.endswith(".") and abbreviated and not _BLANK_LINE.search(end.group(0)):
            continue
        sentences.append(piece)
        start = end.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if _WORD.search(s)]


def _phrase(word: str) -> re.Pattern:
    """A word or phrase as a whole, case-insensitive: "cat" is not found in "category"."""
    return re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)


def _paragraph_count(text: str, separator: str) -> int | None:
    """Paragraphs split by `***` (IFEval) or by blank lines; None when a paragraph between two dividers is empty."""
    pieces = (_DIVIDER if separator == "***" else _BLANK_LINE).split(text.strip())
    if pieces and not pieces[0].strip():
        pieces = pieces[1:]
    if pieces and not pieces[-1].strip():
        pieces = pieces[:-1]
    return None if any(not p.strip() for p in pieces) else len(pieces)


def _json_format(text: str) -> bool:
    """The whole response is one JSON value, optionally in a ``` or ```json fence."""
    text = text.strip()
    fenced = _JSON_FENCE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


def _keywords(text: str, c: dict) -> bool:
    return (all(_phrase(w).search(text) for w in c.get("include", []))
            and not any(_phrase(w).search(text) for w in c.get("exclude", [])))


@dataclass(frozen=True)
class _Type:
    """One constraint type: a check, or a measure whose value must lie in the constraint's count/min/max."""

    keys: tuple[str, ...] = ()  # parameters it reads besides count/min/max
    required: tuple[str, ...] = ()  # of those, the ones it cannot do without
    check: Callable[[str, dict], bool] | None = None
    measure: Callable[[str, dict], int | None] | None = None


TYPES: dict[str, _Type] = {
    "word_count": _Type(measure=lambda t, c: count_words(t)),
    "sentence_count": _Type(measure=lambda t, c: len(split_sentences(t))),
    "keywords": _Type(keys=("include", "exclude"), check=_keywords),
    "keyword_frequency": _Type(keys=("keyword",), required=("keyword",),
                               measure=lambda t, c: len(_phrase(c["keyword"]).findall(t))),
    "case": _Type(keys=("value",), required=("value",),
                  check=lambda t, c: t.islower() if c["value"] == "lower" else t.isupper()),
    "capital_words": _Type(measure=lambda t, c: sum(w.isupper() for w in _CAPITAL_WORD.findall(t))),
    "bullet_list": _Type(measure=lambda t, c: len(_BULLET.findall(t))),
    "paragraphs": _Type(keys=("separator",), measure=lambda t, c: _paragraph_count(t, c.get("separator", "***"))),
    "placeholders": _Type(measure=lambda t, c: len(_PLACEHOLDER.findall(t))),
    "highlights": _Type(measure=lambda t, c: sum(bool((a or b).strip()) for a, b in _HIGHLIGHT.findall(t))),
    "json_format": _Type(check=lambda t, c: _json_format(t)),
    "starts_with": _Type(keys=("value",), required=("value",),
                         check=lambda t, c: t.lstrip().lower().startswith(c["value"].strip().lower())),
    "ends_with": _Type(keys=("value",), required=("value",),
                       check=lambda t, c: t.strip().strip('"').rstrip().lower().endswith(c["value"].strip().lower())),
    "no_commas": _Type(check=lambda t, c: "," not in t),
    "title": _Type(check=lambda t, c: any(title.strip() for title in _TITLE.findall(t))),
    "postscript": _Type(keys=("marker",), check=lambda t, c: any(
        line.lstrip().lower().startswith(c.get("marker", "P.S.").lower()) for line in t.splitlines())),
    "quotation": _Type(check=lambda t, c: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"'),
}


def check_constraints(constraints: list, where: str = "meta.constraints") -> None:
    """Refuse a constraint list that cannot be checked: naming the index and key of the first bad entry."""
    if not isinstance(constraints, list) or not constraints:
        raise ValueError(f"{where}: expected a non-empty list of constraints, got {constraints!r}")
    for i, c in enumerate(constraints):
        at = f"{where}[{i}]"
        if not isinstance(c, dict) or "type" not in c:
            raise ValueError(f"{at}: expected a mapping with a type, got {c!r}")
        kind = TYPES.get(c["type"]) if isinstance(c["type"], str) else None
        if kind is None:
            raise ValueError(f"{at}.type: unknown constraint {c['type']!r} (known: {', '.join(TYPES)})")
        allowed = kind.keys + (_COUNT_KEYS if kind.measure else ())
        unknown = [k for k in c if k != "type" and k not in allowed]
        if unknown:
            raise ValueError(f"{at}.{unknown[0]}: not a parameter of {c['type']} (its parameters: "
                             f"{', '.join(allowed) or 'none'})")
        missing = [k for k in kind.required if k not in c]
        if missing:
            raise ValueError(f"{at}.{missing[0]}: missing; {c['type']} needs it")
        if kind.measure and not any(k in c for k in _COUNT_KEYS):
            raise ValueError(f"{at}: {c['type']} needs count, min or max")
        for key in _COUNT_KEYS:
            if key in c and (isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 0):
                raise ValueError(f"{at}.{key}: {c[key]!r} is not a whole number >= 0")
        for key in ("include", "exclude"):
            words = c.get(key, [])
            if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"{at}.{key}: expected a list of words or phrases, got {words!r}")
        for key in ("value", "keyword", "marker"):
            if key in c and not (isinstance(c[key], str) and c[key].strip()):
                raise ValueError(f"{at}.{key}: expected a non-empty string, got {c[key]!r}")
        if c["type"] == "case" and c["value"] not in ("lower", "upper"):
            raise ValueError(f"{at}.value: {c['value']!r} is not lower or upper")
        if c["type"] == "paragraphs" and c.get("separator", "***") not in ("***", "blank_line"):
            raise ValueError(f"{at}.separator: {c['separator']!r} is not *** or blank_line")
        if c["type"] == "keywords" and not (c.get("include") or c.get("exclude")):
            raise ValueError(f"{at}: keywords needs include or exclude")


def _holds(text: str, c: dict) -> bool:
    kind = TYPES[c["type"]]
    if kind.check:
        return kind.check(text, c)
    value = kind.measure(text, c)
    if value is None:
        return False
    exact, low, high = c.get("count"), c.get("min"), c.get("max")
    return (exact is None or value == exact) and (low is None or value >= low) and (high is None or value <= high)


def _loose_variants(text: str) -> list[str]:
    """IFEval's loose reading: the response, without its first and/or last line, each also without any "*"."""
    lines = text.split("\n")
    cut = [text, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    return [v for variant in cut for v in (variant.strip(), variant.replace("*", "").strip())]


def constraint_results(text: str, constraints: list[dict], *, strict: bool = True) -> list[bool]:
    """Whether each constraint holds. An empty response follows none. Loose (`strict=False`): a constraint holds
    when it holds on any of IFEval's loose variants of the response (a preamble line or markup removed)."""
    check_constraints(constraints)
    variants = [text] if strict else _loose_variants(text)
    return [any(v.strip() and _holds(v, c) for v in variants) for c in constraints]


def constraints_score(text: str, constraints: list[dict], *, strict: bool = True) -> float:
    """The share of the constraints that hold, in [0, 1]."""
    results = constraint_results(text, constraints, strict=strict)
    return sum(results) / len(results)
