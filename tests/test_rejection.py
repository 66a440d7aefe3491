"""The RS stage: config checks, reward composition, best/worst selection, SmolLM2 end to end, resume, two processes."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from posttrain.config import ConfigError, from_dict, to_dict
from rewards.sources import RewardComposer, RewardSourceConfig
from rounds import rejection
from rounds.rejection import Acceptance, SampleStageConfig, select

ADDITIONS = [(2, 3), (4, 5), (7, 1), (6, 6), (9, 8), (3, 4), (5, 2), (8, 1)]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(**overrides) -> SampleStageConfig:
    data = {"policy": {"path": "tiny"}, "prompts": ["p.jsonl"], "output_dir": "out", "rewards": [{"kind": "answer"}]}
    return from_dict(SampleStageConfig, {**data, **overrides})


def _completion(content: str, reward: float, stop_reason: str = "eot", **scores) -> dict:
    return {"message": {"role": "assistant", "content": content}, "reward": reward, "stop_reason": stop_reason,
            "scores": scores}


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"k: 1 samples per prompt; rejection sampling needs at least 2"):
        _config(k=1)
    with pytest.raises(ConfigError, match="temperature: 0.0; greedy"):
        _config(temperature=0.0)
    with pytest.raises(ConfigError, match="rewards: no reward source"):
        _config(rewards=[])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.kind: 'bleu' is not one of rm, judge, answer"):
        _config(rewards=[{"kind": "bleu"}])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.path: missing"):
        _config(rewards=[{"kind": "rm"}])
    with pytest.raises(ConfigError, match="normalize: 'rank' is not one of none, zscore, minmax"):
        _config(rewards=[{"kind": "answer", "normalize": "rank"}])
    with pytest.raises(ConfigError, match=r"top_fraction: 0.0 is outside \(0, 1\]"):
        _config(top_fraction=0.0)
    with pytest.raises(ConfigError, match="max_per_prompt: 0 is outside"):
        _config(max_per_prompt=0)
    assert _config(k=2).rewards[0].name == "answer"


def test_verifiers_gate_by_default_and_a_reward_model_only_when_asked():
    cfg = _config(rewards=[{"kind": "answer"}, {"kind": "rm", "path": "rm"}, {"kind": "regex", "gate": False},
                           {"kind": "rm", "path": "rm", "name": "rm2", "gate": True, "pass_score": 0.5}])
    assert [r.gate for r in cfg.rewards] == [True, False, False, True]
    assert rejection.acceptance(cfg).gates == {"answer": 1.0, "rm2": 0.5}


def test_select_by_reward_without_gates():
    comps = [_completion("a", 0.5), _completion("b", 2.0, "length"), _completion("c", 1.5), _completion("  ", -3.0),
             _completion("d", 1.5), _completion("e", 0.2)]
    plain = Acceptance(gates={})
    kept, worst = select(comps, plain, min_margin=1.0)
    assert kept == [comps[2]] and worst is comps[5]  # truncated b and empty "  " never win; first of the 1.5 tie
    assert select(comps, Acceptance(gates={}, keep_truncated=True), min_margin=1.0) == ([comps[1]], comps[5])
    assert select(comps, plain, min_margin=1.4) == ([comps[2]], None)  # gap 1.3 < 1.4
    assert select(comps, plain, min_margin=0.0, max_per_prompt=3) == ([comps[2], comps[4], comps[0]], comps[5])
    ties = [_completion("a", 1.0), _completion("b", 1.0)]
    assert select(ties, plain, min_margin=0.0) == ([ties[0]], None)
    assert select([_completion("a", 1.0, "length")], plain, min_margin=0.0) == ([], None)


def test_select_keeps_only_samples_that_pass_every_gate():
    gated = Acceptance(gates={"answer": 1.0})
    right, wrong = _completion("5", 0.1, answer=1.0), _completion("6", 3.0, answer=0.0)
    worse = _completion("7", 2.0, answer=0.0)
    # the reward prefers the wrong answers; the gate rejects them, and the pair is right vs the lowest-reward wrong
    assert select([wrong, right, worse], gated, min_margin=5.0) == ([right], worse)
    assert select([wrong, worse], gated, min_margin=0.0) == ([], None)  # every sample fails: nothing to keep
    both = Acceptance(gates={"answer": 1.0}, min_reward=0.5)
    assert select([wrong, right], both, min_margin=0.0) == ([], None)  # right passes the gate, not min_reward
    twice = _completion(" 5 ", 0.05, answer=1.0)  # the same text as `right`: one record, not two
    assert select([right, twice, wrong], gated, min_margin=0.0, max_per_prompt=2) == ([right], wrong)
    assert select([right, twice], gated, min_margin=0.0) == ([right], twice)  # both pass: ranked by reward


def test_gated_merge_writes_no_failing_record_and_counts_match_the_files(tmp_path):
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"{i} + 1?"}], "meta": {"answer": i + 1}}
               for i in range(4)]
    _write_jsonl(tmp_path / "p.jsonl", prompts)
    contents = {"p0": ["1", "2", "9"], "p1": ["7", "8", "9"], "p2": ["3", "3", "4"], "p3": ["4", "5", "x"]}
    samples = []
    for p in prompts:
        group = [{"role": "assistant", "content": t} for t in contents[p["id"]]]
        scored = RewardComposer([RewardSourceConfig(kind="answer")]).score([p], [group])[0]
        # a stand-in reward that prefers long-winded wrong answers: the gate alone must keep the SFT data right
        comps = [{"message": m, "reward": 1.0 - s["scores"]["answer"] + 0.1 * j, "scores": s["scores"],
                  "num_tokens": 1, "stop_reason": "eot"} for j, (m, s) in enumerate(zip(group, scored))]
        samples.append({"prompt_id": p["id"], "completions": comps, "policy": "tiny"})
    (tmp_path / "out" / "samples").mkdir(parents=True)
    _write_jsonl(tmp_path / "out" / "samples" / "shard-00000.jsonl", samples)
    cfg = _config(prompts=[str(tmp_path / "p.jsonl")], output_dir=str(tmp_path / "out"), max_per_prompt=2)
    manifest = rejection.merge(cfg, prompts, 1)
    sft = _read_jsonl(tmp_path / "out" / "sft.jsonl")
    answers = {p["id"]: p["meta"]["answer"] for p in prompts}
    assert [r["id"] for r in sft] == ["p0", "p2", "p3"]  # p1 has no right answer; p2's two "3"s are one record
    assert all(r["messages"][-1]["content"] == str(answers[r["id"]]) for r in sft)
    assert [p["id"] for p in _read_jsonl(tmp_path / "out" / "rejected.jsonl")] == ["p1"]
    pairs = _read_jsonl(tmp_path / "out" / "pairs.jsonl")
    assert [(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("p0", "1", "2"), ("p2", "3", "4"), ("p3", "4", "5")]
    assert all("margin" not in p for p in pairs)  # decided by the gate, not by a reward gap
    m = manifest["metrics"]
    assert (m["prompts"], m["samples"], m["accepted_samples"]) == (4, 12, 4)
    assert (m["prompts_accepted"], m["prompts_rejected"], m["kept"], m["pairs"]) == (3, 1, len(sft), len(pairs))
    # the reward alone picks the last (longest-winded) sample: right for none of the four prompts
    assert m["checks"]["answer"] == {"kept_pass_rate": 1.0, "picked": 0.0, "random": 4 / 12, "oracle": 0.75}
    top = _config(prompts=[str(tmp_path / "p.jsonl")], output_dir=str(tmp_path / "top"), top_fraction=0.5)
    (tmp_path / "top" / "samples").mkdir(parents=True)
    _write_jsonl(tmp_path / "top" / "samples" / "shard-00000.jsonl", samples)
    m = rejection.merge(top, prompts, 1)["metrics"]
    assert [r["id"] for r in _read_jsonl(tmp_path / "top" / "sft.jsonl")] == ["p0", "p2"]  # best rewards 0.0 ties
    assert (m["kept"], m["prompts_accepted"], m["prompts_below_top_fraction"]) == (2, 3, 1)


def test_composer_weights_normalises_and_merges_meta(monkeypatch):
    calls = []

    class FakeRM:  # stands in for rewards.model.RewardModel (a trained RM is another test's business)
        @classmethod
        def from_pretrained(cls, path):
            calls.append(path)
            return cls()

        def score(self, prompts, completions, *, batch_size, tools):
            calls.append((prompts, batch_size, tools))
            return [len(c["content"]) for c in completions]

    monkeypatch.setitem(sys.modules, "rewards.model", types.SimpleNamespace(RewardModel=FakeRM))
    sources = [from_dict(RewardSourceConfig, s) for s in (
        {"kind": "answer", "normalize": "minmax"},
        {"kind": "regex", "weight": 0.5, "normalize": "zscore", "options": {"pattern": "^.{0,8}$"}},
        {"kind": "rm", "path": "some/rm", "weight": 0.0, "batch_size": 3},
    )]
    records = [{"id": "a", "messages": [{"role": "user", "content": "2 + 3?"}], "meta": {"answer": 5}},
               {"id": "b", "messages": [{"role": "user", "content": "3 + 3?"}], "meta": {"answer": 6, "pattern": "7"}}]
    groups = [[{"role": "assistant", "content": t} for t in ("The answer is 5.", "5 apples", "6")],
              [{"role": "assistant", "content": t} for t in ("6", "7")]]
    scored = RewardComposer(sources).score(records, groups)
    # regex scores [0, 1, 1]: mean 2/3, population std sqrt(2)/3 -> z = [-sqrt(2), 1/sqrt(2), 1/sqrt(2)]
    expected = [1 - 0.5 * math.sqrt(2), 1 + 0.5 / math.sqrt(2), 0.5 / math.sqrt(2)]
    assert [s["reward"] for s in scored[0]] == pytest.approx(expected)
    assert [s["scores"] for s in scored[0]] == [{"answer": 1.0, "regex": 0.0, "rm": 16.0},
                                               {"answer": 1.0, "regex": 1.0, "rm": 8.0},
                                               {"answer": 0.0, "regex": 1.0, "rm": 1.0}]
    # the record's meta pattern "7" overrides the option: regex scores [0, 1] -> z = [-1, 1]
    assert [s["reward"] for s in scored[1]] == pytest.approx([1.0 - 0.5, 0.0 + 0.5])
    assert calls == ["some/rm", ([records[0]["messages"]] * 3 + [records[1]["messages"]] * 2, 3, [None] * 5)]
    with pytest.raises(ConfigError, match="two sources named 'answer'"):
        RewardComposer([sources[0], sources[0]])


@pytest.fixture(scope="module")
def addition_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "add.jsonl"
    return _write_jsonl(path, [
        {"id": f"add-{a}-{b}", "meta": {"answer": a + b, "tag": "math"},
         "messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}]}
        for a, b in ADDITIONS])


def _smollm2_config(smollm2_dir, prompts: Path, out: Path) -> SampleStageConfig:
    return from_dict(SampleStageConfig, {
        "policy": {"path": str(smollm2_dir)}, "prompts": [str(prompts)], "output_dir": str(out), "k": 4,
        "temperature": 0.7, "max_new_tokens": 20, "batch_size": 16, "shard_size": 4, "min_margin": 0.5,
        "rewards": [{"kind": "answer"},
                    {"kind": "regex", "weight": 0.5, "gate": False, "options": {"pattern": r"^\D*\d+\D{0,3}$"}}],
    })


@pytest.mark.slow
def test_rejection_sampling_smollm2_end_to_end(smollm2_dir, addition_prompts, tmp_path):
    out = tmp_path
    manifest = rejection.run(_smollm2_config(smollm2_dir, addition_prompts, out))
    samples = _read_jsonl(out / "samples" / "shard-00000.jsonl") + _read_jsonl(out / "samples" / "shard-00001.jsonl")
    assert [s["prompt_id"] for s in samples] == [f"add-{a}-{b}" for a, b in ADDITIONS]
    assert all(len(s["completions"]) == 4 for s in samples)
    rewards = [c["reward"] for s in samples for c in s["completions"]]
    assert len(set(rewards)) > 1
    sft = {r["id"]: r for r in _read_jsonl(out / "sft.jsonl")}
    for s in samples:
        for c in s["completions"]:
            assert c["reward"] == pytest.approx(c["scores"]["answer"] + 0.5 * c["scores"]["regex"])
        eligible = [c for c in s["completions"] if c["stop_reason"] != "length" and c["message"]["content"].strip()
                    and c["scores"]["answer"] == 1.0]  # the answer verifier gates: only right answers are kept
        if not eligible:
            assert s["prompt_id"] not in sft
            continue
        kept = sft[s["prompt_id"]]
        assert kept["reward"] == max(c["reward"] for c in eligible) and kept["source"] == "rs"
        assert kept["messages"][:-1] == [{"role": "user", "content": kept["messages"][0]["content"]}]
        assert kept["messages"][-1] in [c["message"] for c in eligible if c["reward"] == kept["reward"]]
    pairs = _read_jsonl(out / "pairs.jsonl")
    assert pairs, "SmolLM2 should get some additions right and some wrong"
    for pair in pairs:
        rewards_by_message = {json.dumps(c["message"]): c["reward"] for s in samples for c in s["completions"]
                              if s["prompt_id"] == pair["id"]}
        chosen, rejected = (rewards_by_message[json.dumps(pair[key][0])] for key in ("chosen", "rejected"))
        if "margin" in pair:  # both right: ranked by reward, so the margin applies
            assert chosen - rejected >= 0.5 and pair["margin"] == pytest.approx(chosen - rejected)
        else:  # right against wrong: decided by the gate
            assert chosen > rejected
        assert pair["chosen"] == [sft[pair["id"]]["messages"][-1]]
    metrics = manifest["metrics"]
    assert (metrics["prompts"], metrics["samples"], metrics["kept"], metrics["pairs"]) == (8, 32, len(sft), len(pairs))
    assert metrics["prompts_accepted"] == len(sft) and metrics["checks"]["answer"]["kept_pass_rate"] == 1.0
    assert metrics["max_reward"] == max(rewards) and metrics["mean_reward"] == pytest.approx(sum(rewards) / 32)
    assert metrics["tokens_per_s"] > 0 and sum(metrics["stop_reasons"].values()) == 32
    assert "eot" in metrics["stop_reasons"] and set(metrics["stop_reasons"]) <= {"eot", "length"}  # <|im_end|>
    assert (out / "DONE").is_file()
    # same seed, same samples: drop the second shard and the merged outputs, sample that shard again
    names = ("samples/shard-00001.jsonl", "sft.jsonl", "pairs.jsonl")
    before = {name: (out / name).read_text() for name in names}
    for name in (*names, "DONE"):
        (out / name).unlink()
    rejection.run(_smollm2_config(smollm2_dir, addition_prompts, out))
    assert {name: (out / name).read_text() for name in names} == before


@pytest.fixture(scope="module")
def tiny_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-prompts") / "prompts.jsonl"
    return _write_jsonl(path, [
        {"id": f"p{i}", "messages": [{"role": "user", "content": f"Say something about the number {i}."}],
         "meta": {"pattern": "e", "tag": "chat" if i % 2 else "other"}} for i in range(5)])


def _tiny_config(tiny_model_dir, prompts: Path, out: Path) -> dict:
    return {"policy": {"path": str(tiny_model_dir)}, "prompts": [str(prompts)], "output_dir": str(out), "k": 2,
            "temperature": 1.0, "max_new_tokens": 3, "batch_size": 4, "shard_size": 2, "keep_truncated": True,
            "rewards": [{"kind": "regex", "gate": False}], "system_prompts": {"chat": "Be brief."}}


OUTPUTS = (*(f"samples/shard-{i:05d}.jsonl" for i in range(3)), "sft.jsonl", "pairs.jsonl")


@pytest.fixture(scope="module")
def tiny_clean_run(tiny_model_dir, tiny_prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    rejection.run(from_dict(SampleStageConfig, _tiny_config(tiny_model_dir, tiny_prompts, out)))
    return out


def test_a_gate_keeps_no_failing_sample_of_the_tiny_model(tiny_model_dir, tiny_prompts, tmp_path):
    cfg = from_dict(SampleStageConfig, {**_tiny_config(tiny_model_dir, tiny_prompts, tmp_path), "k": 4,
                                        "rewards": [{"kind": "regex"}]})  # meta pattern "e": a gate by default
    m = rejection.run(cfg)["metrics"]
    samples = [s for shard in sorted((tmp_path / "samples").glob("shard-*.jsonl")) for s in _read_jsonl(shard)]
    sft, rejected = _read_jsonl(tmp_path / "sft.jsonl"), _read_jsonl(tmp_path / "rejected.jsonl")
    assert all("e" in r["messages"][-1]["content"] and r["scores"] == {"regex": 1.0} for r in sft)
    passing = {s["prompt_id"] for s in samples if any("e" in c["message"]["content"] for c in s["completions"])}
    assert 0 < len(passing) < 5, "the seeded tiny model should pass for some prompts and not others"
    assert {r["id"] for r in sft} == passing and {r["id"] for r in rejected} == {f"p{i}" for i in range(5)} - passing
    assert (m["prompts_accepted"], m["prompts_rejected"], m["kept"]) == (len(passing), len(rejected), len(sft))
    assert m["accepted_samples"] == sum("e" in c["message"]["content"] for s in samples for c in s["completions"])
    assert m["pairs"] == len(_read_jsonl(tmp_path / "pairs.jsonl"))
    with pytest.raises(ValueError, match=r"finished with other settings \(changed: k, seed\)"):
        rejection.run(from_dict(SampleStageConfig, {**to_dict(cfg), "k": 3, "seed": 1}))


def test_steering_prompt_recorded_but_not_trained_on(tiny_clean_run):
    samples = [s for i in range(3) for s in _read_jsonl(tiny_clean_run / "samples" / f"shard-{i:05d}.jsonl")]
    assert [s.get("system_prompt") for s in samples] == [None, "Be brief.", None, "Be brief.", None]
    sft = _read_jsonl(tiny_clean_run / "sft.jsonl")
    assert [r["id"] for r in sft] == ["p0", "p1", "p2", "p3", "p4"]
    assert all(r["messages"][0]["role"] == "user" for r in sft)


def test_killed_run_resumes_without_losing_or_duplicating(tiny_model_dir, tiny_prompts, tiny_clean_run, tmp_path,
                                                          monkeypatch):
    cfg = from_dict(SampleStageConfig, _tiny_config(tiny_model_dir, tiny_prompts, tmp_path))
    sampled = []
    real_sample_shard = rejection._sample_shard

    def crash_after_first(cfg, model, tokenizer, composer, records, path):
        if sampled:
            raise KeyboardInterrupt("killed")
        real_sample_shard(cfg, model, tokenizer, composer, records, path)
        sampled.append(path.name)

    monkeypatch.setattr(rejection, "_sample_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        rejection.run(cfg)
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.jsonl")) == ["shard-00000.jsonl"]
    assert not (tmp_path / "DONE").exists() and not (tmp_path / "sft.jsonl").exists()

    def record(cfg, model, tokenizer, composer, records, path):
        real_sample_shard(cfg, model, tokenizer, composer, records, path)
        sampled.append(path.name)

    monkeypatch.setattr(rejection, "_sample_shard", record)
    rejection.run(cfg)
    assert sampled == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    for name in OUTPUTS:
        assert (tmp_path / name).read_text() == (tiny_clean_run / name).read_text(), name
    assert [r["id"] for r in _read_jsonl(tmp_path / "sft.jsonl")] == ["p0", "p1", "p2", "p3", "p4"]
    manifest = rejection.run(cfg)  # DONE: nothing is sampled again
    assert len(sampled) == 3 and manifest["metrics"]["prompts"] == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_sample_the_same_prompts_as_one(tiny_model_dir, tiny_prompts, tiny_clean_run, tmp_path):
    config = tmp_path / "sample.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "out")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # accelerate 1.15 starts ONE process for `launch --cpu --num_processes 2` (multi-CPU wants mpirun); --multi_gpu
    # starts two through torch.distributed.run, and on a host without CUDA the stage joins them over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "posttrain", "sample", str(config)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard 2/3 written (process 1)" in result.stdout and "shard 3/3 written (process 0)" in result.stdout
    out = tmp_path / "out"
    ids = [r["id"] for r in _read_jsonl(out / "sft.jsonl")]
    assert ids == [r["id"] for r in _read_jsonl(tiny_clean_run / "sft.jsonl")] == ["p0", "p1", "p2", "p3", "p4"]
    for name in OUTPUTS:
        assert (out / name).read_text() == (tiny_clean_run / name).read_text(), name
    assert json.loads((out / "manifest.json").read_text())["metrics"]["prompts"] == 5


def test_quickstart_config_loads_and_its_prompts_validate():
    from posttrain.config import load_config
    from posttrain.data import read_records

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(SampleStageConfig, repo / "configs" / "sample-quickstart.yaml")
    assert cfg.policy.path == "smollm2-135m-instruct" and cfg.k == 8
    assert [r.kind for r in cfg.rewards] == ["answer", "regex"]
    prompts = read_records(repo / cfg.prompts[0], "prompt")
    assert len(prompts) == 16 and all(p["meta"]["tag"] in cfg.system_prompts for p in prompts)


def test_prompt_meta_cannot_turn_sandbox_isolation_off():
    from rewards.sources import RewardSourceConfig, _verifier_meta

    source = RewardSourceConfig(kind="unit_tests", options={"timeout_s": 5})
    meta = _verifier_meta(source, {"meta": {"tests": "assert True", "allow_unisolated": True, "timeout_s": 99}})
    assert "allow_unisolated" not in meta
    assert meta["timeout_s"] == 5 and meta["tests"] == "assert True"
