"""Tool backends: what answers a tool call during tool-use data generation.

Every backend has `call(name, arguments) -> str`, the text of the ipython turn that follows the call, and raises
`ToolError` when the call fails. The local ones work offline:
- `code_interpreter` -> `CodeInterpreter`: the code runs in synth/sandbox.py (refuses without OS isolation unless
  `allow_unisolated`); the dialog's input files (a CSV, say) are in its working directory.
- `brave_search` -> `LocalCorpusSearch`: an OFFLINE stand-in for Brave Search, BM25 over a JSONL corpus of
  {title, url, text}. It searches only that corpus, never the web.
- `wolfram_alpha` -> `SympyMath`: a local SymPy engine for the math questions Wolfram Alpha answers (integrals,
  equations, derivatives, limits, arithmetic), each evaluated in a forked process with a time and memory limit.
- custom functions -> `PythonFunctions` (user-supplied callables, by import path) or `MockFunctions` (canned results,
  nothing executed).
Real services plug in by config: `backends: {brave_search: {target: "my_pkg.brave:BraveSearch", kwargs: {...}}}`.
`Toolbox.execute` checks a call against the tool's JSON schema before any backend sees it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import re
import resource
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from posttrain.config import check_range, field
from posttrain.data import iter_raw
from posttrain.tools import call_name_args, split_tool_definitions
from rewards.verifiable import tool_call_errors
from synth.sandbox import SandboxUnavailable, isolation_available, run_python

MAX_RESULT_CHARS = 4000  # an ipython turn longer than this is cut: the model reads it, it need not read everything


class ToolError(RuntimeError):
    """A tool call that failed: bad arguments, an exception, a timeout. The message is what the model is told."""


class ToolBackend(Protocol):
    def call(self, name: str, arguments: dict) -> str:
        """The result text of one call (the ipython turn); raise ToolError when the call fails."""


@dataclasses.dataclass
class BackendSpec:
    target: str = field("", help="import path of a backend class: 'package.module:Class' or 'path/file.py:Class'")
    kwargs: dict[str, Any] = field(default_factory=dict, help="keyword arguments for the class")


@dataclasses.dataclass
class ToolBackendsConfig:
    search_corpus: str = field("", help="JSONL of {title, url, text}: the offline corpus brave_search searches")
    search_top_k: int = field(3, help="documents a search returns")
    code_timeout_s: float = field(10.0, help="wall-clock limit of one code_interpreter run")
    code_memory_mb: int = field(512, help="address-space limit of one code_interpreter run")
    allow_unisolated: bool = field(False, help="run code without OS isolation where bubblewrap is unavailable")
    math_timeout_s: float = field(10.0, help="wall-clock limit of one wolfram_alpha (SymPy) query")
    functions: str = field("", help="custom functions: import path of a name -> callable mapping or a module "
                                     "('pkg.mod:FUNCTIONS' or 'file.py:FUNCTIONS'); empty = MockFunctions")
    backends: dict[str, BackendSpec] = field(default_factory=dict, help="tool name -> backend class replacing the "
                                                                         "local one (real services)")

    def __post_init__(self):
        check_range("search_top_k", self.search_top_k, low=1)
        check_range("code_timeout_s", self.code_timeout_s, low=0.1)
        check_range("math_timeout_s", self.math_timeout_s, low=0.1)


def load_object(path: str, where: str = "target") -> Any:
    """The object at 'package.module:attr' or 'path/to/file.py:attr'."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{where}: {path!r} is not 'module:attr'")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if spec is None or not Path(module_name).is_file():
            raise ValueError(f"{where}: {module_name}: no such file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise ValueError(f"{where}: {module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + "\n[... output truncated]"


# ---- code_interpreter ------------------------------------------------------------------------------------------------

class CodeInterpreter:
    """Runs the call's code in the sandbox; the result is its stdout (and stderr, if any). Input files sit in the
    working directory under their names."""

    def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 512, allow_unisolated: bool = False,
                 files: Mapping[str, str | bytes | os.PathLike] | None = None):
        if not allow_unisolated and isolation_available() is None:
            raise SandboxUnavailable("code_interpreter: no OS isolation (bubblewrap) here; set "
                                     "tooluse.backends.allow_unisolated: true to run model-written code unisolated")
        self.timeout_s, self.memory_mb, self.allow_unisolated = timeout_s, memory_mb, allow_unisolated
        self.files = dict(files or {})

    def with_files(self, files: Mapping | None) -> CodeInterpreter:
        """The same interpreter seeing `files` (name -> content or host path) in its working directory."""
        return CodeInterpreter(timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                               allow_unisolated=self.allow_unisolated, files=files)

    def call(self, name: str, arguments: dict) -> str:
        result = run_python(arguments["code"], timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                            files=self.files, allow_unisolated=self.allow_unisolated)
        if result.timed_out:
            raise ToolError(f"the code ran longer than {self.timeout_s:g} s and was stopped")
        if result.returncode != 0:
            raise ToolError(_cut(result.stderr.strip() or f"the code exited with status {result.returncode}"))
        out = result.stdout.rstrip("\n") or "(no output)"
        if result.stderr.strip():
            out += "\n[stderr]\n" + result.stderr.strip()
        return _cut(out)


# ---- brave_search, offline -------------------------------------------------------------------------------------------

def _terms(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class LocalCorpusSearch:
    """OFFLINE search: BM25 (k1, b) over a local JSONL corpus of {title, url, text}; never touches the web.

    Stands in for brave_search in tests and offline generation; results come back as JSON
    {"query", "source": "local-corpus", "results": [{"title", "url", "snippet"}]}.
    """

    def __init__(self, corpus: str | Path | list[dict], *, top_k: int = 3, k1: float = 1.5, b: float = 0.75,
                 snippet_chars: int = 400):
        self.docs = list(corpus) if isinstance(corpus, list) else [_document(raw, where)
                                                                   for where, raw in iter_raw(corpus)]
        if not self.docs:
            raise ValueError(f"{corpus}: the search corpus is empty")
        self.top_k, self.k1, self.b, self.snippet_chars = top_k, k1, b, snippet_chars
        self.doc_terms = [Counter(_terms(d["title"] + " " + d["text"])) for d in self.docs]
        self.doc_lengths = [sum(c.values()) for c in self.doc_terms]
        self.avg_length = sum(self.doc_lengths) / len(self.docs)
        df = Counter(term for counts in self.doc_terms for term in counts)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> list[float]:
        """BM25 score of every document for `query`."""
        out = []
        for counts, length in zip(self.doc_terms, self.doc_lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg_length)
            out.append(sum(self.idf.get(t, 0.0) * counts[t] * (self.k1 + 1) / (counts[t] + norm)
                           for t in set(_terms(query)) if counts[t]))
        return out

    def search(self, query: str) -> list[dict]:
        """The top_k documents with a positive score, best first."""
        scores = self.scores(query)
        ranked = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: (-scores[i], i))
        return [self.docs[i] for i in ranked[:self.top_k]]

    def call(self, name: str, arguments: dict) -> str:
        hits = self.search(arguments["query"])
        results = [{"title": d["title"], "url": d["url"], "snippet": d["text"][:self.snippet_chars]} for d in hits]
        return json.dumps({"query": arguments["query"], "source": "local-corpus", "results": results},
                          ensure_ascii=False)


def _document(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object with title, url, text")
    for key in ("title", "url", "text"):
        if not isinstance(raw.get(key), str):
            raise ValueError(f"{where}: {key}: missing or not a string")
    return {"title": raw["title"], "url": raw["url"], "text": raw["text"]}


# ---- wolfram_alpha, local SymPy ---------------------------------------------------------------------------------------

# Only these characters may reach SymPy's parser (it evaluates the text): no quotes, brackets, underscores or
# attribute access, so a query can call nothing but the whitelisted math functions below.
_SAFE_MATH = re.compile(r"[0-9A-Za-z\s+\-*/^().,=!<>]*")
_ATTRIBUTE = re.compile(r"\.\s*[A-Za-z]")
_MATH_FUNCTIONS = ("sin cos tan cot sec csc asin acos atan sinh cosh tanh exp log sqrt cbrt root Abs sign floor "
                   "ceiling factorial binomial gamma gcd lcm Min Max pi E I oo").split()
_PREFIX = re.compile(r"^(?:what is|what's|compute|calculate|evaluate|find)\s+(?:the\s+)?", re.IGNORECASE)
_QUERY_FORMS = [  # (operation, pattern); the first that matches the whole query wins
    ("definite", r"(?:integrate|integral of)\s+(?P<e>.+?)(?:\s+d(?P<v>[a-z]))?\s+from\s+(?P<a>.+?)\s+to\s+(?P<b>.+)"),
    ("indefinite", r"(?:integrate|integral of)\s+(?P<e>.+?)(?:\s+d(?P<v>[a-z]))?"),
    ("solve", r"solve\s+(?P<e>.+?)(?:\s+for\s+(?P<v>[a-z]))?"),
    ("derivative", r"(?:derivative of|differentiate|d/d(?P<v>[a-z]))\s+(?P<e>.+?)(?:\s+with respect to\s+(?P<w>[a-z]))?"),
    ("limit", r"limit(?:\s+of)?\s+(?P<e>.+?)\s+as\s+(?P<v>[a-z])\s*(?:->|approaches|goes to|to)\s*(?P<a>.+)"),
    ("rewrite", r"(?P<op>simplify|factor|expand)\s+(?P<e>.+)"),
]


def _parse_math(text: str):
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, factorial_notation, implicit_application,
                                            implicit_multiplication, parse_expr, standard_transformations)

    text = text.strip()
    if not _SAFE_MATH.fullmatch(text) or _ATTRIBUTE.search(text):
        raise ToolError(f"wolfram_alpha: cannot read {text!r} as math")
    names = {"__builtins__": {}, **{n: getattr(sympy, n) for n in _MATH_FUNCTIONS}, "ln": sympy.log, "e": sympy.E}
    names.update({n: getattr(sympy, n) for n in ("Symbol", "Integer", "Float", "Rational", "Function")})
    transformations = standard_transformations + (implicit_multiplication, implicit_application, convert_xor,
                                                  factorial_notation)
    try:
        return parse_expr(text, global_dict=names, transformations=transformations)
    except (SyntaxError, TypeError, ValueError, AttributeError, sympy.SympifyError) as e:
        raise ToolError(f"wolfram_alpha: cannot read {text!r} as math ({type(e).__name__})") from None


def _variable(expr, name: str | None):
    import sympy

    if name:
        return sympy.Symbol(name)
    free = sorted(expr.free_symbols, key=str)
    return free[0] if len(free) == 1 else sympy.Symbol("x")


def _solve(text: str, var: str | None) -> str:
    import sympy

    equations = []
    for part in re.split(r",|\band\b", text):
        lhs, _, rhs = part.partition("=")
        equations.append(sympy.Eq(_parse_math(lhs), _parse_math(rhs or "0")))
    unknowns = [sympy.Symbol(var)] if var else sorted(set().union(*(e.free_symbols for e in equations)), key=str)
    solutions = sympy.solve(equations, unknowns, dict=True)
    if not solutions:
        return "no solutions"
    return "; ".join(", ".join(f"{k} = {v}" for k, v in sorted(s.items(), key=lambda kv: str(kv[0])))
                     for s in sorted(solutions, key=lambda s: [sympy.default_sort_key(v) for v in s.values()]))


def _math_answer(query: str) -> str:
    """'Input: ...\\nResult: ...' (plus a decimal approximation for inexact numbers) for one math query."""
    import sympy

    text = _PREFIX.sub("", query.strip().rstrip("?").strip())
    for operation, pattern in _QUERY_FORMS:
        m = re.fullmatch(pattern, text, re.IGNORECASE | re.DOTALL)
        if m:
            break
    else:
        operation = "solve" if "=" in text else "evaluate"
        m = re.fullmatch(r"(?P<e>.+)", text, re.DOTALL)
    if operation == "solve":
        return f"Input: solve {m['e']}\nResult: {_solve(m['e'], m.groupdict().get('v'))}"
    expr = _parse_math(m["e"])
    groups = m.groupdict()
    var = _variable(expr, groups.get("v") or groups.get("w"))
    if operation == "definite":
        result = sympy.integrate(expr, (var, _parse_math(m["a"]), _parse_math(m["b"])))
    elif operation == "indefinite":
        result = sympy.integrate(expr, var)
    elif operation == "derivative":
        result = sympy.diff(expr, var)
    elif operation == "limit":
        result = sympy.limit(expr, var, _parse_math(m["a"]))
    elif operation == "rewrite":
        result = getattr(sympy, m["op"].lower())(expr)
    else:
        result = sympy.simplify(expr)
    out = f"Input: {text}\nResult: {result}"
    if result.is_number and result.is_finite and not (result.is_Integer or result.is_Float):  # exact, not whole
        out += f"\nDecimal approximation: {sympy.N(result, 12)}"
    return out


def _child(send, query: str, memory_mb: int) -> None:
    with open("/proc/self/statm") as f:  # the forked child starts with the parent's address space
        used_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used_bytes + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        send.send((True, _math_answer(query)))
    except ToolError as e:
        send.send((False, str(e)))
    except Exception as e:  # noqa: BLE001 - anything SymPy raises is a failed query, reported to the model
        send.send((False, f"wolfram_alpha: could not compute {query!r} ({type(e).__name__}: {e})"))


class SympyMath:
    """A local math engine (SymPy) standing in for wolfram_alpha; no network.

    Understands "integrate EXPR [from A to B]", "solve EQ[, EQ] [for x]", "derivative of EXPR", "limit of EXPR as x
    -> A", "simplify|factor|expand EXPR" and plain expressions ("2^10 + 3*4"); `^` is a power, "2x" a product.
    Each query runs in a forked child (the SymPy parser evaluates text, and 9^9^9 never ends) with a wall-clock
    and memory limit.
    """

    def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 1024):
        import sympy.parsing.sympy_parser  # noqa: F401 - imported once here, so each forked child starts warm

        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def call(self, name: str, arguments: dict) -> str:
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(send, arguments["query"], self.memory_mb), daemon=True)
        proc.start()
        send.close()
        try:
            if not recv.poll(self.timeout_s):
                raise ToolError(f"wolfram_alpha: {arguments['query']!r} took longer than {self.timeout_s:g} s")
            ok, text = recv.recv()
        except EOFError:
            raise ToolError(f"wolfram_alpha: the engine died on {arguments['query']!r} (out of memory?)") from None
        finally:
            proc.kill()
            proc.join()
            recv.close()
        if not ok:
            raise ToolError(text)
        return text


# ---- custom functions ------------------------------------------------------------------------------------------------

def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


class PythonFunctions:
    """Custom functions run by user-supplied Python callables: a name -> callable mapping, or a module whose
    attributes are the functions. An exception in the callable is a failed call."""

    def __init__(self, registry: str | Mapping[str, Callable] | Any):
        self.registry = load_object(registry, "tooluse.backends.functions") if isinstance(registry, str) else registry

    def _lookup(self, name: str) -> Callable:
        fn = self.registry.get(name) if isinstance(self.registry, Mapping) else getattr(self.registry, name, None)
        if not callable(fn):
            raise ToolError(f"{name}: no such function is implemented")
        return fn

    def call(self, name: str, arguments: dict) -> str:
        fn = self._lookup(name)
        try:
            return _cut(_as_text(fn(**arguments)))
        except Exception as e:  # noqa: BLE001 - the user's function failed; the model is told why
            raise ToolError(f"{name} failed: {type(e).__name__}: {e}") from None


def example_value(schema: dict) -> Any:
    """A placeholder value of a JSON schema (the first enum value, 0, "", true, nested objects filled in)."""
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object":
        return {k: example_value(v) for k, v in schema.get("properties", {}).items() if isinstance(v, dict)}
    if kind == "array":
        return [example_value(schema["items"])] if isinstance(schema.get("items"), dict) else []
    return {"string": "", "integer": 0, "number": 0.0, "boolean": True, "null": None}.get(kind)


class MockFunctions:
    """MOCK custom functions: nothing is executed. A call returns the canned result given for that function (a task's
    `mock_results`), else a placeholder built from the definition's `returns` schema, else {"status": "success"}."""

    def __init__(self, definitions: list, canned: Mapping[str, Any] | None = None):
        _, custom = split_tool_definitions(definitions)
        self.definitions = {t["function"]["name"]: t["function"] for t in custom}
        self.canned = dict(canned or {})

    def call(self, name: str, arguments: dict) -> str:
        if name in self.canned:
            return _as_text(self.canned[name])
        returns = self.definitions.get(name, {}).get("returns")
        return _as_text(example_value(returns) if isinstance(returns, dict) else {"status": "success"})


# ---- one dialog's tools ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ToolOutcome:
    name: str
    arguments: dict
    text: str  # the ipython turn: the result, or "Error: ..." for a failed call
    error: str | None = None


class Toolbox:
    """The tools of one dialog: checks each call against its definition, then runs it on its backend."""

    def __init__(self, tools: list, backends: Mapping[str, ToolBackend]):
        self.tools = tools
        self.backends = dict(backends)

    def execute(self, call: dict) -> ToolOutcome:
        try:
            name, arguments = call_name_args(call)
        except ValueError as e:
            return ToolOutcome("", {}, f"Error: {e}", str(e))
        errors = tool_call_errors({"tool_calls": [call]}, self.tools)
        if not errors and name not in self.backends:
            errors = [f"{name}: no backend is configured for this tool"]
        if errors:
            return ToolOutcome(name, arguments, "Error: " + "; ".join(errors), "; ".join(errors))
        try:
            return ToolOutcome(name, arguments, self.backends[name].call(name, arguments))
        except ToolError as e:
            return ToolOutcome(name, arguments, f"Error: {e}", str(e))


class ToolBackends:
    """Backends made from config, shared across dialogs; `toolbox(tools, ...)` binds them to one dialog."""

    def __init__(self, cfg: ToolBackendsConfig):
        self.cfg = cfg
        self._shared: dict[str, ToolBackend] = {}
        self._functions = PythonFunctions(cfg.functions) if cfg.functions else None

    def _builtin(self, name: str) -> ToolBackend:
        if name not in self._shared:
            self._shared[name] = self._make(name)
        return self._shared[name]

    def _make(self, name: str) -> ToolBackend:
        if name in self.cfg.backends:
            spec = self.cfg.backends[name]
            return load_object(spec.target, f"tooluse.backends.backends.{name}.target")(**spec.kwargs)
        if name == "code_interpreter":
            return CodeInterpreter(timeout_s=self.cfg.code_timeout_s, memory_mb=self.cfg.code_memory_mb,
                                   allow_unisolated=self.cfg.allow_unisolated)
        if name == "wolfram_alpha":
            return SympyMath(timeout_s=self.cfg.math_timeout_s)
        if name == "brave_search":
            if not self.cfg.search_corpus:
                raise ValueError("tooluse.backends.search_corpus: brave_search needs a local corpus (JSONL of "
                                 "title/url/text) or a backends.brave_search entry for a real service")
            return LocalCorpusSearch(self.cfg.search_corpus, top_k=self.cfg.search_top_k)
        raise ValueError(f"tooluse.backends.backends.{name}: no backend for {name!r}")

    def toolbox(self, tools: list, *, files: Mapping | None = None, canned: Mapping | None = None) -> Toolbox:
        """Backends for the tools of one dialog; `files` are the code interpreter's inputs, `canned` = function name ->
        the result MockFunctions returns for it (these functions are not executed)."""
        builtins, custom = split_tool_definitions(tools)
        backends: dict[str, ToolBackend] = {name: self._builtin(name) for name in builtins}
        if files and "code_interpreter" in backends and isinstance(backends["code_interpreter"], CodeInterpreter):
            backends["code_interpreter"] = backends["code_interpreter"].with_files(files)
        mock = MockFunctions(custom, canned)
        for tool in custom:
            name = tool["function"]["name"]
            if name in self.cfg.backends:
                backends[name] = self._builtin(name)
            else:  # the task's canned result first, then the configured callables, then a placeholder
                backends[name] = mock if name in (canned or {}) or self._functions is None else self._functions
        return Toolbox(tools, backends)
