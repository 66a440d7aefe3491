"""Tool-call wire formats of Llama 3.1-3.3, stated once: write a message's tool calls as text and parse them back.

Two references say how a call turn is written; docs/tool-formats.md tabulates both, format by format.
- "prompt_format" (default): what the models emit in the prompt-format documents of llama-models
  (llama3_1/prompt_format.md, llama3_2/text_prompt_format.md; llama3_3/prompt_format.md repeats them).
  builtin: `<|python_tag|>brave_search.call(query="...")<|eom_id|>` (wolfram_alpha alike);
  code_interpreter: `<|python_tag|>` + raw code + `<|eom_id|>`, the only call of its turn;
  json (3.1): `<|python_tag|>` + `{"type": "function", "name": ..., "parameters": {...}}` indented by 4 + `<|eom_id|>`;
  function_tag (3.1): `<function=NAME>{...}</function><|eot_id|>`, no python tag;
  pythonic (3.2/3.3): `[f(a=1, b='x'), pkg.g()]<|eot_id|>`, no python tag, values as Python literals.
  A turn opens with the python tag exactly when it ends with `<|eom_id|>` (an executor must run something).
- "chat_format": as `llama_models.llama3.chat_format.ChatFormat.encode_dialog_prompt` writes a message with
  `stop_reason=end_of_message`: every call turn ends with `<|eom_id|>`; the python tag only when the first call is
  code_interpreter, and then before the turn's content; each call written and tokenised on its own, back to back
  (`[f(a="x")][g()]`, compact ASCII JSON). Where ChatFormat's text would not parse (quotes inside a string, a dict
  in a pythonic call) a valid literal is written instead.
Calls use the message form of docs/formats.md: `{"type": "function", "function": {"name": str, "arguments": {...}}}`.
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import re
from dataclasses import dataclass
from typing import Any

PYTHON_TAG = "<|python_tag|>"
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
QUERY_TOOLS = ("brave_search", "wolfram_alpha")  # called as NAME.call(query="...")
FORMATS = ("builtin", "json", "function_tag", "pythonic")
CUSTOM_FORMATS = ("json", "function_tag", "pythonic")  # how custom (JSON-defined) functions are called
REFERENCES = ("prompt_format", "chat_format")

_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_BUILTIN_CALL = re.compile(  # brave_search.call(query="...") with a quoted Python string
    "(" + "|".join(QUERY_TOOLS) + r""")\.call\(\s*query\s*=\s*("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')\s*\)""")


@dataclass(frozen=True)
class CallTurn:
    """How an assistant turn's tool calls are written after (or around) its content."""

    pieces: tuple[str, ...]  # call text, each piece tokenised on its own, in order
    python_tag: bool  # a <|python_tag|> token opens the calls
    tag_before_content: bool  # ChatFormat's order: the tag comes before the turn's content
    eom: bool  # the turn ends with <|eom_id|> (waiting for results), else <|eot_id|>

    @property
    def text(self) -> str:
        return (PYTHON_TAG if self.python_tag else "") + "".join(self.pieces)


def make_call(name: str, arguments: dict) -> dict:
    """A tool call in message form."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def call_name_args(call: Any, where: str = "tool_calls[0]") -> tuple[str, dict]:
    """(name, arguments) of a call in message form or flat `{"name", "arguments"}`; arguments may be a JSON string."""
    if not isinstance(call, dict):
        raise ValueError(f"{where}: expected an object, got {type(call).__name__}")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.function.name: missing or not a string")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ValueError(f"{where}.function.arguments: not valid JSON") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments: expected an object, got {type(args).__name__}")
    return name, args


def _is_identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _builtin_text(name: str, args: dict, where: str) -> str:
    if name == "code_interpreter":
        if set(args) != {"code"} or not isinstance(args["code"], str):
            raise ValueError(f"{where}.function.arguments: code_interpreter takes exactly {{'code': str}}")
        return args["code"]
    if set(args) != {"query"} or not isinstance(args["query"], str):
        raise ValueError(f"{where}.function.arguments: {name} takes exactly {{'query': str}}")
    return f"{name}.call(query={json.dumps(args['query'], ensure_ascii=False)})"


def _py_literal(value: Any, style: str) -> str:
    """A Python literal for a JSON value. prompt_format: Python's own repr (strings in single quotes, as the 3.2
    model writes them); chat_format: strings in double quotes, as ChatFormat writes them."""
    if isinstance(value, str):
        return repr(value) if style == "prompt_format" else json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"cannot write {value!r} as a pythonic tool argument")
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)):
        items = ", ".join(_py_literal(v, style) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(str(k), style)}: {_py_literal(v, style)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write a {type(value).__name__} as a pythonic tool argument")


def _pythonic_call(name: str, args: dict, where: str, style: str) -> str:
    """`name(k=v, ...)`; a dotted name (`math.factorial`) is written as it is, each part a Python identifier."""
    if not all(_is_identifier(part) for part in name.split(".")):
        raise ValueError(f"{where}.function.name: {name!r} is not a Python identifier or dotted name (pythonic format)")
    bad = [k for k in args if not _is_identifier(k)]
    if bad:
        raise ValueError(f"{where}.function.arguments: {bad[0]!r} is not a Python identifier (pythonic format)")
    return f"{name}(" + ", ".join(f"{k}={_py_literal(v, style)}" for k, v in args.items()) + ")"


def _custom_text(name: str, args: dict, fmt: str, where: str, reference: str) -> str:
    """One custom call in json or function_tag form."""
    if fmt == "builtin":
        raise ValueError(f"{where}.function.name: {name!r} is not a builtin tool ({', '.join(BUILTIN_TOOLS)})")
    ascii_only = reference == "chat_format"  # ChatFormat uses json.dumps' defaults
    if fmt == "json":
        obj = {"type": "function", "name": name, "parameters": args}
        return json.dumps(obj, ensure_ascii=ascii_only, indent=None if ascii_only else 4)
    return f"<function={name}>{json.dumps(args, ensure_ascii=ascii_only)}</function>"


def _checked_calls(calls: Any, fmt: str, reference: str) -> list[tuple[str, dict]]:
    if fmt not in FORMATS:
        raise ValueError(f"tool format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if reference not in REFERENCES:
        raise ValueError(f"tool reference {reference!r}: expected one of {', '.join(REFERENCES)}")
    if not isinstance(calls, list) or not calls:
        raise ValueError("tool_calls: expected a non-empty list")
    parsed = [call_name_args(c, f"tool_calls[{j}]") for j, c in enumerate(calls)]
    names = [name for name, _ in parsed]
    if "code_interpreter" in names and len(parsed) > 1:
        at = names.index("code_interpreter")
        raise ValueError(f"tool_calls[{at}]: code_interpreter must be the only call of its turn")
    return parsed


def write_calls(calls: list, fmt: str = "json", reference: str = "prompt_format") -> CallTurn:
    """How an assistant turn writes `calls`: custom functions in `fmt`, builtin tools always in their builtin form."""
    parsed = _checked_calls(calls, fmt, reference)
    texts: list[str] = []
    group: list[str] = []  # prompt_format: consecutive pythonic calls share one list
    for j, (name, args) in enumerate(parsed):
        where = f"tool_calls[{j}]"
        if fmt == "pythonic" and name not in BUILTIN_TOOLS:
            call = _pythonic_call(name, args, where, reference)
            if reference == "chat_format":
                texts.append(f"[{call}]")
            else:
                group.append(call)
            continue
        if group:
            texts.append("[" + ", ".join(group) + "]")
            group = []
        texts.append(_builtin_text(name, args, where) if name in BUILTIN_TOOLS
                     else _custom_text(name, args, fmt, where, reference))
    if group:
        texts.append("[" + ", ".join(group) + "]")
    if reference == "chat_format":
        return CallTurn(tuple(texts), python_tag=parsed[0][0] == "code_interpreter", tag_before_content=True, eom=True)
    tagged = fmt == "json" or any(name in BUILTIN_TOOLS for name, _ in parsed)
    return CallTurn(("\n".join(texts),), python_tag=tagged, tag_before_content=False, eom=tagged)


def encode_tool_calls(calls: list, fmt: str = "json", reference: str = "prompt_format") -> str:
    """The text of an assistant turn's tool calls (after its content, before the terminator); may start with the
    python tag. `fmt` says how custom functions are written; builtin tools always take their builtin form."""
    return write_calls(calls, fmt, reference).text


def _json_calls(value: Any) -> list[dict] | None:
    """The calls of a decoded JSON value: a call object or a non-empty list of them; None for other data."""
    objects = value if isinstance(value, list) and value else [value]
    calls = []
    for obj in objects:
        if not isinstance(obj, dict):
            return None
        fn = obj["function"] if isinstance(obj.get("function"), dict) else obj
        if "parameters" not in fn and "arguments" not in fn:  # plain JSON data, not a call
            return None
        args = fn.get("parameters", fn.get("arguments"))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(fn.get("name"), str) or not isinstance(args, dict):
            return None
        calls.append(make_call(fn["name"], args))
    return calls


def _calls_at(text: str, pos: int) -> tuple[list[dict], int] | None:
    """The call(s) written from `pos` on, in any format, and where they end; None when no call starts there."""
    if text[pos] in "{[":
        try:
            value, end = json.JSONDecoder().raw_decode(text, pos)
        except json.JSONDecodeError:
            pass  # a pythonic list, below
        else:
            calls = _json_calls(value)
            return (calls, end) if calls else None
    if m := _FUNCTION_TAG.match(text, pos):
        try:
            args = json.loads(m.group(2)) if m.group(2).strip() else {}
        except json.JSONDecodeError:
            return None
        return ([make_call(m.group(1), args)], m.end()) if isinstance(args, dict) else None
    if m := _BUILTIN_CALL.match(text, pos):
        return [make_call(m.group(1), {"query": ast.literal_eval(m.group(2))})], m.end()
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    calls = _parse_pythonic(text[pos:end])
    return (calls, end) if calls else None


def _dotted_name(func: ast.expr) -> str | None:
    """`f` or `pkg.mod.f` of a call node; None for anything else (a subscript, a call's result)."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([func.id, *reversed(parts)])


def _list_items(node: ast.expr) -> list[ast.expr] | None:
    """The items of `[f(), g()]`, or of one-call lists written back to back (`[f()][g()]`, ChatFormat's way, which
    Python reads as subscripts of the first list)."""
    tail: list[ast.expr] = []
    while isinstance(node, ast.Subscript):
        tail = (list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]) + tail
        node = node.value
    if not isinstance(node, ast.List) or not node.elts:
        return None
    return [*node.elts, *tail]


def _parse_pythonic(text: str) -> list[dict] | None:
    """`[f(a=1), pkg.g()]`: a non-empty list of calls with keyword arguments only; dotted names are kept whole."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    items = _list_items(node)
    if items is None:
        return None
    calls = []
    for item in items:
        name = _dotted_name(item.func) if isinstance(item, ast.Call) else None
        if name is None or item.args:
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in item.keywords}
        except ValueError:
            return None
        if None in args:  # **kwargs
            return None
        calls.append(make_call(name, args))
    return calls


def parse_tool_calls(text: str) -> list[dict] | None:
    """The calls in `text` if all of it is tool calls (any format or mix of formats, python tag optional), else None.

    After the python tag, text that is no call is code for code_interpreter (what Llama 3.1 emits for code).
    """
    tagged = text.startswith(PYTHON_TAG)
    body = text[len(PYTHON_TAG):] if tagged else text
    if not body.strip():
        return None
    calls, pos = [], 0
    while True:
        while pos < len(body) and body[pos].isspace():
            pos += 1
        if pos == len(body):
            return calls
        found = _calls_at(body, pos)
        if found is None:
            return [make_call("code_interpreter", {"code": body})] if tagged else None
        calls += found[0]
        pos = found[1]


def split_tool_definitions(tools: Any, where: str = "tools") -> tuple[list[str], list[dict]]:
    """(builtin tool names, custom function definitions) of a tools list; custom ones as {"type": "function", ...}."""
    if not isinstance(tools, list):
        raise ValueError(f"{where}: expected a list of tool names or function definitions")
    builtins, custom = [], []
    for j, tool in enumerate(tools):
        at = f"{where}[{j}]"
        if isinstance(tool, str):
            if tool not in BUILTIN_TOOLS:
                raise ValueError(f"{at}: unknown builtin tool {tool!r} (expected one of {', '.join(BUILTIN_TOOLS)})")
            builtins.append(tool)
            continue
        if not isinstance(tool, dict):
            raise ValueError(f"{at}: expected a builtin tool name or a function definition object")
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{at}.function.name: missing or not a string")
        if fn["name"] in BUILTIN_TOOLS and set(fn) <= {"name"}:
            builtins.append(fn["name"])
            continue
        if not isinstance(fn.get("description", ""), str):
            raise ValueError(f"{at}.function.description: expected a string")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"{at}.function.parameters: expected a JSON schema object")
        custom.append({"type": "function", "function": fn})
    return builtins, custom


def format_tool_definitions(tools: list, fmt: str = "json") -> str:
    """The prompt text that defines the custom functions of `tools` ("" when there are none).

    json and function_tag (3.1): the text of a user turn before the dialog; pythonic (3.2/3.3): a system prompt block.
    """
    if fmt not in CUSTOM_FORMATS:
        raise ValueError(f"tool format {fmt!r}: expected one of {', '.join(CUSTOM_FORMATS)}")
    _, custom = split_tool_definitions(tools)
    if not custom:
        return ""
    if fmt == "json":
        return (
            "Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n"
            + "\n".join(json.dumps(t, indent=4, ensure_ascii=False) for t in custom)
            + "\n\nReturn function calls in JSON format."
        )
    if fmt == "function_tag":
        defs = "".join(_function_tag_definition(t["function"]) for t in custom)
        return (
            "You have access to the following functions:\n\n" + defs
            + "Think very carefully before calling functions.\n"
            "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
            '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
            "Reminder:\n"
            "- If looking for real time information use relevant functions before falling back to brave_search\n"
            "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
            "- Required parameters MUST be specified\n"
            "- Only call one function at a time\n"
            "- Put the entire function call reply on one line"
        )
    listed = [{k: t["function"][k] for k in ("name", "description", "parameters") if k in t["function"]} for t in custom]
    return (
        "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
        "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
        "If none of the function can be used, point it out. If the given question lacks the parameters required by "
        "the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
        "If you decide to invoke any of the function(s), you MUST put it in the format of "
        "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
        "You SHOULD NOT include any other text in the response.\n\n"
        "Here is a list of functions in JSON format that you can invoke.\n\n"
        + json.dumps(listed, indent=4, ensure_ascii=False)
    )


def _function_tag_definition(fn: dict) -> str:
    name, desc = fn["name"], fn.get("description", "")
    spec = json.dumps({"name": name, "description": desc, "parameters": fn.get("parameters", {})}, ensure_ascii=False)
    return f"Use the function '{name}' to '{desc}':\n{spec}\n\n"
