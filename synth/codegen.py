"""Code data with execution feedback (Llama 3, §4.3.1): snippet -> problem -> solution -> static checks + the
teacher's own unit tests in the sandbox -> errors back to the teacher for self-correction; only passing dialogs kept.

Every stage is one batched teacher call over all items still alive, so a model teacher decodes them together (and a
ScriptedTeacher replays stage by stage: problems, solutions, tests, then one round of fixes per retry).
The kept dialog is [user: problem, assistant: the final, passing answer].
"""

from __future__ import annotations

import ast
import dataclasses
import random
import re
from pathlib import Path

from posttrain.config import check_range, field
from posttrain.data import iter_raw
from synth.sandbox import run_tests
from synth.teacher import SamplingConfig, Teacher

PROBLEM = """Here is a snippet of Python code:

```python
{snippet}
```

Inspired by it, write a self-contained Python programming problem: say exactly which function(s) to write, their
arguments and return values, with an example. Write only the problem statement, no solution."""

TESTS = """Write unit tests for this Python solution to the problem below, as plain `assert` statements (or test_
functions using assert) that import nothing from other files: the solution's functions are already defined.

Problem:
{problem}

Solution:
```python
{code}
```

Answer with one ```python code block only."""

FEEDBACK = """Your code failed these checks:

{errors}

Fix it. Answer with the complete corrected solution in one ```python code block."""

# pyflakes messages that mean the code cannot work (others, such as an unused import, are style).
_FATAL_PYFLAKES = {"UndefinedName", "UndefinedLocal", "UndefinedExport", "DuplicateArgument", "ReturnOutsideFunction",
                   "YieldOutsideFunction", "ContinueOutsideLoop", "BreakOutsideLoop", "TwoStarredExpressions"}
_MAX_ERROR_CHARS = 2000


@dataclasses.dataclass
class CodeConfig:
    snippets: str = field("", help="seed code: a .py file or a dir of them (split into top-level defs), or JSONL "
                                   "records with a code field")
    num_problems: int = field(0, help="problems to make, from randomly chosen snippets (0 = one per snippet)")
    max_retries: int = field(2, help="rounds of error feedback before a solution is dropped")
    timeout_s: float = field(10.0, help="wall-clock limit of one test run in the sandbox")
    memory_mb: int = field(512, help="address-space limit of one test run")
    allow_unisolated: bool = field(False, help="run tests without OS isolation where bubblewrap is unavailable")
    sampling: SamplingConfig = field(default_factory=SamplingConfig, help="teacher sampling for problems, code, tests")

    def __post_init__(self):
        check_range("num_problems", self.num_problems, low=0)
        check_range("max_retries", self.max_retries, low=0)
        check_range("timeout_s", self.timeout_s, low=0.1)


def load_snippets(path: str | Path) -> list[str]:
    """Snippets: every top-level function/class of the .py files at `path`, or the `code` field of JSONL records."""
    path = Path(path)
    if not (path.is_dir() or path.suffix == ".py"):
        return [raw["code"] for where, raw in iter_raw(path) if _has_code(raw, where)]
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    snippets = []
    for file in files:
        source = file.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            raise ValueError(f"{file}:{e.lineno}: not valid Python: {e.msg}") from None
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        snippets += [ast.get_source_segment(source, n) for n in defs] or [source]
    return [s for s in snippets if s and s.strip()]


def _has_code(raw, where: str) -> bool:
    if not isinstance(raw, dict) or not isinstance(raw.get("code"), str):
        raise ValueError(f"{where}: code: missing or not a string")
    return bool(raw["code"].strip())


def extract_code(text: str) -> str | None:
    """The first ```python (or unlabelled) code block of an answer; the whole answer if it parses as Python."""
    blocks = re.findall(r"```([\w+-]*)[^\n]*\n(.*?)(?:```|$)", text, re.DOTALL)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3", "") and body.strip():
            return body.strip() + "\n"
    try:
        ast.parse(text)
    except SyntaxError:
        return None
    return text.strip() + "\n" if text.strip() else None


def static_errors(code: str) -> list[str]:
    """Parse, compile and lint a solution: syntax errors, fatal pyflakes messages (when installed), no function or
    class defined, input() calls (a test run has no stdin)."""
    try:
        tree = ast.parse(code)
        compile(tree, "solution.py", "exec")
    except SyntaxError as e:
        return [f"SyntaxError: line {e.lineno}: {e.msg}"]
    errors = []
    try:
        from pyflakes.checker import Checker
    except ImportError:
        Checker = None
    if Checker is not None:
        for msg in Checker(tree, filename="solution.py").messages:
            if type(msg).__name__ in _FATAL_PYFLAKES:
                errors.append(f"line {msg.lineno}: {msg.message % msg.message_args}")
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in ast.walk(tree)):
        errors.append("the solution defines no function or class")
    if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "input" for n in ast.walk(tree)):
        errors.append("the solution calls input(); take arguments instead")
    return errors


def tests_usable(tests: str | None) -> bool:
    """Tests that parse and assert something (an assert statement or a unittest-style assert call)."""
    if not tests:
        return False
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return False
    return any(isinstance(n, ast.Assert) or isinstance(n, ast.Call) and getattr(n.func, "attr", "").startswith("assert")
               for n in ast.walk(tree))


def check(code: str | None, tests: str, cfg: CodeConfig) -> list[str]:
    """Everything wrong with a solution: no code, static errors, or the failing test run's stderr."""
    if code is None:
        return ["the answer holds no Python code block"]
    errors = static_errors(code)
    if errors:
        return errors
    result = run_tests(code, tests, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb,
                       allow_unisolated=cfg.allow_unisolated)
    if result.passed:
        return []
    if result.timed_out:
        return [f"the tests timed out after {cfg.timeout_s:g} s"]
    output = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}")
    return [output[-_MAX_ERROR_CHARS:]]


def _ask(teacher: Teacher, dialogs: list[list[dict]], cfg: CodeConfig, seed: int) -> list[str]:
    """One teacher answer per dialog; a plain string is a single user turn."""
    prompts = [[{"role": "user", "content": d}] if isinstance(d, str) else d for d in dialogs]
    s = cfg.sampling
    answers = teacher.complete(prompts, n=1, temperature=s.temperature, top_p=s.top_p,
                               max_new_tokens=s.max_new_tokens, seed=seed)
    return [texts[0] for texts in answers]


def _record(item: dict, teacher: Teacher, index: int) -> dict:
    execution = {"passed": True, "attempts": item["attempts"], "errors": item["history"]}
    return {
        "id": f"synth-code-{index}",
        "messages": [{"role": "user", "content": item["problem"]}, {"role": "assistant", "content": item["answer"]}],
        "source": "synth:code",
        "meta": {"teacher": teacher.name, "code": {"snippet": item["snippet"], "tests": item["tests"]},
                 "qc": {"execution": execution}, "filters_passed": ["execution"]},
    }


def code_dialogs(teacher: Teacher, cfg: CodeConfig, *, seed: int) -> tuple[list[dict], dict]:
    """Passing code dialogs and stats (counts of what each check removed) from the snippets at `cfg.snippets`."""
    if not cfg.snippets:
        raise ValueError("code.snippets: kind=code needs a file or dir of code snippets")
    snippets = load_snippets(cfg.snippets)
    if cfg.num_problems:
        snippets = [random.Random(seed).choice(snippets) for _ in range(cfg.num_problems)]
    problems = _ask(teacher, [PROBLEM.format(snippet=s) for s in snippets], cfg, seed)
    items = [{"snippet": s, "problem": p.strip(), "attempts": 0, "history": []} for s, p in zip(snippets, problems)]
    removed = {"empty_problem": sum(not it["problem"] for it in items)}
    items = [it for it in items if it["problem"]]
    for it, answer in zip(items, _ask(teacher, [it["problem"] for it in items], cfg, seed + 1)):
        it["answer"], it["code"] = answer.strip(), extract_code(answer)
    requests = [TESTS.format(problem=it["problem"], code=(it["code"] or it["answer"]).strip()) for it in items]
    for it, answer in zip(items, _ask(teacher, requests, cfg, seed + 2)):
        it["tests"] = extract_code(answer)
    removed["unusable_tests"] = sum(not tests_usable(it["tests"]) for it in items)
    items = [it for it in items if tests_usable(it["tests"])]
    passed, failing = _run_feedback_loop(items, teacher, cfg, seed)
    removed["execution"] = len(failing)
    fixed = sum(it["attempts"] > 1 for it in passed)
    stats = {"snippets": len(snippets), "removed": removed, "fixed_by_feedback": fixed}
    return [_record(it, teacher, i) for i, it in enumerate(passed)], stats


def _run_feedback_loop(items: list[dict], teacher: Teacher, cfg: CodeConfig,
                       seed: int) -> tuple[list[dict], list[dict]]:
    """Check every solution; feed the errors of failing ones back to the teacher up to max_retries times."""
    passed, failing = [], items
    for retry in range(cfg.max_retries + 1):
        if retry:
            dialogs = [[{"role": "user", "content": it["problem"]}, {"role": "assistant", "content": it["answer"]},
                        {"role": "user", "content": FEEDBACK.format(errors="\n".join(it["errors"]))}] for it in failing]
            for it, answer in zip(failing, _ask(teacher, dialogs, cfg, seed + 2 + retry)):
                it["answer"], it["code"] = answer.strip(), extract_code(answer)
        still = []
        for it in failing:
            it["attempts"] += 1
            it["errors"] = check(it["code"], it["tests"], cfg)
            if it["errors"]:
                it["history"].append(it["errors"][0][-500:])
                still.append(it)
            else:
                passed.append(it)
        failing = still
        if not failing:
            break
    return passed, failing
