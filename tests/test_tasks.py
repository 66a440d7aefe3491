"""Tasks as data + YAML: generators and data files, the held-out split by rendered prompt, the seeded train stream,
load-time errors naming file, line and key, user generators and verifiers, and the evals that score a policy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from posttrain.config import ConfigError, from_dict
from posttrain.data import RecordError
from posttrain.generate import Completion
from rounds import evaluate
from rounds.evaluate import EvalConfig
from rounds.run_config import RunConfig
from rounds.tasks import Task, TaskConfig

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _task(**settings) -> Task:
    seed = settings.pop("seed", 0)
    return Task(from_dict(TaskConfig, settings), seed)


def _user_texts(records: list[dict]) -> list[str]:
    return [r["messages"][-1]["content"] for r in records]


def test_addition_keeps_its_held_out_problems_and_seeded_stream():
    task = _task(name="addition", eval_prompts=256)
    heldout = task.eval_prompts()
    assert len(heldout) == 256 and heldout[0]["id"].startswith("addition-eval-")
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random("addition-heldout-0").shuffle(pairs)
    a, b = pairs[0]
    assert heldout[0] == {"id": f"addition-eval-{a}-{b}", "messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
                          "meta": {"answer": a + b, "task": "addition", "tag": "math"}}
    first, second = task.train_prompts(0, 64), task.train_prompts(64, 64)
    assert len({r["id"] for r in first + second}) == 128
    assert task.train_prompts(0, 128) == first + second  # one stream, sliced per round
    assert not set(_user_texts(first + second)) & set(_user_texts(heldout))
    other_seed = _task(name="addition", eval_prompts=256, seed=1)
    assert other_seed.eval_prompts() == heldout and other_seed.train_prompts(0, 64) != first
    assert from_dict(TaskConfig, {}).name == "addition"  # the default task
    with pytest.raises(ValueError, match=r"the train prompts run out: .* holds 7844"):
        task.train_prompts(7800, 100)


def test_a_data_task_fills_its_template_and_never_trains_on_an_eval_prompt(tmp_path):
    eval_records = [{"q": f"{i} * 3", "a": 3 * i} for i in range(10)]
    train_records = ([{"q": f"{i} * 3", "a": 3 * i} for i in range(10, 60)]
                     + [{"q": "4 * 3", "a": 12, "id": "sneaky"}]  # an eval prompt under another id
                     + [{"q": "11 * 3", "a": 33}] * 3)  # duplicates in the train file
    task = _task(train=[_jsonl(tmp_path / "train.jsonl", train_records)],
                 eval=[_jsonl(tmp_path / "eval.jsonl", eval_records)], template="Compute {q}.", answer_field="a",
                 system_prompt="Answer with a number.", eval_prompts=10, name="times3")
    heldout = task.eval_prompts()
    assert heldout[0]["messages"] == [{"role": "system", "content": "Answer with a number."},
                                      {"role": "user", "content": "Compute 0 * 3."}]
    assert heldout[0]["meta"] == {"q": "0 * 3", "a": 0, "answer": 0}
    assert heldout[0]["id"].startswith("times3-eval-")
    train = task.train_prompts(0, 50)  # 50 distinct train prompts are left: 10..59
    assert sorted(_user_texts(train)) == sorted(f"Compute {i} * 3." for i in range(10, 60))
    assert not {Task.key(r) for r in train} & task.eval_keys
    with pytest.raises(ValueError, match="run out"):
        task.train_prompts(0, 51)
    with pytest.raises(ValueError, match="11 eval prompts asked, the task 'times3' holds 10"):
        task.eval_prompts(11)


def test_without_eval_files_the_eval_prompts_are_held_out_of_the_train_records(tmp_path):
    records = [{"messages": [{"role": "user", "content": f"Say {i}."}], "meta": {"answer": i}} for i in range(40)]
    path = _jsonl(tmp_path / "prompts.jsonl", records)
    task = _task(train=[path], eval_prompts=8)
    heldout, train = task.eval_prompts(), task.train_prompts(0, 32)
    assert len(heldout) == 8 and len(train) == 32
    assert sorted(_user_texts(heldout + train)) == sorted(f"Say {i}." for i in range(40))
    reseeded = _task(train=[path], eval_prompts=8, seed=5)
    assert reseeded.eval_prompts() == heldout  # the held-out split never depends on the run's seed
    assert _user_texts(reseeded.train_prompts(0, 32)) != _user_texts(train)  # the train order does


def test_shipped_example_task_loads():
    cfg = TaskConfig(train=[str(REPO / "examples/tasks/multiplication/train.jsonl")],
                     eval=[str(REPO / "examples/tasks/multiplication/eval.jsonl")], template="{question}",
                     eval_prompts=200)
    task = Task(cfg)
    assert len(task.eval_prompts()) == 200 and len(task.train_prompts(0, 512)) == 512
    assert task.check("It is 324.", {"answer": 324}) == 1.0


@pytest.mark.parametrize("settings, records, message", [
    ({"template": "Q: {question}"}, [{"question": "a", "answer": 1}, {"answer": 2}],
     r"train.jsonl:2: question: missing; the task's template uses it"),
    ({"template": "Q: {question}"}, [{"question": "a", "answer": 1}, {"question": "b"}],
     r"train.jsonl:2: answer: missing; the 'answer' verifier needs the reference answer"),
    ({}, [{"messages": [{"role": "assistant", "content": "hi"}], "meta": {"answer": 1}}],
     r"train.jsonl:1: messages"),
    ({"template": "Q: {question}"}, ["just a string"], r"train.jsonl:1: expected a JSON object"),
])
def test_a_bad_record_fails_naming_file_line_and_field(tmp_path, settings, records, message):
    task = _task(train=[_jsonl(tmp_path / "train.jsonl", records)], **settings)
    with pytest.raises(RecordError, match=message):
        task.train_prompts(0, 1)


@pytest.mark.parametrize("settings, message", [
    ({"verifier": "bleu"}, r"verifier: .*'bleu'"),
    ({"verifier": "no_such_module_x:check"}, r"verifier: .*no_such_module_x"),
    ({"name": "no_such_module_x:make"}, r"name: 'no_such_module_x:make': cannot import"),
    ({"name": "addition", "train": ["TRAIN"]}, r"name: 'addition' is a generator, and train files are given too"),
    ({"train": ["/no/such/file.jsonl"]}, r"train\[0\]: /no/such/file.jsonl: no such file"),
    ({"template": "no fields"}, r"template: 'no fields' names no record field"),
    ({"eval_prompts": 0}, r"eval_prompts: 0 is outside"),
])
def test_a_bad_task_spec_fails_at_load_naming_the_key(tmp_path, settings, message):
    train = _jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": 1}])
    settings = {k: [train] if v == ["TRAIN"] else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=message):
        from_dict(TaskConfig, settings)


def test_a_run_config_reads_its_task_records_at_load(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": 1}, {"question": "b"}])
    with pytest.raises(ConfigError, match=r"train.jsonl:2: answer: missing"):
        from_dict(RunConfig, {"name": "t", "model": {"path": "tiny"},
                              "task": {"train": [train], "template": "{question}", "eval_prompts": 1}})


def test_a_run_whose_rounds_would_exhaust_the_train_pool_fails_at_load(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": i} for i in range(30)])
    run = {"name": "t", "model": {"path": "tiny"}, "rounds": 3,
           "task": {"train": [train], "template": "{question}", "eval_prompts": 5, "rs_prompts": 5, "pref_prompts": 3}}
    from_dict(RunConfig, run)  # 3 rounds x 8 fresh prompts = 24 of the 25 left after the eval's 5
    with pytest.raises(ConfigError, match=r"prompts 31..31 .* holds 25"):
        from_dict(RunConfig, {**run, "rounds": 4})


def test_user_generator_and_verifier_by_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(
        "def prompts(split, seed):\n"
        "    start = 0 if split == 'eval' else 100 + seed\n"
        "    for i in range(start, start + 50):\n"
        "        yield {'text': f'Echo {i}', 'answer': str(i)}\n"
        "def echoes(message, meta):\n"
        "    return float(meta['answer'] in message['content'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = _task(name="my_task:prompts", template="{text}", verifier="my_task:echoes", eval_prompts=5)
    assert _user_texts(task.eval_prompts()) == [f"Echo {i}" for i in range(5)]
    assert _user_texts(task.train_prompts(3, 2)) == ["Echo 103", "Echo 104"]
    assert task.check({"role": "assistant", "content": "it is 7"}, {"answer": "7"}) == 1.0
    assert task.reward_source() == {"kind": "my_task:echoes", "options": {}}
    assert _task(verifier="none").reward_source() is None


def _scripted_generate(answers: dict[str, list[str]]):
    """Stands in for posttrain.generate.generate: the listed answers to each prompt, by its user text."""
    def generate(model, tokenizer, prompts, *, k, **kwargs):
        return [[Completion(message={"role": "assistant", "content": text}, text=text, token_ids=[1, 2],
                            num_tokens=2, stop_reason="eot") for text in answers[p[-1]["content"]][:k]]
                for p in prompts]
    return generate


def test_evals_measure_accuracy_pass_at_k_and_mean_reward(tmp_path, monkeypatch):
    records = [{"q": f"{i} + 1", "a": i + 1} for i in range(4)]
    task_cfg = from_dict(TaskConfig, {"train": [_jsonl(tmp_path / "t.jsonl", records)],
                                      "eval": [_jsonl(tmp_path / "e.jsonl", records)], "template": "{q}",
                                      "answer_field": "a", "eval_prompts": 4})
    answers = {"0 + 1": ["1", "1"], "1 + 1": ["3", "2"], "2 + 1": ["5", "6"], "3 + 1": ["4", "0"]}
    monkeypatch.setattr("posttrain.generate.generate", _scripted_generate(answers))
    evals = [from_dict(EvalConfig, {"name": "greedy"}),
             from_dict(EvalConfig, {"name": "pass2", "k": 2, "temperature": 0.8}),
             from_dict(EvalConfig, {"name": "two", "num_prompts": 2, "verifier": "regex",
                                    "task": {"name": "addition"}})]
    evals[2].task.verifier_options = {"pattern": "^1$"}  # the third eval: addition's prompts, scored by a regex
    addition = Task(evals[2].task).eval_prompts(2)
    for p in addition:
        answers[p["messages"][-1]["content"]] = ["1"]
    out = evaluate.evaluate_all(None, None, evals, task_cfg)
    assert out["name"] == "greedy" and out["accuracy"] == 0.5 and len(out["results"]) == 4  # the first: top level
    assert out["evals"]["greedy"]["mean_reward"] == 0.5
    assert out["evals"]["pass2"]["accuracy"] == 4 / 8 and out["evals"]["pass2"]["pass@2"] == 0.75
    assert out["evals"]["two"]["accuracy"] == 1.0 and out["evals"]["two"]["num_prompts"] == 2
    assert "results" not in out["evals"]["pass2"] and len(out["all_results"]["pass2"]) == 4
    with pytest.raises(ConfigError, match="temperature: 0.0 with k: 2"):
        from_dict(EvalConfig, {"k": 2})
    with pytest.raises(ConfigError, match="evals: two evals named 'a'"):
        from_dict(RunConfig, {"name": "t", "model": {"path": "tiny"}, "evals": [{"name": "a"}, {"name": "a"}]})
