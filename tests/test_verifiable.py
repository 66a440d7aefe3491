"""Rule-based rewards: answer extraction and matching, exact/regex, unit tests in the sandbox, tool-call validity,
JSON against a schema."""

import pytest

from rewards.verifiable import (VERIFIERS, answer_match, exact_match, extract_code, extract_final_answer, extract_json,
                                json_schema_errors, json_schema_match, regex_match, schema_errors, tool_call_errors,
                                tool_call_valid, unit_tests)


@pytest.mark.parametrize("text, expected", [
    (r"So the total is \boxed{62}.", "62"),
    (r"first \boxed{1}, finally \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{x^{2} + 1}", "x^{2} + 1"),  # nested braces
    (r"unclosed \boxed{62 so 63", "63"),  # an unclosed box is no answer; falls through to the last number
    ("The answer is 62.", "62."),
    ("Final Answer: The final answer is 62. I hope it is correct.", "62"),
    ("The answer is 12.\nWait, no: the answer is 13.", "13."),
    ("work...\n#### 1,234", "1,234"),
    ("answer: Paris", "Paris"),
    ("5 * 12 + 2 = 62", "62"),
    ("2 + 2 = 4 and so the total is 62", "62"),  # "= X" only closes the text with a short X
    ("I have 3 apples and 5 pears", "5"),
    ("Paris", "Paris"),
    ("no numbers here\nand two lines", None),
    ("", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("text, answer, expected", [
    ("62", 62, 1.0),
    ("62.", 62, 1.0),
    ("62.0", 62, 1.0),
    ("6.2e1", 62, 1.0),
    ("1,234", 1234, 1.0),
    ("The total is 1,234 dollars.", "1234", 1.0),
    ("-62", -62, 1.0),
    ("\u221262", -62, 1.0),  # unicode minus
    ("-62", 62, 0.0),
    ("6 2", 62, 0.0),
    ("620", 62, 0.0),
    ("62 apples", 62, 1.0),
    ("The answer is 62 apples.", 62, 1.0),
    ("The answer is 62 or 63.", 62, 0.0),  # two numbers: ambiguous, no credit
    ("I first got 62, but the answer is 63.", 62, 0.0),
    ("62 at first, then 30 more, so 92", 62, 0.0),
    (r"\boxed{\frac{3}{4}}", 0.75, 1.0),
    ("3/4", "0.75", 1.0),
    ("0.75", "3/4", 1.0),
    ("The answer is 1/0", 0, 0.0),
    ("50%", 0.5, 1.0),
    ("50%", 50, 1.0),
    (r"\boxed{50\%}", "50%", 1.0),
    ("$62$", 62, 1.0),
    ("It costs $62.", 62, 1.0),
    ("The answer is **62**.", 62, 1.0),
    ("62.0000001", 62, 1.0),  # within rel_tol 1e-6
    ("62.01", 62, 0.0),
    ("The answer is Paris.", "paris", 1.0),
    ("The answer is **B**", "(B)", 1.0),
    ("answer: B2", "B", 0.0),
    ("2A", "2B", 0.0),  # "2B" is a label, not the number 2
    ("", 62, 0.0),
    ({"role": "assistant", "content": "So she has 62 left."}, 62, 1.0),
])
def test_answer_match(text, answer, expected):
    assert answer_match(text, answer) == expected


def test_answer_match_tolerances():
    assert answer_match("3.14", 3.14159, rel_tol=1e-3) == 1.0
    assert answer_match("3.14", 3.14159) == 0.0
    assert answer_match("0.00001", 0, abs_tol=1e-4) == 1.0


@pytest.mark.parametrize("text, expected, score", [
    ("  Paris. ", "paris", 1.0),
    ("Paris, France", "Paris", 0.0),
    ("**Yes**", "yes", 1.0),
    ("The answer is yes", "yes", 0.0),  # exact means the whole response
])
def test_exact_match(text, expected, score):
    assert exact_match(text, expected) == score


@pytest.mark.parametrize("text, pattern, score", [
    ("Order #A-1234 confirmed", r"#A-\d{4}", 1.0),
    ("Order #A-12 confirmed", r"#A-\d{4}", 0.0),
    ("42", r"^\d+$", 1.0),
    ("42 apples", r"^\d+$", 0.0),
])
def test_regex_match(text, pattern, score):
    assert regex_match(text, pattern) == score


@pytest.mark.parametrize("text, expected", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nUsage:\n```py\nprint(f())\n```",
     "def f():\n    return 1\nprint(f())\n"),
    ("```\nx = 1\n```", "x = 1\n"),
    ("```bash\nls\n```\n```python\nx = 2\n```", "x = 2\n"),
    ("x = 3", "x = 3"),
])
def test_extract_code(text, expected):
    assert extract_code(text) == expected


needs_sandbox = pytest.mark.sandbox
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


@needs_sandbox
@pytest.mark.parametrize("text, score", [
    ("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nExample:\n```python\nprint(add(1, 2))\n```", 1.0),
    ("```python\ndef add(a, b):\n    return a - b\n```", 0.0),
    ("def add(a, b):\n    return a + b", 1.0),  # raw code, no fence
    ("I cannot solve this.", 0.0),
    ("```python\ndef add(a, b):\n    return a + b\nimport os\nos._exit(0)\n```", 0.0),  # tests never ran
])
def test_unit_tests(text, score):
    assert unit_tests(text, ADD_TESTS, timeout_s=5) == score


@needs_sandbox
def test_unit_tests_early_exit_is_no_pass():
    cheat = "```python\ndef add(a, b):\n    return 0\nimport sys\nsys.exit(0)\n```"
    assert unit_tests(cheat, ADD_TESTS, timeout_s=5) == 0.0


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}, "days": {"type": "integer"},
        "hours": {"type": "array", "items": {"type": "number"}}}}}}
TOOLS = [WEATHER, "brave_search"]


def call(name, arguments):
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                "function": {"name": name, "arguments": arguments}}]}


@pytest.mark.parametrize("message, errors", [
    (call("get_weather", {"city": "Paris"}), []),
    (call("get_weather", {"city": "Paris", "unit": "c", "days": 3, "hours": [1, 2.5]}), []),
    (call("get_weather", '{"city": "Paris", "days": 3.0}'), []),  # JSON string arguments; 3.0 is an integer
    (call("get_weather", {}), ["tool_calls[0].function.arguments.city: required but missing"]),
    (call("get_weather", {"city": "Paris", "unit": "k"}),
     ["tool_calls[0].function.arguments.unit: 'k' is not one of ['c', 'f']"]),
    (call("get_weather", {"city": "Paris", "days": "3"}),
     ["tool_calls[0].function.arguments.days: expected integer, got str"]),
    (call("get_weather", {"city": "Paris", "days": True}),
     ["tool_calls[0].function.arguments.days: expected integer, got bool"]),
    (call("get_weather", {"city": "Paris", "hours": [1, "x"]}),
     ["tool_calls[0].function.arguments.hours[1]: expected number, got str"]),
    (call("get_weather", {"city": "Paris", "country": "FR"}),
     ["tool_calls[0].function.arguments.country: not an allowed property"]),
    (call("get_weather", '{"city": "Paris"'), ["tool_calls[0].function.arguments: not valid JSON"]),
    (call("get_stock", {"symbol": "X"}), ["tool_calls[0]: unknown tool 'get_stock'"]),
    (call("brave_search", {"query": "llama 3"}), []),
    (call("brave_search", {"query": "llama 3", "n": 3}),
     ["tool_calls[0].function.arguments.n: not an allowed property"]),
    ({"role": "assistant", "content": "It is sunny."}, ["no tool call"]),
])
def test_tool_call_errors(message, errors):
    assert tool_call_errors(message, TOOLS) == errors
    assert tool_call_valid(message, TOOLS) == float(not errors)


def test_tool_call_all_calls_must_be_valid():
    message = call("get_weather", {"city": "Paris"})
    message["tool_calls"].append({"type": "function", "function": {"name": "get_weather", "arguments": {}}})
    assert tool_call_valid(message, TOOLS) == 0.0


@pytest.mark.parametrize("text, score", [
    ('<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>', 1.0),
    ('<function=get_weather>{"city": 3}</function>', 0.0),
    ('<|python_tag|>brave_search.call(query="llama 3")<|eom_id|>', 1.0),
    ("The weather is fine.", 0.0),
])
def test_tool_call_valid_parses_text(text, score):
    assert tool_call_valid(text, TOOLS) == score


def test_schema_errors_nested():
    schema = {"type": "object", "properties": {"points": {"type": "array", "items": {
        "type": "object", "required": ["x"], "properties": {"x": {"type": ["number", "null"]}}}}}}
    assert schema_errors({"points": [{"x": 1}, {"x": None}, {}, {"x": "1"}]}, schema) == [
        "arguments.points[2].x: required but missing", "arguments.points[3].x: expected number or null, got str"]


def test_registry_names_and_signature():
    assert set(VERIFIERS) == {"answer", "exact", "regex", "unit_tests", "tool_call", "json_schema", "constraints"}
    message = {"role": "assistant", "content": "The answer is 62."}
    assert VERIFIERS["answer"](message, {"answer": 62}) == 1.0
    assert VERIFIERS["answer"](message, {"answer": 63}) == 0.0
    assert VERIFIERS["exact"]("62", {"answer": "62"}) == 1.0
    assert VERIFIERS["regex"](message, {"pattern": r"answer is \d+"}) == 1.0
    assert VERIFIERS["tool_call"](call("brave_search", {"query": "q"}), {"tools": ["brave_search"]}) == 1.0
    with pytest.raises(ValueError, match="meta.answer: missing"):
        VERIFIERS["answer"](message, {})
    with pytest.raises(ValueError, match="meta.tests: missing"):
        VERIFIERS["unit_tests"](message, {"answer": 62})


@needs_sandbox
def test_registry_unit_tests():
    message = {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}
    assert VERIFIERS["unit_tests"](message, {"tests": ADD_TESTS, "timeout_s": 5}) == 1.0
    assert VERIFIERS["unit_tests"](message, {"tests": "assert add(1, 1) == 3"}) == 0.0


@pytest.mark.parametrize("schema, value, errors", [
    ({"type": "integer", "minimum": 1, "maximum": 5}, 5, []),
    ({"type": "integer", "minimum": 1, "maximum": 5}, 0, ["v: minimum 1, got 0"]),
    ({"type": "number", "exclusiveMaximum": 1}, 1.0, ["v: exclusiveMaximum 1, got 1.0"]),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, 2, ["v: maximum 1, got 2"]),
    ({"minimum": 0}, True, []),  # a boolean is not a number: numeric bounds do not apply
    ({"type": "string", "minLength": 2, "maxLength": 3}, "abcd", ["v: maxLength 3, got length 4"]),
    ({"type": "string", "pattern": "^[A-Z]{3}$"}, "ABC", []),
    ({"type": "string", "pattern": "[0-9]"}, "a1b", []),  # unanchored, as JSON Schema searches
    ({"type": "string", "pattern": "^[A-Z]{3}$"}, "ABCD", ["v: 'ABCD' does not match pattern '^[A-Z]{3}$'"]),
    ({"type": "array", "minItems": 2}, [1], ["v: minItems 2, got length 1"]),
    ({"type": "array", "maxItems": 1, "items": {"type": "string"}}, ["a", 2],
     ["v: maxItems 1, got length 2", "v[1]: expected string, got int"]),
    ({"const": "yes"}, "no", ["v: 'no' is not 'yes'"]),
    ({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]}, 3, []),
    ({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]}, -3, ["v: matches none of anyOf"]),
    ({"oneOf": [{"type": "string"}]}, 3, []),  # keywords outside the subset are ignored
])
def test_schema_errors_keywords(schema, value, errors):
    assert schema_errors(value, schema, "v") == errors


@pytest.mark.parametrize("text, found, value", [
    ('{"a": 1}', True, {"a": 1}),
    ("  [1, 2]\n", True, [1, 2]),
    ("null", True, None),  # a found null is still found
    ("42", True, 42),
    ('Here you go:\n```json\n{"a": 1}\n```\nAnything else?', True, {"a": 1}),
    ('```bash\nls -la\n```\n```\n{"b": 2}\n```', True, {"b": 2}),  # the first fenced block that parses
    ('The result is {"a": {"b": [1, 2]}} as asked, and {"c": 3}.', True, {"a": {"b": [1, 2]}}),  # the first
    ('Sets like {1, 2} are not JSON; this is: {"ok": true}', True, {"ok": True}),
    ('{"a": 1,}', False, None),
    ("no JSON here", False, None),
    ("", False, None),
])
def test_extract_json(text, found, value):
    assert extract_json(text) == (found, value)


PERSON = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}}}


@pytest.mark.parametrize("text, errors", [
    ('{"name": "Ada", "age": 36}', []),
    ('Sure! ```json\n{"name": "Ada", "age": 36, "tags": ["math"]}\n```', []),
    ({"role": "assistant", "content": 'Result: {"name": "Ada", "age": 36.0}.'}, []),  # 36.0 is an integer
    ('{"name": "", "age": -1}', ["response.name: minLength 1, got length 0", "response.age: minimum 0, got -1"]),
    ('{"name": "Ada"}', ["response.age: required but missing"]),
    ('{"name": "Ada", "age": 36, "email": "a@b.c"}', ["response.email: not an allowed property"]),
    ('{"name": "Ada", "age": "36"}', ["response.age: expected integer, got str"]),
    ('[{"name": "Ada", "age": 36}]', ["response: expected object, got list"]),
    ("Ada is 36.", ["no JSON found"]),
    ('{"name": "Ada", "age": 36', ["no JSON found"]),  # truncated
])
def test_json_schema_errors(text, errors):
    assert json_schema_errors(text, PERSON) == errors
    assert json_schema_match(text, PERSON) == float(not errors)


def test_json_schema_verifier_reads_meta():
    verify = VERIFIERS["json_schema"]
    assert verify('{"n": 3}', {"schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}) == 1.0
    assert verify('{"n": "3"}', {"schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}) == 0.0
    with pytest.raises(ValueError, match="meta.schema: missing; the 'json_schema' verifier needs it"):
        verify("{}", {})
    with pytest.raises(ValueError, match="meta.schema: expected a JSON schema"):
        verify("{}", {"schema": "object"})


def test_tool_call_arguments_meet_bounds():
    tools = [{"type": "function", "function": {"name": "wait", "parameters": {
        "type": "object", "properties": {"seconds": {"type": "integer", "minimum": 1, "maximum": 60}}}}}]
    assert tool_call_errors(call("wait", {"seconds": 90}), tools) == [
        "tool_calls[0].function.arguments.seconds: maximum 60, got 90"]
