"""A battery of bad inputs through the real `posttrain` entry point, across every stage and `run`.

Each one must exit 2 with a single `posttrain STAGE: error: ...` line (`config error:` for the config) that names
the file, line or key at fault, print no traceback, write nothing and delete nothing. Almost all of them fail at
config or data load, before any model is built, so the battery stays fast.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main

SFT_OK = {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
SFT_OK2 = {"id": "b", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
PAIR_OK = {"id": "p1", "prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
PAIR_OK2 = {"id": "p2", "prompt": "What is 3+3?", "chosen": "6.", "rejected": "7."}
PROMPT_OK = {"id": "q1", "messages": [{"role": "user", "content": "What is 2+2?"}]}
MODEL = {"path": "tiny", "dtype": "float32"}
TRAIN = {"output_dir": "out", "max_steps": 1, "batch_size": 2, "max_length": 64, "report_to": ["none"]}


def jsonl(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def base_config(stage: str) -> dict:
    """A config for `stage` that is fine apart from what a case changes (paths relative to the case's dir)."""
    return {
        "sft": {"model": MODEL, "lora": {"r": 4, "alpha": 8}, "train": TRAIN, "data": [{"path": "data.jsonl"}]},
        "dpo": {"model": MODEL, "lora": {"r": 4, "alpha": 8}, "train": TRAIN, "data": [{"path": "data.jsonl"}]},
        "rm": {"model": MODEL, "lora": {"r": 4, "alpha": 8}, "train": TRAIN, "data": ["data.jsonl"],
               "eval_fraction": 0.0},
        "sample": {"policy": MODEL, "prompts": ["data.jsonl"], "output_dir": "out", "k": 2,
                   "rewards": [{"kind": "answer"}]},
        "synth": {"output_dir": "out"},
        "eval": {"policy": MODEL},
        "run": {"name": "r", "runs_dir": "out", "model": MODEL},
        "inspect": {},
    }[stage]


GOOD_DATA = {"sft": jsonl(SFT_OK, SFT_OK2), "dpo": jsonl(PAIR_OK, PAIR_OK2), "rm": jsonl(PAIR_OK, PAIR_OK2),
             "sample": jsonl(PROMPT_OK), "inspect": jsonl(SFT_OK)}
NOT_UTF8 = b'{"id": "a", "messages": [{"role": "user", "content": "caf\xe9"}]}\n'


def case(stage, expect, overrides=(), data=None, config=None, files=None, id=None):
    """One bad input: `expect` = substrings the error line must hold; `data` replaces data.jsonl; `config` replaces
    (a dict: merges into) the stage's base config; `files` are written into the case's dir before the run."""
    return pytest.param(stage, expect, list(overrides), data, config, files or {}, id=id)


CASES = [
    # ---- training values that make no sense: refused at load, naming the key
    case("sft", ["train.learning_rate", "0.0"], ["train.learning_rate=0"], id="sft-lr-zero"),
    case("sft", ["train.learning_rate"], ["train.learning_rate=-1e-5"], id="sft-lr-negative"),
    case("sft", ["train.learning_rate", "nan"], ["train.learning_rate=.nan"], id="sft-lr-nan"),
    case("sft", ["train.max_steps", "-5"], ["train.max_steps=-5"], id="sft-max-steps-negative"),
    case("sft", ["train.max_steps"], ["train.max_steps=0"], id="sft-max-steps-zero"),
    case("sft", ["train.max_grad_norm", "inf"], ["train.max_grad_norm=.inf"], id="sft-grad-norm-infinite"),
    case("sft", ["train.logging_steps"], [f"train.logging_steps=-{10 ** 400}"], id="sft-logging-steps-huge-int"),
    case("sft", ["train.num_epochs"], ["train.max_steps=-1", "train.num_epochs=0"], id="sft-zero-epochs"),
    case("sft", ["train.save_steps", "-3"], ["train.save_steps=-3"], id="sft-save-steps-negative"),
    case("sft", ["train.warmup_ratio", "5"], ["train.warmup_ratio=5"], id="sft-warmup-ratio-5"),
    case("sft", ["train.warmup_ratio"], ["train.warmup_ratio=1"], id="sft-warmup-ratio-1"),
    case("sft", ["train.warmup_ratio"], ["train.warmup_ratio=-0.1"], id="sft-warmup-ratio-negative"),
    case("sft", ["train.logging_steps"], ["train.logging_steps=0"], id="sft-logging-steps-zero"),
    case("sft", ["train.batch_size"], ["train.batch_size=0"], id="sft-batch-size-zero"),
    case("sft", ["train.grad_accum"], ["train.grad_accum=0"], id="sft-grad-accum-zero"),
    case("sft", ["train.max_grad_norm"], ["train.max_grad_norm=-1"], id="sft-grad-norm-negative"),
    case("sft", ["train.weight_decay"], ["train.weight_decay=-0.1"], id="sft-weight-decay-negative"),
    case("sft", ["train.lr_scheduler", "cosin"], ["train.lr_scheduler=cosin"], id="sft-unknown-scheduler"),
    case("sft", ["train.max_length"], ["train.max_length=4"], id="sft-max-length-tiny"),
    case("sft", ["lora.alpha"], ["lora.alpha=0"], id="sft-lora-alpha-zero"),
    case("sft", ["lora.r"], ["lora.r=0"], id="sft-lora-rank-zero"),
    case("sft", ["lora.dropout"], ["lora.dropout=1"], id="sft-lora-dropout-one"),
    case("sft", ["lora.target_modules"], ["lora.target_modules=[]"], id="sft-lora-no-targets"),
    case("sft", ["model.attn_implementation", "bogus"], ["model.attn_implementation=bogus"], id="sft-attn-bogus"),
    case("sft", ["model.dtype", "fp8"], ["model.dtype=fp8"], id="sft-dtype-unknown"),
    case("sft", ["truncation", "maybe"], ["truncation=maybe"], id="sft-truncation-unknown"),
    case("sft", ["eval_fraction"], ["eval_fraction=0.9"], id="sft-eval-fraction-high"),
    case("sft", ["data[0].weight"], ["data=[{path: data.jsonl, weight: 0}]"], id="sft-weight-zero"),
    case("sft", ["data[0].format", "alpaca"], ["data=[{path: data.jsonl, format: alpaca}]"], id="sft-format-unknown"),
    case("sft", ["data: at least one"], ["data=[]"], id="sft-no-data"),
    case("sft", ["model.path: required"], ["model.path="], id="sft-no-model"),
    case("sft", ["train.output_dir: must differ from model.path"], ["model.path=out", "train.output_dir=out"],
         id="sft-output-is-model"),
    # ---- config files and overrides
    case("sft", ["train.learning_rat: unknown key", "did you mean train.learning_rate"], ["train.learning_rat=1"],
         id="sft-typo-key"),
    case("sft", ["train.max_steps: expected int"], ["train.max_steps=abc"], id="sft-wrong-type"),
    case("sft", ["x: '[1' is not a YAML value"], ["x=[1"], id="override-bad-yaml"),
    case("sft", ["noequals: an override must look like key=value"], ["noequals"], id="override-no-equals"),
    case("sft", ["missing.yaml: config file not found"], config="missing.yaml", id="config-missing"),
    case("sft", ["a directory, not a YAML config file"], config=".", id="config-is-a-directory"),
    case("sft", ["bad.yaml: not UTF-8"], config="bad.yaml", files={"bad.yaml": b"model: {path: caf\xe9}\n"},
         id="config-not-utf8"),
    case("sft", ["bad.yaml:2:", "not valid YAML"], config="bad.yaml",
         files={"bad.yaml": b"model: {path: tiny}\ntrain: a: b\n"}, id="config-bad-yaml"),
    case("sft", ["bad.yaml: the top level must be a mapping"], config="bad.yaml", files={"bad.yaml": b"- 1\n"},
         id="config-a-list"),
    # ---- SFT records
    case("sft", ["nope.jsonl", "no such file"], ["data=[{path: nope.jsonl}]"], id="sft-data-missing"),
    case("sft", ["data.jsonl:1:", "not valid UTF-8"], data=NOT_UTF8, id="sft-not-utf8"),
    case("sft", ["data.jsonl:2:", "not valid UTF-8"], data=jsonl(SFT_OK) + NOT_UTF8, id="sft-not-utf8-line-2"),
    case("sft", ["data.jsonl: no records"], data=b"", id="sft-empty-file"),
    case("sft", ["data.jsonl: no records"], data=b"\n  \n", id="sft-blank-lines-only"),
    case("sft", ["data.jsonl:2:", "not valid JSON"], data=jsonl(SFT_OK, "{oops"), id="sft-bad-json"),
    case("sft", ["data.jsonl:2:", "id", "'a'", "data.jsonl:1"], data=jsonl(SFT_OK, SFT_OK), id="sft-duplicate-id"),
    case("sft", ["data.jsonl:1:", "messages: missing field"], data=jsonl({"id": "x"}), id="sft-no-messages"),
    case("sft", ["data.jsonl:1:", "messages[0].role", "robot"],
         data=jsonl({"messages": [{"role": "robot", "content": "hi"}]}), id="sft-unknown-role"),
    case("sft", ["data.jsonl:1:", "messages[0].role", "must be assistant"],
         data=jsonl({"messages": [{"role": "user", "content": "hi"}]}), id="sft-ends-with-user"),
    case("sft", ["data.jsonl:1:", "messages[1].content", "expected a string"],
         data=jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}),
         id="sft-content-not-string"),
    case("sft", ["data.jsonl:1:", "messages[1].role", "system message must come first"],
         data=jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                                  {"role": "assistant", "content": "y"}]}), id="sft-system-late"),
    case("sft", ["data.jsonl:1:", "expected a JSON object"], data=jsonl("[1, 2]"), id="sft-not-an-object"),
    case("sft", ["data.jsonl:1:", "conversations[0].from", "alien"],
         ["data=[{path: data.jsonl, format: sharegpt}]"],
         data=jsonl({"conversations": [{"from": "alien", "value": "hi"}]}), id="sft-sharegpt-bad-speaker"),
    case("sft", ["data.jsonl:1:", "messages", "train.max_length=64"],
         data=jsonl({"messages": [{"role": "user", "content": "word " * 400_000},
                                  {"role": "assistant", "content": "ok"}]}), id="sft-huge-record"),
    case("sft", ["data.parquet", "not a readable parquet file"], ["data=[{path: data.parquet}]"],
         files={"data.parquet": b"PAR1 this is not parquet"}, id="sft-corrupt-parquet"),
    case("sft", ["somedir", "not a readable HF datasets dir"], ["data=[{path: somedir}]"],
         files={"somedir/notes.txt": b"hello"}, id="sft-dir-not-a-dataset"),
    case("sft", ["model.path:", "/nonexistent/model", "not an HF dir"], ["model.path=/nonexistent/model"],
         id="sft-model-path-missing"),
    # ---- output dirs that are not the stage's
    case("sft", ["train.output_dir", "holds files that no posttrain stage wrote", "model.safetensors", "notes.txt"],
         files={"out/model.safetensors": b"user weights", "out/adapter_config.json": b"{}", "out/notes.txt": b"x"},
         id="sft-user-dir"),
    case("sft", ["train.output_dir", "is a file"], files={"out": b"a file"}, id="sft-output-is-a-file"),
    case("dpo", ["train.output_dir", "holds a posttrain rm stage"],
         files={"out/manifest.json": b'{"stage": "rm"}', "out/model.safetensors": b"rm weights"},
         id="dpo-into-an-rm-dir"),
    case("rm", ["train.output_dir", "holds files that no posttrain stage wrote", "pytorch_model.bin"],
         files={"out/pytorch_model.bin": b"user weights"}, id="rm-user-dir"),
    # ---- DPO
    case("dpo", ["beta"], ["beta=0"], id="dpo-beta-zero"),
    case("dpo", ["nll_weight"], ["nll_weight=-1"], id="dpo-nll-weight-negative"),
    case("dpo", ["max_prompt_length"], ["max_prompt_length=64"], id="dpo-prompt-longer-than-max-length"),
    case("dpo", ["train.learning_rate"], ["train.learning_rate=0"], id="dpo-lr-zero"),
    case("dpo", ["lora.alpha"], ["lora.alpha=0"], id="dpo-lora-alpha-zero"),
    case("dpo", ["data.jsonl:1:", "rejected: identical to chosen"],
         data=jsonl({"prompt": "q", "chosen": "a", "rejected": "a"}), id="dpo-chosen-is-rejected"),
    case("dpo", ["data.jsonl:1:", "rejected: missing field"], data=jsonl({"prompt": "q", "chosen": "a"}),
         id="dpo-no-rejected"),
    case("dpo", ["data.jsonl:1:", "chosen: empty response"],
         data=jsonl({"prompt": "q", "chosen": " ", "rejected": "a"}), id="dpo-empty-chosen"),
    case("dpo", ["data.jsonl: no records"], data=b"", id="dpo-empty-file"),
    case("dpo", ["data.jsonl:1:", "not valid UTF-8"], data=NOT_UTF8, id="dpo-not-utf8"),
    case("dpo", ["data.jsonl:2:", "id", "'p1'"], data=jsonl(PAIR_OK, PAIR_OK), id="dpo-duplicate-id"),
    case("dpo", ["data.jsonl:1:", "chosen", "train.max_length=64"],
         data=jsonl({"prompt": "q", "chosen": "word " * 400_000, "rejected": "no"}), id="dpo-huge-record"),
    case("dpo", ["ref_model_path:", "/nonexistent/ref"], ["ref_model_path=/nonexistent/ref"], id="dpo-ref-missing"),
    # ---- RM
    case("rm", ["eval_fraction"], ["eval_fraction=0.9"], id="rm-eval-fraction-high"),
    case("rm", ["min_margin", "abc"], ["min_margin=abc"], id="rm-margin-not-a-number"),
    case("rm", ["train.max_steps"], ["train.max_steps=-5"], id="rm-max-steps-negative"),
    case("rm", ["data.jsonl:1:", "not valid UTF-8"], data=NOT_UTF8, id="rm-not-utf8"),
    case("rm", ["data.jsonl: no records"], data=b"", id="rm-empty-file"),
    case("rm", ["data.jsonl:2:", "id", "'p1'"], data=jsonl(PAIR_OK, PAIR_OK), id="rm-duplicate-id"),
    case("rm", ["nope.jsonl", "no such file"], ["data=[nope.jsonl]"], id="rm-data-missing"),
    # ---- the other stages and `run`: their config checks and data readers speak through the same boundary
    case("sample", ["k: 1"], ["k=1"], id="sample-k-one"),
    case("sample", ["temperature: 0.0"], ["temperature=0"], id="sample-greedy"),
    case("sample", ["data.jsonl:1:", "not valid UTF-8"], data=NOT_UTF8, id="sample-not-utf8"),
    case("sample", ["nope.jsonl"], ["prompts=[nope.jsonl]"], id="sample-prompts-missing"),
    case("sample", ["policy.path"], ["policy.path="], id="sample-no-policy"),
    case("synth", ["output_dir"], ["output_dir="], id="synth-no-output-dir"),
    case("synth", ["bogus: unknown key"], ["bogus=1"], id="synth-unknown-key"),
    case("eval", ["policy.path"], ["policy.path="], id="eval-no-policy"),
    case("run", ["name"], ["name="], id="run-no-name"),
    case("run", ["rounds", "expected int"], ["rounds=abc"], id="run-rounds-not-a-number"),
    case("run", ["rm.train.learning_rat: unknown key"], ["rm.train.learning_rat=1"], id="run-typo-in-a-section"),
    case("inspect", ["data.jsonl:1:", "not valid UTF-8"], data=NOT_UTF8, id="inspect-not-utf8"),
    case("inspect", ["nope.jsonl"], config="nope.jsonl", id="inspect-missing-file"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its bytes (dirs as 'dir')."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def test_the_battery_is_large_and_covers_every_command():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.values[0] for c in CASES} == {"sft", "dpo", "rm", "sample", "synth", "eval", "run", "inspect"}


@pytest.mark.parametrize("stage, expect, overrides, data, config, files", CASES)
def test_bad_input_fails_with_one_line_and_touches_nothing(stage, expect, overrides, data, config, files, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_bytes(GOOD_DATA.get(stage, b"") if data is None else data)
    for name, content in files.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(content)
    if isinstance(config, str):
        target = config
    else:
        target = "stage.yaml"
        Path(target).write_text(yaml.safe_dump({**base_config(stage), **(config or {})}))
    argv = [stage, "data.jsonl", *overrides] if stage == "inspect" and config is None else [stage, target, *overrides]
    before = snapshot(tmp_path)
    started = time.monotonic()

    code = main(argv)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and re.fullmatch(rf"posttrain {stage}: (config )?error: .+", lines[-1]), err
    for part in expect:
        assert part in lines[-1], f"{part!r} not in {lines[-1]!r}"
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted
    assert time.monotonic() - started < 30  # the huge records are refused without being tokenised
