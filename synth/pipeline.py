"""The synth stage (`posttrain synth CONFIG.yaml`): teacher-made dialogs, curated, written as SFT records.

    dialogs  = BUILDERS[kind](cfg, teacher, judge)   general: prompts -> K responses, best kept; code: execution loop
    curated  = rules -> decontam -> judge -> high quality -> dedup
    output_dir/sft.jsonl, removed.jsonl (each with meta.removed_by), manifest.json (what each filter removed), DONE

A builder is `(cfg, teacher, judge) -> (SFT records, stats)`; stats["removed"] counts what the builder itself
dropped. A new kind is one more entry in BUILDERS plus its config section.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from posttrain.config import ConfigError, ModelConfig, check_choice, field, to_dict
from posttrain.data import (RecordError, atomic_write_json, atomic_write_text, file_sha256, validate_record,
                            write_jsonl)
from synth import curate
from synth.codegen import CodeConfig, code_dialogs
from synth.prompts import PromptConfig, synthesize_prompts
from synth.teacher import ModelTeacher, ResponseConfig, Teacher, distill
from synth.tooluse import ToolUseConfig, build_dialogs

log = logging.getLogger(__name__)

KINDS = ("general", "code", "tooluse")


@dataclasses.dataclass
class SynthConfig:
    output_dir: str = field("", help="where sft.jsonl, removed.jsonl, manifest.json and DONE go")
    kind: str = field("general", help="general (prompts -> distilled answers), code (execution feedback) or tooluse")
    teacher: ModelConfig = field(default_factory=ModelConfig, help="the teacher model")
    judge: ModelConfig = field(default_factory=ModelConfig, help="the judge model (path empty: the teacher judges)")
    batch_size: int = field(16, help="sequences the teacher decodes together")
    seed: int = field(0, help="seed for prompt synthesis, sampling, k-means")
    prompts: PromptConfig = field(default_factory=PromptConfig, help="kind=general: where the prompts come from")
    responses: ResponseConfig = field(default_factory=ResponseConfig, help="kind=general: K teacher answers, one kept")
    code: CodeConfig = field(default_factory=CodeConfig, help="kind=code: snippets, retries, sandbox limits")
    tooluse: ToolUseConfig = field(default_factory=ToolUseConfig, help="kind=tooluse: tasks, call format, backends")
    curate: curate.CurateConfig = field(default_factory=curate.CurateConfig, help="quality control")

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("output_dir: required")
        if not self.teacher.path:
            raise ConfigError("teacher.path: required (HF dir, Meta dir, .gguf or a config name)")
        check_choice("kind", self.kind, KINDS)
        judged = self.curate.judge.enabled or (self.kind == "general" and "rm" in self.responses.select)
        if self.curate.judge.require_high_quality and not judged:
            raise ConfigError("curate.judge.require_high_quality: needs curate.judge.enabled or responses.select "
                              "with rm (nothing else says what is high quality)")


def _general(cfg: SynthConfig, teacher: Teacher, judge: Teacher) -> tuple[list[dict], dict]:
    prompts, prompt_stats = synthesize_prompts(teacher, cfg.prompts, seed=cfg.seed)
    records, stats = distill(prompts, teacher, cfg.responses, kind="general", seed=cfg.seed + 1, judge=judge,
                             judge_max_new_tokens=cfg.curate.judge.max_new_tokens)
    return records, {"prompts": prompt_stats, "responses": stats}


def _code(cfg: SynthConfig, teacher: Teacher, judge: Teacher) -> tuple[list[dict], dict]:
    return code_dialogs(teacher, cfg.code, seed=cfg.seed)


BUILDERS = {"general": _general, "code": _code, "tooluse": build_dialogs}


def _schema_check(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drop records that would not load as SFT records (e.g. an empty user turn); keeps the normalised ones."""
    kept, removed = [], []
    for rec in records:
        try:
            kept.append(validate_record(rec, "sft", str(rec.get("id"))))
        except RecordError as e:
            rec.setdefault("meta", {})["removed_by"] = "schema"
            rec["meta"]["schema_error"] = str(e)
            removed.append(rec)
    return kept, removed


def curate_records(records: list[dict], cfg: curate.CurateConfig,
                   judge: Teacher) -> tuple[list[dict], list[dict], dict]:
    """Run every quality-control step in order; returns (kept, removed, {"removed": per step, "judge_unparseable"})."""
    removed_all, counts = [], {}

    def step(name: str, result: tuple[list[dict], list[dict]]) -> list[dict]:
        kept, removed = result
        counts[name] = len(removed)
        removed_all.extend(removed)
        return kept

    records = step("schema", _schema_check(records))
    records = step("rules", curate.rule_clean(records, cfg.rules))
    if cfg.decontam.eval_sets:
        index = curate.eval_ngrams(cfg.decontam.eval_sets, cfg.decontam.ngram)
        records = step("decontam", curate.decontaminate(records, index))
    unparseable = curate.judge(records, judge, cfg.judge) if cfg.judge.enabled and records else {}
    records = step("high_quality", curate.mark_high_quality(records, cfg.judge))
    if cfg.dedup.enabled:
        records = step("dedup", curate.semantic_dedup(records, cfg.dedup))
    return records, removed_all, {"removed": counts, "judge_unparseable": unparseable}


def synthesize(cfg: SynthConfig, teacher: Teacher, judge: Teacher | None = None) -> dict:
    """Build, curate and write the dialogs of `cfg.kind`; returns the manifest. Teachers are passed in (tests use
    ScriptedTeacher); `run` loads them from the config."""
    judge = judge or teacher
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    (out / "DONE").unlink(missing_ok=True)
    records, stats = BUILDERS[cfg.kind](cfg, teacher, judge)
    generated = len(records)
    kept, removed, qc = curate_records(records, cfg.curate, judge)
    write_jsonl(out / "sft.jsonl", kept)
    write_jsonl(out / "removed.jsonl", removed)
    unparseable = dict(qc["judge_unparseable"])
    unparseable["select"] = stats.get("responses", {}).get("select_judge_unparseable", 0)
    manifest = {
        "stage": "synth",
        "kind": cfg.kind,
        "teacher": teacher.name,
        "judge": judge.name,
        "generated": generated,
        "removed": {**stats.get("removed", {}), **qc["removed"]},
        "kept": len(kept),
        "judge_unparseable": unparseable,
        "stats": {k: v for k, v in stats.items() if k != "removed"},
        "outputs": {"sft.jsonl": {"records": len(kept), "sha256": file_sha256(out / "sft.jsonl")},
                    "removed.jsonl": {"records": len(removed)}},
        "seconds": round(time.perf_counter() - start, 2),
        "config": to_dict(cfg),
    }
    atomic_write_json(out / "manifest.json", manifest)
    atomic_write_text(out / "DONE", "")
    log.info("synth: kept %d of %d dialogs; removed %s", len(kept), generated, manifest["removed"])
    return manifest


def _load_teacher(model: ModelConfig, batch_size: int) -> ModelTeacher:
    return ModelTeacher(model.path, dtype=model.dtype, batch_size=batch_size)


def run(cfg: SynthConfig) -> dict:
    """The `posttrain synth` entry: skip when output_dir is DONE with this same config, else synthesise."""
    out = Path(cfg.output_dir)
    if (out / "DONE").is_file() and (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest.get("config") == to_dict(cfg):
            log.info("synth: %s is DONE with this config; skipping", out)
            return manifest
    teacher = _load_teacher(cfg.teacher, cfg.batch_size)
    same = not cfg.judge.path or cfg.judge.path == cfg.teacher.path
    judge = teacher if same else _load_teacher(cfg.judge, cfg.batch_size)
    return synthesize(cfg, teacher, judge)
