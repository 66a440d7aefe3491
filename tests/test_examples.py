"""Every shipped example file loads as what it is there for (a new file must be listed here)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from posttrain.config import from_dict
from posttrain.data import from_openai, from_sharegpt, read_records, validate_messages, validate_record
from rewards.tool_eval import load_eval_set
from rounds.tasks import Task, TaskConfig
from synth.tool_backends import LocalCorpusSearch, PythonFunctions
from synth.tooluse import load_tasks

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _task_config(config: str) -> TaskConfig:
    """The task section of a shipped run config, its file paths taken from the repo root."""
    task = yaml.safe_load((REPO / config).read_text())["task"]
    task = {**task, **{k: [str(REPO / p) for p in task.get(k, [])] for k in ("train", "eval")}}
    return from_dict(TaskConfig, task, source=config)


def _task_records(cfg: TaskConfig):
    def load(path: Path) -> list[dict]:
        split = "eval" if path.name.startswith("eval") else "train"
        return list(Task(cfg)._from_files([str(path)], split))  # each line shaped by the task and validated
    return load


MULTIPLICATION = TaskConfig(template="{question}", train=[str(EXAMPLES / "tasks/multiplication/train.jsonl")],
                            eval=[str(EXAMPLES / "tasks/multiplication/eval.jsonl")])
LOADERS = {
    "dpo-pairs.jsonl": lambda p: read_records(p, "preference", strict=True),
    "prompts-addition.jsonl": lambda p: read_records(p, "prompt", strict=True),
    "sft-addition.jsonl": lambda p: read_records(p, "sft", strict=True),
    "sft-chat.jsonl": lambda p: read_records(p, "sft", strict=True),
    "tasks/chat/train.jsonl": _task_records(_task_config("configs/tasks/style-prefs-3round.yaml")),
    "tasks/chat/eval.jsonl": _task_records(_task_config("configs/tasks/style-prefs-3round.yaml")),
    "tasks/constraints/train.jsonl": _task_records(_task_config("configs/tasks/constraints-3round.yaml")),
    "tasks/constraints/eval.jsonl": _task_records(_task_config("configs/tasks/constraints-3round.yaml")),
    "tasks/multiplication/train.jsonl": _task_records(MULTIPLICATION),
    "tasks/multiplication/eval.jsonl": _task_records(MULTIPLICATION),
    "tasks/tooluse/train.jsonl": _task_records(_task_config("configs/tasks/tooluse-3round.yaml")),
    "tasks/tooluse/eval.jsonl": _task_records(_task_config("configs/tasks/tooluse-3round.yaml")),
    "tools/search_corpus.jsonl": lambda p: LocalCorpusSearch(p).docs,
    "tools/tasks.jsonl": load_tasks,
    "tools/tool_eval.jsonl": load_eval_set,
}


def _functions(path: Path) -> list[str]:
    """The names of the functions, loaded as configs/synth-tooluse.yaml's `tooluse.backends.functions` names them."""
    registry = PythonFunctions(f"{path}:FUNCTIONS").registry
    assert all(callable(fn) for fn in registry.values())
    return sorted(registry)


def _task_input_rows(path: Path) -> list[dict]:
    """The rows of a CSV that a task in examples/tools/tasks.jsonl hands the code interpreter."""
    named = [task for task in load_tasks(EXAMPLES / "tools" / "tasks.jsonl")
             if path.resolve() in {Path(p).resolve() for p in task["files"].values()}]
    assert named, f"{path}: no task in examples/tools/tasks.jsonl names it"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert all(int(row["units"]) > 0 and float(row["price_usd"]) > 0 for row in rows)
    return rows


# files that are not records: how each loads, and what it must hold
OTHER_LOADERS = {
    "tools/functions.py": (_functions, ["convert_currency", "get_weather"]),
    "tools/sales.csv": (lambda p: len(_task_input_rows(p)), 6),
}


def test_every_example_file_has_a_loader():
    shipped = sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    assert shipped == sorted([*LOADERS, *OTHER_LOADERS])


@pytest.mark.parametrize("name", sorted(OTHER_LOADERS))
def test_other_example_loads(name):
    load, expected = OTHER_LOADERS[name]
    assert load(EXAMPLES / name) == expected


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_example_loads_every_line(name):
    path = EXAMPLES / name
    lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    assert len(LOADERS[name](path)) == lines


# docs/formats.md: every JSON example under a heading validates as that heading's record kind
DOC_KINDS = {"SFT records": "sft", "Tool dialogs": "sft", "Prompt records": "prompt", "Preference records": "preference",
             "Samples records": "samples", "ShareGPT and OpenAI messages": "sft"}


def _doc_examples() -> list[tuple[str, dict]]:
    text = (REPO / "docs" / "formats.md").read_text(encoding="utf-8")
    found = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = section.splitlines()[0].split(" (")[0]
        for block in re.findall(r"```json\n(.*?)```", section, flags=re.S):
            found += [(heading, json.loads(line)) for line in block.splitlines() if line.strip()]
    return found


def test_every_record_example_in_the_format_doc_validates():
    examples = _doc_examples()
    assert {h for h, _ in examples} == {"Messages", *DOC_KINDS}
    for heading, raw in examples:
        if heading == "Messages":
            validate_messages([raw])
            continue
        if heading.startswith("ShareGPT"):
            raw = from_sharegpt(raw) if "conversations" in raw else from_openai(raw)
        validate_record(raw, DOC_KINDS[heading], f"docs/formats.md {heading}")
