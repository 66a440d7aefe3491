"""Tool-use dialogs from a ScriptedTeacher, executed on the real backends, rendered to Llama 3.1 ids: one test per
wire format (builtin search, code interpreter, custom JSON, function-tag, pythonic list), then the failure paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import chat
from posttrain.data import RecordError, validate_record
from posttrain.tokenizer import END_HEADER, EOM, EOT, PYTHON_TAG, START_HEADER
from posttrain.tools import format_tool_definitions, make_call
from synth.teacher import ScriptedTeacher
from synth.tool_backends import ToolBackendsConfig
from synth.tooluse import Dialog, ToolUseConfig, load_tasks, teacher_prompt, tool_dialogs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tools"
FUNCTIONS = f"{EXAMPLES / 'functions.py'}:FUNCTIONS"
HEAD = "Environment: ipython\n"
DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city"]}}}
CURRENCY = {"type": "function", "function": {"name": "convert_currency", "description": "Convert money",
                                             "parameters": {"type": "object", "properties": {
                                                 "amount": {"type": "number"}, "from_currency": {"type": "string"},
                                                 "to_currency": {"type": "string"}},
                                                 "required": ["amount", "from_currency", "to_currency"]}}}
needs_sandbox = pytest.mark.sandbox


def run(tmp_path, tasks: list[dict], outputs: list[str], **overrides):
    """Run tool_dialogs with a ScriptedTeacher over `tasks`; returns (records, stats, teacher)."""
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"title": "Eiffel Tower", "url": "https://local.corpus/eiffel",
                                  "text": "The Eiffel Tower is 330 metres tall."}) + "\n"
                      + json.dumps({"title": "Mount Everest", "url": "https://local.corpus/everest",
                                    "text": "Mount Everest is 8,848.86 metres high."}) + "\n")
    backends = ToolBackendsConfig(search_corpus=str(corpus), search_top_k=1, functions=overrides.pop("functions", ""))
    cfg = ToolUseConfig(tasks=str(tmp_path / "tasks.jsonl"), backends=backends, **overrides)
    teacher = ScriptedTeacher(outputs)
    records, stats = tool_dialogs(teacher, cfg, seed=0)
    assert teacher.remaining == 0
    for rec in records:
        validate_record(rec, "sft", rec["id"])
    return records, stats, teacher


def turns(rendered, tokenizer) -> list[tuple[str, str, bool]]:
    """(role, content + terminator as text, trained) per message; headers must be untrained and a turn all or nothing."""
    ids, mask = rendered.ids, rendered.mask
    starts = [i for i, t in enumerate(ids) if t == START_HEADER] + [len(ids)]
    out = []
    for start, end in zip(starts, starts[1:]):
        end_header = ids.index(END_HEADER, start)
        assert tokenizer.decode(ids[end_header + 1:end_header + 2]) == "\n\n"
        assert not any(mask[start:end_header + 2])
        trained = set(mask[end_header + 2:end])
        assert len(trained) == 1, "a turn is trained on whole or not at all"
        out.append((tokenizer.decode(ids[start + 1:end_header]), tokenizer.decode(ids[end_header + 2:end]),
                    trained.pop()))
    return out


def first_content_ids(rendered, role_turn: int) -> tuple[int, int]:
    """(first content id, terminator id) of the message at position `role_turn`."""
    starts = [i for i, t in enumerate(rendered.ids) if t == START_HEADER] + [len(rendered.ids)]
    end_header = rendered.ids.index(END_HEADER, starts[role_turn])
    return rendered.ids[end_header + 2], rendered.ids[starts[role_turn + 1] - 1]


# ---- one dialog per wire format --------------------------------------------------------------------------------------

def test_builtin_search_dialog(tmp_path, llama3_tokenizer):
    task = {"id": "eiffel", "query": "How tall is the Eiffel Tower?", "tools": ["brave_search"], "answer": 330}
    (rec,), stats, _ = run(tmp_path, [task], ['<|python_tag|>brave_search.call(query="Eiffel Tower height")',
                                              "The Eiffel Tower is 330 metres tall."])
    result = ('{"query": "Eiffel Tower height", "source": "local-corpus", "results": [{"title": "Eiffel Tower", '
              '"url": "https://local.corpus/eiffel", "snippet": "The Eiffel Tower is 330 metres tall."}]}')
    assert rec["id"] == "synth-tooluse-eiffel" and rec["source"] == "synth:tooluse" and rec["tools"] == ["brave_search"]
    assert rec["messages"][2] == {"role": "ipython", "content": result}
    assert rec["meta"]["backends"] == {"brave_search": "LocalCorpusSearch"}
    rendered = chat.render(rec["messages"], llama3_tokenizer, tools=rec["tools"])
    assert turns(rendered, llama3_tokenizer) == [
        ("system", f"{HEAD}Tools: brave_search\n{DATES}<|eot_id|>", False),
        ("user", "How tall is the Eiffel Tower?<|eot_id|>", False),
        ("assistant", '<|python_tag|>brave_search.call(query="Eiffel Tower height")<|eom_id|>', True),
        ("ipython", result + "<|eot_id|>", False),
        ("assistant", "The Eiffel Tower is 330 metres tall.<|eot_id|>", True),
    ]
    assert first_content_ids(rendered, 2) == (PYTHON_TAG, EOM)
    assert first_content_ids(rendered, 4)[1] == EOT
    assert stats["calls_by_tool"] == {"brave_search": 1} and stats["kept"] == 1 and stats["removed"] == {}


@needs_sandbox
def test_code_interpreter_dialog_with_an_input_file(tmp_path, llama3_tokenizer):
    (tmp_path / "sales.csv").write_bytes((EXAMPLES / "sales.csv").read_bytes())
    task = {"id": "csv", "query": "How many units were sold in total?", "tools": ["code_interpreter"],
            "files": {"sales.csv": "sales.csv"}, "answer": 685}
    code = 'import csv\nrows = list(csv.DictReader(open("sales.csv")))\nprint(sum(int(r["units"]) for r in rows))'
    (rec,), _, _ = run(tmp_path, [task], ["<|python_tag|>" + code, "In total 685 units were sold."])
    assert rec["messages"][1]["tool_calls"] == [{"type": "function", "function": {"name": "code_interpreter",
                                                                                   "arguments": {"code": code}}}]
    assert rec["meta"]["files"] == ["sales.csv"]
    rendered = chat.render(rec["messages"], llama3_tokenizer, tools=rec["tools"])
    assert turns(rendered, llama3_tokenizer) == [
        ("system", f"{HEAD}{DATES}<|eot_id|>", False),
        ("user", 'How many units were sold in total?\n\nThe file "sales.csv" is in the working directory of the code '
                 "interpreter.<|eot_id|>", False),
        ("assistant", f"<|python_tag|>{code}<|eom_id|>", True),
        ("ipython", "685<|eot_id|>", False),
        ("assistant", "In total 685 units were sold.<|eot_id|>", True),
    ]
    assert first_content_ids(rendered, 2) == (PYTHON_TAG, EOM)


def test_custom_json_dialog(tmp_path, llama3_tokenizer):
    task = {"id": "paris", "query": "Weather in Paris, in celsius?", "tools": [WEATHER],
            "mock_results": {"get_weather": {"temperature": 18, "condition": "cloudy"}}}
    call = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
    (rec,), _, _ = run(tmp_path, [task], [call, "It is 18 °C and cloudy in Paris."])
    assert rec["meta"]["backends"] == {"get_weather": "MockFunctions"}
    rendered = chat.render(rec["messages"], llama3_tokenizer, tools=rec["tools"], tool_format="json")
    assert turns(rendered, llama3_tokenizer) == [
        ("system", f"{HEAD}{DATES}<|eot_id|>", False),
        ("user", format_tool_definitions([WEATHER], "json") + "<|eot_id|>", False),
        ("user", "Weather in Paris, in celsius?<|eot_id|>", False),
        ("assistant", '<|python_tag|>{\n    "type": "function",\n    "name": "get_weather",\n    "parameters": {\n'
                      '        "city": "Paris",\n        "unit": "celsius"\n    }\n}<|eom_id|>', True),
        ("ipython", '{"temperature": 18, "condition": "cloudy"}<|eot_id|>', False),
        ("assistant", "It is 18 °C and cloudy in Paris.<|eot_id|>", True),
    ]
    assert first_content_ids(rendered, 3) == (PYTHON_TAG, EOM)


def test_function_tag_dialog(tmp_path, llama3_tokenizer):
    task = {"id": "usd", "query": "How much is 250 US dollars in euros?", "tools": [CURRENCY], "answer": 230}
    call = '<function=convert_currency>{"amount": 250, "from_currency": "USD", "to_currency": "EUR"}</function>'
    (rec,), _, teacher = run(tmp_path, [task], [call, "250 US dollars is 230 euros."],
                             functions=FUNCTIONS, tool_format="function_tag")
    assert rec["meta"]["backends"] == {"convert_currency": "PythonFunctions"}
    assert "<function=example_function_name>" in teacher.calls[0][0][0][1]["content"]  # the definitions turn
    rendered = chat.render(rec["messages"], llama3_tokenizer, tools=rec["tools"], tool_format="function_tag")
    assert turns(rendered, llama3_tokenizer)[3:] == [
        ("assistant", call + "<|eot_id|>", True),
        ("ipython", '{"amount": 230.0, "currency": "EUR"}<|eot_id|>', False),
        ("assistant", "250 US dollars is 230 euros.<|eot_id|>", True),
    ]
    assert first_content_ids(rendered, 3)[1] == EOT and PYTHON_TAG not in rendered.ids


def test_pythonic_list_dialog_with_parallel_calls(tmp_path, llama3_tokenizer):
    task = {"id": "two", "query": "Weather in Paris, and in Tokyo in fahrenheit?", "tools": [WEATHER]}
    call = '[get_weather(city="Paris"), get_weather(city="Tokyo", unit="fahrenheit")]'
    (rec,), _, _ = run(tmp_path, [task], [call, "Paris: 18 °C, cloudy. Tokyo: 75.2 °F, sunny."],
                       functions=FUNCTIONS, tool_format="pythonic")
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "ipython", "ipython", "assistant"]
    rendered = chat.render(rec["messages"], llama3_tokenizer, tools=rec["tools"], tool_format="pythonic")
    got = turns(rendered, llama3_tokenizer)
    assert got[0] == ("system", f"{DATES}\n\n{format_tool_definitions([WEATHER], 'pythonic')}<|eot_id|>", False)
    assert got[2:] == [
        ("assistant", "[get_weather(city='Paris'), get_weather(city='Tokyo', unit='fahrenheit')]<|eot_id|>", True),
        ("ipython", '{"city": "Paris", "temperature": 18, "unit": "celsius", "condition": "cloudy"}<|eot_id|>', False),
        ("ipython", '{"city": "Tokyo", "temperature": 75.2, "unit": "fahrenheit", "condition": "sunny"}<|eot_id|>',
         False),
        ("assistant", "Paris: 18 °C, cloudy. Tokyo: 75.2 °F, sunny.<|eot_id|>", True),
    ]


def test_multi_step_dialog(tmp_path, llama3_tokenizer):
    task = {"id": "stack", "query": "How many Eiffel Towers make one Everest?", "mode": "multi",
            "tools": ["brave_search", "wolfram_alpha"]}
    (rec,), stats, teacher = run(tmp_path, [task], [
        '<|python_tag|>brave_search.call(query="Mount Everest height")',
        '<|python_tag|>wolfram_alpha.call(query="8848.86 / 330")',
        "About 26.8 Eiffel Towers."])
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "ipython", "assistant", "ipython", "assistant"]
    assert rec["messages"][4]["content"] == "Input: 8848.86 / 330\nResult: 26.8147272727273"
    assert "8,848.86 metres" in rec["messages"][2]["content"]
    # the teacher's third prompt holds both calls (as text: a scripted teacher has no Llama 3 renderer) and results
    assert [m["role"] for m in teacher.calls[2][0][0]][1:] == ["user", "assistant", "ipython", "assistant", "ipython"]
    rendered = chat.render(rec["messages"], llama3_tokenizer, tools=rec["tools"])
    assert [(role, trained) for role, _, trained in turns(rendered, llama3_tokenizer)] == [
        ("system", False), ("user", False), ("assistant", True), ("ipython", False), ("assistant", True),
        ("ipython", False), ("assistant", True)]
    assert [t for t in rendered.ids if t in (EOM, EOT)] == [EOT, EOT, EOM, EOT, EOM, EOT, EOT]
    assert stats["by_mode"] == {"multi": 1}


def test_easy_query_answered_without_a_tool(tmp_path, llama3_tokenizer):
    task = {"id": "capital", "query": "What is the capital of France?", "mode": "no_tool",
            "tools": ["brave_search", "wolfram_alpha"], "answer": "Paris"}
    (rec,), _, teacher = run(tmp_path, [task], ["The capital of France is Paris."])
    assert "without calling any tool" in teacher.calls[0][0][0][0]["content"]
    assert rec["tools"] == ["brave_search", "wolfram_alpha"]
    rendered = chat.render(rec["messages"], llama3_tokenizer, tools=rec["tools"])
    assert turns(rendered, llama3_tokenizer) == [
        ("system", f"{HEAD}Tools: brave_search, wolfram_alpha\n{DATES}<|eot_id|>", False),
        ("user", "What is the capital of France?<|eot_id|>", False),
        ("assistant", "The capital of France is Paris.<|eot_id|>", True),
    ]
    assert PYTHON_TAG not in rendered.ids and EOM not in rendered.ids


# ---- what the teacher sees ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, native, name, as_text", [
    ("pythonic", False, "get_weather", "[get_weather(city='Paris')]"),
    ("pythonic", True, "get_weather", "[get_weather(city='Paris')]"),  # a Llama 3 renderer would write JSON
    ("json", False, "get_weather", '<|python_tag|>{\n    "type": "function",\n    "name": "get_weather",\n'
                                   '    "parameters": {\n        "city": "Paris"\n    }\n}'),
    ("json", True, "get_weather", None),  # structured: the teacher's own renderer writes it exactly
    ("pythonic", True, "brave_search", None),
    ("function_tag", False, "brave_search", '<|python_tag|>brave_search.call(query="Paris")'),
])
def test_teacher_sees_earlier_calls_in_its_own_format(fmt, native, name, as_text):
    arguments = {"query": "Paris"} if name == "brave_search" else {"city": "Paris"}
    call = {"role": "assistant", "content": "", "tool_calls": [make_call(name, arguments)]}
    task = {"id": "t", "tools": [WEATHER, "brave_search"], "mode": "single", "files": {}}
    dialog = Dialog(task, [{"role": "user", "content": "Paris?"}, call, {"role": "ipython", "content": "18 C"}], None)
    prompt = teacher_prompt(dialog, fmt, native)
    assert prompt[-2] == (call if as_text is None else {"role": "assistant", "content": as_text})
    assert prompt[-1] == {"role": "ipython", "content": "18 C"}
    assert prompt[0]["content"].startswith(f"{HEAD}Tools: brave_search\n{DATES}\n\n")
    assert "You are an assistant that can call tools." in prompt[0]["content"]


# ---- failures --------------------------------------------------------------------------------------------------------

def test_failed_call_is_sent_back_and_corrected(tmp_path):
    task = {"id": "fix", "query": "How much is 10 dollars in euros?", "tools": [CURRENCY]}
    bad = '{"name": "convert_currency", "parameters": {"amount": 10, "from_currency": "USD", "to_currency": "EURO"}}'
    good = '{"name": "convert_currency", "parameters": {"amount": 10, "from_currency": "USD", "to_currency": "EUR"}}'
    (rec,), stats, teacher = run(tmp_path, [task], [bad, good, "10 dollars is 9.2 euros."], functions=FUNCTIONS)
    error = "convert_currency: convert_currency failed: ValueError: unknown currency 'EURO'; known: USD, EUR, GBP, JPY"
    assert teacher.calls[1][0][0][-2:] == [
        {"role": "assistant", "content": bad},
        {"role": "user", "content": f"The tool call failed:\n{error}\nFix the call and try again."}]
    assert rec["messages"][1]["tool_calls"][0]["function"]["arguments"]["to_currency"] == "EUR"
    assert rec["messages"][2]["content"] == '{"amount": 9.2, "currency": "EUR"}'
    assert len(rec["messages"]) == 4  # the failed turn and the feedback are not part of the kept dialog
    assert rec["meta"]["qc"]["execution"] == {"passed": True, "call_turns": 1, "retries": 1,
                                              "errors": [f"call_failed: {error}"]}
    assert (stats["corrections"], stats["corrected"], stats["removed"]) == ({"call_failed": 1}, 1, {})


@needs_sandbox
def test_failing_code_is_dropped_when_no_retries_are_left(tmp_path):
    task = {"id": "boom", "query": "Divide 1 by 0 in Python.", "tools": ["code_interpreter"]}
    records, stats, _ = run(tmp_path, [task], ["<|python_tag|>print(1 / 0)"], max_retries=0)
    assert records == []
    assert stats["removed"] == {"call_failed": 1}
    (dropped,) = stats["dropped"]
    assert dropped["task"] == "boom" and dropped["reason"] == "call_failed"
    assert dropped["detail"].endswith("ZeroDivisionError: division by zero")


def test_every_failure_is_counted_with_its_reason(tmp_path):
    weather = {"tools": [WEATHER], "mock_results": {"get_weather": "18 C"}}
    tasks = [
        {"id": "a", "query": "Weather in Rome?", **weather},
        {"id": "b", "query": "Weather in Oslo?", **weather},
        {"id": "c", "query": "Weather in Lima?", **weather},
        {"id": "d", "query": "What is 2 + 2?", "mode": "no_tool", **weather},
        {"id": "e", "query": "Weather in Kyiv?", "answer": 18, **weather},
        {"id": "f", "query": "Weather in Cairo?", **weather},
    ]
    call = '{"name": "get_weather", "parameters": {"city": "X"}}'
    step0 = ['{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"town": "Oslo"}}',
             "It is sunny in Lima.", call, call, call]
    step1 = ["It is 25 C in Kyiv.", call]
    records, stats, _ = run(tmp_path, tasks, step0 + step1, max_retries=0, max_steps=2)
    assert records == []
    assert stats["removed"] == {"unparseable_call": 1, "invalid_call": 1, "no_tool_call": 1,
                                "unexpected_tool_call": 1, "wrong_answer": 1, "max_steps": 1}
    details = {d["task"]: d["detail"] for d in stats["dropped"]}
    assert details["b"] == "tool_calls[0].function.arguments.city: required but missing"
    assert details["e"] == "the final answer does not match 18"


def test_scenario_tasks_get_teacher_written_queries(tmp_path):
    task = {"id": "travel", "scenario": "a traveller asks about the weather", "tools": [WEATHER], "num_queries": 2,
            "mock_results": {"get_weather": "sunny"}}
    call = '{"name": "get_weather", "parameters": {"city": "Tokyo"}}'
    records, stats, teacher = run(tmp_path, [task], [
        "1. What's the weather like in Tokyo?\n2. Is it raining in Berlin today?\n3. Extra line",
        call, call, "Sunny in Tokyo.", "Sunny in Berlin."])
    assert "- get_weather: Get the current weather in a city" in teacher.calls[0][0][0][0]["content"]
    assert [(r["id"], r["messages"][0]["content"]) for r in records] == [
        ("synth-tooluse-travel-q0", "What's the weather like in Tokyo?"),
        ("synth-tooluse-travel-q1", "Is it raining in Berlin today?")]
    assert stats["tasks"] == 2


@pytest.mark.parametrize("task, error", [
    ({"query": "hi"}, r"tasks.jsonl:1: tools: expected a list"),
    ({"query": "hi", "scenario": "x", "tools": ["brave_search"]}, r"tasks.jsonl:1: query: give exactly one"),
    ({"query": "hi", "tools": ["brave_search"], "files": {"a.csv": "a.csv"}}, r"files: input files need code_interpreter"),
    ({"query": "hi", "tools": ["code_interpreter"], "files": {"a.csv": "a.csv"}}, r"files.a.csv: .*a.csv: no such file"),
    ({"query": "hi", "tools": ["code_interpreter"], "files": {"../a.csv": "a.csv"}},
     r"files\.\.\./a\.csv: a file name must stay inside the working directory"),
    ({"query": "hi", "tools": ["brave_search"], "mode": "often"}, r"mode: 'often' is not one of no_tool, single, multi"),
])
def test_bad_tasks_name_the_line_and_field(tmp_path, task, error):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(task) + "\n")
    with pytest.raises(RecordError, match=error):
        load_tasks(path)
