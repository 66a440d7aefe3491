"""Render a dialog to token ids with its supervision mask; the Llama 3.1 system prompt; parse a completion back.

Llama 3 tokenizers get the exact Llama 3.1 format, token for token as Meta's `ChatFormat.encode_dialog_prompt`:
`<|begin_of_text|>` then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, where the
role name, "\\n\\n" and the content are tokenised separately and special-token text inside content stays plain text.
Tool-call turns are written by `posttrain.tools.write_calls` (python tag, call text, `<|eom_id|>` or `<|eot_id|>`).
Other tokenizers (SmolLM2's ChatML) render through their own chat template; the mask is found by rendering once more
with a sentinel in place of every content and diffing the two texts. A template that writes no tool definitions (or
no tool calls) gets them as plain text instead: the Llama 3.1 tool prompts as turns of their own, each call as its
format's text after the turn's content, which `parse_completion` reads back (docs/tool-formats.md).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import jinja2

from posttrain.data import validate_messages
from posttrain.tokenizer import BEGIN_OF_TEXT, END_HEADER, EOM, EOT, PYTHON_TAG, START_HEADER, STOP_IDS, is_llama3
from posttrain.tools import CUSTOM_FORMATS, REFERENCES, format_tool_definitions, parse_tool_calls
from posttrain.tools import PYTHON_TAG as PYTHON_TAG_TEXT
from posttrain.tools import make_call, split_tool_definitions, write_calls

DEFAULT_DATE = "26 Jul 2024"
KNOWLEDGE_CUTOFF = "December 2023"
TRAIN_ON = ("all", "last")
# Meta's Tokenizer.encode cuts text into 400k-char chunks and no piece may hold a run of more than 25k whitespace or
# non-whitespace chars (tiktoken issue 195); the cuts change the tokens, so we cut the same way.
_MAX_CHUNK_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_TERMINATOR_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>")
# where a tool call written without the python tag may start, after some content
_CALL_START = re.compile(
    r"<function=|\[\s*(?:[A-Za-z_][\w.]*\(|\{)|\{\s*\"(?:type|name|function)\"|(?:brave_search|wolfram_alpha)\.call\("
)


@dataclass
class Rendered:
    """Token ids of a dialog; `mask`: trained on (assistant content + terminator); `format_mask`: headers, terminators."""

    ids: list[int]
    mask: list[bool]
    format_mask: list[bool]

    def __post_init__(self):
        assert len(self.ids) == len(self.mask) == len(self.format_mask), "ids, mask and format_mask differ in length"


def system_prompt(tools: list | None = None, system: str = "", *, date: str | None = DEFAULT_DATE,
                  tool_format: str = "json") -> str:
    """The Llama 3.1 system prompt: tool environment lines, dates, (pythonic: function definitions), then `system`.

    `Environment: ipython` turns on the code interpreter and is there for builtin tools and 3.1 custom formats (json,
    function_tag), whose calls end with `<|eom_id|>`; the 3.2/3.3 pythonic prompt has no such line (its calls end
    with `<|eot_id|>`, as in llama-models' llama3_2/text_prompt_format.md). `Tools:` names brave_search/wolfram_alpha;
    `date=None` leaves out the knowledge-cutoff and today lines.
    """
    builtins, custom = split_tool_definitions(tools or [])
    lines = ["Environment: ipython"] if builtins or (custom and tool_format != "pythonic") else []
    named = [name for name in builtins if name != "code_interpreter"]
    if named:
        lines.append("Tools: " + ", ".join(named))
    if date is not None:
        lines += [f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}", f"Today Date: {date}"]
    blocks = ["\n".join(lines)]
    if tool_format == "pythonic":
        blocks.append(format_tool_definitions(custom, "pythonic"))
    blocks.append(system)
    return "\n\n".join(b for b in blocks if b)


def with_tool_prompts(messages: list[dict], tools: list, tool_format: str = "json",
                      date: str | None = DEFAULT_DATE) -> list[dict]:
    """The dialog with the tool system prompt merged in, and (3.1 json/function_tag) a user turn defining functions."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    out = [{"role": "system", "content": system_prompt(tools, system, date=date, tool_format=tool_format)}]
    if tool_format != "pythonic":
        definitions = format_tool_definitions(tools, tool_format)
        if definitions:
            out.append({"role": "user", "content": definitions})
    return out + body


def _trained_indices(messages: list[dict], train_on: str) -> set[int]:
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return set(assistant[-1:] if train_on == "last" else assistant)


def render(messages: list[dict], tokenizer, *, tools: list | None = None, add_generation_prompt: bool = False,
           train_on: str = "all", tool_format: str = "json", tool_reference: str = "prompt_format",
           date: str | None = DEFAULT_DATE) -> Rendered:
    """Token ids, supervision mask and format mask of a dialog (messages as in docs/formats.md).

    `train_on="last"` trains only the last assistant turn; `tools` (builtin names and/or function definitions) adds the
    Llama 3.1 tool system prompt; `tool_format` (json, function_tag, pythonic) says how custom calls are written, and
    `tool_reference` whose way: "prompt_format" (what the models emit in llama-models' prompt-format documents) or
    "chat_format" (as llama-models' ChatFormat encodes call turns); docs/tool-formats.md has both.
    Bad messages raise RecordError (a ValueError) naming the message index and field.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on: {train_on!r}, expected one of {', '.join(TRAIN_ON)}")
    if tool_format not in CUSTOM_FORMATS:
        raise ValueError(f"tool_format: {tool_format!r}, expected one of {', '.join(CUSTOM_FORMATS)}")
    if tool_reference not in REFERENCES:
        raise ValueError(f"tool_reference: {tool_reference!r}, expected one of {', '.join(REFERENCES)}")
    messages = validate_messages(messages, "messages")
    if not is_llama3(tokenizer):
        definitions, calls = _template_writes_tools(tokenizer)
        if tools and not definitions:
            messages, tools = with_tool_prompts(messages, tools, tool_format, date), None
        if not calls:
            messages = [_calls_as_text(m, tool_format, tool_reference) if m.get("tool_calls") else m for m in messages]
        return _render_template(messages, tokenizer, tools or None, add_generation_prompt, train_on)
    if tools:
        messages = with_tool_prompts(messages, tools, tool_format, date)
    trained = _trained_indices(messages, train_on)
    ids, mask, fmt = [BEGIN_OF_TEXT], [False], [False]

    def add(piece: list[int], *, train: bool, is_format: bool) -> None:
        ids.extend(piece)
        mask.extend([train] * len(piece))
        fmt.extend([is_format] * len(piece))

    for i, msg in enumerate(messages):
        train = i in trained
        turn = write_calls(msg["tool_calls"], tool_format, tool_reference) if msg.get("tool_calls") else None
        add(_header(tokenizer, msg["role"]), train=False, is_format=True)
        if turn and turn.python_tag and turn.tag_before_content:
            add([PYTHON_TAG], train=train, is_format=False)
        add(encode_text(tokenizer, msg["content"]), train=train, is_format=False)
        if turn:
            if turn.python_tag and not turn.tag_before_content:
                add([PYTHON_TAG], train=train, is_format=False)
            for piece in turn.pieces:
                add(encode_text(tokenizer, piece), train=train, is_format=False)
        add([EOM if turn and turn.eom else EOT], train=train, is_format=True)
    if add_generation_prompt:
        add(_header(tokenizer, "assistant"), train=False, is_format=True)
    return Rendered(ids, mask, fmt)


def _header(tokenizer, role: str) -> list[int]:
    return [START_HEADER, *encode_text(tokenizer, role), END_HEADER, *encode_text(tokenizer, "\n\n")]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of plain text as Meta's `Tokenizer.encode(text, bos=False, eos=False)`: special-token text stays text."""
    ids: list[int] = []
    for start in range(0, len(text), _MAX_CHUNK_CHARS):
        for piece in _split_long_runs(text[start:start + _MAX_CHUNK_CHARS]):
            ids.extend(tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True))
    return ids


def _split_long_runs(text: str):
    """Cut `text` so no piece holds more than _MAX_RUN_CHARS consecutive (non-)whitespace chars, where Meta cuts."""
    if len(text) <= _MAX_RUN_CHARS:
        yield text
        return
    piece_start = pos = 0
    for _, run in itertools.groupby(text, key=str.isspace):
        run_len = len(list(run))
        for cut in range(pos + _MAX_RUN_CHARS, pos + run_len, _MAX_RUN_CHARS):
            yield text[piece_start:cut]
            piece_start = cut
        pos += run_len
    yield text[piece_start:]


# ---- other tokenizers: their own chat template ---------------------------------------------------------------------

_PROBE_DEFINITION, _PROBE_CALL = "posttrain_probe_definition", "posttrain_probe_call"
_TEMPLATE_TOOLS: dict[str, tuple[bool, bool]] = {}  # chat template -> what _template_writes_tools found


def _template_writes_tools(tokenizer) -> tuple[bool, bool]:
    """(writes tool definitions, writes tool calls): whether the tokenizer's chat template puts a probe tool's name in
    the text, given as a definition and as an assistant's call. SmolLM2's ChatML template writes neither."""
    template = tokenizer.chat_template or ""
    if template not in _TEMPLATE_TOOLS:
        probe = [{"role": "user", "content": "?"},
                 {"role": "assistant", "content": "", "tool_calls": [make_call(_PROBE_CALL, {})]}]
        tool = {"type": "function", "function": {"name": _PROBE_DEFINITION, "description": "",
                                                 "parameters": {"type": "object", "properties": {}}}}
        try:
            text = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False)
        except jinja2.TemplateError:  # a template that refuses tool calls writes none
            text = tokenizer.apply_chat_template(probe[:1], tools=[tool], tokenize=False)
        _TEMPLATE_TOOLS[template] = (_PROBE_DEFINITION in text, _PROBE_CALL in text)
    return _TEMPLATE_TOOLS[template]


def _calls_as_text(message: dict, tool_format: str, tool_reference: str) -> dict:
    """An assistant call turn as plain content: the calls written as in the Llama 3 path (tools.write_calls), the
    python tag as text."""
    turn = write_calls(message["tool_calls"], tool_format, tool_reference)
    tag = PYTHON_TAG_TEXT if turn.python_tag else ""
    before, after = (tag, "") if turn.tag_before_content else ("", tag)
    content = before + message["content"] + after + "".join(turn.pieces)
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}


def _template_messages(messages: list[dict], contents: list[str]) -> list[dict]:
    # HF chat templates call the tool role "tool"
    return [{**m, "role": "tool" if m["role"] == "ipython" else m["role"], "content": c}
            for m, c in zip(messages, contents)]


def _content_spans(messages: list[dict], tokenizer, tools, add_generation_prompt: bool) -> tuple[str, list[tuple]]:
    """The rendered text and the char span of every message's content in it."""
    def apply(contents):
        return tokenizer.apply_chat_template(_template_messages(messages, contents), tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    text = apply([m["content"] for m in messages])
    sentinels = [f"\ue000{i}\ue001" for i in range(len(messages))]
    marked = apply(sentinels)
    pieces, pos = [], 0
    for i, sentinel in enumerate(sentinels):
        at = marked.find(sentinel, pos)
        if at < 0:
            raise ValueError(f"messages[{i}]: the chat template of {tokenizer.name_or_path!r} drops this message")
        pieces.append(marked[pos:at])
        pos = at + len(sentinel)
    pieces.append(marked[pos:])
    for strip in (False, True):  # some templates trim contents
        contents = [m["content"].strip() if strip else m["content"] for m in messages]
        spans, rebuilt = [], pieces[0]
        for content, piece in zip(contents, pieces[1:]):
            spans.append((len(rebuilt), len(rebuilt) + len(content)))
            rebuilt += content + piece
        if rebuilt == text:
            return text, spans
    raise ValueError(f"the chat template of {tokenizer.name_or_path!r} rewrites message contents; cannot locate them")


def _render_template(messages: list[dict], tokenizer, tools, add_generation_prompt: bool, train_on: str) -> Rendered:
    """Render with the tokenizer's chat template; mask = assistant content up to and including its end token."""
    template_tools = None
    if tools:
        builtins, custom = split_tool_definitions(tools)
        template_tools = custom + [{"type": "function", "function": {"name": name}} for name in builtins]
    text, spans = _content_spans(messages, tokenizer, template_tools, add_generation_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    trained = _trained_indices(messages, train_on)
    mask, fmt = [False] * len(ids), [False] * len(ids)
    prev_end = 0  # char where the previous message's terminator ended
    for i, (start, end) in enumerate(spans):
        role = "tool" if messages[i]["role"] == "ipython" else messages[i]["role"]
        for j in _header_tokens(text, ids, offsets, special, prev_end, start, role):
            fmt[j] = True
        term = next((j for j, (s, _) in enumerate(offsets) if s >= end and ids[j] in special), None)
        if term is not None:
            fmt[term] = True
        if i in trained:
            last_char = offsets[term][1] if term is not None else end
            for j, (s, e) in enumerate(offsets):
                if (s < end and e > start) or (s >= end and e <= last_char):
                    mask[j] = True
        prev_end = offsets[term][1] if term is not None else end
    if add_generation_prompt:
        for j in _header_tokens(text, ids, offsets, special, prev_end, len(text), "assistant"):
            fmt[j] = True
    return Rendered(ids, mask, fmt)


def _header_tokens(text, ids, offsets, special, region_start: int, region_end: int, role: str) -> list[int]:
    """Token indices of a message header: from the special token that opens it (before the role name) to its content."""
    inside = [j for j, (s, e) in enumerate(offsets) if s >= region_start and e <= region_end and e > s]
    role_at = text.rfind(role, region_start, region_end)
    opens = [j for j in inside if ids[j] in special and (role_at < 0 or offsets[j][0] <= role_at)]
    return [j for j in inside if j >= opens[-1]] if opens else []


# ---- completions -----------------------------------------------------------------------------------------------------

def parse_completion(text: str, *, stop_reason: str | int | None = None) -> dict:
    """The assistant message of a generated completion, with `tool_calls` when it calls tools.

    A trailing end token (`<|eot_id|>`, `<|eom_id|>`, ...) is dropped. `stop_reason="length"` (cut off at the token
    limit) means a half-written call is no call: the text stays content. Content before a call is kept as content.
    """
    for token in _TERMINATOR_TEXTS:
        if text.endswith(token):
            text = text[: -len(token)]
            break
    if stop_reason == "length":
        return {"role": "assistant", "content": text}
    content, calls = _split_calls(text)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def _split_calls(text: str) -> tuple[str, list | None]:
    if PYTHON_TAG_TEXT in text:
        at = text.index(PYTHON_TAG_TEXT)
        calls = parse_tool_calls(text[at:])
        return (text[:at], calls) if calls else (text, None)
    for m in _CALL_START.finditer(text):
        calls = parse_tool_calls(text[m.start():])
        if calls:
            return text[:m.start()], calls
    return text, None


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a generation: Llama 3's end_of_text/eom/eot; otherwise eos (and `<|im_end|>` for ChatML)."""
    if is_llama3(tokenizer):
        return list(STOP_IDS)
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    im_end = tokenizer.get_added_vocab().get("<|im_end|>")
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    return ids
