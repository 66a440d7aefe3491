"""The synth stage end to end: scripted teachers for exact accounting, then SmolLM2 through the CLI and into SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config import ConfigError, load_config
from posttrain.data import read_records
from synth.pipeline import SynthConfig, run, synthesize
from synth.sandbox import isolation_available
from synth.teacher import ScriptedTeacher

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "synth-quickstart.yaml"
EVAL_QUESTION = ("Natalia sold clips to forty eight of her friends in April and then she sold half as many clips "
                 "in May how many clips did Natalia sell altogether in April and May")
PHOTO = "Explain how photosynthesis turns sunlight, water and carbon dioxide into glucose in green plants."


def _config(tmp_path, **kw) -> SynthConfig:
    data = {"output_dir": str(tmp_path / "out"), "teacher": {"path": "not-loaded-in-this-test"},
            "prompts": {"method": "magpie", "num_prompts": 5}, "responses": {"k": 1, "select": "first"},
            "curate": {"judge": {"require_high_quality": False}, "dedup": {"threshold": 0.8}}}
    return load_config(SynthConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**data, **kw}.items()])


def test_scripted_run_writes_records_and_counts_every_filter(tmp_path):
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(EVAL_QUESTION + "\n")
    cfg = _config(tmp_path, curate={"judge": {"require_high_quality": False}, "dedup": {"threshold": 0.8},
                                    "decontam": {"eval_sets": [str(eval_file)]}})
    teacher = ScriptedTeacher([
        PHOTO, PHOTO.replace("Explain how", "Explain briefly how"), "Write a haiku about the sea at night.",
        f"Solve: {EVAL_QUESTION}", "Say something nice to me.",                       # Magpie prompts
        "Plants use light energy to turn water and CO2 into glucose and oxygen.",
        "Plants use light energy to turn water and CO2 into glucose and oxygen.",
        "Waves hum softly / under a silver moon / the tide breathes slowly",
        "72 clips.", "Wow!!! You are amazing!!! Truly!!!",                             # answers
    ], name="scripted-teacher")
    judge = ScriptedTeacher([
        "Accuracy: 1\nInstruction following: 1\nTone: 0\nScore: 2/3", "Score: 3/3", "I like this poem.",  # quality
        "Difficulty: 2", "Difficulty: 2", "Difficulty: 1",                                            # difficulty
        '{"topic": "biology", "intents": ["explain process"]}', '{"topic": "biology", "intents": []}',
        "Topic: poetry\nIntents: write poem",                                                         # tags
    ], name="scripted-judge")
    manifest = synthesize(cfg, teacher, judge)
    assert teacher.remaining == 0 and judge.remaining == 0

    out = Path(cfg.output_dir)
    records = read_records(out / "sft.jsonl", "sft")
    assert [r["id"] for r in records] == ["synth-general-magpie-1", "synth-general-magpie-2"]
    assert records[0]["source"] == "synth:general" and records[0]["meta"]["teacher"] == "scripted-teacher"
    assert records[0]["meta"]["filters_passed"] == ["rules", "decontam", "high_quality", "dedup"]
    assert set(records[0]["meta"]["qc"]) == {"select", "rules", "decontam", "judge_quality", "judge_difficulty",
                                            "tags", "high_quality", "dedup"}
    assert manifest["generated"] == 5 and manifest["kept"] == 2
    assert manifest["removed"] == {"schema": 0, "rules": 1, "decontam": 1, "high_quality": 0, "dedup": 1}
    assert manifest["judge_unparseable"] == {"quality": 1, "difficulty": 0, "tags": 0, "select": 0}
    assert manifest["stats"]["prompts"] == {"sampled": 5, "kept": 5}
    assert json.loads((out / "manifest.json").read_text())["removed"] == manifest["removed"]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["meta"]["removed_by"]) for r in removed) == [
        ("synth-general-magpie-0", "dedup"), ("synth-general-magpie-3", "decontam"), ("synth-general-magpie-4", "rules")]
    assert (out / "DONE").is_file()
    # same config, DONE: run() returns the manifest without loading the (nonexistent) teacher
    assert run(cfg)["kept"] == 2


def test_code_kind_dispatches_to_the_execution_loop_and_judges_with_the_code_rubric(tmp_path):
    snippets = tmp_path / "snippets.jsonl"
    snippets.write_text('{"code": "x = 1"}\n{"code": "y = 2"}\n')
    cfg = _config(tmp_path, kind="code", code={"snippets": str(snippets), "max_retries": 0,
                                                "allow_unisolated": isolation_available() is None},
                  curate={"judge": {"require_high_quality": True}})
    solution = "```python\ndef double(x):\n    return 2 * x\n```"
    teacher = ScriptedTeacher(["Write double(x).", "Write triple(x).", solution, solution,
                               "```python\nassert double(2) == 4\n```", "```python\nassert triple(2) == 6\n```"])
    judge = ScriptedTeacher(["Bugs: 1\nIntent: 1\nScore: 2/2", "Difficulty: 1", '{"topic": "code", "intents": []}'])
    manifest = synthesize(cfg, teacher, judge)
    assert "Score: <total>/2" in judge.calls[0][0][0][0]["content"]
    assert manifest["removed"] == {"empty_problem": 0, "unusable_tests": 0, "execution": 1, "schema": 0, "rules": 0,
                                   "high_quality": 0, "dedup": 0}
    (record,) = read_records(Path(cfg.output_dir) / "sft.jsonl", "sft")
    assert record["source"] == "synth:code"
    assert record["meta"]["filters_passed"] == ["execution", "rules", "high_quality", "dedup"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="kind: 'poetry' is not one of"):
        _config(tmp_path, kind="poetry")
    with pytest.raises(ConfigError, match="curate.judge.require_high_quality"):
        _config(tmp_path, curate={"judge": {"enabled": False, "require_high_quality": True}})
    with pytest.raises(ConfigError, match="responses.reward_model"):
        _config(tmp_path, responses={"select": "rm"})
    cfg = load_config(SynthConfig, QUICKSTART)
    assert (cfg.teacher.path, cfg.prompts.method, cfg.responses.k) == ("smollm2-135m-instruct", "magpie", 2)


@pytest.mark.slow
def test_smollm2_synth_cli_records_train_with_sft(smollm2_dir, tmp_path):
    from posttrain import sft
    from posttrain.cli import main
    from posttrain.config import LoRAConfig, ModelConfig, TrainConfig

    out = tmp_path / "synth"
    assert main(["synth", str(QUICKSTART), f"output_dir={out}", f"teacher.path={smollm2_dir}", "prompts.num_prompts=2",
                 "prompts.sampling.max_new_tokens=16", "responses.sampling.max_new_tokens=16",
                 "curate.judge.max_new_tokens=8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    records = read_records(out / "sft.jsonl", "sft")
    assert len(records) == manifest["kept"] >= 1
    assert set(manifest["removed"]) == {"schema", "rules", "high_quality", "dedup"}
    assert manifest["generated"] - sum(manifest["removed"].values()) == manifest["kept"]
    assert set(manifest["judge_unparseable"]) == {"quality", "difficulty", "tags", "select"}
    assert all(r["source"] == "synth:general" and r["messages"][-1]["role"] == "assistant" for r in records)

    cfg = sft.SFTStageConfig(
        model=ModelConfig(path=str(smollm2_dir), dtype="float32"), lora=LoRAConfig(r=8, alpha=16),
        train=TrainConfig(output_dir=str(tmp_path / "sft"), max_steps=1, batch_size=1, max_length=256,
                          logging_steps=1, report_to=["none"]),
        data=[sft.DataSourceConfig(path=str(out / "sft.jsonl"))], truncation="truncate")
    metrics = sft.train(cfg)
    assert metrics["steps"] == 1 and metrics["tokens_trained"] > 0
