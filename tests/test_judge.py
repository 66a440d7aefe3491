"""The LLM judge as a reward source, a preference labeller's source and an eval scorer: rubric prompts carry the
dialog and its tools, verdicts are normalised to [0, 1], and a judge's agreement with a verifier is reported."""

from __future__ import annotations

import json

import pytest

from posttrain.config import ConfigError, from_dict
from rewards import judge as judge_module
from rewards.judge import GENERAL_QUALITY, ModelJudge, rubric_scores
from rewards.sources import RewardComposer, RewardSourceConfig
from rounds import rejection
from rounds.evaluate import EvalConfig


class ScriptedJudge:
    """Answers every judge prompt with the next scripted verdict; keeps the prompts it saw."""

    name = "scripted"

    def __init__(self, verdicts):
        self.verdicts, self.prompts = list(verdicts), []

    def complete(self, prompts, *, n=1, **sampling):
        assert n == 1 and sampling["temperature"] == 0.0  # a judge decodes greedily
        self.prompts += prompts
        return [[self.verdicts.pop(0)] for _ in prompts]


def test_rubric_scores_are_normalised_points_and_the_judge_sees_dialog_and_tools():
    judge = ScriptedJudge(["Accuracy: 1\nInstruction following: 1\nTone: 1\nScore: 3/3", "Score: 1/3",
                           "I cannot judge this.", '{"score": 2}'])
    prompts = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(4)]
    responses = [{"role": "assistant", "content": str(i + 1)} for i in range(4)]
    tools = [None, [{"name": "calc", "parameters": {}}], None, None]
    assert rubric_scores(judge, prompts, responses, tools=tools) == pytest.approx([1.0, 1 / 3, 0.0, 2 / 3])
    first, second = (p[0]["content"] for p in judge.prompts[:2])
    assert first.startswith(GENERAL_QUALITY.template.split("\n")[0])
    assert "User: What is 0 + 1?\n\nAssistant: 1" in first and "calc" not in first
    assert '[tools available: [{"name": "calc"' in second


def test_a_judge_source_needs_a_model_and_known_options():
    with pytest.raises(ConfigError, match="path: missing; a reward source of kind judge needs its model"):
        from_dict(RewardSourceConfig, {"kind": "judge"})
    with pytest.raises(ConfigError, match="options.scale: not a judge option"):
        from_dict(RewardSourceConfig, {"kind": "judge", "path": "m", "options": {"scale": 5}})
    with pytest.raises(ConfigError, match="options.rubric: 'poetry' is not one of general, code"):
        from_dict(RewardSourceConfig, {"kind": "judge", "path": "m", "options": {"rubric": "poetry"}})
    source = from_dict(RewardSourceConfig, {"kind": "judge", "path": "m"})
    assert source.gate is False and source.name == "judge"  # a model score ranks; it gates only when asked
    with pytest.raises(ConfigError, match="judge: an eval scores with a judge or a verifier, not both"):
        from_dict(EvalConfig, {"judge": "m", "verifier": "answer"})


def test_judge_scores_rs_samples_and_its_agreement_with_the_verifier_is_reported(tmp_path, monkeypatch):
    verdicts = ["Score: 3/3", "Score: 0/3", "Score: 3/3", "Score: 3/3"]  # right, wrong | right, wrong (disagrees)
    monkeypatch.setattr(judge_module, "ModelJudge", lambda path, batch_size: ScriptedJudge(verdicts))
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"{i} + 1?"}], "meta": {"answer": i + 1}}
               for i in range(2)]
    groups = [[{"role": "assistant", "content": t} for t in pair] for pair in (("1", "7"), ("2", "9"))]
    cfg = from_dict(rejection.SampleStageConfig, {
        "policy": {"path": "tiny"}, "prompts": [str(tmp_path / "p.jsonl")], "output_dir": str(tmp_path / "out"),
        "rewards": [{"kind": "judge", "path": "judge-model"}, {"kind": "answer", "weight": 0.0}]})
    scored = RewardComposer(cfg.rewards).score(prompts, groups)
    assert [[s["scores"]["judge"] for s in g] for g in scored] == [[1.0, 0.0], [1.0, 1.0]]
    samples = [{"prompt_id": p["id"], "policy": "tiny", "completions": [
        {"message": m, **s, "num_tokens": 1, "stop_reason": "eot"} for m, s in zip(g, sg)]}
        for p, g, sg in zip(prompts, groups, scored)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "out" / "samples").mkdir(parents=True)
    (tmp_path / "out" / "samples" / "shard-00000.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    metrics = rejection.merge(cfg, prompts, 1)["metrics"]
    assert metrics["judge_agreement"] == {"judge vs answer": 0.75}
    assert metrics["checks"]["judge"]["picked"] == 1.0 and metrics["checks"]["answer"]["kept_pass_rate"] == 1.0


@pytest.mark.slow
def test_smollm2_as_judge_returns_scores_in_range(smollm2_dir):
    judge = ModelJudge(str(smollm2_dir), batch_size=4)
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 2
    responses = [{"role": "assistant", "content": "2 + 2 = 4."}, {"role": "assistant", "content": "Bananas."}]
    scores = rubric_scores(judge, prompts, responses, max_new_tokens=24)
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
