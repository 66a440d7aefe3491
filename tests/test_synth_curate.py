"""Quality control steps and judge-verdict parsers: literal inputs, literal expected outcomes."""

from __future__ import annotations

import json

import pytest

from synth import curate
from rewards.judge import CODE_QUALITY, DIFFICULTY, GENERAL_QUALITY, parse_score
from synth.teacher import ScriptedTeacher, parse_tags


def _rec(idx: str, user: str, answer: str, *, quality: int | None = None, difficulty: int | None = None,
         source: str = "synth:general") -> dict:
    qc = {}
    if quality is not None:
        qc["judge_quality"] = {"score": quality, "max": 3, "parts": {}}
    if difficulty is not None:
        qc["judge_difficulty"] = {"score": difficulty, "max": 3, "parts": {}}
    return {"id": idx, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "source": source, "meta": {"qc": qc, "filters_passed": []}}


# ---------------------------------------------------------------- verdict parsers

GOOD = "Accuracy: 1\nInstruction following: 1\nTone: 0\nScore: 2/3"


@pytest.mark.parametrize("text, expected", [
    (GOOD, 2),
    ("Accuracy: 1\nInstruction following: 1\nTone: 1\nScore: 3/3", 3),
    ("**Score:** 2/3", 2),
    ("Score: 1 out of 3", 1),
    ("Final score = 0", 0),
    # the format ignored: criteria only, in markdown bold or yes/no
    ("**Accuracy**: 1\n**Instruction following**: 0\n**Tone**: 1", 2),
    ("- Accuracy: yes\n- Instruction-following: yes\n- Tone: no", 2),
    # JSON, bare or fenced, with the total or the criteria
    ('{"score": 3}', 3),
    ('Here you go:\n```json\n{"accuracy": 1, "instruction_following": 0, "tone": 0}\n```', 1),
    # adversarial: a score quoted from the graded reply, then the real one
    ('The reply ends with "Score: 3" which is not a verdict.\nScore: 1/3', 1),
    ("> Score: 3\nAccuracy: 0\nInstruction following: 0\nTone: 1\nScore: 1/3", 1),
    ("<conversation>Assistant: Score: 3</conversation>\nScore: 0/3", 0),
    ("```\nprint('Score: 3')\n```\nScore: 2/3", 2),
    # several verdicts: the last one wins
    ("Score: 1/3\nOn reflection, Score: 2/3", 2),
    ('{"score": 3} ... no wait. Score: 1/3', 1),
    # an out-of-range criterion does not matter when the total is valid
    ("**Accuracy**: 3\nScore: 2/3", 2),
])
def test_parse_general_verdicts(text, expected):
    assert parse_score(text, GENERAL_QUALITY)[0] == expected


@pytest.mark.parametrize("text", [
    "", None, "I think it is a good answer.", "Score: two", "Score: -1", "Score: 4", "Score: 5/3", "Score: 8/10",
    "Score: 2.5/3", "**Accuracy**: 3", "Accuracy: 1\nTone: 1", "> Score: 3", '{"score": 7}', "{not json",
    '```\nScore: 3\n```', "Score: 1/3 and later Score: 9",
])
def test_unparseable_verdicts_give_none(text):
    assert parse_score(text, GENERAL_QUALITY)[0] is None


def test_parse_parts_and_other_rubrics():
    assert parse_score(GOOD, GENERAL_QUALITY) == (2, {"accuracy": 1, "instruction following": 1, "tone": 0})
    assert parse_score("Bugs: 1\nIntent: 1\nScore: 2/2", CODE_QUALITY)[0] == 2
    assert parse_score("Score: 3/3", CODE_QUALITY)[0] is None  # the code rubric has 2 points
    assert parse_score("Bugs: yes\nIntent: no", CODE_QUALITY) == (1, {"bugs": 1, "intent": 0})
    assert parse_score("Difficulty: 3", DIFFICULTY)[0] == 3
    assert parse_score("**Difficulty**: 2 (medium)", DIFFICULTY)[0] == 2
    assert parse_score("Difficulty: 0", DIFFICULTY)[0] is None


def test_parse_tags():
    assert parse_tags('{"topic": "Math", "intents": ["Solve equation", "explain steps", "solve equation"]}') == {
        "topic": "math", "intents": ["solve equation", "explain steps"]}
    assert parse_tags("Topic: **coding**\nIntents: write code; debug.") == {"topic": "coding", "intents": ["write code", "debug"]}
    assert parse_tags("- explain concept\n- give example") == {"topic": None, "intents": ["explain concept", "give example"]}
    assert parse_tags('{"intents": "compare, summarize"}') == {"topic": None, "intents": ["compare", "summarize"]}
    assert parse_tags("no idea") is None
    assert parse_tags(None) is None


# ---------------------------------------------------------------- rules, judge, high quality


def test_rule_clean_counts_and_thresholds():
    records = [
        _rec("ok", "hi", "Hello. `a != b` in code:\n```python\nassert 1 != 2\n```"),
        _rec("shouty", "hi", "Great!!! Amazing!"),
        _rec("emoji", "hi", "Sure \U0001f600\U0001f389\u2728"),
        _rec("sorry", "hi", "I'm sorry, I apologize, but I\u2019m sorry."),
        _rec("empty", "hi", "   "),
    ]
    kept, removed = curate.rule_clean(records, curate.RulesConfig())
    assert [r["id"] for r in kept] == ["ok"]
    assert [(r["id"], r["meta"]["removed_by"]) for r in removed] == [
        ("shouty", "rules"), ("emoji", "rules"), ("sorry", "rules"), ("empty", "rules")]
    assert records[0]["meta"]["qc"]["rules"] == {"emojis": 0, "exclamations": 0, "apologies": 0, "response_chars": 52}
    assert records[1]["meta"]["qc"]["rules"]["exclamations"] == 4
    assert records[2]["meta"]["qc"]["rules"]["emojis"] == 3
    assert records[3]["meta"]["qc"]["rules"]["apologies"] == 3
    assert kept[0]["meta"]["filters_passed"] == ["rules"]


def test_judge_stores_scores_and_counts_unparseable():
    records = [_rec("a", "What is 2+2?", "4"), _rec("b", "Write f", "```python\ndef f(): pass\n```", source="synth:code")]
    judge = ScriptedTeacher([
        GOOD, "garbage",                                  # quality (general, code)
        "Difficulty: 1", "Difficulty: 3",                 # difficulty
        '{"topic": "math", "intents": ["add numbers"]}', "nothing useful",  # tags
    ])
    unparseable = curate.judge(records, judge, curate.JudgeConfig())
    assert unparseable == {"quality": 1, "difficulty": 0, "tags": 1}
    assert "Instruction following: <0 or 1>" in judge.calls[0][0][0][0]["content"]
    assert "Bugs: <0 or 1>" in judge.calls[0][0][1][0]["content"]
    qa, qb = records[0]["meta"]["qc"], records[1]["meta"]["qc"]
    assert qa["judge_quality"] == {"score": 2, "max": 3, "parts": {"accuracy": 1, "instruction following": 1, "tone": 0}}
    assert qb["judge_quality"]["score"] is None and qb["judge_quality"]["max"] == 2
    assert qb["judge_quality"]["unparsed_verdict"] == "garbage"
    assert (qa["judge_difficulty"]["score"], qb["judge_difficulty"]["score"]) == (1, 3)
    assert qa["tags"] == {"topic": "math", "intents": ["add numbers"]}
    assert qb["tags"] == {"topic": None, "intents": []}


def test_high_quality_is_top_rm_quartile_or_max_judge_score():
    records = [_rec(str(i), f"q{i}", f"a{i}", quality=q) for i, q in enumerate([3, 2, 2, 2, None, 1, 2, 2])]
    for rec, rm in zip(records, [0.0, 5.0, 1.0, 2.0, 7.0, 3.0, 4.0, 6.0]):
        rec["meta"]["qc"]["rm"] = {"score": rm}
    kept, removed = curate.mark_high_quality(records, curate.JudgeConfig())
    # RM cutoff = 0.75 quantile of the 8 scores = 5.25 -> ids 4 (7.0) and 7 (6.0); id 0 has the max judge score
    assert [r["id"] for r in kept] == ["0", "4", "7"]
    assert records[0]["meta"]["qc"]["high_quality"] == {"rm_top": False, "judge_max": True, "value": True}
    assert len(removed) == 5
    kept, _ = curate.mark_high_quality(records, curate.JudgeConfig(require_high_quality=False))
    assert len(kept) == 8


# ---------------------------------------------------------------- semantic dedup

BASE = ("Explain how photosynthesis turns sunlight, water and carbon dioxide into glucose and oxygen inside the "
        "chloroplasts of green plants.")


def test_hashed_tfidf_is_deterministic_and_unit_norm():
    a = curate.hashed_tfidf([BASE, "something else entirely", BASE], dim=512)
    b = curate.hashed_tfidf([BASE, "something else entirely", BASE], dim=512)
    assert (a == b).all()
    assert a.shape == (3, 512)
    assert abs(float(a[0] @ a[0]) - 1.0) < 1e-5
    assert float(a[0] @ a[2]) == pytest.approx(1.0, abs=1e-5)
    assert float(a[0] @ a[1]) < 0.2


def test_dedup_keeps_the_better_near_duplicate_and_distinct_items():
    records = [
        _rec("low", BASE, "Plants use light to make sugar.", quality=1, difficulty=2),
        _rec("high", BASE.replace("Explain how", "Explain briefly how"), "Plants use light to make sugar.",
             quality=3, difficulty=2),
        _rec("other", "Write a haiku about the sea at night, with waves and moonlight.", "Waves hum under moon", quality=1),
        _rec("third", "List three prime numbers larger than one hundred and explain why.", "101, 103, 107", quality=1),
    ]
    kept, removed = curate.semantic_dedup(records, curate.DedupConfig(threshold=0.8, cluster_size=2, seed=0))
    assert sorted(r["id"] for r in kept) == ["high", "other", "third"]
    assert [r["id"] for r in removed] == ["low"]
    dedup = records[0]["meta"]["qc"]["dedup"]
    assert dedup["duplicate_of"] == "high" and dedup["max_sim"] >= 0.8
    assert records[1]["meta"]["qc"]["dedup"]["cluster"] == dedup["cluster"]


def test_rank_key_is_quality_times_difficulty_then_intents():
    rec = _rec("a", "q", "a", quality=2, difficulty=3)
    rec["meta"]["qc"]["tags"] = {"topic": None, "intents": ["x", "y"]}
    assert curate.rank_key(rec) == (2 / 3 * 3, 2)
    assert curate.rank_key(_rec("b", "q", "a")) == (0.0, 0)


def test_kmeans_separates_obvious_clusters():
    import numpy as np

    vecs = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.1, 0.995]], dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    labels = curate.kmeans(vecs, 2, seed=0)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]


# ---------------------------------------------------------------- decontamination

EVAL_QUESTION = ("Natalia sold clips to forty eight of her friends in April and then she sold half as many clips "
                 "in May how many clips did Natalia sell altogether in April and May")


def test_decontaminate_removes_shared_13_gram_and_keeps_clean(tmp_path):
    eval_file = tmp_path / "gsm8k.jsonl"
    eval_file.write_text(json.dumps({"id": "e1", "messages": [{"role": "user", "content": EVAL_QUESTION}]}) + "\n")
    leaked = " ".join(EVAL_QUESTION.split()[3:16])  # exactly 13 words of the eval question
    records = [
        _rec("leak", f"Here is a puzzle: {leaked}?", "72"),
        _rec("near", " ".join(EVAL_QUESTION.split()[3:15]) + " zebra", "no"),  # only 12 shared words
        _rec("clean", "How many legs does a spider have?", "8"),
    ]
    index = curate.eval_ngrams([str(eval_file)], 13)
    kept, removed = curate.decontaminate(records, index)
    assert [r["id"] for r in kept] == ["near", "clean"]
    assert [r["id"] for r in removed] == ["leak"]
    assert records[0]["meta"]["qc"]["decontam"] == {"overlap": leaked.lower(), "eval_set": "gsm8k.jsonl"}
    assert records[2]["meta"]["qc"]["decontam"] == {"overlap": None}


def test_decontaminate_plain_text_lines_and_short_items(tmp_path):
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("what is the capital city of the country france\n\nhi there\n")
    index = curate.eval_ngrams([str(eval_file)], 13)
    assert set(index) == {9}  # the 9-word line is matched whole; the 2-word line is too short to count
    records = [_rec("a", "Quick: What is the capital city of the country France?", "Paris"), _rec("b", "hi there", "hello")]
    kept, removed = curate.decontaminate(records, index)
    assert [r["id"] for r in kept] == ["b"] and [r["id"] for r in removed] == ["a"]


def test_eval_set_without_text_field_names_the_line(tmp_path):
    eval_file = tmp_path / "bad.jsonl"
    eval_file.write_text('{"answer": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected one of the fields"):
        curate.eval_ngrams([str(eval_file)], 13)


def test_dialog_text_shows_tool_calls_and_skips_system():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "calc", "arguments": {"expr": "2+2"}}}]},
                {"role": "ipython", "content": "4"}, {"role": "assistant", "content": "4"}]
    assert curate.dialog_text(messages) == (
        'User: 2+2?\n\nAssistant: \n[tool calls: [{"type": "function", "function": {"name": "calc", '
        '"arguments": {"expr": "2+2"}}}]]\n\nIpython: 4\n\nAssistant: 4')
