"""The tool battery: dialogs from the prompt-format documents shipped in llama-models, each rendered token for token as
its reference writes it: the document (tool_reference="prompt_format") and Meta's ChatFormat ("chat_format").

Every example of llama3_1/prompt_format.md and llama3_2/text_prompt_format.md is read from the installed package;
further dialogs (results, several calls, several turns in every format) are built from the same documents' turns and
rules. docs/tool-formats.md is the table these tests hold to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from posttrain.chat import parse_completion, render, with_tool_prompts
from posttrain.tools import make_call

SPECIAL = {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
           "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010}
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL) + ")")
_TURN = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|<\|eom_id\|>)", re.DOTALL)
GEN_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def read_examples() -> dict[tuple[str, str], tuple[str, str]]:
    """(document, section title) -> (input prompt, model response), as the document's code blocks hold them."""
    import llama_models

    root = Path(llama_models.__file__).parent
    examples = {}
    for version, name in (("3.1", "llama3_1/prompt_format.md"), ("3.2", "llama3_2/text_prompt_format.md")):
        title, label, blocks, block = None, None, {}, None
        for line in (root / name).read_text().splitlines(keepends=True):
            if block is not None:  # inside a code block
                if line.startswith("```"):
                    blocks[label] = "".join(block)[:-1]  # the last newline is the fence's
                    block = None
                    if label == "response":
                        examples[(version, title)] = (blocks["prompt"], blocks["response"])
                else:
                    block.append(line)
            elif line.startswith("```"):
                block = []
            elif line.startswith(("## ", "### ")):
                title = line.lstrip("#").strip()
            elif line.startswith("##### "):
                label = "prompt" if "Input Prompt" in line else "response"
    return examples


EXAMPLES = read_examples()


def doc_turns(prompt: str) -> list[dict]:
    """The messages of a document's prompt, contents exactly as shown."""
    return [{"role": role, "content": content} for role, content in _TURN.findall(prompt)]


def doc_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of a document's text, cut where ChatFormat cuts: special tokens, the role, the "\\n\\n" after a
    header, then the rest of each stretch of text; tokenised by Meta's own Tokenizer."""
    ids, after_header = [], False
    for piece in _SPECIAL_SPLIT.split(text):
        if piece in SPECIAL:
            ids.append(SPECIAL[piece])
            after_header = piece == "<|end_header_id|>"
            continue
        if after_header:
            assert piece.startswith("\n\n"), piece
            ids += tokenizer.encode("\n\n", bos=False, eos=False)
            piece, after_header = piece[2:], False
        if piece:
            ids += tokenizer.encode(piece, bos=False, eos=False)
    return ids


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def calls(*called, content: str = "") -> dict:
    return {"role": "assistant", "content": content, "tool_calls": [make_call(name, args) for name, args in called]}


def tool(content: str) -> dict:
    return {"role": "ipython", "content": content}


def turn(role: str, content: str, end: str = "<|eot_id|>") -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}{end}"


@dataclass
class Case:
    """A dialog, the text its reference shows for it, and how to render it."""

    id: str
    messages: list[dict]
    expected: str
    tools: list | None = None
    tool_format: str = "json"
    date: str | None = None


def _code(response: str) -> str:
    return response.removeprefix("<|python_tag|>").removesuffix("<|eom_id|>")


def _pythonic_functions(system: str) -> list[dict]:
    return json.loads(system[system.index("invoke.\n\n[") + len("invoke.\n\n"):])


def document_cases() -> list[Case]:
    """Every chat example of the two documents: the prompt's turns, the model's response as a structured message."""
    ex = EXAMPLES
    cases = []
    for version in ("3.1", "3.2"):
        prompt, response = ex[(version, "User and assistant conversation")]
        cases.append(Case(f"{version}-chat", doc_turns(prompt) + [answer(response.removesuffix("<|eot_id|>"))],
                          prompt + response))
    prompt, response = ex[("3.1", "Builtin Tool Calling")]
    cases.append(Case("3.1-brave_search", [{"role": "system", "content": "You are a helpful assistant.\n"},
                                           doc_turns(prompt)[1],
                                           calls(("brave_search", {"query": "latest price of 1oz gold"}))],
                      prompt + response, tools=["brave_search", "wolfram_alpha"], date="21 September 2024"))
    prompt, response = ex[("3.1", "Builtin Code Interpreter")]
    code = calls(("code_interpreter", {"code": _code(response)}))
    cases.append(Case("3.1-code_interpreter", [doc_turns(prompt)[1], code], prompt + response,
                      tools=["code_interpreter"]))
    prompt, response = ex[("3.1", "Built-in tools full interaction")]
    system, user, _, result = doc_turns(prompt)
    call = calls(("wolfram_alpha", {"query": "100th decimal of pi"}))
    cases.append(Case("3.1-wolfram_alpha-result",
                      [system, user, call, tool(result["content"]), answer("The 100th decimal of pi is 7.")],
                      prompt + response))
    prompt, response = ex[("3.1", "JSON based tool calling")]
    cases.append(Case("3.1-json", doc_turns(prompt) + [calls(("trending_songs", {"n": "10", "genre": "all"}))],
                      prompt + response))
    prompt, response = ex[("3.1", "`<function>` based tool calling")]
    cases.append(Case("3.1-function_tag", doc_turns(prompt) + [calls(("trending_songs", {"n": 10}))], prompt + response,
                      tool_format="function_tag"))
    prompt, response = ex[("3.2", "Zero shot function calling")]
    system, user = doc_turns(prompt)
    sf, seattle = ({"city": city, "metric": "celsius"} for city in ("San Francisco", "Seattle"))
    cases.append(Case("3.2-pythonic-parallel", [user, calls(("get_weather", sf), ("get_weather", seattle))],
                      prompt + response, tools=_pythonic_functions(system["content"]), tool_format="pythonic"))
    prompt, response = ex[("3.2", "Zero shot function calling with user message")]
    cases.append(Case("3.2-pythonic-user-message",
                      doc_turns(prompt) + [calls(("get_user_info", {"user_id": 7890, "special": "black"}))],
                      prompt + response, tool_format="pythonic"))
    prompt, response = ex[("3.2", "Code Interpreter")]
    code = calls(("code_interpreter", {"code": _code(response)}))
    cases.append(Case("3.2-code_interpreter", doc_turns(prompt) + [code], prompt + response))
    prompt, response = ex[("3.2", "Zero shot function calling E2E format")]
    system, user, _, result = doc_turns(prompt)
    # This prompt's call turn was written by an older ChatFormat (python tag before every call, double quotes); the
    # model itself writes it as in the zero-shot response above it, and so do we.
    written = '<|python_tag|>[get_weather(city="San Francisco", metric="celsius")]<|eot_id|>'
    assert written in prompt
    cases.append(Case("3.2-pythonic-result",
                      [user, calls(("get_weather", sf)), tool(result["content"]),
                       answer("The weather in San Francisco is 25 C.")],
                      prompt.replace(written, "[get_weather(city='San Francisco', metric='celsius')]<|eot_id|>")
                      + response, tools=_pythonic_functions(system["content"]), tool_format="pythonic"))
    return cases


def _json_call(name: str, parameters: dict) -> str:
    """A JSON call as the 3.1 document's response writes it (indented by 4)."""
    return json.dumps({"type": "function", "name": name, "parameters": parameters}, indent=4)


SONGS = '[{"title": "Espresso", "artist": "Sabrina Carpenter"}]'
FACTORIAL = {"name": "math.factorial", "description": "The factorial of a whole number",
             "parameters": {"type": "dict", "required": ["number"],
                            "properties": {"number": {"type": "integer", "description": "The number"}}}}


def composed_cases() -> list[Case]:
    """Dialogs past the documents' examples, in their turns and by their rules: tool results, several calls in a
    turn, several turns, a dotted function name; one per format."""
    ex = EXAMPLES
    prompt, response = ex[("3.1", "JSON based tool calling")]
    rock, jazz = {"n": "3", "genre": "rock"}, {"n": "3", "genre": "jazz"}
    json_case = Case(
        "json-results-turns",
        doc_turns(prompt) + [calls(("trending_songs", {"n": "10", "genre": "all"})), tool(SONGS),
                             answer("Espresso leads."), {"role": "user", "content": "Top 3 rock and jazz?"},
                             calls(("trending_songs", rock), ("trending_songs", jazz)), tool("[]"), tool("[]"),
                             answer("Nothing trends there.")],
        prompt + response + turn("ipython", SONGS) + turn("assistant", "Espresso leads.")
        + turn("user", "Top 3 rock and jazz?")
        + turn("assistant", f"<|python_tag|>{_json_call('trending_songs', rock)}\n{_json_call('trending_songs', jazz)}",
               "<|eom_id|>")
        + turn("ipython", "[]") * 2 + turn("assistant", "Nothing trends there."))
    prompt, response = ex[("3.1", "`<function>` based tool calling")]
    tag_case = Case(
        "function_tag-results-turns",
        doc_turns(prompt) + [calls(("trending_songs", {"n": 10})), tool(SONGS), answer("Espresso leads."),
                             {"role": "user", "content": "Top 3 rock and jazz?"},
                             calls(("trending_songs", {"n": 3, "genre": "rock"}),
                                   ("trending_songs", {"n": 3, "genre": "jazz"})),
                             tool("[]"), tool("[]"), answer("Nothing trends there.")],
        prompt + response + turn("ipython", SONGS) + turn("assistant", "Espresso leads.")
        + turn("user", "Top 3 rock and jazz?")
        + turn("assistant", '<function=trending_songs>{"n": 3, "genre": "rock"}</function>\n'
                            '<function=trending_songs>{"n": 3, "genre": "jazz"}</function>')
        + turn("ipython", "[]") * 2 + turn("assistant", "Nothing trends there."),
        tool_format="function_tag")
    prompt, _ = ex[("3.2", "Zero shot function calling")]
    system = doc_turns(prompt)[0]["content"]
    functions = _pythonic_functions(system) + [FACTORIAL]
    intro = system[:system.index("invoke.\n\n[") + len("invoke.\n\n")]
    pythonic_case = Case(
        "pythonic-dotted-results-turns",
        [{"role": "user", "content": "What is 5 factorial, and the weather in SF?"},
         calls(("math.factorial", {"number": 5}), ("get_weather", {"city": "San Francisco"})), tool("120"),
         tool('"25 C"'), answer("120, and 25 C."), {"role": "user", "content": "And in Seattle, in fahrenheit?"},
         calls(("get_weather", {"city": "Seattle", "metric": "fahrenheit"})), tool('"61 F"'), answer("61 F.")],
        "<|begin_of_text|>" + turn("system", intro + json.dumps(functions, indent=4))
        + turn("user", "What is 5 factorial, and the weather in SF?")
        + turn("assistant", "[math.factorial(number=5), get_weather(city='San Francisco')]")
        + turn("ipython", "120") + turn("ipython", '"25 C"') + turn("assistant", "120, and 25 C.")
        + turn("user", "And in Seattle, in fahrenheit?")
        + turn("assistant", "[get_weather(city='Seattle', metric='fahrenheit')]") + turn("ipython", '"61 F"')
        + turn("assistant", "61 F."),
        tools=functions, tool_format="pythonic")
    prompt, response = ex[("3.1", "Builtin Tool Calling")]
    builtin_case = Case(
        "builtin-multi-step",
        [{"role": "system", "content": "You are a helpful assistant.\n"},
         {"role": "user", "content": "How many Eiffel Towers make one Everest?"},
         calls(("brave_search", {"query": "height of Mount Everest"})), tool("8,848.86 m"),
         calls(("wolfram_alpha", {"query": "8848.86 / 330"})), tool("26.81"), answer("About 26.8.")],
        prompt[:prompt.index("<|start_header_id|>user")]
        + turn("user", "How many Eiffel Towers make one Everest?")
        + turn("assistant", '<|python_tag|>brave_search.call(query="height of Mount Everest")', "<|eom_id|>")
        + turn("ipython", "8,848.86 m")
        + turn("assistant", '<|python_tag|>wolfram_alpha.call(query="8848.86 / 330")', "<|eom_id|>")
        + turn("ipython", "26.81") + turn("assistant", "About 26.8."),
        tools=["brave_search", "wolfram_alpha"], date="21 September 2024")
    prompt, _ = ex[("3.1", "Builtin Code Interpreter")]
    code_case = Case(
        "code-content-result",
        [{"role": "user", "content": "Is 7 prime?"}, calls(("code_interpreter", {"code": "print(all(7 % d for d in "
                                                                                         "range(2, 7)))"}),
                                                            content="Let me check.\n\n"),
         tool("True"), answer("Yes, 7 is prime.")],
        prompt[:prompt.index("<|start_header_id|>user")] + turn("user", "Is 7 prime?")
        + turn("assistant", "Let me check.\n\n<|python_tag|>print(all(7 % d for d in range(2, 7)))", "<|eom_id|>")
        + turn("ipython", "True") + turn("assistant", "Yes, 7 is prime."),
        tools=["code_interpreter"])
    return [json_case, tag_case, pythonic_case, builtin_case, code_case]


CASES = document_cases() + composed_cases()
FORMATS = {"json": "json", "function_tag": "function_tag", "pythonic": "python_list"}


@pytest.fixture(scope="module")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def _render(case: Case, tokenizer, messages=None, **options):
    return render(case.messages if messages is None else messages, tokenizer, tools=case.tools,
                  tool_format=case.tool_format, date=case.date, **options)


def test_the_battery_holds_every_example_of_both_documents():
    assert len(EXAMPLES) == 13  # 7 in 3.1, 6 in 3.2, two of them base-model completions
    assert len(CASES) == 16
    covered = {case.id for case in CASES}
    assert {"3.1-json", "3.1-function_tag", "3.2-pythonic-parallel", "3.1-brave_search", "3.1-code_interpreter",
            "3.2-pythonic-result", "3.1-wolfram_alpha-result"} <= covered


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_renders_as_the_documents_show(llama3_tokenizer, meta_tokenizer, case):
    assert _render(case, llama3_tokenizer).ids == doc_tokens(meta_tokenizer, case.expected)
    # the prompt before the model's last turn, with the header the model continues from
    at = case.expected.rindex(GEN_HEADER) + len(GEN_HEADER)
    prompt = _render(case, llama3_tokenizer, case.messages[:-1], add_generation_prompt=True)
    assert prompt.ids == doc_tokens(meta_tokenizer, case.expected[:at])


def _generated_turns(rendered, tokenizer) -> list[str]:
    """The text of every assistant turn, as the model writes it (after its header, with its terminator)."""
    text = tokenizer.decode(rendered.ids)
    turns = text.split("<|start_header_id|>")
    return [t.split("<|end_header_id|>\n\n", 1)[1] for t in turns if t.startswith("assistant")]


@pytest.mark.parametrize("reference", ["prompt_format", "chat_format"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_rendered_call_turn_parses_back(llama3_tokenizer, case, reference):
    sent = [m for m in case.messages if m["role"] == "assistant"]
    parsed = [parse_completion(t) for t in _generated_turns(_render(case, llama3_tokenizer, tool_reference=reference),
                                                            llama3_tokenizer)]
    if reference == "chat_format" and case.id == "code-content-result":
        # ChatFormat writes the python tag before the content, so the content reads back as part of the code
        code = sent[0]["tool_calls"][0]["function"]["arguments"]["code"]
        sent[0] = {**sent[0], "content": "", "tool_calls": [make_call("code_interpreter",
                                                                      {"code": sent[0]["content"] + code})]}
    assert parsed == sent


def chat_format_tokens(case: Case) -> list[int]:
    """Meta's ChatFormat.encode_dialog_prompt of the dialog (tool prompts as plain turns; call turns with
    stop_reason end_of_message), without the assistant header it appends."""
    from llama_models.datatypes import RawMessage, StopReason, ToolCall, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    messages = case.messages
    if case.tools:
        messages = with_tool_prompts(messages, case.tools, case.tool_format, case.date)
    raw = []
    for m in messages:
        tool_calls = [ToolCall(call_id=str(j), tool_name=c["function"]["name"], arguments=c["function"]["arguments"])
                      for j, c in enumerate(m.get("tool_calls", []))]
        raw.append(RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m["content"],
                              tool_calls=tool_calls,
                              stop_reason=StopReason.end_of_message if tool_calls else StopReason.end_of_turn))
    tokens = ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt(raw, ToolPromptFormat(FORMATS[case.tool_format]))
    return tokens.tokens[:-4]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_chat_format_reference_renders_as_meta_chat_format(llama3_tokenizer, case):
    assert _render(case, llama3_tokenizer, tool_reference="chat_format").ids == chat_format_tokens(case)


def test_the_references_differ_where_the_table_says(llama3_tokenizer):
    """prompt_format and chat_format give the same tokens for turns without calls and differ in every call turn:
    the python tag (builtin, JSON), the terminator (function_tag, pythonic), the call text (JSON, pythonic)."""
    same, differ = [], []
    for case in CASES:
        ours = _render(case, llama3_tokenizer).ids
        meta = _render(case, llama3_tokenizer, tool_reference="chat_format").ids
        (same if ours == meta else differ).append(case.id)
    assert same == ["3.1-chat", "3.2-chat", "3.1-code_interpreter", "3.2-code_interpreter"]
