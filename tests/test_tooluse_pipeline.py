"""`posttrain synth` with kind=tooluse: the shipped config with a scripted teacher (dialogs kept, one corrected, one
dropped, all mixing into SFT), and a short real run with SmolLM2 as teacher (what it drops, and why, is recorded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import from_dict
from posttrain.sft import IGNORE_INDEX, SFTStageConfig, render_sources
from posttrain.tokenizer import END_HEADER, EOM, EOT, PYTHON_TAG, START_HEADER
from synth import pipeline
from synth.sandbox import isolation_available
from synth.teacher import ScriptedTeacher
from synth.tooluse import FEEDBACK

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "synth-tooluse.yaml"
REASONS = set(FEEDBACK) | {"no_query"}

# The shipped tasks in order: eiffel, integral, csv, weather, currency, everest, capital, then the scenario's 2 queries.
SCRIPT = [
    "What's the weather like in Tokyo?\nIs it raining in Berlin right now?",  # the scenario's queries
    # step 0
    '<|python_tag|>brave_search.call(query="Eiffel Tower height")',
    '<|python_tag|>wolfram_alpha.call(query="integrate x^2 from 0 to 3")',
    '<|python_tag|>import csv\nprint(sum(int(r["units"]) for r in csv.DictReader(open("sales.csv"))))',
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    '{"name": "convert_currency", "parameters": {"amount": 250, "from_currency": "USD", "to_currency": "EURO"}}',
    '<|python_tag|>brave_search.call(query="Mount Everest height")',
    "The capital of France is Paris.",
    '{"name": "get_weather", "parameters": {"city": "Tokyo"}}',
    "I think it is raining.",  # no call: sent back once
    # step 1
    "The Eiffel Tower is 330 metres tall.",
    "The integral of x^2 from 0 to 3 is 9.",
    "685 units were sold in total.",
    "It is 18 °C and cloudy in Paris.",
    '{"name": "convert_currency", "parameters": {"amount": 250, "from_currency": "USD", "to_currency": "EUR"}}',
    '<|python_tag|>brave_search.call(query="Eiffel Tower height")',
    "It is sunny and 24 °C in Tokyo.",
    "Probably raining.",  # still no call: dropped
    # step 2
    "250 US dollars is 230 euros.",
    '<|python_tag|>wolfram_alpha.call(query="8848.86 / 330")',
    # step 3
    "About 26.8 Eiffel Towers stacked up reach the top of Mount Everest.",
]


def test_scripted_run_through_the_cli(tmp_path, monkeypatch, llama3_tokenizer):
    teacher = ScriptedTeacher(SCRIPT)
    monkeypatch.setattr(pipeline, "_load_teacher", lambda model, batch_size: teacher)
    monkeypatch.chdir(ROOT)  # the shipped config names its example files relative to the repository
    out = tmp_path / "out"
    overrides = [f"output_dir={out}", "teacher.path=scripted"]
    if isolation_available() is None:
        overrides.append("tooluse.backends.allow_unisolated=true")
    assert main(["synth", str(CONFIG), *overrides]) == 0
    assert teacher.remaining == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "DONE").is_file()
    assert (manifest["kind"], manifest["generated"], manifest["kept"]) == ("tooluse", 8, 8)
    assert manifest["removed"]["no_tool_call"] == 1
    stats = manifest["stats"]
    assert stats["corrections"] == {"call_failed": 1, "no_tool_call": 1}
    assert stats["corrected"] == 1
    assert stats["calls_by_tool"] == {"brave_search": 3, "code_interpreter": 1, "convert_currency": 1,
                                      "get_weather": 2, "wolfram_alpha": 2}
    assert stats["dropped"] == [{"task": "travel-scenario-q1", "reason": "no_tool_call",
                                 "detail": "answered after 0 tool call turn(s); the task needs 1"}]

    records = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert {r["source"] for r in records} == {"synth:tooluse"}
    by_id = {r["id"]: r for r in records}
    assert by_id["synth-tooluse-code-csv"]["messages"][2] == {"role": "ipython", "content": "685"}
    assert json.loads(by_id["synth-tooluse-weather-json"]["messages"][2]["content"]) == {
        "city": "Paris", "temperature": 18, "unit": "celsius", "condition": "cloudy"}  # examples/tools/functions.py
    _mixes_into_sft(tmp_path, out / "sft.jsonl", llama3_tokenizer)


def _mixes_into_sft(tmp_path, tool_records: Path, tokenizer) -> None:
    """The tool-use records render as SFT rows beside another source: calls trained up to <|eom_id|>, results not."""
    cfg = from_dict(SFTStageConfig, {"model": {"path": "tiny"}, "train": {"output_dir": str(tmp_path / "sft")},
                                     "data": [{"path": str(tool_records)},
                                              {"path": str(ROOT / "examples" / "sft-addition.jsonl"),
                                               "max_records": 2}]})
    rows, _, _ = render_sources(cfg, tokenizer)
    assert len(rows) == 10
    tool_rows = [r for r in rows if PYTHON_TAG in r["input_ids"]]
    assert len(tool_rows) == 7  # all but the easy query: builtin, code and JSON calls start with the python tag
    header = [START_HEADER, *tokenizer.encode("ipython", add_special_tokens=False), END_HEADER]
    for row in tool_rows:
        ids, labels = row["input_ids"], row["labels"]
        assert labels[ids.index(PYTHON_TAG)] == PYTHON_TAG and labels[ids.index(EOM)] == EOM
        starts = [i for i in range(len(ids)) if ids[i:i + len(header)] == header]
        assert starts
        for start in starts:  # the whole ipython turn, header to <|eot_id|>, is untrained
            end = ids.index(EOT, start)
            assert all(label == IGNORE_INDEX for label in labels[start:end + 1])


@pytest.mark.slow
def test_smollm2_teacher_run(tmp_path, smollm2_dir):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in [
        {"id": "eiffel", "query": "How tall is the Eiffel Tower?", "tools": ["brave_search"]},
        {"id": "capital", "query": "What is the capital of France?", "tools": ["brave_search"], "mode": "no_tool"},
    ]))
    out = tmp_path / "out"
    assert main(["synth", str(CONFIG), f"output_dir={out}", f"teacher.path={smollm2_dir}", f"tooluse.tasks={tasks}",
                 f"tooluse.backends.search_corpus={ROOT / 'examples/tools/search_corpus.jsonl'}",
                 "tooluse.max_steps=2", "tooluse.max_retries=0", "tooluse.sampling.max_new_tokens=24",
                 "tooluse.sampling.temperature=0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["stats"]
    dropped_by_builder = {k: v for k, v in manifest["removed"].items() if k in REASONS}
    # every dialog is accounted for: kept by the builder, or dropped with a known reason and what went wrong
    assert stats["dialogs"] == 2 == manifest["generated"] + sum(dropped_by_builder.values())
    assert len(stats["dropped"]) == sum(dropped_by_builder.values())
    assert all(d["reason"] in REASONS and d["detail"] for d in stats["dropped"])
    assert manifest["teacher"] == str(smollm2_dir)
    for line in (out / "sft.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["source"] == "synth:tooluse" and record["meta"]["qc"]["execution"]["passed"]
        assert record["tools"] == ["brave_search"]
        roles = [m["role"] for m in record["messages"]]
        for i, message in enumerate(record["messages"]):
            if message.get("tool_calls"):
                assert roles[i + 1] == "ipython"
