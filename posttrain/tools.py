"""Tool-call wire formats of Llama 3.1-3.3, stated once: encode a message's tool calls to text and parse them back.

Formats of an assistant turn that calls tools (the turn then ends with `<|eom_id|>`):
- builtin (3.1): `<|python_tag|>brave_search.call(query="...")`, same for wolfram_alpha; always used for those two.
- code_interpreter (3.1): `<|python_tag|>` + the raw code; it must be the only call of its turn.
- json (3.1): `<|python_tag|>{"type": "function", "name": NAME, "parameters": {...}}`, one call per line.
- function_tag (3.1): `<function=NAME>{...json arguments...}</function>`, one per line, no python tag.
- pythonic (3.2/3.3): `[f(a=1, b="x"), g()]`, several calls in one list, no python tag.
The python tag placement follows the model outputs in llama-models' llama3_1/prompt_format.md (builtin, code and
JSON calls start with it); the JSON object carries `"type": "function"` as Meta's ChatFormat encodes it.
Calls use the message form of DESIGN.md: `{"type": "function", "function": {"name": str, "arguments": {...}}}`.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

PYTHON_TAG = "<|python_tag|>"
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
QUERY_TOOLS = ("brave_search", "wolfram_alpha")  # called as NAME.call(query="...")
FORMATS = ("builtin", "json", "function_tag", "pythonic")
CUSTOM_FORMATS = ("json", "function_tag", "pythonic")  # how custom (JSON-defined) functions are called

_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


def _builtin_text(name: str, args: dict, where: str) -> str:
    if name == "code_interpreter":
        if set(args) != {"code"} or not isinstance(args["code"], str):
            raise ValueError(f"{where}.function.arguments: code_interpreter takes exactly {{'code': str}}")
        return args["code"]
    if set(args) != {"query"} or not isinstance(args["query"], str):
        raise ValueError(f"{where}.function.arguments: {name} takes exactly {{'query': str}}")
    return f"{name}.call(query={_py_literal(args['query'])})"


def _py_literal(value: Any) -> str:
    """A Python literal for a JSON value: strings in double quotes, True/False/None, dicts as Python dicts."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(str(k))}: {_py_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write a {type(value).__name__} as a pythonic tool argument")


def _pythonic_call(name: str, args: dict, where: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{where}.function.name: {name!r} is not a Python identifier (pythonic format)")
    bad = [k for k in args if not _IDENTIFIER.fullmatch(k)]
    if bad:
        raise ValueError(f"{where}.function.arguments: {bad[0]!r} is not a Python identifier (pythonic format)")
    return f"{name}(" + ", ".join(f"{k}={_py_literal(v)}" for k, v in args.items()) + ")"


def encode_tool_calls(calls: list, fmt: str = "json") -> str:
    """The text of an assistant turn's tool calls (after its content, before `<|eom_id|>`); may start with the python tag.

    `fmt` says how custom functions are written; builtin tools always take their builtin form.
    """
    if fmt not in FORMATS:
        raise ValueError(f"tool format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not isinstance(calls, list) or not calls:
        raise ValueError("tool_calls: expected a non-empty list")
    parsed = [call_name_args(c, f"tool_calls[{j}]") for j, c in enumerate(calls)]
    names = [name for name, _ in parsed]
    if "code_interpreter" in names and len(parsed) > 1:
        at = names.index("code_interpreter")
        raise ValueError(f"tool_calls[{at}]: code_interpreter must be the only call of its turn")
    lines: list[str] = []
    group: list[str] = []  # consecutive pythonic calls share one list
    for j, (name, args) in enumerate(parsed):
        where = f"tool_calls[{j}]"
        if fmt == "pythonic" and name not in BUILTIN_TOOLS:
            group.append(_pythonic_call(name, args, where))
            continue
        if group:
            lines.append("[" + ", ".join(group) + "]")
            group = []
        if name in BUILTIN_TOOLS:
            lines.append(_builtin_text(name, args, where))
        elif fmt == "builtin":
            raise ValueError(f"{where}.function.name: {name!r} is not a builtin tool ({', '.join(BUILTIN_TOOLS)})")
        elif fmt == "json":
            lines.append(json.dumps({"type": "function", "name": name, "parameters": args}, ensure_ascii=False))
        else:
            lines.append(f"<function={name}>{json.dumps(args, ensure_ascii=False)}</function>")
    if group:
        lines.append("[" + ", ".join(group) + "]")
    tagged = fmt == "json" or any(name in BUILTIN_TOOLS for name in names)
    return (PYTHON_TAG if tagged else "") + "\n".join(lines)


def _parse_builtin(line: str) -> dict | None:
    try:
        node = ast.parse(line.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
            and isinstance(node.func.value, ast.Name) and node.func.value.id in QUERY_TOOLS and not node.args):
        return None
    try:
        args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    except ValueError:
        return None
    return make_call(node.func.value.id, args)


def _parse_json_calls(text: str) -> list[dict] | None:
    """A JSON call object, a JSON list of them, or one object per line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            return None
        calls = [_parse_json_calls(line) for line in lines]
        return None if any(c is None for c in calls) else [c for group in calls for c in group]
    values = value if isinstance(value, list) and value else [value]
    calls = []
    for obj in values:
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


def _parse_function_tags(text: str) -> list[dict] | None:
    """`<function=NAME>{json}</function>` calls covering the whole text (the closing tag may be missing at the end)."""
    calls, pos = [], 0
    for m in _FUNCTION_TAG.finditer(text):
        if text[pos:m.start()].strip():
            return None
        try:
            args = json.loads(m.group(2)) if m.group(2).strip() else {}
        except json.JSONDecodeError:
            return None
        if not isinstance(args, dict):
            return None
        calls.append(make_call(m.group(1), args))
        pos = m.end()
    return calls if calls and not text[pos:].strip() else None


def _parse_pythonic(text: str) -> list[dict] | None:
    """`[f(a=1), g()]`: a non-empty list of calls with keyword arguments only."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.List) or not node.elts:
        return None
    calls = []
    for elt in node.elts:
        if not (isinstance(elt, ast.Call) and isinstance(elt.func, ast.Name)) or elt.args:
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in elt.keywords}
        except ValueError:
            return None
        if None in args:  # **kwargs
            return None
        calls.append(make_call(elt.func.id, args))
    return calls


def _parse_line(line: str) -> list[dict] | None:
    line = line.strip()
    builtin = _parse_builtin(line)
    if builtin is not None:
        return [builtin]
    for parse in (_parse_json_calls, _parse_function_tags, _parse_pythonic):
        calls = parse(line)
        if calls is not None:
            return calls
    return None


def parse_tool_calls(text: str) -> list[dict] | None:
    """The calls in `text` if all of it is tool calls (any format, python tag optional), else None.

    After the python tag, text that is no call is code for code_interpreter (what Llama 3.1 emits for code).
    """
    tagged = text.startswith(PYTHON_TAG)
    body = text[len(PYTHON_TAG):] if tagged else text
    if not body.strip():
        return None
    calls = _parse_line(body)
    if calls is not None:
        return calls
    lines = [line for line in body.splitlines() if line.strip()]
    per_line = [_parse_line(line) for line in lines]
    if len(lines) > 1 and all(c is not None for c in per_line):
        return [c for group in per_line for c in group]
    return [make_call("code_interpreter", {"code": body})] if tagged else None


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
