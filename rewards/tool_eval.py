"""Tool-call accuracy on a held-out set, BFCL-style: predicted calls matched to the expected ones by structure.

A call matches when the function name is the same, every expected argument is present, no other argument is given,
and each value is equal after type normalisation: an int equals a float of the same value (but True is not 1),
strings compare exactly, keyword order does not matter, list order does, dicts compare recursively. An expected
value may instead list what is acceptable:
    {"$one_of": [v1, v2, ...]}    present, and equal to one of them
    {"$optional": [v1, ...]}      may be left out; if given, equal to one of them (an empty list: any value)
Several calls match as a set (order="any", each expected call paired with its own predicted call) or in order
(order="exact"). No expected calls means the model should answer without a tool.

Eval records are prompt records with `meta.expected_calls` (and optionally `meta.order`, `meta.category`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from posttrain.data import RecordError, iter_raw, validate_record
from posttrain.tools import call_name_args, split_tool_definitions
from rewards.verifiable import tool_call_errors

ORDERS = ("any", "exact")
ONE_OF, OPTIONAL = "$one_of", "$optional"


def values_equal(predicted: Any, expected: Any) -> bool:
    """Equal after type normalisation: 3 == 3.0, True != 1, lists in order, dicts by key, strings exactly."""
    if isinstance(predicted, bool) or isinstance(expected, bool):
        return isinstance(predicted, bool) and isinstance(expected, bool) and predicted == expected
    if isinstance(predicted, (int, float)) and isinstance(expected, (int, float)):
        return predicted == expected
    if isinstance(predicted, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(predicted) == len(expected) and all(map(values_equal, predicted, expected))
    if isinstance(predicted, dict) and isinstance(expected, dict):
        return predicted.keys() == expected.keys() and all(values_equal(predicted[k], expected[k]) for k in expected)
    return type(predicted) is type(expected) and predicted == expected


def _alternatives(spec: Any) -> tuple[list | None, bool]:
    """(acceptable values or None for a plain literal, whether the argument may be left out)."""
    if isinstance(spec, dict) and len(spec) == 1:
        key, values = next(iter(spec.items()))
        if key in (ONE_OF, OPTIONAL):
            if not isinstance(values, list):
                raise ValueError(f"{key}: expected a list of acceptable values")
            return values, key == OPTIONAL
    return None, False


def call_match(predicted: dict, expected: dict) -> tuple[bool, str]:
    """(match, reason) for one predicted call against one expected call."""
    name, args = call_name_args(predicted, "predicted")
    want_name, want_args = call_name_args(expected, "expected")
    if name != want_name:
        return False, f"wrong function: expected {want_name}, got {name}"
    for key, spec in want_args.items():
        values, optional = _alternatives(spec)
        if key not in args:
            if optional:
                continue
            return False, f"{name}: missing argument {key!r}"
        if values is None and not values_equal(args[key], spec):
            return False, f"{name}.{key}: expected {spec!r}, got {args[key]!r}"
        if values is not None and values and not any(values_equal(args[key], v) for v in values):
            return False, f"{name}.{key}: {args[key]!r} is not one of {values!r}"
    extra = sorted(set(args) - set(want_args))
    if extra:
        return False, f"{name}: unexpected argument {extra[0]!r}"
    return True, "match"


def _perfect_matching(ok: list[list[bool]]) -> bool:
    """Whether every expected call (row) can take its own predicted call (column)."""
    taken: set[int] = set()

    def place(row: int) -> bool:
        if row == len(ok):
            return True
        for col, fits in enumerate(ok[row]):
            if fits and col not in taken:
                taken.add(col)
                if place(row + 1):
                    return True
                taken.discard(col)
        return False

    return place(0)


def ast_match(predicted_calls: list | None, expected_calls: list, tools: list | None = None, *,
              order: str = "any") -> tuple[bool, str]:
    """(match, reason): do the predicted calls match the expected ones? `tools` (the definitions offered) adds a
    check that every predicted call names an offered tool with arguments valid under its schema."""
    if order not in ORDERS:
        raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
    predicted = list(predicted_calls or [])
    if not expected_calls:
        return (True, "no call expected, none made") if not predicted else (False, "called a tool; none was expected")
    if not predicted:
        return False, "no tool call"
    if len(predicted) != len(expected_calls):
        return False, f"expected {len(expected_calls)} call(s), got {len(predicted)}"
    if tools is not None:
        errors = tool_call_errors({"tool_calls": predicted}, tools)
        if errors:
            return False, errors[0]
    if order == "exact":
        for i, (pred, want) in enumerate(zip(predicted, expected_calls)):
            ok, reason = call_match(pred, want)
            if not ok:
                return False, f"call {i}: {reason}" if len(predicted) > 1 else reason
        return True, "match"
    results = [[call_match(pred, want) for pred in predicted] for want in expected_calls]
    ok = [[r[0] for r in row] for row in results]
    if _perfect_matching(ok):
        return True, "match"
    if len(expected_calls) == 1:
        return results[0][0]
    for j, row in enumerate(results):
        if not any(fits for fits, _ in row):
            want_name = call_name_args(expected_calls[j])[0]
            same_name = [reason for (_, reason), pred in zip(row, predicted) if call_name_args(pred)[0] == want_name]
            return False, f"expected call {j}: " + (same_name[0] if same_name else f"no call to {want_name}")
    return False, "calls match only by sharing a predicted call"


def _message(completion: Any) -> dict:
    """The assistant message of a completion: a message dict, generate's Completion, or raw text."""
    if isinstance(completion, dict):
        return completion
    if hasattr(completion, "message"):
        return completion.message
    from posttrain.chat import parse_completion

    return parse_completion(str(completion))


def evaluate_tool_calls(records: list[dict], completions: list, *, order: str | None = None) -> dict:
    """Tool-call accuracy of `completions` (one per eval record, in order) against each record's expected calls.

    Returns {"n", "accuracy", "name_accuracy" (the right functions, in any order), "by_category": {cat: {"n",
    "accuracy"}}, "results": [{"id", "correct", "reason"}]}; `order` overrides each record's `meta.order`.
    """
    if len(records) != len(completions):
        raise ValueError(f"completions: {len(completions)} for {len(records)} eval records")
    results, names_right, by_category = [], 0, {}
    for rec, completion in zip(records, completions):
        meta = rec.get("meta") or {}
        expected = meta["expected_calls"]
        calls = _message(completion).get("tool_calls") or []
        try:
            correct, reason = ast_match(calls, expected, rec.get("tools"), order=order or meta.get("order", "any"))
        except ValueError as e:  # a malformed predicted call
            correct, reason = False, str(e)
        names = Counter(call_name_args(c)[0] for c in expected)
        names_right += Counter(_names(calls)) == names
        category = by_category.setdefault(meta.get("category", "all"), {"n": 0, "correct": 0})
        category["n"] += 1
        category["correct"] += correct
        results.append({"id": rec.get("id"), "correct": correct, "reason": reason})
    n = len(results)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in results) / n if n else 0.0,
        "name_accuracy": names_right / n if n else 0.0,
        "by_category": {k: {"n": v["n"], "accuracy": v["correct"] / v["n"]} for k, v in sorted(by_category.items())},
        "results": results,
    }


def _names(calls: list) -> list[str]:
    out = []
    for call in calls:
        try:
            out.append(call_name_args(call)[0])
        except ValueError:
            out.append("")
    return out


def load_eval_set(path: str | Path) -> list[dict]:
    """Eval records (prompt records with tools and meta.expected_calls); errors name file:line and field."""
    records = []
    for where, raw in iter_raw(path):
        rec = validate_record(raw, "prompt", where)
        meta = rec.get("meta") or {}
        expected = meta.get("expected_calls")
        if not isinstance(expected, list):
            raise RecordError(f"{where}: meta.expected_calls: missing or not a list (use [] for no call)")
        for i, call in enumerate(expected):
            try:
                call_name_args(call, f"meta.expected_calls[{i}]")
            except ValueError as e:
                raise RecordError(f"{where}: {e}") from None
        if meta.get("order", "any") not in ORDERS:
            raise RecordError(f"{where}: meta.order: {meta['order']!r} is not one of {', '.join(ORDERS)}")
        if "tools" in rec:
            try:
                split_tool_definitions(rec["tools"])
            except ValueError as e:
                raise RecordError(f"{where}: {e}") from None
        records.append(rec)
    return records
