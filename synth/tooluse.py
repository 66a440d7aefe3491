"""Tool-use dialogs (Llama 3, §4.3.5): a teacher works through tool-use tasks, every call it makes is executed on the
tool backends, and only dialogs whose calls all parse, validate and run are kept.

    tasks     JSONL seeds: a user query, or a scenario the teacher writes queries for; the tools on offer (builtin
              names and/or JSON function definitions); input files for the code interpreter; the mode (no_tool: an
              easy query answered without tools even though tools are on, single: at least one call, multi: two or
              more calls in sequence); an optional reference answer
    loop      one batched teacher call per step over all live dialogs. A call -> checked against its definition,
              executed, appended with one ipython turn per call; a final answer -> checked, the dialog is done
    failures  an unparseable or invalid call, a failed call, a tool call where none was wanted (or none where one
              was), a wrong answer, no steps left: sent back to the teacher with the error (max_retries), then dropped
Kept dialogs are SFT records with `tools` and `source: "synth:tooluse"`; the teacher's instructions are not in them.
Custom calls are stored structured; they render in `tool_format` (set the SFT stage's tool_format to match).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

from posttrain.chat import parse_completion, system_prompt
from posttrain.config import check_choice, check_range, field
from posttrain.data import RecordError, iter_raw
from posttrain.tokenizer import is_llama3
from posttrain.tools import (BUILTIN_TOOLS, CUSTOM_FORMATS, call_name_args, encode_tool_calls, format_tool_definitions,
                             split_tool_definitions)
from rewards.verifiable import answer_match, tool_call_errors
from synth.teacher import SamplingConfig, Teacher
from synth.tool_backends import ToolBackends, ToolBackendsConfig, Toolbox

MODES = ("no_tool", "single", "multi")
MIN_CALL_TURNS = {"no_tool": 0, "single": 1, "multi": 2}
MAX_DROPPED_SHOWN = 20  # dropped dialogs listed (with reason and error) in the manifest

CALL_FORMS = {
    "brave_search": '<|python_tag|>brave_search.call(query="...")',
    "wolfram_alpha": '<|python_tag|>wolfram_alpha.call(query="...")',
    "code_interpreter": "<|python_tag|> followed by Python code that prints what you need",
    "json": '{"name": "function_name", "parameters": {"argument": "value"}}',
    "function_tag": '<function=function_name>{"argument": "value"}</function>',
    "pythonic": '[function_name(argument="value")]',
}
MODE_HINTS = {
    "no_tool": "This request is easy: answer it directly from what you know, without calling any tool.",
    "single": "Use the tools to answer: make the call(s) you need, then answer from their results.",
    "multi": "Work step by step: make at least two tool calls, one after another (each using what the previous one "
             "returned), then give the final answer.",
}
GUIDE = """You are an assistant that can call tools. To call a tool, reply with the call only, nothing before or after it:
{forms}
The result comes back in the next turn. Then make another call, or give your final answer to the user in plain text.
{hint}"""
QUERIES = """Write {n} different requests that a user might send to an AI assistant that has these tools:
{tools}
Scenario: {scenario}
{hint}
Write one request per line, with no numbering and nothing else."""
QUERY_HINTS = {
    "no_tool": "Each request must be easy: answerable from general knowledge in a sentence, with no tool needed.",
    "single": "Each request must need one of the tools to answer well.",
    "multi": "Each request must need two or more tool calls in sequence (the second depends on the first's result).",
}
FEEDBACK = {
    "unparseable_call": "Your tool call could not be parsed. Reply with the call alone, exactly in the format given.",
    "invalid_call": "Your tool call is invalid: {error}\nCall the tool again with valid arguments.",
    "call_failed": "The tool call failed:\n{error}\nFix the call and try again.",
    "unexpected_tool_call": "This request needs no tool. Answer it directly, without calling any tool.",
    "no_tool_call": "Do not answer from memory: call a tool first.",
    "too_few_calls": "Use at least {min_calls} tool calls, one after another, before giving the final answer.",
    "wrong_answer": "That answer is not correct. Check the tool results and answer again.",
    "empty_answer": "Your reply was empty. Answer the user.",
    "max_steps": "No more tool calls: give the final answer now, from the results you have.",
}
FILE_NOTE = 'The file "{name}" is in the working directory of the code interpreter.'
_CALL_LIKE = re.compile(r"<\|python_tag\|>|<function=|(?:brave_search|wolfram_alpha)\.call\(|^\s*\[\s*[A-Za-z_]\w*\("
                        r"|^\s*\{\s*\"(?:name|type|function)\"", re.MULTILINE)


@dataclasses.dataclass
class ToolUseConfig:
    tasks: str = field("", help="JSONL of tool-use task seeds (query or scenario, tools, mode, files, answer)")
    tool_format: str = field("json", help="how custom calls are written: json, function_tag, pythonic (match the "
                                          "SFT stage's tool_format)")
    queries_per_scenario: int = field(2, help="user queries the teacher writes for each scenario task")
    max_steps: int = field(4, help="assistant turns per dialog (tool calls plus the final answer)")
    max_retries: int = field(1, help="corrections per dialog (errors sent back to the teacher) before it is dropped")
    sampling: SamplingConfig = field(default_factory=SamplingConfig, help="teacher sampling for queries and turns")
    backends: ToolBackendsConfig = field(default_factory=ToolBackendsConfig, help="what executes the tool calls")

    def __post_init__(self):
        check_choice("tool_format", self.tool_format, CUSTOM_FORMATS)
        check_range("queries_per_scenario", self.queries_per_scenario, low=1)
        check_range("max_steps", self.max_steps, low=1)
        check_range("max_retries", self.max_retries, low=0)


# ---- tasks -----------------------------------------------------------------------------------------------------------

def _task(raw, where: str, base_dir: Path) -> dict:
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected a task object")
    texts = [key for key in ("query", "scenario") if isinstance(raw.get(key), str) and raw[key].strip()]
    if len(texts) != 1:
        raise RecordError(f"{where}: query: give exactly one of query (the user turn) or scenario (the teacher "
                          "writes queries for it)")
    try:
        builtins, _ = split_tool_definitions(raw.get("tools"), "tools")
    except ValueError as e:
        raise RecordError(f"{where}: {e}") from None
    if not raw["tools"]:
        raise RecordError(f"{where}: tools: empty; a tool-use task offers at least one tool")
    mode = raw.get("mode", "single")
    if mode not in MODES:
        raise RecordError(f"{where}: mode: {mode!r} is not one of {', '.join(MODES)}")
    files = raw.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise RecordError(f"{where}: files: expected a mapping of file name -> path (relative to the tasks file)")
    if files and "code_interpreter" not in builtins:
        raise RecordError(f"{where}: files: input files need code_interpreter among the tools")
    paths = {name: base_dir / path for name, path in files.items()}
    for name, path in paths.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise RecordError(f"{where}: files.{name}: a file name must stay inside the working directory")
        if not path.is_file():
            raise RecordError(f"{where}: files.{name}: {path}: no such file")
    for key, kind in (("mock_results", dict), ("system", str), ("num_queries", int)):
        if key in raw and not isinstance(raw[key], kind):
            raise RecordError(f"{where}: {key}: expected {kind.__name__}")
    task = {k: v for k, v in raw.items() if k not in ("query", "scenario") or k == texts[0]}
    return {**task, "id": str(raw.get("id", f"line{where.rsplit(':', 1)[-1]}")), "mode": mode, "files": paths}


def load_tasks(path: str | Path) -> list[dict]:
    """Validated task seeds; file paths resolved against the tasks file's directory."""
    base_dir = Path(path).parent
    return [_task(raw, where, base_dir) for where, raw in iter_raw(path)]


def _describe_tools(tools: list) -> str:
    builtins, custom = split_tool_definitions(tools)
    about = {"brave_search": "web search", "wolfram_alpha": "math engine", "code_interpreter": "runs Python code"}
    lines = [f"- {name}: {about[name]}" for name in builtins]
    return "\n".join(lines + [f"- {t['function']['name']}: {t['function'].get('description', '')}" for t in custom])


def _query_lines(text: str, n: int) -> list[str]:
    lines = [re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line).strip().strip('"') for line in text.splitlines()]
    return [line for line in lines if len(line) >= 8][:n]


def expand_queries(tasks: list[dict], teacher: Teacher, cfg: ToolUseConfig, seed: int) -> tuple[list[dict], int]:
    """One task per user query: scenario tasks become `num_queries` teacher-written queries. Returns (tasks, number
    of scenarios for which the teacher wrote no usable query)."""
    scenarios = [i for i, t in enumerate(tasks) if "query" not in t]
    prompts = [[{"role": "user", "content": QUERIES.format(n=tasks[i].get("num_queries", cfg.queries_per_scenario),
                                                            tools=_describe_tools(tasks[i]["tools"]),
                                                            scenario=tasks[i]["scenario"],
                                                            hint=QUERY_HINTS[tasks[i]["mode"]])}] for i in scenarios]
    written = dict(zip(scenarios, _complete(teacher, prompts, cfg.sampling, seed))) if scenarios else {}
    out, empty = [], 0
    for i, task in enumerate(tasks):
        if i not in written:
            out.append(task)
            continue
        queries = _query_lines(written[i], task.get("num_queries", cfg.queries_per_scenario))
        empty += not queries
        out += [{**task, "id": f"{task['id']}-q{j}", "query": q} for j, q in enumerate(queries)]
    return out, empty


# ---- dialogs ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Dialog:
    task: dict
    messages: list[dict]  # the dialog being kept: [system], user, then (assistant call, ipython results)*, answer
    toolbox: Toolbox
    call_turns: int = 0
    retries: int = 0
    fix: list[dict] = dataclasses.field(default_factory=list)  # [bad turn, feedback]: shown to the teacher once
    errors: list[str] = dataclasses.field(default_factory=list)  # "reason: detail" of every failure, in order
    done: bool = False
    dropped: str | None = None


def start_dialog(task: dict, backends: ToolBackends) -> Dialog:
    """The opening of a task's dialog (its system text, the user query with a note per input file) and its tools."""
    query = task["query"].strip()
    if task["files"]:
        query += "\n\n" + "\n".join(FILE_NOTE.format(name=name) for name in task["files"])
    messages = [{"role": "system", "content": task["system"]}] if task.get("system") else []
    messages.append({"role": "user", "content": query})
    toolbox = backends.toolbox(task["tools"], files=task["files"], canned=task.get("mock_results"))
    return Dialog(task, messages, toolbox)


def guide(tools: list, fmt: str, mode: str) -> str:
    """The teacher's instructions: how to write each offered kind of call, and what the task wants."""
    builtins, custom = split_tool_definitions(tools)
    forms = [CALL_FORMS[name] for name in BUILTIN_TOOLS if name in builtins] + ([CALL_FORMS[fmt]] if custom else [])
    return GUIDE.format(forms="\n".join(f"  {f}" for f in forms), hint=MODE_HINTS[mode])


def _teacher_turn(message: dict, fmt: str, native: bool) -> dict:
    """An assistant call turn as the teacher sees it: structured for a Llama 3 teacher where its renderer writes the
    calls in `fmt` (builtin tools, json); as text otherwise (a ChatML template does not render tool calls)."""
    calls = message.get("tool_calls")
    builtin_only = calls and all(call_name_args(c)[0] in BUILTIN_TOOLS for c in calls)
    if not calls or (native and (fmt == "json" or builtin_only)):
        return message
    return {"role": "assistant", "content": message["content"] + encode_tool_calls(calls, fmt)}


def teacher_prompt(d: Dialog, fmt: str, native: bool) -> list[dict]:
    """The messages the teacher continues: tool system prompt with the guide, function definitions, the dialog so far,
    and the last failed turn with its feedback when a correction is due."""
    tools = d.task["tools"]
    own = d.messages[0]["content"] if d.messages[0]["role"] == "system" else ""
    body = d.messages[1:] if own else d.messages
    system = "\n\n".join(s for s in (guide(tools, fmt, d.task["mode"]), own) if s)
    prompt = [{"role": "system", "content": system_prompt(tools, system, tool_format=fmt)}]
    if fmt != "pythonic" and format_tool_definitions(tools, fmt):
        prompt.append({"role": "user", "content": format_tool_definitions(tools, fmt)})
    return prompt + [_teacher_turn(m, fmt, native) for m in body] + d.fix


def answer_ok(text: str, answer) -> bool:
    """The reply's final answer matches (numbers within tolerance), or a text answer appears in it as whole words."""
    if answer_match(text, answer):
        return True
    return isinstance(answer, str) and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.IGNORECASE) is not None


def _final_answer(d: Dialog, message: dict) -> tuple[str, str] | None:
    content = message["content"].strip()
    if not content:
        return "empty_answer", "the reply is empty"
    need = MIN_CALL_TURNS[d.task["mode"]]
    if d.call_turns < need:
        reason = "no_tool_call" if d.call_turns == 0 else "too_few_calls"
        return reason, f"answered after {d.call_turns} tool call turn(s); the task needs {need}"
    if "answer" in d.task and not answer_ok(content, d.task["answer"]):
        return "wrong_answer", f"the final answer does not match {d.task['answer']!r}"
    d.messages.append({"role": "assistant", "content": content})
    d.done = True
    return None


def review(d: Dialog, text: str, cfg: ToolUseConfig) -> tuple[str, str] | None:
    """Take the teacher's reply into the dialog: execute its calls or accept its answer. Returns (reason, detail) of
    what is wrong with it instead, leaving the dialog unchanged."""
    message = parse_completion(text)
    calls = message.get("tool_calls")
    if not calls:
        if _CALL_LIKE.search(text):
            return "unparseable_call", "the reply looks like a tool call but does not parse as one"
        return _final_answer(d, message)
    if d.task["mode"] == "no_tool":
        return "unexpected_tool_call", f"called {', '.join(call_name_args(c)[0] for c in calls)}"
    if d.call_turns + 1 >= cfg.max_steps:
        return "max_steps", f"no turn left for the final answer after {d.call_turns} tool call turn(s)"
    errors = tool_call_errors(message, d.task["tools"])
    if not errors:
        try:
            encode_tool_calls(calls, cfg.tool_format)
        except ValueError as e:  # e.g. code_interpreter beside another call: the turn cannot be rendered
            errors.append(str(e))
    if errors:
        return "invalid_call", "; ".join(errors)
    outcomes = [d.toolbox.execute(call) for call in calls]
    failed = [o for o in outcomes if o.error]
    if failed:
        return "call_failed", f"{failed[0].name}: {failed[0].error}"
    d.messages.append({"role": "assistant", "content": message["content"].strip(), "tool_calls": calls})
    d.messages += [{"role": "ipython", "content": o.text} for o in outcomes]
    d.call_turns += 1
    return None


def _fail(d: Dialog, text: str, reason: str, detail: str, max_retries: int, stats: dict) -> None:
    """Send the failure back to the teacher when retries are left, else drop the dialog."""
    d.errors.append(f"{reason}: {detail}")
    if d.retries < max_retries:
        d.retries += 1
        stats["corrections"][reason] += 1
        feedback = FEEDBACK[reason].format(error=detail, min_calls=MIN_CALL_TURNS[d.task["mode"]])
        d.fix = [{"role": "assistant", "content": text}, {"role": "user", "content": feedback}]
        return
    d.dropped = reason
    stats["removed"][reason] += 1
    if len(stats["dropped"]) < MAX_DROPPED_SHOWN:
        stats["dropped"].append({"task": d.task["id"], "reason": reason, "detail": detail[-500:]})


def _complete(teacher: Teacher, prompts: list[list[dict]], s: SamplingConfig, seed: int) -> list[str]:
    return [texts[0] for texts in teacher.complete(prompts, n=1, temperature=s.temperature, top_p=s.top_p,
                                                   max_new_tokens=s.max_new_tokens, seed=seed)]


def run_dialogs(dialogs: list[Dialog], teacher: Teacher, cfg: ToolUseConfig, seed: int, stats: dict) -> None:
    """Advance every dialog one teacher turn per step (one batched call) until each is done or dropped."""
    tokenizer = getattr(teacher, "tokenizer", None)
    native = tokenizer is not None and is_llama3(tokenizer)
    live = list(dialogs)
    for step in range(cfg.max_steps + cfg.max_retries):
        if not live:
            break
        texts = _complete(teacher, [teacher_prompt(d, cfg.tool_format, native) for d in live], cfg.sampling,
                          seed + step)
        for d, text in zip(live, texts, strict=True):
            d.fix = []
            failure = review(d, text, cfg)
            if failure:
                _fail(d, text, *failure, cfg.max_retries, stats)
        live = [d for d in live if not d.done and d.dropped is None]
    # each step adds a call turn (at most max_steps - 1), ends the dialog, or spends a retry
    assert not live, "a dialog outlived max_steps + max_retries teacher turns"


def _record(d: Dialog, teacher: Teacher, cfg: ToolUseConfig) -> dict:
    execution = {"passed": True, "call_turns": d.call_turns, "retries": d.retries, "errors": d.errors}
    return {
        "id": f"synth-tooluse-{d.task['id']}",
        "messages": d.messages,
        "tools": d.task["tools"],
        "source": "synth:tooluse",
        "meta": {"teacher": teacher.name, "task": d.task["id"], "mode": d.task["mode"],
                 "tool_format": cfg.tool_format, "files": sorted(d.task["files"]),
                 "backends": {name: type(b).__name__ for name, b in d.toolbox.backends.items()},
                 "qc": {"execution": execution}, "filters_passed": ["execution"]},
    }


def tool_dialogs(teacher: Teacher, cfg: ToolUseConfig, *, seed: int) -> tuple[list[dict], dict]:
    """Executed, validated tool-use dialogs (SFT records) and stats: what was dropped and why, what was corrected."""
    if not cfg.tasks:
        raise ValueError("tooluse.tasks: kind=tooluse needs a JSONL file of task seeds")
    tasks = load_tasks(cfg.tasks)
    backends = ToolBackends(cfg.backends)
    tasks, empty_scenarios = expand_queries(tasks, teacher, cfg, seed)
    dialogs = [start_dialog(task, backends) for task in tasks]
    stats = {"removed": Counter(), "corrections": Counter(), "dropped": []}
    if empty_scenarios:
        stats["removed"]["no_query"] = empty_scenarios
    run_dialogs(dialogs, teacher, cfg, seed + 1, stats)
    kept = [d for d in dialogs if d.done]
    calls = Counter(call_name_args(c)[0] for d in kept for m in d.messages for c in m.get("tool_calls") or [])
    return [_record(d, teacher, cfg) for d in kept], {
        "tasks": len(tasks),
        "dialogs": len(dialogs),
        "kept": len(kept),
        "removed": dict(stats["removed"]),
        "corrections": dict(stats["corrections"]),
        "corrected": sum(d.retries > 0 for d in kept),
        "calls_by_tool": dict(sorted(calls.items())),
        "by_mode": dict(Counter(d.task["mode"] for d in kept)),
        "dropped": stats["dropped"],
    }


def build_dialogs(cfg, teacher: Teacher, judge: Teacher) -> tuple[list[dict], dict]:
    """The synth pipeline's `tooluse` builder: `cfg` is a SynthConfig; reads cfg.tooluse and cfg.seed."""
    return tool_dialogs(teacher, cfg.tooluse, seed=cfg.seed)
