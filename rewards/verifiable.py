"""Rule-based (verifiable) rewards: final-answer match, exact and regex match, unit tests in the sandbox, tool calls,
JSON against a schema, instruction constraints (rewards/constraints.py).

A verifier is `fn(message | text, meta) -> float` in [0, 1], where `meta` is the prompt record's `meta` merged over
the reward source's options: {"answer": 62}, {"pattern": "..."}, {"tests": "..."}, {"tools": [...]},
{"schema": {...}}, {"constraints": [...]}. `get_verifier(name)` finds one by name: a built-in of `VERIFIERS`, an
entry point of an installed package, or `module:function`; docs/verifiers.md lists them with the meta each reads.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from posttrain.tools import call_name_args, split_tool_definitions
from rewards.constraints import constraints_score

# A number as people write it: sign, thousands separators, decimals (also "62."), exponent.
_NUMBER = r"[-+\u2212]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_LATEX_FRAC_TEXT = r"\\[dt]?frac\{[^{}]*\}\{[^{}]*\}"
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_FRACTION = re.compile(rf"\s*({_NUMBER})[ \t]*/[ \t]*({_NUMBER})")
# One number of running text, taken whole: "3/4", "\frac{3}{4}", "50%" (not "4", "}", "50").
_NUMBER_TOKEN = re.compile(rf"(?<![\w.])(?:{_LATEX_FRAC_TEXT}|{_NUMBER}(?:[ \t]*/[ \t]*{_NUMBER})?)%?(?!\w)")
# The greedy `^.*` takes the last "answer is" of its line ("Final Answer: The final answer is 62").
_ANSWER_PHRASE = re.compile(r"^.*(?:####|\banswer[ \t]*(?:is|:))[ \t]*:?[ \t]*(.+)$", re.IGNORECASE | re.MULTILINE)
# "= X" closing the text, X one token plus at most one unit word ("= 62", "= 62 apples.", "= \frac{3}{4}").
_TRAILING_EQUALS = re.compile(r"=[ \t]*([^\s=]+(?:[ \t]+[^\s=\d]+)?)[ \t]*$")
_CODE_FENCE = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_WRAPPERS = (("**", "**"), ("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("`", "`"), ('"', '"'),
             ("'", "'"), ("\\text{", "}"), ("\\mathrm{", "}"), ("(", ")"))
_TRAILING_PUNCTUATION = ".,;:!?"


def message_text(message: dict | str) -> str:
    """The text of a message (its content; text parts joined) or the string itself."""
    if isinstance(message, str):
        return message
    content = message.get("content") or ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None  # unclosed: this rule does not apply


def extract_final_answer(text: str) -> str | None:
    """The final answer of a response, by the first rule that applies:

    1. the last `\\boxed{...}`;
    2. the last "answer is X" / "answer: X" / "#### X" (X: the rest of its line, up to a sentence end ". ");
    3. "= X" at the end of the text (the last line ends in an equation);
    4. the last number in the text;
    5. the whole text when it is a single line with no number ("Paris").
    None when nothing applies.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        return re.split(r"\.\s", phrases[-1].strip(), maxsplit=1)[0].strip()
    stripped = text.strip()
    equation = _TRAILING_EQUALS.search(stripped)
    if equation:
        return equation.group(1)
    numbers = [m.group(0) for m in _NUMBER_TOKEN.finditer(stripped)]
    if numbers:
        return numbers[-1]
    return stripped if stripped and "\n" not in stripped else None


def _unwrap(text: str) -> str:
    """Strip surrounding markup (bold, $...$, \\text{}, quotes, parentheses) and trailing punctuation."""
    text = text.strip()
    changed = True
    while changed and text:
        changed = False
        stripped = text.rstrip(_TRAILING_PUNCTUATION).strip()
        if stripped != text:
            text, changed = stripped, True
        for left, right in _WRAPPERS:
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text, changed = text[len(left):len(text) - len(right)].strip(), True
                break
    return text


def normalize_text(text: str) -> str:
    """Case-, whitespace- and markup-insensitive form of a short answer."""
    return " ".join(_unwrap(text).split()).lower()


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("\u2212", "-"))


def parse_number(text: str) -> list[float] | None:
    """The values an answer string can mean, or None when it is not a number (units after it are allowed).

    "62.", "6.2e1", "1,234", "-62", "3/4", "\\frac{3}{4}", "$62$", "62 apples" are numbers; "6 2" and "62 or 63" are
    not (digits after the number make it ambiguous). "50%" means 50 or 0.5.
    """
    parsed = _parse_number(text)
    return parsed[0] if parsed else None


def _parse_number(text: str) -> tuple[list[float], str] | None:
    """(values, text after the number) or None."""
    text = _LATEX_FRAC.sub(r"\1/\2", _unwrap(text)).replace("\\%", "%").replace("\\$", "$").lstrip("$")
    fraction = _FRACTION.match(text)
    if fraction:
        if _to_float(fraction.group(2)) == 0:
            return None
        value, rest = _to_float(fraction.group(1)) / _to_float(fraction.group(2)), text[fraction.end():]
    else:
        number = re.match(rf"\s*({_NUMBER})", text)
        if number is None:
            return None
        value, rest = _to_float(number.group(1)), text[number.end():]
    if re.search(r"\d", rest):
        return None
    return ([value, value / 100] if rest.lstrip().startswith("%") else [value]), rest.strip()


def answer_match(text: dict | str, answer: Any, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """1.0 when the response's final answer equals `answer`: numerically within tolerance when `answer` is a
    number (or a string that is one), else as normalised text."""
    predicted = extract_final_answer(message_text(text))
    if predicted is None:
        return 0.0
    gold = float(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) else None
    if gold is None and isinstance(answer, str):
        parsed = _parse_number(answer)
        gold = parsed[0][0] if parsed and parsed[1] in ("", "%") else None  # "2B" is a label, not the number 2
    if gold is not None:
        values = parse_number(predicted)
        return float(values is not None and any(math.isclose(v, gold, rel_tol=rel_tol, abs_tol=abs_tol)
                                                for v in values))
    return float(normalize_text(predicted) == normalize_text(str(answer)))


def exact_match(text: dict | str, expected: str) -> float:
    """1.0 when the whole response equals `expected` up to case, whitespace, markup and trailing punctuation."""
    return float(normalize_text(message_text(text)) == normalize_text(str(expected)))


def regex_match(text: dict | str, pattern: str) -> float:
    """1.0 when `pattern` is found anywhere in the response (anchor it to require more)."""
    return float(re.search(pattern, message_text(text)) is not None)


def extract_code(text: str) -> str:
    """The Python code of a response: all ```python/```py blocks joined in order (a solution is often followed by
    a usage block that needs it); else all unlabelled ``` blocks; else the text itself."""
    blocks = _CODE_FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    plain = [body for lang, body in blocks if not lang]
    chosen = python or plain
    return "".join(body.rstrip("\n") + "\n" for body in chosen) if chosen else text


def unit_tests(text: dict | str, tests: str, **sandbox_kw) -> float:
    """1.0 when the response's code passes `tests` (asserts / test_* functions) in `synth.sandbox.run_tests`."""
    from synth.sandbox import run_tests

    return float(bool(run_tests(extract_code(message_text(text)), tests, **sandbox_kw).passed))


# ---- tool calls --------------------------------------------------------------------------------------------------

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def schema_errors(value: Any, schema: dict, where: str = "arguments") -> list[str]:
    """Why `value` fails `schema`, for a JSON-schema subset: type (one or a list), enum, const, anyOf; minimum,
    maximum, exclusiveMinimum, exclusiveMaximum; minLength, maxLength, pattern (searched, as JSON Schema does);
    properties, required, additionalProperties (false or a schema); items (one schema), minItems, maxItems.
    Other keywords are ignored."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        unknown = [t for t in names if t not in _JSON_TYPES]
        if unknown:
            return [f"{where}: schema has unknown type {unknown[0]!r}"]
        if not any(_JSON_TYPES[t](value) for t in names):
            return [f"{where}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']!r}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: {value!r} is not {schema['const']!r}"]
    if "anyOf" in schema and all(schema_errors(value, option, where) for option in schema["anyOf"]):
        return [f"{where}: matches none of anyOf"]
    return _bound_errors(value, schema, where) + _container_errors(value, schema, where)


# keyword -> the test a value (a number, or the length of a string or array) must pass against the keyword's bound
_BOUNDS = {"minimum": operator.ge, "maximum": operator.le, "exclusiveMinimum": operator.gt,
           "exclusiveMaximum": operator.lt}
_SIZES = {"minLength": (str, operator.ge), "maxLength": (str, operator.le),
          "minItems": (list, operator.ge), "maxItems": (list, operator.le)}


def _bound_errors(value: Any, schema: dict, where: str) -> list[str]:
    """Numeric bounds, string and array sizes, string pattern."""
    errors = []
    if _JSON_TYPES["number"](value):
        errors += [f"{where}: {key} {schema[key]!r}, got {value!r}" for key, ok in _BOUNDS.items()
                   if key in schema and not ok(value, schema[key])]
    for key, (kind, ok) in _SIZES.items():
        if key in schema and isinstance(value, kind) and not ok(len(value), schema[key]):
            errors.append(f"{where}: {key} {schema[key]!r}, got length {len(value)}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match pattern {schema['pattern']!r}")
    return errors


def _container_errors(value: Any, schema: dict, where: str) -> list[str]:
    """Object properties (required, additional) and array items, recursively."""
    errors = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{where}.{key}: required but missing" for key in schema.get("required", []) if key not in value]
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}.{key}: not an allowed property")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


_BUILTIN_ARGUMENT = {"brave_search": "query", "wolfram_alpha": "query", "code_interpreter": "code"}


def _tool_schemas(tools: list) -> dict[str, dict]:
    """Tool name -> parameters schema; builtin tools take their one Llama 3.1 string argument."""
    builtins, custom = split_tool_definitions(tools, "meta.tools")
    schemas = {name: {"type": "object", "properties": {_BUILTIN_ARGUMENT[name]: {"type": "string"}},
                      "required": [_BUILTIN_ARGUMENT[name]], "additionalProperties": False} for name in builtins}
    for tool in custom:
        schemas[tool["function"]["name"]] = tool["function"].get("parameters") or {}
    return schemas


def tool_call_errors(message: dict | str, tools: list) -> list[str]:
    """Why the message's tool calls are invalid: none, unknown tool, arguments not JSON or not matching the schema."""
    if isinstance(message, str):
        from posttrain.chat import parse_completion  # loads transformers; parsed message dicts need no parser

        message = parse_completion(message)
    calls = message.get("tool_calls") or []
    if not calls:
        return ["no tool call"]
    schemas = _tool_schemas(tools)
    errors = []
    for i, call in enumerate(calls):
        where = f"tool_calls[{i}]"
        try:
            name, args = call_name_args(call, where)
        except ValueError as e:
            errors.append(str(e))
            continue
        if name not in schemas:
            errors.append(f"{where}: unknown tool {name!r}")
            continue
        errors += schema_errors(args, {"type": "object", **schemas[name]}, f"{where}.function.arguments")
    return errors


def tool_call_valid(message: dict | str, tools: list) -> float:
    """1.0 when the message calls tools, every call names a known tool and its arguments satisfy that tool's schema."""
    return float(not tool_call_errors(message, tools))


# ---- JSON output ------------------------------------------------------------------------------------------------

def extract_json(text: str) -> tuple[bool, Any]:
    """(True, value) for the JSON of a response, by the first rule that applies: the whole text is JSON; a fenced
    ``` block is (the first that parses); an object or array inside the text is (the first that parses).
    (False, None) when none applies; `null` is a value, so the flag says whether one was found."""
    candidates = [text.strip(), *(body for _, body in _CODE_FENCE.findall(text))]
    for candidate in candidates:
        try:
            return True, json.loads(candidate)
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    for start in re.finditer(r"[{\[]", text):
        try:
            return True, decoder.raw_decode(text, start.start())[0]
        except ValueError:
            continue
    return False, None


def json_schema_errors(text: dict | str, schema: dict) -> list[str]:
    """Why the response's JSON (`extract_json`) fails `schema` (`schema_errors`); ["no JSON found"] without one."""
    found, value = extract_json(message_text(text))
    return schema_errors(value, schema, "response") if found else ["no JSON found"]


def json_schema_match(text: dict | str, schema: dict) -> float:
    """1.0 when the response holds JSON that satisfies `schema`."""
    return float(not json_schema_errors(text, schema))


# ---- registry ----------------------------------------------------------------------------------------------------

Verifier = Callable[[dict | str, dict], float]
ENTRY_POINT_GROUP = "posttrain.verifiers"


def _need(meta: dict, key: str, verifier: str) -> Any:
    if key not in meta:
        raise ValueError(f"meta.{key}: missing; the {verifier!r} verifier needs it")
    return meta[key]


def _verify_unit_tests(message: dict | str, meta: dict) -> float:
    """Sandbox limits come from meta (the source's options): timeout_s, memory_mb, allow_unisolated."""
    limits = {key: meta[key] for key in ("timeout_s", "memory_mb", "allow_unisolated") if key in meta}
    return unit_tests(message, _need(meta, "tests", "unit_tests"), **limits)


def _verify_tool_call(message: dict | str, meta: dict) -> float:
    """Without meta.expected_calls: the calls are valid for meta.tools (tool_call_valid). With them: the calls match
    the expected ones by rewards.tool_eval.ast_match, its `rules` (bfcl, the default, or strict) and `order` (any,
    the default, or exact) read from meta; a call without a name or with arguments that are no object scores 0."""
    if "expected_calls" not in meta:
        return tool_call_valid(message, _need(meta, "tools", "tool_call"))
    from rewards.tool_eval import ast_match  # rewards.tool_eval imports this module

    if isinstance(message, str):
        from posttrain.chat import parse_completion

        message = parse_completion(message)
    calls = message.get("tool_calls") or []
    try:
        for i, call in enumerate(calls):
            call_name_args(call, f"tool_calls[{i}]")
    except ValueError:
        return 0.0
    return float(ast_match(calls, meta["expected_calls"], meta.get("tools"), order=meta.get("order", "any"),
                           rules=meta.get("rules", "bfcl"))[0])


def _verify_json_schema(message: dict | str, meta: dict) -> float:
    schema = _need(meta, "schema", "json_schema")
    if not isinstance(schema, dict):
        raise ValueError(f"meta.schema: expected a JSON schema (a mapping), got {schema!r}")
    return json_schema_match(message, schema)


def _verify_constraints(message: dict | str, meta: dict) -> float:
    strict = meta.get("strict", True)
    if not isinstance(strict, bool):
        raise ValueError(f"meta.strict: expected true or false, got {strict!r}")
    return constraints_score(message_text(message), _need(meta, "constraints", "constraints"), strict=strict)


VERIFIERS: dict[str, Verifier] = {
    "answer": lambda m, meta: answer_match(m, _need(meta, "answer", "answer"), rel_tol=meta.get("rel_tol", 1e-6),
                                           abs_tol=meta.get("abs_tol", 1e-9)),
    "exact": lambda m, meta: exact_match(m, _need(meta, "answer", "exact")),
    "regex": lambda m, meta: regex_match(m, _need(meta, "pattern", "regex")),
    "unit_tests": _verify_unit_tests,
    "tool_call": _verify_tool_call,
    "json_schema": _verify_json_schema,
    "constraints": _verify_constraints,
}
"""The built-in verifiers; `get_verifier` also finds plug-ins."""


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def verifier_names() -> tuple[str, ...]:
    """The built-in verifiers, then the entry points installed packages register in group posttrain.verifiers."""
    return (*VERIFIERS, *sorted(set(_entry_points()) - set(VERIFIERS)))


def _callable_verifier(name: str, fn: Any) -> Verifier:
    if not callable(fn):
        raise ValueError(f"verifier {name!r}: {fn!r} is not callable")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ValueError(f"verifier {name!r}: takes {inspect.signature(fn)}, but a verifier is called as "
                         "fn(message, meta)") from None
    except ValueError:
        pass  # no signature to read (some builtins): the first call will tell
    return fn


def get_verifier(name: str) -> Verifier:
    """The verifier called `name`: a built-in, an entry point in group posttrain.verifiers, or `module:function`
    (`module:Class.method` too) importable from the Python path. A ValueError names `name` when none resolves."""
    if name in VERIFIERS:
        return VERIFIERS[name]
    entry_points = _entry_points()
    if name in entry_points:
        try:
            return _callable_verifier(name, entry_points[name].load())
        except (ImportError, AttributeError) as e:
            raise ValueError(f"verifier {name!r}: entry point {entry_points[name].value!r} in group "
                             f"{ENTRY_POINT_GROUP} does not load ({e})") from e
    if ":" not in name:
        raise ValueError(f"verifier {name!r}: unknown; known: {', '.join(verifier_names())}, or module:function "
                         "on the Python path")
    from posttrain.plugins import load_callable

    try:
        target = load_callable(name)
    except ValueError as e:
        raise ValueError(f"verifier {e}") from None
    return _callable_verifier(name, target)
