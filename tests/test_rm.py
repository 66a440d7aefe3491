"""Reward model units: the Bradley-Terry loss by hand, pair expansion, filters, config errors, batch layout, packing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config import ConfigError, from_dict
from posttrain.data import RecordError, validate_record
from rewards.model import (
    RMStageConfig,
    bt_loss,
    encode_record,
    encode_records,
    load_preferences,
    pair_indices,
    ranked_pairs,
    split_records,
    train,
)
from rewards.packing import collate, packed_attention_mask, response_rewards, row_groups


def _cfg(tmp_path, data, **extra) -> RMStageConfig:
    return from_dict(RMStageConfig, {"model": {"path": "tiny"}, "data": [str(p) for p in data],
                                     "train": {"output_dir": str(tmp_path / "rm")}, **extra})


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- the loss, by hand -------------------------------------------------------------------------------------------
# -log σ(d) = log(1 + e^-d):  d=1 -> 0.3132617,  d=0 -> ln 2 = 0.6931472,  d=2 -> 0.1269280,  d=-1 -> 1.3132617


def test_bt_loss_two_pairs_is_mean_over_pairs():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.5])  # d = 1, 0
    # (0.3132617 + 0.6931472) / 2 = 0.5032044
    assert bt_loss(chosen, rejected).item() == pytest.approx(0.5032044, abs=1e-6)


def test_bt_loss_three_way_record_sums_its_three_pairs():
    edited, chosen, rejected = 3.0, 2.0, 1.0
    better, worse = pair_indices(torch.tensor([3]))
    assert better.tolist() == [0, 0, 1] and worse.tolist() == [1, 2, 2]  # e>c, e>r, c>r
    rewards = torch.tensor([edited, chosen, rejected])
    # d = 1, 2, 1 -> 0.3132617 + 0.1269280 + 0.3132617 = 0.7534514, one record
    assert bt_loss(rewards[better], rewards[worse], num_records=1).item() == pytest.approx(0.7534514, abs=1e-6)


def test_bt_loss_mixed_batch_divides_by_records():
    rewards = torch.tensor([3.0, 2.0, 1.0, 0.0, 1.0])  # a 3-way record, then a pair ranked wrongly (d = -1)
    better, worse = pair_indices(torch.tensor([3, 2]))
    assert list(zip(better.tolist(), worse.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    # (0.7534514 + 1.3132617) / 2 records = 1.0333565
    assert bt_loss(rewards[better], rewards[worse], num_records=2).item() == pytest.approx(1.0333565, abs=1e-6)


def test_bt_loss_has_no_margin_term_and_is_ln2_at_a_tie():
    assert bt_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(math.log(2), abs=1e-7)


def test_ranked_pairs():
    assert ranked_pairs(2) == [(0, 1)]
    assert ranked_pairs(3) == [(0, 1), (0, 2), (1, 2)]


# ---- data: filters, split, bad records ----------------------------------------------------------------------------


def _pref(i, **extra):
    return {"id": f"r{i}", "prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", **extra}


def test_filters_drop_low_margins_and_unclear_labels(tmp_path):
    records = [
        _pref(0),  # no margin, no label: kept
        _pref(1, margin=0.1),  # below min_margin
        _pref(2, margin=2.0, rating="better"),
        _pref(3, rating="Slightly Better"),  # not a kept label
        _pref(4, rating="Significantly better "),  # case and spaces do not matter
        _pref(5, meta={"rating": "negligibly better"}),  # label_key looks at "rating", not meta.rating
    ]
    cfg = _cfg(tmp_path, [_write(tmp_path / "p.jsonl", records)], min_margin=0.5)
    kept, counts = load_preferences(cfg)
    assert [r["id"] for r in kept] == ["r0", "r2", "r4", "r5"]
    assert counts == {"records_read": 6, "filtered_margin": 1, "filtered_label": 1}
    cfg = _cfg(tmp_path, [tmp_path / "p.jsonl"], label_key="meta.rating", keep_labels=[])
    assert len(load_preferences(cfg)[0]) == 6  # [] keeps every label; no min_margin keeps every margin
    cfg = _cfg(tmp_path, [tmp_path / "p.jsonl"], label_key="meta.rating")
    assert [r["id"] for r in load_preferences(cfg)[0]] == ["r0", "r1", "r2", "r3", "r4"]


def test_split_is_seeded_and_by_prompt():
    records = [{"id": i, "prompt": [{"role": "user", "content": f"q{i % 10}"}], "chosen": "a", "rejected": "b"}
               for i in range(40)]  # 10 prompts, each in 4 records (as when rounds repeat a prompt)
    train_a, held_a = split_records(records, 0.1, seed=3)
    train_b, held_b = split_records(records, 0.1, seed=3)
    assert held_a == held_b and len(held_a) == 4 and len(train_a) == 36
    assert sorted(r["id"] for r in train_a + held_a) == list(range(40))
    held_prompts = {r["prompt"][0]["content"] for r in held_a}
    assert len(held_prompts) == 1 and not held_prompts & {r["prompt"][0]["content"] for r in train_a}
    assert {r["prompt"][0]["content"] for r in split_records(records, 0.1, seed=4)[1]} != held_prompts
    assert split_records(records, 0.0, seed=3) == (records, [])
    # a prompt keeps its side when more data arrives: the split does not depend on the other prompts
    grown = records + [{"id": 40 + i, "prompt": [{"role": "user", "content": f"new{i}"}], "chosen": "a",
                        "rejected": "b"} for i in range(10)]
    held_grown = {r["prompt"][0]["content"] for r in split_records(grown, 0.1, seed=3)[1]}
    assert held_prompts <= held_grown or not held_grown & {f"q{i}" for i in range(10)}
    with pytest.raises(ValueError, match="over 1 distinct prompts"):
        split_records([records[0], records[10]], 0.1, seed=3)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, ":2: rejected: identical to chosen"),
        ({"prompt": "q", "chosen": "a"}, ":2: rejected: missing field"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, ":2: chosen: empty response"),
    ],
)
def test_bad_record_fails_with_file_line_before_anything_is_written(tmp_path, bad, message):
    path = _write(tmp_path / "prefs.jsonl", [_pref(0), bad, _pref(2)])
    cfg = _cfg(tmp_path, [path])
    with pytest.raises(RecordError, match=f"{path}{message}"):
        train(cfg)
    assert not (tmp_path / "rm").exists()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data: list at least one"):
        from_dict(RMStageConfig, {"model": {"path": "tiny"}, "train": {"output_dir": "x"}})
    with pytest.raises(ConfigError, match="model.path: required"):
        from_dict(RMStageConfig, {"data": ["p.jsonl"], "train": {"output_dir": "x"}})
    with pytest.raises(ConfigError, match="eval_fraction"):
        _cfg(tmp_path, ["p.jsonl"], eval_fraction=0.9)
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        from_dict(RMStageConfig, {"model": {"path": "tiny", "attn_implementation": "flash_attention_2"},
                                  "pack_responses": True, "data": ["p"], "train": {"output_dir": "x"}})
    with pytest.raises(ConfigError, match="min_margin"):
        _cfg(tmp_path, ["p.jsonl"], min_margin="big")
    with pytest.raises(ConfigError, match="pack_response: unknown key"):
        _cfg(tmp_path, ["p.jsonl"], pack_response=True)


# ---- rendering and batch layout -----------------------------------------------------------------------------------


def test_encode_record_shares_the_rendered_prompt(llama3_tokenizer):
    from posttrain.chat import render

    prompt = [{"role": "user", "content": "Hi"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Hello!"}],
              "rejected": [{"role": "assistant", "content": "Go away."}],
              "edited": [{"role": "assistant", "content": "Hello, how can I help?"}]}
    ex = encode_record(record, llama3_tokenizer)
    assert ex["prompt_ids"] == render(prompt, llama3_tokenizer, add_generation_prompt=True).ids
    for ids, key in zip(ex["response_ids"], ("edited", "chosen", "rejected")):  # rank order, best first
        assert ex["prompt_ids"] + ids == render(prompt + record[key], llama3_tokenizer).ids
        assert ids[-1] == 128009  # the reward is read at <|eot_id|>


def test_collate_rows_literal():
    examples = [{"prompt_ids": [1, 2], "response_ids": [[3, 4], [5]], "order": [1, 0]}]
    batch = collate(examples, pad_id=0, pack=False)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert batch["reward_index"].tolist() == [[0, 3], [1, 2]]
    assert batch["num_responses"].tolist() == [2]


def test_collate_packed_literal():
    examples = [{"prompt_ids": [1, 2], "response_ids": [[3, 4], [5]], "order": [1, 0]},
                {"prompt_ids": [6], "response_ids": [[7], [8]], "order": [0, 1]}]
    batch = collate(examples, pad_id=0, pack=True)
    assert batch["input_ids"].tolist() == [[1, 2, 5, 3, 4], [6, 7, 8, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 1, 1, 0, 0]]
    assert batch["reward_index"].tolist() == [[0, 4], [0, 2], [1, 1], [1, 2]]  # rank order, not row order
    assert batch["num_responses"].tolist() == [2, 2]
    assert batch["attention_mask"].shape == (2, 1, 5, 5)
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # response 5 sees the prompt and itself
        [1, 1, 0, 1, 0],  # response 3 4 does not see 5
        [1, 1, 0, 1, 1],
    ]
    assert batch["attention_mask"][1, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],  # padding attends to itself only
        [0, 0, 0, 0, 1],
    ]


def test_packed_rows_split_at_max_length():
    ex = {"prompt_ids": [1, 2, 3], "response_ids": [[4, 5], [6, 7], [8]], "order": [2, 0, 1]}
    assert row_groups(ex, pack=True, max_length=6) == [[2, 0], [1]]
    assert row_groups(ex, pack=True) == [[2, 0, 1]]
    assert row_groups(ex, pack=False) == [[0], [1], [2]]
    assert packed_attention_mask([(3, [(3, 5)])], 5).sum().item() == 3 * 4 // 2 + 2 * 3 + 3  # prompt, response


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_gives_the_scores_and_loss_of_separate_rows(tiny_model_dir, llama3_tokenizer, attn):
    from posttrain.backbone import load_model

    torch.manual_seed(0)
    model = load_model(tiny_model_dir, torch.float32, attn_implementation=attn, num_labels=1).eval()
    raw = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "It is five, I think.", "edited": "2 + 2 = 4."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
         "chosen": "Blue.", "rejected": "I would rather not say which colour I like."},
        {"prompt": "Say hi", "chosen": "Hi there! Nice to meet you.", "rejected": "no"},
    ]
    records = [validate_record(r, "preference") for r in raw]
    examples, too_long = encode_records(records, llama3_tokenizer, max_length=512, seed=0)
    assert too_long == 0 and [len(ex["response_ids"]) for ex in examples] == [3, 2, 2]
    with torch.no_grad():
        rows = response_rewards(model, collate(examples, 128004, pack=False))
        packed_batch = collate(examples, 128004, pack=True)
        packed = response_rewards(model, packed_batch)
    assert packed_batch["input_ids"].shape[0] == 3 and rows.shape == packed.shape == (7,)
    torch.testing.assert_close(packed, rows, atol=1e-4, rtol=0)
    better, worse = pair_indices(torch.tensor([3, 2, 2]))
    loss_rows = bt_loss(rows[better], rows[worse], num_records=3)
    loss_packed = bt_loss(packed[better], packed[worse], num_records=3)
    assert abs(loss_rows.item() - loss_packed.item()) < 1e-4


def test_quickstart_config_loads_with_overrides():
    from posttrain.config import load_config

    cfg = load_config(RMStageConfig, "configs/rm-quickstart.yaml", ["train.max_steps=5", "data=[a.jsonl, b.jsonl]"])
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.pack_responses and cfg.min_margin == 0.5
    assert cfg.train.max_steps == 5 and cfg.data == ["a.jsonl", "b.jsonl"]
