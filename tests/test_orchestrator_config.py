"""The run config: errors at load name the key with a hint; sections merge into stage configs; per-round overrides;
stage variants trained apart and averaged; human preference labels picked up from a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import PartialState
from safetensors.torch import load_file, save_file

from posttrain.cli import main
from posttrain.config import ConfigError, ModelConfig, from_dict, load_config
from posttrain.data import RecordError
from rounds import orchestrator
from rounds.collect import LabelsNeeded, PrefsConfig, collect, scored_pairs
from rounds import run_config
from rounds.run_config import RunConfig, round_config
from rounds.stage_configs import deep_merge, dpo_config, rm_config, rs_config, sft_config
from rounds.state import RunDir

BASE = {"name": "t", "model": {"path": "tiny"}}


@pytest.mark.parametrize("change, message", [
    ({"rm": {"train": {"learning_rat": 1e-4}}},
     "rm.train.learning_rat: unknown key (did you mean rm.train.learning_rate?)"),
    ({"tsk": {}}, "tsk: unknown key (did you mean task?)"),
    ({"rounds": "three"}, "rounds: expected int, got str 'three'"),
    ({"rs": {"temperature": "hot"}}, "rs.temperature: expected float, got str 'hot'"),
    ({"model": {"path": ""}}, "model.path: missing; name the base checkpoint"),
    ({"model": {"path": "/no/such/model"}}, "model.path: /no/such/model: no such file or directory"),
    ({"rs": {"k": 1}}, "rs.k: 1 samples per prompt; rejection sampling needs at least 2"),
    ({"prefs": {"k": 1}}, "prefs.k: 1 responses per prompt; a preference needs at least 2"),
    ({"sft": {"variants": [{"train": {"sed": 1}}]}}, "sft.train.sed: unknown key (did you mean sft.train.seed?)"),
    ({"rounds": 3, "round_overrides": {3: {"rs": {"temperatur": 0.6}}}},
     "round_overrides.3.rs.temperatur: unknown key (did you mean rs.temperature?)"),
    ({"round_overrides": {2: {"rs": {}}}}, "round_overrides.2: not a round of this run (1..1)"),
    ({"round_overrides": {1: {"task": {}}}}, "round_overrides.1.task: cannot change per round"),
    ({"sft": {"lora": {"merge": False}}}, "sft.lora.merge: false saves an adapter"),
    ({"prefs": {"rounds": []}}, "prefs.rounds: round 1 trains a reward model but has no preference data"),
    ({"dpo": {"pairs_from": ["human"]}}, "dpo.pairs_from: 'human' is not one of rs, prefs, given"),
    ({"prefs": {"labeler": "human"}}, "prefs.labels: labeler human needs a labels file template with {round}"),
    ({"sft": {"recent_rounds": 0}}, "sft.recent_rounds: 0; give a whole number of rounds >= 1"),
    ({"sft": {"continue_from_policy": "yes"}}, "sft.continue_from_policy: expected true or false, got str 'yes'"),
])
def test_config_errors_fail_at_load_naming_the_key(change, message, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(deep_merge(BASE, change)))
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, path)
    assert str(error.value).startswith(f"{path}: {message}")


def test_cli_reports_a_config_error_and_exits_2(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "rm": {"train": {"learning_rat": 1e-4}}}))
    assert main(["run", str(path)]) == 2
    assert "config error" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_sections_merge_over_run_defaults_into_stage_configs(tmp_path):
    cfg = from_dict(RunConfig, {**BASE, "seed": 7, "lora": {"r": 4}, "model": {"path": "tiny", "dtype": "float32"},
                                "rm": {"lora": {"r": 8}, "train": {"learning_rate": 1e-4}, "data": ["human.jsonl"]},
                                "rs": {"k": 3, "rewards": [{"kind": "rm"}, {"kind": "answer", "weight": 0.5}]},
                                "sft": {"data": [{"path": "chat.jsonl", "weight": 2.0}]}})
    rm = rm_config(cfg, tmp_path / "rm", ["pairs.jsonl"])
    assert (rm.model.path, rm.model.dtype, rm.lora.r, rm.train.learning_rate, rm.train.seed) == \
        ("tiny", "float32", 8, 1e-4, 7)
    assert rm.data == ["human.jsonl", "pairs.jsonl"] and rm.train.output_dir == str(tmp_path / "rm")
    sft = sft_config(cfg, "tiny", tmp_path / "sft", ["rs.jsonl"])
    assert sft.lora.r == 4 and [(d.path, d.weight) for d in sft.data] == [("chat.jsonl", 2.0), ("rs.jsonl", 1.0)]
    dpo = dpo_config(cfg, str(tmp_path / "sft"), tmp_path / "dpo", ["latest.jsonl"])
    assert dpo.model.path == str(tmp_path / "sft") and [d.path for d in dpo.data] == ["latest.jsonl"]
    rs = rs_config(cfg, "policy-dir", tmp_path / "p.jsonl", tmp_path / "rs", "round-rm")
    assert (rs.k, rs.seed, rs.policy.path, rs.policy.dtype) == (3, 7, "policy-dir", "float32")
    assert [(s.kind, s.path, s.weight) for s in rs.rewards] == [("rm", "round-rm", 1.0), ("answer", "", 0.5)]


def test_round_overrides_change_only_their_round():
    cfg = from_dict(RunConfig, {**BASE, "rounds": 3, "round_overrides": {
        3: {"rs": {"temperature": 0.6}, "stages": {"dpo": False}}, "2": {"prefs": {"k": 8}}}})
    assert [round_config(cfg, r).rs.get("temperature") for r in (1, 2, 3)] == [None, None, 0.6]
    assert [round_config(cfg, r).stages.dpo for r in (1, 2, 3)] == [True, True, False]
    assert [round_config(cfg, r).prefs.k for r in (1, 2, 3)] == [4, 8, 4]
    assert rs_config(round_config(cfg, 3), "p", Path("p.jsonl"), Path("o"), "rm").temperature == 0.6


def _fake_train(calls: list):
    """Stands in for a stage's train(): a model whose one tensor holds the seed, and a final loss of seed / 10."""
    def train(cfg):
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True)
        save_file({"w": torch.full((2, 2), float(cfg.train.seed))}, str(out / "model.safetensors"))
        (out / "config.json").write_text("{}")
        RunDir.mark_done(out, {"stage": "sft", "inputs": ["rs.jsonl"], "metrics": {"final_loss": cfg.train.seed / 10}})
        calls.append(cfg.train.seed)
    return train


def test_variants_are_trained_apart_then_averaged_into_the_stage_model_dir(tmp_path):
    cfg = from_dict(RunConfig, {**BASE, "sft": {"variants": [{"train": {"seed": 1}},
                                                            {"train": {"seed": 3, "learning_rate": 3e-4}}],
                                                "variant_weights": [1.0, 3.0]}})
    out = tmp_path / "round_01" / "sft"
    configs = orchestrator._stage_configs(cfg, "sft", out, lambda d, v: sft_config(cfg, "tiny", d, ["rs.jsonl"], v))
    assert [(c.train.seed, c.train.learning_rate) for c in configs] == [(1, 1e-5), (3, 3e-4)]
    assert [c.train.output_dir for c in configs] == [str(out / "variants" / "v0"), str(out / "variants" / "v1")]
    run = orchestrator.Run(cfg, RunDir(tmp_path), PartialState())
    calls: list = []
    orchestrator.train_stage(run, "sft", out, configs, _fake_train(calls), [1.0, 3.0])
    assert calls == [1, 3]
    torch.testing.assert_close(load_file(out / "model.safetensors")["w"], torch.full((2, 2), 2.5))  # (1 + 3*3) / 4
    manifest = RunDir.manifest(out)
    assert RunDir.is_done(out) and manifest["metrics"] == {"final_loss": pytest.approx(0.2)}
    assert manifest["weights"] == [1.0, 3.0] and manifest["inputs"] == ["rs.jsonl"]
    assert json.loads((out / "soup.json").read_text())["sources"] == [str(out / "variants" / v) for v in ("v0", "v1")]

    (out / "DONE").unlink()  # killed before the soup was marked: finished variants are not trained again
    orchestrator.train_stage(run, "sft", out, configs, _fake_train(calls), [1.0, 3.0])
    assert calls == [1, 3] and RunDir.is_done(out)


def test_human_labeler_waits_for_the_labels_file_then_builds_pairs(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"{i} + 1?"}],
                                           "meta": {"answer": i + 1}}) + "\n" for i in range(2)))
    labels = tmp_path / "labels_1.jsonl"
    cfg = from_dict(PrefsConfig, {"labeler": "human", "labels": str(tmp_path / "labels_{round}.jsonl"), "k": 2,
                                  "max_new_tokens": 4, "keep_truncated": True})
    policy, out = ModelConfig(path=str(tiny_model_dir), dtype="float32"), tmp_path / "prefs"
    with pytest.raises(LabelsNeeded, match="labels_1.jsonl"):
        collect(cfg, policy, prompts, out, round_idx=1, verifier="answer", seed=0)
    assert not RunDir.is_done(out) and RunDir.is_done(out / "sampled")
    assert (out / "sampled" / "pairs.jsonl").read_text() == ""  # unlabelled: no automatic pairs

    labels.write_text(json.dumps({"prompt_id": "p1", "chosen": 0, "rejected": 2}) + "\n")
    with pytest.raises(RecordError, match=r"labels_1.jsonl:1: rejected: needs a completion index in 0\.\.1"):
        collect(cfg, policy, prompts, out, round_idx=1, verifier="answer", seed=0)
    labels.write_text(json.dumps({"prompt_id": "p1", "chosen": 1, "rejected": 0, "rating": "better"}) + "\n")
    collect(cfg, policy, prompts, out, round_idx=1, verifier="answer", seed=0)
    (sample,) = [json.loads(line) for line in (out / "sampled" / "samples" / "shard-00000.jsonl").read_text()
                 .splitlines() if json.loads(line)["prompt_id"] == "p1"]
    (pair,) = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pair["chosen"] == [sample["completions"][1]["message"]]
    assert pair["rejected"] == [sample["completions"][0]["message"]]
    assert (pair["id"], pair["rating"], pair["source"]) == ("p1", "better", "prefs:human")
    manifest = RunDir.manifest(out)
    assert RunDir.is_done(out) and manifest["metrics"]["pairs"] == 1 and str(labels) in manifest["inputs"]["labels"]


def _completion(text: str, reward: float, stop_reason: str = "eot") -> dict:
    return {"message": {"role": "assistant", "content": text}, "reward": reward, "stop_reason": stop_reason}


def test_verifier_labels_pair_a_top_response_with_each_distinct_worse_one():
    a, b, c = _completion("82", 1.0), _completion("81", 0.0), _completion("82, because", 1.0, "length")
    d, e, f = _completion("81", 0.0), _completion("about 80", 0.5), _completion("  ", 0.0)
    group = [a, b, c, d, e, f]
    labels = {"pairs_per_prompt": 3, "min_margin": 0.5}
    assert scored_pairs(group, from_dict(PrefsConfig, labels)) == [(a, b), (a, e)]  # d repeats b; f is empty
    assert scored_pairs(group, from_dict(PrefsConfig, {**labels, "keep_truncated": True})) == [(a, b), (c, e)]
    assert scored_pairs(group, from_dict(PrefsConfig, {"min_margin": 0.6})) == [(a, b)]
    assert scored_pairs([b, d], from_dict(PrefsConfig, {})) == []  # all wrong: nothing to prefer


def test_shipped_run_configs_load(tmp_path):
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("quickstart", "addition-3round"):
        cfg = load_config(RunConfig, configs / f"{name}.yaml")
        assert cfg.model.path == "smollm2-135m-instruct" and cfg.task.eval_prompts >= 128
    task = configs.parent / "examples" / "tasks" / "multiplication"
    fill_in = ["model.path=tiny", f"task.train=[{task / 'train.jsonl'}]", f"task.eval=[{task / 'eval.jsonl'}]",
               "task.eval_prompts=200", "task.rs_prompts=100", "task.pref_prompts=50"]
    for name, rounds in (("llama3.1-8b-lora", 3), ("llama3.1-70b-fsdp", 3)):
        with pytest.raises(ConfigError, match="data/train.jsonl"):  # the files to fill in do not exist yet
            load_config(RunConfig, configs / f"{name}.yaml", ["model.path=tiny"])
        cfg = load_config(RunConfig, configs / f"{name}.yaml", fill_in)  # a user fills in the real paths
        assert cfg.rounds == rounds and cfg.task.template == "{question}"


def _done(stage_dir: Path, model: bool = True) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    if model:
        (stage_dir / "config.json").write_text("{}")
    RunDir.mark_done(stage_dir if stage_dir.name != "model" else stage_dir.parent, {"stage": "x"})


def test_round_policy_and_the_data_each_stage_reads_come_from_the_run_dir(tmp_path):
    cfg = from_dict(RunConfig, {**BASE, "rounds": 2, "prefs": {"given": {2: ["g2.jsonl"]}}, "rm": {"data": ["h.jsonl"]},
                                "dpo": {"pairs_from": ["prefs"]}})
    run = orchestrator.Run(cfg, RunDir(tmp_path), PartialState())
    r1, r2 = tmp_path / "round_01", tmp_path / "round_02"
    assert orchestrator.policy_after(run, 1) == "tiny"  # nothing trained yet: the base
    _done(r1 / "sft")
    assert orchestrator.policy_after(run, 1) == str(r1 / "sft")
    _done(r1 / "dpo" / "model")
    assert orchestrator.policy_after(run, 2) == str(r1 / "dpo" / "model")  # round 2 trained nothing yet
    _done(r2 / "dpo", model=False)  # skipped for lack of pairs: no model
    assert orchestrator.policy_after(run, 2) == str(r1 / "dpo" / "model")
    for r in (r1, r2):
        for stage in ("prefs", "samples"):
            (r / stage / "pairs.jsonl").parent.mkdir(parents=True, exist_ok=True)
            (r / stage / "pairs.jsonl").write_text("{}\n")
    (r2 / "samples" / "sft.jsonl").write_text("")  # nothing kept in round 2
    (r1 / "samples" / "sft.jsonl").write_text("{}\n")
    assert orchestrator.preference_files(run, cfg, 2) == [str(r1 / "prefs" / "pairs.jsonl"),
                                                          str(r1 / "samples" / "pairs.jsonl"), "g2.jsonl",
                                                          str(r2 / "prefs" / "pairs.jsonl")]
    only_labelled = from_dict(RunConfig, {**BASE, "rm": {"pairs_from": ["prefs"]}})
    assert orchestrator.preference_files(run, only_labelled, 2) == [str(r / "prefs" / "pairs.jsonl") for r in (r1, r2)]
    assert orchestrator.latest_pairs(run, cfg, 2) == [str(r2 / "prefs" / "pairs.jsonl")]
    assert orchestrator.sft_files(run, cfg, 2) == [{"path": str(r1 / "samples" / "sft.jsonl"), "weight": 1.0}]
    assert rm_config(cfg, r2 / "rm", orchestrator.preference_files(run, cfg, 2)).data[0] == "h.jsonl"


def test_sft_can_continue_from_the_last_policy_on_the_latest_rounds_picks(tmp_path, monkeypatch):
    r1, r2 = tmp_path / "round_01", tmp_path / "round_02"
    _done(r1 / "dpo" / "model")
    for r in (r1, r2):
        (r / "samples").mkdir(parents=True)
        (r / "samples" / "sft.jsonl").write_text("{}\n")
    trained = []
    monkeypatch.setattr("posttrain.sft.train", trained.append)
    for sft in ({}, {"continue_from_policy": True, "recent_rounds": 1}):
        cfg = from_dict(RunConfig, {**BASE, "rounds": 2, "sft": sft})
        orchestrator.step_sft(orchestrator.Run(cfg, RunDir(tmp_path), PartialState()), cfg, 2)
    recipe, latest = trained
    assert recipe.model.path == "tiny"  # the recipe: from the base on every round's picks
    assert [d.path for d in recipe.data] == [str(r / "samples" / "sft.jsonl") for r in (r1, r2)]
    assert latest.model.path == str(r1 / "dpo" / "model")
    assert [d.path for d in latest.data] == [str(r2 / "samples" / "sft.jsonl")]


def test_rs_gates_on_the_task_verifier_unless_told_otherwise(tmp_path):
    def sources(rs: dict) -> list[tuple]:
        cfg = from_dict(RunConfig, {**BASE, "rs": rs})
        stage = rs_config(cfg, "tiny", tmp_path / "p.jsonl", tmp_path / "out", "rm-dir")
        return [(s.kind, s.name, s.weight, s.gate) for s in stage.rewards]

    assert sources({}) == [("rm", "rm", 1.0, False), ("answer", "task_verifier", 0.0, True)]
    assert sources({"task_verifier": "audit"}) == [("rm", "rm", 1.0, False), ("answer", "task_verifier", 0.0, False)]
    assert sources({"task_verifier": "off"}) == [("rm", "rm", 1.0, False)]
    # the task's verifier listed by the user: used as listed, not added twice
    assert sources({"rewards": [{"kind": "answer", "weight": 2.0}]}) == [("answer", "answer", 2.0, True)]
    with pytest.raises(ConfigError, match="rs.task_verifier: 'maybe' is not one of gate, audit, off"):
        from_dict(RunConfig, {**BASE, "rs": {"task_verifier": "maybe"}})


def test_preference_collection_is_skipped_when_no_stage_reads_its_pairs(tmp_path, monkeypatch):
    def unused(change: dict) -> str:
        return run_config.prefs_unused(from_dict(RunConfig, deep_merge({**BASE, "rounds": 2}, change)), 1)

    assert unused({}) == ""  # the RM and DPO both read them
    assert unused({"dpo": {"pairs_from": ["rs"]}}) == ""  # the RM still does
    assert unused({"stages": {"rm": False}, "rs": {"rewards": [{"kind": "answer"}]}}) == ""  # DPO does
    neither = {"stages": {"rm": False, "dpo": False}, "rs": {"rewards": [{"kind": "answer"}]}}
    assert "no stage reads its pairs" in unused(neither)
    assert "no stage reads its pairs" in unused({"rm": {"pairs_from": ["rs", "given"]},
                                                "dpo": {"pairs_from": ["rs"]}, "prefs": {"given": {1: ["g"]}}})
    # a later round's RM reads round 1's pairs
    assert unused({**neither, "round_overrides": {2: {"stages": {"rm": True}}}}) == ""
    cfg = from_dict(RunConfig, deep_merge({**BASE, "rounds": 2}, neither))
    monkeypatch.setattr("rounds.collect.collect", lambda *a, **k: pytest.fail("sampled preferences nobody reads"))
    orchestrator.step_prefs(orchestrator.Run(cfg, RunDir(tmp_path), PartialState()), cfg, 1)
    assert "no stage reads its pairs" in RunDir.manifest(tmp_path / "round_01" / "prefs")["skipped"]


def test_prompts_no_sample_passed_are_retried_in_the_next_rounds(tmp_path):
    from posttrain.data import write_jsonl

    def prompt(i: int) -> dict:
        return {"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}]}

    rejected = {1: [0, 1, 2], 2: [0, 1], 3: [0, 5]}  # p0 fails in rounds 1-3, p1 in 1-2, p5 first fails in 3
    for r, ids in rejected.items():
        write_jsonl(tmp_path / f"round_{r:02d}" / "samples" / "rejected.jsonl", [prompt(i) for i in ids])

    def retried(retries: int, r: int) -> list[str]:
        cfg = from_dict(RunConfig, {**BASE, "rounds": 4, "task": {"retry_rejected": retries}})
        return [p["id"] for p in orchestrator.retried_prompts(orchestrator.Run(cfg, RunDir(tmp_path), None), cfg, r)]

    assert retried(0, 2) == [] and retried(1, 1) == []
    assert retried(1, 2) == ["p0", "p1", "p2"] and retried(1, 3) == [] and retried(1, 4) == ["p5"]
    assert retried(2, 3) == ["p0", "p1"] and retried(2, 4) == ["p5"]  # p0 has had its 2 retries by round 4
    assert retried(3, 4) == ["p0", "p5"]
