"""Prompt synthesis (Magpie, self-instruct), the Magpie prefix of real chat formats, and response distillation."""

from __future__ import annotations

import json

import pytest

from synth import prompts
from synth.teacher import ResponseConfig, ScriptedTeacher, distill, user_turn_prefix


def test_magpie_prefix_for_llama3(llama3_tokenizer):
    assert user_turn_prefix(llama3_tokenizer) == [128000, 128006, 882, 128007, 271]


def test_magpie_samples_from_the_user_prefix_and_drops_short_and_duplicate_prompts():
    teacher = ScriptedTeacher(["  What is the tallest mountain?  ", "what is the TALLEST mountain", "hi",
                               "Write a poem about rain."], user_prefix=[7, 8, 9])
    cfg = prompts.PromptConfig(method="magpie", num_prompts=4)
    records, stats = prompts.magpie(teacher, cfg, seed=3)
    assert teacher.calls == [([[7, 8, 9]], 4)]
    assert records == [
        {"id": "magpie-0", "messages": [{"role": "user", "content": "What is the tallest mountain?"}], "meta": {"method": "magpie"}},
        {"id": "magpie-1", "messages": [{"role": "user", "content": "Write a poem about rain."}], "meta": {"method": "magpie"}},
    ]
    assert stats == {"sampled": 4, "kept": 2}


@pytest.mark.parametrize("answer, expected", [
    ("Task: Sort a list.\nTask: Reverse a string.", ["Sort a list.", "Reverse a string."]),
    ("Here are some:\n1. **Task 1:** Sort a list.\n2. Task 2: Merge two dicts.", ["Sort a list.", "Merge two dicts."]),
    ("Sure!\n- Plan a trip to Rome.\n- Summarise a paper.\nHope this helps", ["Plan a trip to Rome.", "Summarise a paper."]),
    ("I cannot do that.", []),
])
def test_parse_tasks(answer, expected):
    assert prompts.parse_tasks(answer) == expected


def test_self_instruct_tags_new_tasks_and_skips_seed_copies(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    rows = [{"instruction": "Add 12 and 30.", "topic": "math", "capability": "arithmetic"},
            {"instruction": "Multiply 7 by 6.", "topic": "math", "capability": "arithmetic"},
            {"instruction": "Write a limerick about a cat.", "meta": {"topic": "writing", "capability": "poetry"}}]
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = prompts.PromptConfig(method="self_instruct", num_prompts=3, seed_tasks=str(seeds), num_shots=2,
                               tasks_per_request=2)
    teacher = ScriptedTeacher(["Task: Subtract 9 from 50.\nTask: add 12 and 30", "Task: Write a sonnet about snow."])
    records, stats = prompts.self_instruct(teacher, cfg, seed=0)
    requests = [p[0]["content"] for p in teacher.calls[0][0]]
    assert "Write 2 new tasks about math that test arithmetic." in requests[0]
    assert "Task: Add 12 and 30." in requests[0] and "Task: Multiply 7 by 6." in requests[0]
    assert "about writing that test poetry" in requests[1]
    assert [(r["messages"][0]["content"], r["meta"]["topic"], r["meta"]["capability"]) for r in records] == [
        ("Subtract 9 from 50.", "math", "arithmetic"), ("Write a sonnet about snow.", "writing", "poetry")]
    assert stats == {"requests": 2, "parsed": 3, "kept": 2}


def test_seed_tasks_from_text_lines(tmp_path):
    path = tmp_path / "seeds.txt"
    path.write_text("Name three rivers.\n\nDefine entropy.\n")
    assert prompts.load_seed_tasks(path) == [{"instruction": "Name three rivers.", "topic": None, "capability": None},
                                             {"instruction": "Define entropy.", "topic": None, "capability": None}]


class FakeRM:
    def __init__(self, scores):
        self.scores, self.seen = scores, None

    def score(self, prompts_, completions):
        self.seen = (prompts_, completions)
        return self.scores


def test_distill_keeps_the_rm_best_of_k(monkeypatch):
    import rewards.model

    rm = FakeRM([0.1, 0.9, 0.5, 0.2, -1.0, 0.3])
    monkeypatch.setattr(rewards.model.RewardModel, "from_pretrained", classmethod(lambda cls, path: rm))
    prompt_records = [{"id": "p0", "messages": [{"role": "user", "content": "Q0"}], "meta": {"method": "magpie"}},
                      {"id": "p1", "messages": [{"role": "user", "content": "Q1"}]}]
    teacher = ScriptedTeacher(["a", "b", "c", "d", "e", "f"])
    cfg = ResponseConfig(k=3, select="rm", reward_model="rm-dir")
    records, stats = distill(prompt_records, teacher, cfg, kind="general", seed=0)
    assert [r["messages"][-1]["content"] for r in records] == ["b", "f"]
    assert records[0]["meta"]["qc"]["rm"] == {"score": 0.9, "candidates": [0.1, 0.9, 0.5]}
    assert records[0]["id"] == "synth-general-p0" and records[0]["source"] == "synth:general"
    assert records[0]["meta"]["prompt"] == {"method": "magpie"}
    assert rm.seen[1][0] == {"role": "assistant", "content": "a"} and rm.seen[0][3] == [{"role": "user", "content": "Q1"}]
    assert stats == {"samples": 6, "select_judge_unparseable": 0}


def test_distill_by_judge_breaks_ties_in_order_and_skips_empty():
    prompt_records = [{"id": "p0", "messages": [{"role": "user", "content": "Q0"}]}]
    teacher = ScriptedTeacher(["", "first good", "second good"])
    judge = ScriptedTeacher(["Score: 3/3", "Score: 3/3", "Score: 3/3"])
    records, stats = distill(prompt_records, teacher, ResponseConfig(k=3, select="judge"), kind="general", seed=0,
                             judge=judge)
    assert records[0]["messages"][-1]["content"] == "first good"
    assert records[0]["meta"]["qc"]["select"] == {"method": "judge", "k": 3, "chosen": 1, "judge_scores": [3, 3, 3]}
