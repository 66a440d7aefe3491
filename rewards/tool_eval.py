"""Tool-call accuracy on a held-out set: predicted calls matched to the expected ones by structure (AST match).

A call matches when the function name is the same, every expected argument is present, no other argument is given,
and each value is acceptable. An expected value is a literal, or says what is acceptable:
    {"$one_of": [v1, v2, ...]}    present, and equal to one of them
    {"$optional": [v1, ...]}      may be left out; if given, equal to one of them (an empty list: any value)
(also inside an expected dict, key by key). No expected calls means the model should answer without a tool.

Two rule sets (`rules`):
- "bfcl" (default): the rules of the Berkeley Function Calling Leaderboard's AST checker (bfcl-eval,
  eval_checker/ast_eval/ast_checker.py, Python categories). Strings compare after normalisation (spaces and
  `,./-_*^` removed, lower case, `'` read as `"`), also inside lists and dicts. Types come from the tool's schema
  (from the expected value without one): an int is accepted where a float is declared (BFCL's "auto conversion"),
  never a float for an int nor a bool for a number; a tuple counts as a list where a tuple is declared; the items of
  an array are type-checked one level deep; a value of the expected value's type where the schema says otherwise is a
  "variable" and compared as it is. With a schema, a required argument may not be left out and an argument it does
  not declare is unexpected. Several calls: each expected call in turn takes the first unused predicted call that
  matches it (BFCL's greedy no-order check).
- "strict": values equal with the same JSON types (3 != 3.0, True != 1), strings exactly, lists in order; several
  calls match as a set when each expected call can take its own predicted call; `tools` adds a JSON-schema check.
order="exact" pairs the calls in order under either rule set.

Eval records are prompt records with `meta.expected_calls` (and optionally `meta.order`, `meta.category`);
`from_bfcl` turns a BFCL entry and its possible answer into one.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from posttrain.data import RecordError, iter_raw, validate_record
from posttrain.tools import call_name_args, split_tool_definitions
from rewards.verifiable import tool_call_errors

ORDERS = ("any", "exact")
RULES = ("bfcl", "strict")
ONE_OF, OPTIONAL = "$one_of", "$optional"
# BFCL's type names, and the JSON-schema ones, as Python types
SCHEMA_TYPES = {"string": str, "integer": int, "float": float, "number": float, "boolean": bool, "array": list,
                "tuple": list, "dict": dict, "object": dict, "any": str}
_PUNCTUATION = re.compile(r"[ ,./\-_*^]")


def standardize(text: str) -> str:
    """A string as BFCL compares it: no spaces or `,./-_*^`, lower case, single quotes as double quotes."""
    return _PUNCTUATION.sub("", text).lower().replace("'", '"')


def _alternatives(spec: Any) -> tuple[list | None, bool]:
    """(acceptable values or None for a plain literal, whether the argument may be left out)."""
    if isinstance(spec, dict) and len(spec) == 1:
        key, values = next(iter(spec.items()))
        if key in (ONE_OF, OPTIONAL):
            if not isinstance(values, list):
                raise ValueError(f"{key}: expected a list of acceptable values")
            return values, key == OPTIONAL
    return None, False


def _acceptable(spec: Any) -> list | None:
    """The acceptable values of an expected argument; None when any value is."""
    values, optional = _alternatives(spec)
    if values is None:
        return [spec]
    return None if optional and not values else values


def _dict_ok(predicted: Any, expected: dict, equal) -> bool:
    """A predicted dict against an expected one whose values may be specs: no unknown keys, every value acceptable,
    every key left out optional."""
    if not isinstance(predicted, dict) or any(k not in expected for k in predicted):
        return False
    for key, spec in expected.items():
        if key not in predicted:
            if not _alternatives(spec)[1]:
                return False
            continue
        values = _acceptable(spec)
        if values is not None and not any(equal(predicted[key], v) for v in values):
            return False
    return True


def strict_equal(predicted: Any, expected: Any) -> bool:
    """Equal with the same JSON types: 3 != 3.0, True != 1, lists in order, strings exactly."""
    if isinstance(expected, dict):
        return _dict_ok(predicted, expected, strict_equal)
    if isinstance(predicted, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(predicted) == len(expected) and all(map(strict_equal, predicted, expected))
    return type(predicted) is type(expected) and predicted == expected


def _bfcl_equal(predicted: Any, expected: Any) -> bool:
    """BFCL's comparison of one value with one acceptable value: two strings after standardising, else ==."""
    if isinstance(predicted, str) and isinstance(expected, str):
        return standardize(predicted) == standardize(expected)
    return predicted == expected


def _bfcl_list_equal(predicted: list, expected: Any) -> bool:
    """Item by item, strings standardised; BFCL reads an acceptable string as the list of its characters."""
    if not isinstance(expected, (list, str)) or len(predicted) != len(expected):
        return False
    return all(_bfcl_equal(p, e) for p, e in zip(predicted, expected))


def _answer_type(values: list) -> type | None:
    return next((type(v) for v in values if v != ""), None)


def _bfcl_types_ok(value: Any, values: list, declared: type | None, items: type | None) -> tuple[bool, bool]:
    """(type accepted, value is a "variable": of the acceptable values' type where the schema says otherwise)."""
    answer_type = _answer_type(values)
    variable = answer_type is not None and answer_type is not declared
    if declared is None or type(value) is declared:
        if items is None:
            return True, variable
        for answer in values:  # each item must fit the item type, or the type of an acceptable list's items
            if not isinstance(answer, list):
                return True, variable
            item_answer = _answer_type(answer)
            if all(type(v) is items or type(v) is item_answer for v in value):
                return True, variable
        return False, variable
    return answer_type is not None and type(value) is answer_type, True


def bfcl_value_ok(value: Any, spec: Any, schema: dict | None = None) -> bool:
    """Whether a predicted argument value is acceptable for `spec` under BFCL's rules; `schema`: the argument's
    property schema from the tool definition (without one, the acceptable values' type is the declared type)."""
    values = _acceptable(spec)
    if values is None:
        return True
    schema = schema or {}
    declared = SCHEMA_TYPES.get(schema.get("type")) or _answer_type(values)
    items = SCHEMA_TYPES.get((schema.get("items") or {}).get("type")) if declared is list else None
    if schema.get("type") == "tuple" and isinstance(value, tuple):
        value = list(value)
    if declared is float and type(value) is int:
        value = float(value)
    ok, variable = _bfcl_types_ok(value, values, declared, items)
    if not ok:
        return False
    if variable:
        return value in values
    if declared is dict:
        return any(isinstance(v, dict) and _dict_ok(value, v, _bfcl_equal) for v in values)
    if declared is list and items is dict:
        return any(isinstance(v, list) and len(v) == len(value)
                   and all(isinstance(e, dict) and _dict_ok(p, e, _bfcl_equal) for p, e in zip(value, v))
                   for v in values)
    if declared is str:
        return any(isinstance(v, str) and standardize(value) == standardize(v) for v in values)
    if declared is list:
        return any(_bfcl_list_equal(value, v) for v in values)
    return value in values


def _schemas(tools: list | None) -> dict[str, dict]:
    """Function name -> parameters schema of the offered tools."""
    if tools is None:
        return {}
    _, custom = split_tool_definitions(tools)
    return {t["function"]["name"]: t["function"].get("parameters") or {} for t in custom}


def call_match(predicted: dict, expected: dict, schema: dict | None = None, *, rules: str = "bfcl") -> tuple[bool, str]:
    """(match, reason) for one predicted call against one expected call; `schema`: the function's parameters."""
    name, args = call_name_args(predicted, "predicted")
    want_name, want_args = call_name_args(expected, "expected")
    if name != want_name:
        return False, f"wrong function: expected {want_name}, got {name}"
    properties = (schema or {}).get("properties")
    if rules == "bfcl":
        missing = [key for key in (schema or {}).get("required", []) if key not in args]
        if missing:
            return False, f"{name}: missing required argument {missing[0]!r}"
    for key, value in args.items():
        if key not in want_args or (rules == "bfcl" and properties is not None and key not in properties):
            return False, f"{name}: unexpected argument {key!r}"
        spec = want_args[key]
        if rules == "bfcl":
            ok = bfcl_value_ok(value, spec, (properties or {}).get(key))
        else:
            values = _acceptable(spec)
            ok = values is None or any(strict_equal(value, v) for v in values)
        if not ok:
            values, _ = _alternatives(spec)
            if values is None:
                return False, f"{name}.{key}: expected {spec!r}, got {value!r}"
            return False, f"{name}.{key}: {value!r} is not one of {values!r}"
    for key, spec in want_args.items():
        if key not in args and not _alternatives(spec)[1]:
            return False, f"{name}: missing argument {key!r}"
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


def _greedy_matching(ok: list[list[bool]]) -> tuple[int, set[int]] | None:
    """BFCL's no-order check: each expected call takes the first free predicted call it matches. None when all find
    one, else (the first expected call left without one, the predicted calls taken before it)."""
    taken: set[int] = set()
    for row, fits in enumerate(ok):
        col = next((c for c, fit in enumerate(fits) if fit and c not in taken), None)
        if col is None:
            return row, taken
        taken.add(col)
    return None


def _unmatched_reason(j: int, row: list[tuple[bool, str]], predicted: list, expected_calls: list,
                      taken: set[int] = frozenset()) -> str:
    want_name = call_name_args(expected_calls[j])[0]
    same_name = [reason for col, ((_, reason), pred) in enumerate(zip(row, predicted))
                 if col not in taken and call_name_args(pred)[0] == want_name]
    return f"expected call {j}: " + (same_name[0] if same_name else f"no call to {want_name}" + " left" * bool(taken))


def ast_match(predicted_calls: list | None, expected_calls: list, tools: list | None = None, *,
              order: str = "any", rules: str = "bfcl") -> tuple[bool, str]:
    """(match, reason): do the predicted calls match the expected ones? `tools` (the definitions offered) gives each
    argument its declared type and required/allowed arguments (bfcl), or adds a JSON-schema check (strict)."""
    if order not in ORDERS:
        raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
    if rules not in RULES:
        raise ValueError(f"rules: {rules!r} is not one of {', '.join(RULES)}")
    predicted = list(predicted_calls or [])
    if not expected_calls:
        return (True, "no call expected, none made") if not predicted else (False, "called a tool; none was expected")
    if not predicted:
        return False, "no tool call"
    if len(predicted) != len(expected_calls):
        return False, f"expected {len(expected_calls)} call(s), got {len(predicted)}"
    if tools is not None and rules == "strict":
        errors = tool_call_errors({"tool_calls": predicted}, tools)
        if errors:
            return False, errors[0]
    schemas = _schemas(tools)

    def match(pred: dict, want: dict) -> tuple[bool, str]:
        return call_match(pred, want, schemas.get(call_name_args(want)[0]), rules=rules)

    if order == "exact":
        for i, (pred, want) in enumerate(zip(predicted, expected_calls)):
            ok, reason = match(pred, want)
            if not ok:
                return False, f"call {i}: {reason}" if len(predicted) > 1 else reason
        return True, "match"
    results = [[match(pred, want) for pred in predicted] for want in expected_calls]
    if len(expected_calls) == 1:
        return results[0][0]
    ok = [[r[0] for r in row] for row in results]
    if rules == "bfcl":
        unmatched = _greedy_matching(ok)
        if unmatched is None:
            return True, "match"
        row, taken = unmatched
        return False, _unmatched_reason(row, results[row], predicted, expected_calls, taken)
    if _perfect_matching(ok):
        return True, "match"
    for j, row in enumerate(results):
        if not any(fits for fits, _ in row):
            return False, _unmatched_reason(j, row, predicted, expected_calls)
    return False, "calls match only by sharing a predicted call"


def _message(completion: Any) -> dict:
    """The assistant message of a completion: a message dict, generate's Completion, or raw text."""
    if isinstance(completion, dict):
        return completion
    if hasattr(completion, "message"):
        return completion.message
    from posttrain.chat import parse_completion

    return parse_completion(str(completion))


def evaluate_tool_calls(records: list[dict], completions: list, *, order: str | None = None,
                        rules: str = "bfcl") -> dict:
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
            correct, reason = ast_match(calls, expected, rec.get("tools"), order=order or meta.get("order", "any"),
                                        rules=rules)
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


# ---- BFCL's files ------------------------------------------------------------------------------------------------

def _bfcl_value(value: Any) -> Any:
    """An acceptable value of a BFCL answer: a dict answer's values are lists of acceptable values themselves."""
    if isinstance(value, dict):
        return {k: _bfcl_spec(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_bfcl_value(v) for v in value]
    return value


def _bfcl_spec(values: list) -> dict:
    """BFCL's list of acceptable values ("" among them: may be left out) as an expected-argument spec."""
    if not isinstance(values, list):
        raise ValueError(f"expected a list of acceptable values, got {type(values).__name__}")
    return {OPTIONAL if "" in values else ONE_OF: [_bfcl_value(v) for v in values]}


def expected_from_bfcl(ground_truth: list) -> list[dict]:
    """A BFCL possible answer (`[{"func": {"arg": [acceptable, ...]}}, ...]`) as expected calls."""
    calls = []
    for j, call in enumerate(ground_truth):
        if not isinstance(call, dict) or len(call) != 1:
            raise ValueError(f"ground_truth[{j}]: expected {{function name: {{argument: [values]}}}}")
        (name, args), = call.items()
        calls.append({"name": name, "arguments": {k: _bfcl_spec(v) for k, v in args.items()}})
    return calls


def from_bfcl(entry: dict, answer: dict) -> dict:
    """An eval record from a BFCL entry (`id`, `question`, `function`) and its possible answer (`ground_truth`)."""
    if entry.get("id") != answer.get("id"):
        raise ValueError(f"answer id {answer.get('id')!r} does not match entry id {entry.get('id')!r}")
    category = re.sub(r"_\d+$", "", str(entry["id"]))
    return {"id": entry["id"], "messages": entry["question"][0], "tools": entry["function"],
            "meta": {"expected_calls": expected_from_bfcl(answer["ground_truth"]), "category": category}}


def load_bfcl(questions: str | Path, answers: str | Path) -> list[dict]:
    """Eval records from a BFCL question file and its possible-answer file (JSON lines, matched by id)."""
    by_id = {}
    for where, raw in iter_raw(answers):
        by_id[raw.get("id")] = (where, raw)
    records = []
    for where, entry in iter_raw(questions):
        if entry.get("id") not in by_id:
            raise RecordError(f"{where}: id {entry.get('id')!r} has no possible answer in {answers}")
        try:
            records.append(validate_record(from_bfcl(entry, by_id[entry["id"]][1]), "prompt", where))
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"{where}: {e}") from None
    return records


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
