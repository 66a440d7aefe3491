"""Tool-call wire formats: literal tokens of tool dialogs, encode/parse round trips in both references, dotted names.

tests/test_tool_battery.py holds the dialogs of llama-models' documents and Meta's ChatFormat as references."""

from __future__ import annotations

import pytest

from posttrain.chat import parse_completion, render
from posttrain.tools import encode_tool_calls, format_tool_definitions, make_call, parse_tool_calls, write_calls

BOS, SH, EH, EOM, EOT, TAG, NN = 128000, 128006, 128007, 128008, 128009, 128010, 271
USER, ASSISTANT, IPYTHON = [882], [78191], [23799, 4690]
WEATHER = make_call("get_weather", {"city": "Paris"})
SEARCH = make_call("brave_search", {"query": "Paris weather"})
# token ids of each call's text (after the python tag where it has one)
CALL_IDS = {
    "json": [TAG, 517, 262, 330, 1337, 794, 330, 1723, 761, 262, 330, 609, 794, 330, 456, 70464, 761, 262, 330, 14105,
             794, 341, 286, 330, 9103, 794, 330, 60704, 702, 262, 457, 92],
    "function_tag": [27, 1723, 29380, 70464, 89963, 9103, 794, 330, 60704, 1, 5474, 1723, 29],
    "pythonic": [58, 456, 70464, 44602, 1151, 60704, 52128],
    "builtin": [TAG, 1347, 525, 10947, 8692, 10974, 429, 60704, 9282, 909],
}
# a call turn that waits for an executor (python tag) ends with <|eom_id|>; 3.1 function tags and 3.2 lists with eot
END = {"json": EOM, "builtin": EOM, "function_tag": EOT, "pythonic": EOT}


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
                     *header(ASSISTANT), *calls, END[fmt],
                     *header(IPYTHON), 972, 34, EOT,  # the tool result comes back as an ipython turn
                     *header(ASSISTANT), 972, 34, 304, 12366, 13, EOT]
    F, T = False, True
    assert r.mask == ([F] + [F] * 9 + [F] * 4 + [T] * (len(calls) + 1) + [F] * 8 + [F] * 4 + [T] * 6)
    assert r.format_mask == ([F] + [T] * 4 + [F] * 4 + [T] + [T] * 4 + [F] * len(calls) + [T]
                             + [T] * 5 + [F, F] + [T] + [T] * 4 + [F] * 5 + [T])


@pytest.mark.parametrize("reference", ["prompt_format", "chat_format"])
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
    ("", [make_call("math.factorial", {"number": 5}), make_call("geo.distance.km", {"a": "x", "b": "y"})]),
])
def test_parse_completion_round_trips_rendered_turn(llama3_tokenizer, fmt, content, calls, reference):
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    r = render([{"role": "user", "content": "Hi"}, message], llama3_tokenizer, tool_format=fmt, tool_reference=reference)
    turn = r.ids[r.ids.index(78191) + 3:]  # after the assistant header: what the model generates
    assert turn[-1] == (EOM if write_calls(calls, fmt, reference).eom else EOT)
    assert parse_completion(llama3_tokenizer.decode(turn)) == message


def test_encode_literals():
    assert encode_tool_calls([SEARCH], "builtin") == '<|python_tag|>brave_search.call(query="Paris weather")'
    assert encode_tool_calls([make_call("code_interpreter", {"code": "print(1)"})], "pythonic") == \
        "<|python_tag|>print(1)"
    assert encode_tool_calls([WEATHER], "json") == ('<|python_tag|>{\n    "type": "function",\n    "name": "get_weather",'
                                                    '\n    "parameters": {\n        "city": "Paris"\n    }\n}')
    assert encode_tool_calls([WEATHER], "function_tag") == '<function=get_weather>{"city": "Paris"}</function>'
    two = [WEATHER, make_call("f", {"x": [1, True, None], "y": {"k": "v"}, "q": "it's"})]
    assert encode_tool_calls(two, "pythonic") == \
        """[get_weather(city='Paris'), f(x=[1, True, None], y={'k': 'v'}, q="it's")]"""
    assert encode_tool_calls(two, "json").count("\n}\n{") == 1
    assert encode_tool_calls(two, "function_tag").count("</function>\n<function=") == 1
    # arguments given as a JSON string (OpenAI style) are read
    as_string = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert encode_tool_calls([as_string], "function_tag") == encode_tool_calls([WEATHER], "function_tag")


def test_dotted_names_in_the_pythonic_format():
    calls = [make_call("math.factorial", {"number": 5}), make_call("spotify.play", {"artist": "Taylor Swift"})]
    text = encode_tool_calls(calls, "pythonic")
    assert text == "[math.factorial(number=5), spotify.play(artist='Taylor Swift')]"
    assert parse_tool_calls(text) == calls
    assert parse_completion(f"Sure.{text}<|eot_id|>") == {"role": "assistant", "content": "Sure.", "tool_calls": calls}


def test_chat_format_literals():
    """As ChatFormat writes each call: on its own, back to back; compact ASCII JSON; double-quoted strings."""
    city = make_call("get_weather", {"city": "São Paulo"})
    assert write_calls([WEATHER, city], "json", "chat_format").pieces == (
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"type": "function", "name": "get_weather", "parameters": {"city": "S\\u00e3o Paulo"}}')
    assert encode_tool_calls([WEATHER, city], "pythonic", "chat_format") == \
        '[get_weather(city="Paris")][get_weather(city="São Paulo")]'
    assert encode_tool_calls([city], "function_tag", "chat_format") == \
        '<function=get_weather>{"city": "S\\u00e3o Paulo"}</function>'
    turn = write_calls([SEARCH], "json", "chat_format")  # the tag only before code_interpreter
    assert (turn.text, turn.eom) == ('brave_search.call(query="Paris weather")', True)
    code = write_calls([make_call("code_interpreter", {"code": "print(1)"})], "json", "chat_format")
    assert (code.python_tag, code.tag_before_content, code.eom) == (True, True, True)
    # where ChatFormat's own text would not parse, a valid literal: escaped quotes, a dict as a Python dict
    odd = make_call("f", {"q": 'say "hi"', "d": {"k": 1}})
    assert encode_tool_calls([odd], "pythonic", "chat_format") == '[f(q="say \\"hi\\"", d={"k": 1})]'


@pytest.mark.parametrize("calls, fmt, match", [
    ([WEATHER], "xml", "tool format 'xml'"),
    ([], "json", "tool_calls: expected a non-empty list"),
    ([WEATHER], "builtin", r"tool_calls\[0\]\.function\.name: 'get_weather' is not a builtin tool"),
    ([{"function": {"arguments": {}}}], "json", r"tool_calls\[0\]\.function\.name: missing"),
    ([make_call("f", [1])], "json", r"tool_calls\[0\]\.function\.arguments: expected an object"),
    ([{"function": {"name": "f", "arguments": "{oops"}}], "json", r"tool_calls\[0\]\.function\.arguments: not valid JSON"),
    ([make_call("brave_search", {"q": "x"})], "json", r"tool_calls\[0\]\.function\.arguments: brave_search takes"),
    ([make_call("code_interpreter", {"code": "1"}), SEARCH], "json", r"tool_calls\[0\]: code_interpreter must be"),
    ([make_call("my-tool", {})], "pythonic", r"'my-tool' is not a Python identifier or dotted name"),
    ([make_call("math..f", {})], "pythonic", r"'math\.\.f' is not a Python identifier or dotted name"),
    ([make_call("class.f", {})], "pythonic", r"'class\.f' is not a Python identifier or dotted name"),
    ([make_call("f", {"lambda": 1})], "pythonic", r"'lambda' is not a Python identifier"),
    ([make_call("f", {"x": float("nan")})], "pythonic", r"cannot write nan"),
])
def test_encode_errors(calls, fmt, match):
    with pytest.raises(ValueError, match=match):
        encode_tool_calls(calls, fmt)
    with pytest.raises(ValueError, match="tool reference 'meta'"):
        encode_tool_calls([WEATHER], "json", "meta")


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
    ("[math.factorial(number=5), a.b.c(x=[1, 2])]",
     [make_call("math.factorial", {"number": 5}), make_call("a.b.c", {"x": [1, 2]})]),
    # back to back, as ChatFormat writes several calls
    ('[f(a="x")][g()][h(b=1), k()]', [make_call("f", {"a": "x"}), make_call("g", {}), make_call("h", {"b": 1}),
                                     make_call("k", {})]),
    ('{"name": "f", "parameters": {}}{"name": "g", "parameters": {"a": 1}}',
     [make_call("f", {}), make_call("g", {"a": 1})]),
    ('<function=f>{}</function><function=g>{"a": 1}</function>', [make_call("f", {}), make_call("g", {"a": 1})]),
    ("brave_search.call(query='a')wolfram_alpha.call(query=\"b\")",
     [make_call("brave_search", {"query": "a"}), make_call("wolfram_alpha", {"query": "b"})]),
    # indented JSON calls one after another, after a builtin call
    ('<|python_tag|>brave_search.call(query="a")\n{\n    "name": "f",\n    "parameters": {}\n}\n{"name": "g", '
     '"parameters": {}}', [make_call("brave_search", {"query": "a"}), make_call("f", {}), make_call("g", {})]),
    ("[f()][0]", None),
    ("[f().g()]", None),
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
