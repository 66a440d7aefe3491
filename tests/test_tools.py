"""Tool-call wire formats: literal tokens of tool dialogs, Meta's ChatFormat as oracle, encode/parse round trips."""

from __future__ import annotations

import pytest

from posttrain.chat import parse_completion, render
from posttrain.tools import encode_tool_calls, format_tool_definitions, make_call, parse_tool_calls

BOS, SH, EH, EOM, EOT, TAG, NN = 128000, 128006, 128007, 128008, 128009, 128010, 271
USER, ASSISTANT, IPYTHON = [882], [78191], [23799, 4690]
WEATHER = make_call("get_weather", {"city": "Paris"})
SEARCH = make_call("brave_search", {"query": "Paris weather"})
# token ids of each call's text (after the python tag where it has one)
CALL_IDS = {
    "json": [TAG, 5018, 1337, 794, 330, 1723, 498, 330, 609, 794, 330, 456, 70464, 498, 330, 14105, 794, 5324, 9103, 794,
             330, 60704, 32075],
    "function_tag": [27, 1723, 29380, 70464, 89963, 9103, 794, 330, 60704, 1, 5474, 1723, 29],
    "pythonic": [58, 456, 70464, 44602, 429, 60704, 32017],
    "builtin": [TAG, 1347, 525, 10947, 8692, 10974, 429, 60704, 9282, 909],
}


def dialog(call):
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "18C"},
            {"role": "assistant", "content": "18C in Paris."}]


def header(role_ids):
    return [SH, *role_ids, EH, NN]


@pytest.mark.parametrize("fmt", ["json", "function_tag", "pythonic", "builtin"])
def test_tool_dialog_literal_tokens_and_mask(llama3_tokenizer, fmt):
    call = SEARCH if fmt == "builtin" else WEATHER
    r = render(dialog(call), llama3_tokenizer, tool_format="json" if fmt == "builtin" else fmt)
    calls = CALL_IDS[fmt]
    assert r.ids == [BOS, *header(USER), 30081, 304, 12366, 30, EOT,
                     *header(ASSISTANT), *calls, EOM,  # a turn that calls a tool ends with <|eom_id|>
                     *header(IPYTHON), 972, 34, EOT,  # the tool result comes back as an ipython turn
                     *header(ASSISTANT), 972, 34, 304, 12366, 13, EOT]
    F, T = False, True
    assert r.mask == ([F] + [F] * 9 + [F] * 4 + [T] * (len(calls) + 1) + [F] * 8 + [F] * 4 + [T] * 6)
    assert r.format_mask == ([F] + [T] * 4 + [F] * 4 + [T] + [T] * 4 + [F] * len(calls) + [T]
                             + [T] * 5 + [F, F] + [T] + [T] * 4 + [F] * 5 + [T])


def meta_tool_tokens(name, arguments, fmt):
    from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    tool = BuiltinTool[name] if name in BuiltinTool.__members__ else name
    raw = [RawMessage(role="user", content="Weather in Paris?"),
           RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message,
                      tool_calls=[ToolCall(call_id="1", tool_name=tool, arguments=arguments)]),
           RawMessage(role="tool", content="18C"),
           RawMessage(role="assistant", content="18C in Paris.", stop_reason=StopReason.end_of_turn)]
    meta_fmt = {"json": ToolPromptFormat.json, "function_tag": ToolPromptFormat.function_tag,
                "pythonic": ToolPromptFormat.python_list}[fmt]
    return ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt(raw, meta_fmt).tokens


@pytest.mark.parametrize("fmt", ["json", "function_tag", "pythonic", "builtin"])
def test_tool_dialog_matches_meta_chat_format(llama3_tokenizer, fmt):
    call = SEARCH if fmt == "builtin" else WEATHER
    fn = call["function"]
    expected = meta_tool_tokens(fn["name"], fn["arguments"], "json" if fmt == "builtin" else fmt)
    if fmt in ("json", "builtin"):
        # Meta's ChatFormat writes the python tag only before code; the 3.1 model (prompt_format.md) also emits it
        # before builtin and JSON calls, and so do we
        at = 1 + 9 + 4
        expected = expected[:at] + [TAG] + expected[at:]
    ours = render(dialog(call), llama3_tokenizer, tool_format="json" if fmt == "builtin" else fmt,
                  add_generation_prompt=True)
    assert ours.ids == expected


@pytest.mark.parametrize("fmt", ["json", "function_tag", "pythonic"])
@pytest.mark.parametrize("content, calls", [
    ("", [WEATHER]),
    ("Let me check.", [WEATHER]),
    ("", [make_call("get_weather", {"city": "São Paulo", "days": 3, "metric": True, "hours": [1, 2],
                                    "opts": {"a": None, "b": 1.5}, "q": "say \"hi\"\n"})]),
    ("", [WEATHER, make_call("get_time", {})]),
    ("", [SEARCH]),
    ("Searching.", [make_call("wolfram_alpha", {"query": "100th decimal of pi"})]),
    ("", [make_call("code_interpreter", {"code": "import math\nprint(math.pi)\n"})]),
    ("", [SEARCH, WEATHER]),
])
def test_parse_completion_round_trips_rendered_turn(llama3_tokenizer, fmt, content, calls):
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    r = render([{"role": "user", "content": "Hi"}, message], llama3_tokenizer, tool_format=fmt)
    turn = r.ids[r.ids.index(78191) + 3:]  # after the assistant header: what the model generates
    text = llama3_tokenizer.decode(turn)
    assert text.endswith("<|eom_id|>")
    assert parse_completion(text) == message


def test_encode_literals():
    assert encode_tool_calls([SEARCH], "builtin") == '<|python_tag|>brave_search.call(query="Paris weather")'
    assert encode_tool_calls([make_call("code_interpreter", {"code": "print(1)"})], "pythonic") == \
        "<|python_tag|>print(1)"
    assert encode_tool_calls([WEATHER], "json") == \
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}'
    assert encode_tool_calls([WEATHER], "function_tag") == '<function=get_weather>{"city": "Paris"}</function>'
    two = [WEATHER, make_call("f", {"x": [1, True, None], "y": {"k": "v"}})]
    assert encode_tool_calls(two, "pythonic") == '[get_weather(city="Paris"), f(x=[1, True, None], y={"k": "v"})]'
    assert encode_tool_calls(two, "json").count("\n") == 1
    # arguments given as a JSON string (OpenAI style) are read
    as_string = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert encode_tool_calls([as_string], "function_tag") == encode_tool_calls([WEATHER], "function_tag")


@pytest.mark.parametrize("calls, fmt, match", [
    ([WEATHER], "xml", "tool format 'xml'"),
    ([], "json", "tool_calls: expected a non-empty list"),
    ([WEATHER], "builtin", r"tool_calls\[0\]\.function\.name: 'get_weather' is not a builtin tool"),
    ([{"function": {"arguments": {}}}], "json", r"tool_calls\[0\]\.function\.name: missing"),
    ([make_call("f", [1])], "json", r"tool_calls\[0\]\.function\.arguments: expected an object"),
    ([{"function": {"name": "f", "arguments": "{oops"}}], "json", r"tool_calls\[0\]\.function\.arguments: not valid JSON"),
    ([make_call("brave_search", {"q": "x"})], "json", r"tool_calls\[0\]\.function\.arguments: brave_search takes"),
    ([make_call("code_interpreter", {"code": "1"}), SEARCH], "json", r"tool_calls\[0\]: code_interpreter must be"),
    ([make_call("my-tool", {})], "pythonic", r"'my-tool' is not a Python identifier"),
])
def test_encode_errors(calls, fmt, match):
    with pytest.raises(ValueError, match=match):
        encode_tool_calls(calls, fmt)


@pytest.mark.parametrize("text, expected", [
    ('<|python_tag|>brave_search.call(query="latest price of 1oz gold")',
     [make_call("brave_search", {"query": "latest price of 1oz gold"})]),
    ('wolfram_alpha.call(query="100th decimal of pi")', [make_call("wolfram_alpha", {"query": "100th decimal of pi"})]),
    ("<|python_tag|>def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))",
     [make_call("code_interpreter", {"code": "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))"})]),
    ('{"name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}',
     [make_call("trending_songs", {"n": "10", "genre": "all"})]),
    ('<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {"n": 10}\n}',
     [make_call("trending_songs", {"n": 10})]),
    ('<function=trending_songs>{"n": 10}</function>', [make_call("trending_songs", {"n": 10})]),
    ('<function=getWeather>{"location":"New York","date":"2023-08-05"}',
     [make_call("getWeather", {"location": "New York", "date": "2023-08-05"})]),
    ("[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle', metric='celsius')]",
     [make_call("get_weather", {"city": "San Francisco", "metric": "celsius"}),
      make_call("get_weather", {"city": "Seattle", "metric": "celsius"})]),
    ("[get_user_info(user_id=7890, special='black')]", [make_call("get_user_info", {"user_id": 7890, "special": "black"})]),
    ("[get_time()]", [make_call("get_time", {})]),
    ("The capital of France is Paris.", None),
    ('{"name": "Paris", "population": 2100000}', None),  # JSON data without parameters is no call
    ("[1, 2, 3]", None),
    ("[get_boiling_point('water')]", None),  # positional arguments are not the pythonic format
    ("<|python_tag|>", None),
])
def test_parse_tool_calls(text, expected):
    assert parse_tool_calls(text) == expected


def test_parse_completion_strips_terminators_and_keeps_content():
    assert parse_completion('<|python_tag|>brave_search.call(query="gold")<|eom_id|>') == {
        "role": "assistant", "content": "", "tool_calls": [make_call("brave_search", {"query": "gold"})]}
    assert parse_completion('Sure.[get_time()]<|eot_id|>') == {
        "role": "assistant", "content": "Sure.", "tool_calls": [make_call("get_time", {})]}
    assert parse_completion("Use a list like [1, 2] here.") == {"role": "assistant", "content": "Use a list like [1, 2] here."}


def test_format_tool_definitions():
    tool = {"type": "function", "function": {"name": "trending_songs", "description": "Returns the trending songs",
                                             "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}
    assert format_tool_definitions(["brave_search"], "json") == ""
    tag = format_tool_definitions([tool, "brave_search"], "function_tag")
    assert tag.startswith("You have access to the following functions:\n\nUse the function 'trending_songs' to "
                          "'Returns the trending songs':\n{\"name\": \"trending_songs\", \"description\": \"Returns the "
                          "trending songs\", \"parameters\": {\"type\": \"object\", \"properties\": {\"n\": {\"type\": "
                          "\"integer\"}}}}\n\nThink very carefully before calling functions.\n")
    assert tag.endswith("- Put the entire function call reply on one line")
    js = format_tool_definitions([tool], "json")
    assert js.startswith("Answer the user's question by making use of the following functions if needed.\n"
                         "If none of the function can be used, please say so.\n"
                         "Here is a list of functions in JSON format:\n{\n    \"type\": \"function\",\n")
    assert js.endswith("}\n\nReturn function calls in JSON format.")
    with pytest.raises(ValueError, match=r"tools\[1\]\.function\.name: missing"):
        format_tool_definitions([tool, {"type": "function", "function": {"description": "x"}}], "json")
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.parameters: expected a JSON schema object"):
        format_tool_definitions([{"name": "f", "parameters": []}], "pythonic")
