"""BFCL-style AST match of tool calls, and tool-call accuracy on the held-out example set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.data import RecordError
from posttrain.tools import make_call
from rewards.tool_eval import ast_match, evaluate_tool_calls, load_eval_set, values_equal

EVAL_SET = Path(__file__).resolve().parent.parent / "examples" / "tools" / "tool_eval.jsonl"
BOOK = {"type": "function", "function": {"name": "book_table", "parameters": {"type": "object", "properties": {
    "restaurant": {"type": "string"}, "people": {"type": "integer"}, "outdoor": {"type": "boolean"}},
    "required": ["restaurant", "people"]}}}


def call(name, **arguments):
    return make_call(name, arguments)


def test_keyword_order_does_not_matter():
    assert ast_match([call("f", b=2, a="x")], [{"name": "f", "arguments": {"a": "x", "b": 2}}]) == (True, "match")


@pytest.mark.parametrize("predicted, expected, equal", [
    (3, 3.0, True), (3.0, 3, True), (2.5, 2.5, True), (3, 3.5, False),
    (True, 1, False), (1, True, False), (False, False, True),
    ("3", 3, False), ("Paris", "paris", False), ("Paris", "Paris", True),
    ([1, 2], [1, 2], True), ([1, 2], [2, 1], False), ([1], [1, 1], False),
    ({"a": {"b": 1.0}, "c": [1]}, {"c": [1.0], "a": {"b": 1}}, True), ({"a": 1, "x": 2}, {"a": 1}, False),
    (None, None, True), (None, "", False),
])
def test_values_equal_after_type_normalisation(predicted, expected, equal):
    assert values_equal(predicted, expected) is equal


def test_int_and_float_arguments_match():
    assert ast_match([call("area", width=4, height=2.0)], [call("area", width=4.0, height=2)])[0]


def test_extra_missing_and_wrong_values():
    expected = [call("f", a=1, b="x")]
    assert ast_match([call("f", a=1, b="x", c=3)], expected) == (False, "f: unexpected argument 'c'")
    assert ast_match([call("f", a=1)], expected) == (False, "f: missing argument 'b'")
    assert ast_match([call("f", a=1, b="y")], expected) == (False, "f.b: expected 'x', got 'y'")
    assert ast_match([call("f", a=True, b="x")], expected) == (False, "f.a: expected 1, got True")


def test_wrong_function_name():
    assert ast_match([call("get_time", city="Paris")], [call("get_weather", city="Paris")]) == (
        False, "wrong function: expected get_weather, got get_time")


def test_acceptable_values_and_optional_arguments():
    expected = [{"name": "f", "arguments": {"city": {"$one_of": ["NYC", "New York"]}, "unit": {"$optional": ["C"]},
                                             "note": {"$optional": []}}}]
    assert ast_match([call("f", city="New York")], expected)[0]
    assert ast_match([call("f", city="NYC", unit="C", note="anything")], expected)[0]
    assert ast_match([call("f", city="LA")], expected) == (False, "f.city: 'LA' is not one of ['NYC', 'New York']")
    assert ast_match([call("f", city="NYC", unit="F")], expected) == (False, "f.unit: 'F' is not one of ['C']")


def test_multiple_calls_as_a_set_or_in_order():
    expected = [call("w", city="Paris"), call("w", city="Tokyo")]
    swapped = [call("w", city="Tokyo"), call("w", city="Paris")]
    assert ast_match(swapped, expected) == (True, "match")
    assert ast_match(swapped, expected, order="exact") == (False, "call 0: w.city: expected 'Paris', got 'Tokyo'")
    assert ast_match(expected, expected, order="exact") == (True, "match")
    # each expected call needs its own predicted call
    assert ast_match([call("w", city="Paris")] * 2, expected) == (
        False, "expected call 1: w.city: expected 'Tokyo', got 'Paris'")
    assert ast_match(expected[:1], expected) == (False, "expected 2 call(s), got 1")
    assert ast_match([call("w", city="Paris"), call("x")], expected) == (
        False, "expected call 1: w.city: expected 'Tokyo', got 'Paris'")


def test_no_call_expected():
    assert ast_match([], []) == (True, "no call expected, none made")
    assert ast_match([call("f")], []) == (False, "called a tool; none was expected")
    assert ast_match(None, [call("f")]) == (False, "no tool call")


def test_tools_add_a_schema_check():
    expected = [call("book_table", restaurant="Luigi's", people=4)]
    assert ast_match([call("book_table", restaurant="Luigi's", people=4)], expected, [BOOK]) == (True, "match")
    assert ast_match([call("book_table", restaurant="Luigi's", people="4")], expected, [BOOK]) == (
        False, "tool_calls[0].function.arguments.people: expected integer, got str")
    assert ast_match([call("book_tables", restaurant="x", people=4)], expected, [BOOK]) == (
        False, "tool_calls[0]: unknown tool 'book_tables'")


def test_arguments_given_as_a_json_string():
    predicted = [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1.0}'}}]
    assert ast_match(predicted, [call("f", a=1)])[0]


def _completion(rec: dict, right: bool) -> str:
    """A completion for an eval record: its expected calls (first acceptable values) as pythonic or builtin text, or,
    when not `right`, the same with an extra argument (no call expected: a call)."""
    def pick(value):
        if isinstance(value, dict) and "$one_of" in value:
            return value["$one_of"][0]
        return value

    calls = rec["meta"]["expected_calls"]
    if not calls:
        return "Here you go." if right else '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    args = [{k: pick(v) for k, v in c["arguments"].items() if not (isinstance(v, dict) and "$optional" in v)}
            for c in calls]
    if not right:
        args[0] = {**args[0], "unexpected": 1}
    if calls[0]["name"] in ("wolfram_alpha", "brave_search"):
        return f'<|python_tag|>{calls[0]["name"]}.call(query="{args[0]["query"]}")'
    return "[" + ", ".join(f"{c['name']}(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in a.items()) + ")"
                           for c, a in zip(calls, args)) + "]"


def test_evaluate_on_the_held_out_set():
    records = load_eval_set(EVAL_SET)
    assert len(records) == 16
    wrong_ids = {"simple-area", "multiple-stock", "parallel-mixed", "irrelevant-poem"}
    completions = [_completion(r, r["id"] not in wrong_ids) for r in records]
    metrics = evaluate_tool_calls(records, completions)
    assert metrics["n"] == 16
    assert metrics["accuracy"] == 12 / 16
    assert metrics["by_category"] == {
        "builtin": {"n": 2, "accuracy": 1.0}, "irrelevance": {"n": 2, "accuracy": 0.5},
        "multiple": {"n": 3, "accuracy": 2 / 3}, "parallel": {"n": 3, "accuracy": 2 / 3},
        "simple": {"n": 6, "accuracy": 5 / 6}}
    # wrong arguments still name the right functions; the irrelevance miss calls one where none was wanted
    assert metrics["name_accuracy"] == 15 / 16
    failures = {r["id"]: r["reason"] for r in metrics["results"] if not r["correct"]}
    assert failures == {"simple-area": "rectangle_area: unexpected argument 'unexpected'",
                        "multiple-stock": "get_stock_price: unexpected argument 'unexpected'",
                        "parallel-mixed": "expected call 0: convert_currency: unexpected argument 'unexpected'",
                        "irrelevant-poem": "called a tool; none was expected"}


def test_evaluate_accepts_messages_and_reports_parse_failures():
    records = [{"id": "a", "messages": [], "meta": {"expected_calls": [call("f", x=1)]}}] * 2
    metrics = evaluate_tool_calls(records, [{"role": "assistant", "content": "", "tool_calls": [call("f", x=1.0)]},
                                            "I cannot call f."])
    assert [r["correct"] for r in metrics["results"]] == [True, False]
    assert metrics["results"][1]["reason"] == "no tool call"


def test_eval_set_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}], "meta": {}}) + "\n")
    with pytest.raises(RecordError, match=r"eval.jsonl:1: meta.expected_calls: missing"):
        load_eval_set(path)
    path.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}],
                                "meta": {"expected_calls": [{"arguments": {}}]}}) + "\n")
    with pytest.raises(RecordError, match=r"eval.jsonl:1: meta.expected_calls\[0\].function.name: missing"):
        load_eval_set(path)
