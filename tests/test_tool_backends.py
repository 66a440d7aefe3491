"""Tool backends: offline search, the SymPy math engine, the sandboxed code interpreter, custom functions, plug-ins."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from posttrain.config import from_dict
from posttrain.tools import make_call
from synth import tool_backends
from synth.sandbox import SandboxUnavailable
from synth.tool_backends import (CodeInterpreter, LocalCorpusSearch, MockFunctions, PythonFunctions, SympyMath,
                                 ToolBackends, ToolBackendsConfig, ToolError)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tools"
CORPUS = EXAMPLES / "search_corpus.jsonl"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}}
needs_sandbox = pytest.mark.sandbox


class FakeSearch:
    """A stand-in for a real web search service, plugged in by import path."""

    def __init__(self, answer: str):
        self.answer = answer

    def call(self, name: str, arguments: dict) -> str:
        return f"{self.answer} for {arguments['query']}"


# ---- search ----------------------------------------------------------------------------------------------------------

def test_local_search_finds_the_right_document():
    search = LocalCorpusSearch(CORPUS, top_k=3)
    assert search.search("how tall is the eiffel tower")[0]["title"] == "Eiffel Tower"
    assert [d["title"] for d in search.search("who won two Nobel prizes")] == ["Marie Curie"]
    assert search.search("largest coral reef")[0]["url"] == "https://local.corpus/great-barrier-reef"
    assert search.search("zzzz qqqq") == []


def test_bm25_score_by_hand():
    docs = [{"title": "", "url": "a", "text": "cat sat"}, {"title": "", "url": "b", "text": "dog dog ran far"}]
    search = LocalCorpusSearch(docs, k1=1.5, b=0.75)
    # "cat": df 1 of N 2 -> idf ln(1 + 1.5/1.5) = ln 2; doc a: tf 1, length 2, average length 3
    # score = ln2 * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 2/3)) = ln2 * 2.5 / 2.125
    assert search.scores("cat") == pytest.approx([math.log(2) * 2.5 / 2.125, 0.0])
    # "dog": doc b: tf 2, length 4 -> ln2 * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 4/3)) = ln2 * 5 / 3.875
    assert search.scores("dog dog") == pytest.approx([0.0, math.log(2) * 5 / 3.875])


def test_search_call_returns_json_results():
    out = json.loads(LocalCorpusSearch(CORPUS, top_k=1).call("brave_search", {"query": "Python 3.12 release date"}))
    assert out["query"] == "Python 3.12 release date"
    assert out["source"] == "local-corpus"
    assert [r["url"] for r in out["results"]] == ["https://local.corpus/python-3-12"]
    assert out["results"][0]["snippet"].startswith("Python 3.12 was released on 2 October 2023.")


def test_search_corpus_errors_name_the_line(tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"title": "a", "url": "u", "text": "t"}\n{"title": "b", "url": "u"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: text: missing"):
        LocalCorpusSearch(bad)


# ---- math ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def math_engine():
    return SympyMath(timeout_s=20)


@pytest.mark.parametrize("query, result", [
    ("integrate x^2 from 0 to 3", "Result: 9"),
    ("solve x^2-4=0", "Result: x = -2; x = 2"),
    ("What is 2^10 + 3*4?", "Result: 1036"),
    ("derivative of x^3 + 2x", "Result: 3*x**2 + 2"),
    ("limit of sin(x)/x as x -> 0", "Result: 1"),
    ("solve x + y = 3, x - y = 1", "Result: x = 2, y = 1"),
])
def test_sympy_engine_answers(math_engine, query, result):
    assert result in math_engine.call("wolfram_alpha", {"query": query}).splitlines()


def test_sympy_engine_gives_a_decimal_for_inexact_results(math_engine):
    out = math_engine.call("wolfram_alpha", {"query": "1/3 + 1/6"})
    assert out == "Input: 1/3 + 1/6\nResult: 1/2\nDecimal approximation: 0.500000000000"


@pytest.mark.parametrize("query", ["__import__('os').system('ls')", "x.__class__", "open('f')", "[x for x in y]"])
def test_sympy_engine_refuses_non_math(math_engine, query):
    with pytest.raises(ToolError, match="cannot read"):
        math_engine.call("wolfram_alpha", {"query": query})


def test_sympy_engine_stops_runaway_queries():
    with pytest.raises(ToolError, match="took longer than 1 s"):
        SympyMath(timeout_s=1).call("wolfram_alpha", {"query": "9^9^9"})


# ---- code interpreter ------------------------------------------------------------------------------------------------

@needs_sandbox
def test_code_interpreter_returns_stdout_and_reads_input_files():
    code = CodeInterpreter(timeout_s=20, files={"sales.csv": EXAMPLES / "sales.csv"})
    program = 'import csv\nprint(sum(int(r["units"]) for r in csv.DictReader(open("sales.csv"))))'
    assert code.call("code_interpreter", {"code": program}) == "685"
    assert code.call("code_interpreter", {"code": "x = 1"}) == "(no output)"


@needs_sandbox
def test_code_interpreter_failure_is_a_tool_error():
    with pytest.raises(ToolError, match="ZeroDivisionError: division by zero"):
        CodeInterpreter(timeout_s=20).call("code_interpreter", {"code": "print(1 / 0)"})


def test_code_interpreter_refuses_without_isolation(monkeypatch):
    monkeypatch.setattr(tool_backends, "isolation_available", lambda: None)
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        CodeInterpreter()
    assert CodeInterpreter(allow_unisolated=True).allow_unisolated


# ---- custom functions ------------------------------------------------------------------------------------------------

def test_python_functions_from_a_file_registry():
    functions = PythonFunctions(f"{EXAMPLES / 'functions.py'}:FUNCTIONS")
    out = functions.call("convert_currency", {"amount": 250, "from_currency": "USD", "to_currency": "EUR"})
    assert json.loads(out) == {"amount": 230.0, "currency": "EUR"}
    with pytest.raises(ToolError, match="convert_currency failed: ValueError: unknown currency 'XYZ'"):
        functions.call("convert_currency", {"amount": 1, "from_currency": "XYZ", "to_currency": "EUR"})
    with pytest.raises(ToolError, match="no such function"):
        functions.call("get_time", {})


def test_mock_functions_return_canned_results():
    returns = {"type": "object", "properties": {"temperature": {"type": "number"}, "sky": {"type": "string",
                                                                                           "enum": ["clear", "rain"]}}}
    defined = {"type": "function", "function": {**WEATHER["function"], "name": "get_forecast", "returns": returns}}
    mock = MockFunctions([WEATHER, defined], canned={"get_weather": {"temperature": 18}})
    assert mock.call("get_weather", {"city": "Paris"}) == '{"temperature": 18}'
    assert json.loads(mock.call("get_forecast", {"city": "Paris"})) == {"temperature": 0.0, "sky": "clear"}
    assert MockFunctions([WEATHER]).call("get_weather", {"city": "Paris"}) == '{"status": "success"}'


# ---- toolbox ---------------------------------------------------------------------------------------------------------

def test_toolbox_checks_arguments_before_running():
    box = ToolBackends(ToolBackendsConfig(search_corpus=str(CORPUS))).toolbox(["brave_search", WEATHER])
    bad = box.execute(make_call("get_weather", {"unit": "kelvin"}))
    assert bad.error == ("tool_calls[0].function.arguments.city: required but missing; "
                         "tool_calls[0].function.arguments.unit: 'kelvin' is not one of ['celsius', 'fahrenheit']")
    assert bad.text.startswith("Error: tool_calls[0].function.arguments.city")
    assert box.execute(make_call("get_time", {})).error == "tool_calls[0]: unknown tool 'get_time'"
    ok = box.execute(make_call("brave_search", {"query": "Mount Everest height"}))
    assert ok.error is None and json.loads(ok.text)["results"][0]["title"] == "Mount Everest"
    assert box.execute(make_call("get_weather", {"city": "Paris"})).text == '{"status": "success"}'


def test_toolbox_uses_canned_results_before_the_function_registry():
    cfg = ToolBackendsConfig(functions=f"{EXAMPLES / 'functions.py'}:FUNCTIONS")
    backends = ToolBackends(cfg)
    real = backends.toolbox([WEATHER]).execute(make_call("get_weather", {"city": "Berlin"}))
    assert json.loads(real.text) == {"city": "Berlin", "temperature": 14, "unit": "celsius", "condition": "rain"}
    canned = backends.toolbox([WEATHER], canned={"get_weather": "sunny"}).execute(make_call("get_weather", {"city": "B"}))
    assert canned.text == "sunny"


def test_real_services_plug_in_by_config():
    cfg = from_dict(ToolBackendsConfig, {"backends": {"brave_search": {
        "target": "test_tool_backends:FakeSearch", "kwargs": {"answer": "web results"}}}})
    box = ToolBackends(cfg).toolbox(["brave_search"])
    assert box.execute(make_call("brave_search", {"query": "llamas"})).text == "web results for llamas"
    assert type(box.backends["brave_search"]).__name__ == "FakeSearch"


def test_search_without_a_corpus_or_service_is_a_config_error():
    with pytest.raises(ValueError, match="tooluse.backends.search_corpus: brave_search needs a local corpus"):
        ToolBackends(ToolBackendsConfig()).toolbox(["brave_search"])
