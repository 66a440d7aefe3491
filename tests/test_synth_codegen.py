"""The code loop: static checks, the teacher's tests in the sandbox, error feedback, only passing dialogs kept."""

from __future__ import annotations

import json

import pytest

from synth import codegen
from synth.sandbox import isolation_available
from synth.teacher import ScriptedTeacher

ALLOW_UNISOLATED = isolation_available() is None  # CI machines without bubblewrap still run the loop

GOOD = "Here is the solution:\n```python\ndef add(a, b):\n    return a + b\n```"
BUGGY = "```python\ndef add(a, b):\n    return a - b\n```"
FIXED = "Fixed: I was subtracting.\n```python\ndef add(a, b):\n    return a + b\n```"
TESTS = "```python\nassert add(2, 3) == 5\n\ndef test_negative():\n    assert add(-1, -1) == -2\n```"


def _config(tmp_path, snippets: list[str], max_retries: int = 2) -> codegen.CodeConfig:
    path = tmp_path / "snippets.jsonl"
    path.write_text("".join(json.dumps({"code": s}) + "\n" for s in snippets))
    return codegen.CodeConfig(snippets=str(path), max_retries=max_retries, timeout_s=20, allow_unisolated=ALLOW_UNISOLATED)


def test_loop_keeps_passing_fixes_failing_and_drops_never_passing(tmp_path):
    cfg = _config(tmp_path, ["x = 1 + 2", "y = 3 - 1", "z = 2 * 2"], max_retries=2)
    teacher = ScriptedTeacher([
        "Write add(a, b) returning the sum. (first)", "Write add(a, b) returning the sum. (second)",
        "Write add(a, b) returning the sum. (third)",      # problems
        GOOD, BUGGY, BUGGY,                                 # solutions
        TESTS, TESTS, TESTS,                                # tests
        FIXED, BUGGY,                                       # retry 1: second fixed, third still buggy
        "I cannot fix this.",                               # retry 2: third has no code at all
    ])
    records, stats = codegen.code_dialogs(teacher, cfg, seed=0)
    assert teacher.remaining == 0
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Write add(a, b) returning the sum. (first)"}, {"role": "assistant", "content": GOOD}],
        [{"role": "user", "content": "Write add(a, b) returning the sum. (second)"}, {"role": "assistant", "content": FIXED}],
    ]
    assert stats["removed"] == {"empty_problem": 0, "unusable_tests": 0, "execution": 1}
    assert stats["fixed_by_feedback"] == 1
    first, second = (r["meta"]["qc"]["execution"] for r in records)
    assert (first["attempts"], first["errors"]) == (1, [])
    assert second["attempts"] == 2 and "AssertionError" in second["errors"][0]
    assert records[1]["source"] == "synth:code" and records[1]["meta"]["filters_passed"] == ["execution"]
    # the failing run's stderr went back to the teacher with its own answer in the dialog
    retry_prompts, _ = teacher.calls[3]
    assert [m["role"] for m in retry_prompts[0]] == ["user", "assistant", "user"]
    assert retry_prompts[0][1]["content"] == BUGGY.strip()
    assert "AssertionError" in retry_prompts[0][2]["content"]
    assert "Solution:\n```python\ndef add(a, b):\n    return a - b\n```" in teacher.calls[2][0][1][0]["content"]


def test_unusable_tests_and_empty_problems_are_dropped(tmp_path):
    cfg = _config(tmp_path, ["a", "b", "c"], max_retries=0)
    teacher = ScriptedTeacher([
        "Problem one", "   ", "Problem three",
        GOOD, GOOD,
        "```python\nprint('no asserts here')\n```", "```python\nassert add(1, 1) ==\n```",
    ])
    records, stats = codegen.code_dialogs(teacher, cfg, seed=0)
    assert records == []
    assert stats["removed"] == {"empty_problem": 1, "unusable_tests": 2, "execution": 0}


@pytest.mark.parametrize("code, expected", [
    ("def f(x):\n    return x\n", []),
    ("def f(x)\n    return x\n", ["SyntaxError: line 1: expected ':'"]),
    ("x = 1\n", ["the solution defines no function or class"]),
    ("def f():\n    return input()\n", ["the solution calls input(); take arguments instead"]),
])
def test_static_errors(code, expected):
    assert codegen.static_errors(code) == expected


def test_extract_code():
    assert codegen.extract_code("Text\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert codegen.extract_code("```\ndef f(): pass\n```") == "def f(): pass\n"
    assert codegen.extract_code("def f():\n    return 1") == "def f():\n    return 1\n"
    assert codegen.extract_code("Sorry, I can't.") is None
    assert codegen.extract_code("```bash\nls\n```") is None


def test_load_snippets_splits_python_files_into_top_level_defs(tmp_path):
    (tmp_path / "m.py").write_text("import os\n\ndef a():\n    return 1\n\nclass B:\n    pass\n")
    assert codegen.load_snippets(tmp_path) == ["def a():\n    return 1", "class B:\n    pass"]
