"""SFT data: config checks, exact labels, packing (literal tensors and exact loss), mixtures, malformed records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config import ConfigError, LoRAConfig, ModelConfig, TrainConfig, load_config
from posttrain.data import RecordError
from posttrain.packing import PackedCollator, pack
from posttrain.sft import DataSourceConfig, SFTStageConfig, build_dataset, render_sources, train

REPO = Path(__file__).resolve().parents[1]
PAD = 128004
# <|begin_of_text|> <|start_header_id|> user <|end_header_id|> \n\n Hi <|eot_id|> <|start_header_id|> assistant
# <|end_header_id|> \n\n Hello <|eot_id|>
HI_IDS = [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271, 9906, 128009]
HI_LABELS = [-100] * 11 + [9906, 128009]
# the same with "2+2?" -> "4"
SUM_IDS = [128000, 128006, 882, 128007, 271, 17, 10, 17, 30, 128009, 128006, 78191, 128007, 271, 19, 128009]
SUM_LABELS = [-100] * 14 + [19, 128009]
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
SUM = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]



@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on the shared 2-core machine two threads contend and a step runs ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def make_cfg(tmp_path, sources, **kw) -> SFTStageConfig:
    train_kw = {"output_dir": str(tmp_path / "out"), "max_length": kw.pop("max_length", 64), "seed": kw.pop("seed", 0)}
    data = [s if isinstance(s, DataSourceConfig) else DataSourceConfig(path=str(s)) for s in sources]
    return SFTStageConfig(model=ModelConfig(path="tiny", dtype="float32"), lora=LoRAConfig(),
                          train=TrainConfig(**train_kw), data=data, **kw)


def test_config_errors_name_the_key(tmp_path):
    good = tmp_path / "sft.yaml"
    good.write_text("model: {path: tiny}\ntrain: {output_dir: out}\ndata: [{path: a.jsonl, weight: 2}]\n")
    cfg = load_config(SFTStageConfig, good)
    assert cfg.train.learning_rate == 1e-5 and cfg.packing and cfg.truncation == "error" and cfg.resume
    assert cfg.data[0].weight == 2.0
    cases = {
        "model.path": ["model.path="],
        "train.output_dir": ["train.output_dir="],
        "must differ from model.path": ["model.path=runs/x", "train.output_dir=runs/x/"],
        "data: at least one": ["data=[]"],
        "data[0].weight": ["data=[{path: a.jsonl, weight: 0}]"],
        "data[0].format": ["data=[{path: a.jsonl, format: alpaca}]"],
        "truncation": ["truncation=cut"],
        "train_on": ["train_on=first"],
        "tool_format": ["tool_format=xml"],
        "eval_fraction": ["eval_fraction=0.9"],
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_config(SFTStageConfig, good, overrides)


@pytest.mark.parametrize("name", ["sft-quickstart.yaml", "llama3.1-8b-sft-lora.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(SFTStageConfig, REPO / "configs" / name)
    assert cfg.lora.enabled and cfg.packing and cfg.train.output_dir


def test_labels_are_the_render_mask(tmp_path, llama3_tokenizer):
    cfg = make_cfg(tmp_path, [write_jsonl(tmp_path / "a.jsonl", [{"messages": HI}])], packing=False)
    ds = build_dataset(cfg, llama3_tokenizer)
    assert ds[0] == {"input_ids": HI_IDS, "labels": HI_LABELS}


def test_train_on_last_masks_earlier_answers(tmp_path, llama3_tokenizer):
    two_turns = HI + [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": two_turns}])
    labels = build_dataset(make_cfg(tmp_path, [path], train_on="last"), llama3_tokenizer)[0]["labels"]
    assert [t for t in labels if t != -100] == [34, 23332, 128009]  # "C" "iao" <|eot_id|>
    labels = build_dataset(make_cfg(tmp_path, [path], train_on="all"), llama3_tokenizer)[0]["labels"]
    assert [t for t in labels if t != -100] == [9906, 128009, 34, 23332, 128009]


def test_collator_unpacked_pads_with_attention_mask():
    batch = PackedCollator(PAD)([{"input_ids": HI_IDS, "labels": HI_LABELS},
                                 {"input_ids": SUM_IDS, "labels": SUM_LABELS}])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [HI_IDS + [PAD] * 3, SUM_IDS]
    assert batch["labels"].tolist() == [HI_LABELS + [-100] * 3, SUM_LABELS]
    assert batch["attention_mask"].tolist() == [[1] * 13 + [0] * 3, [1] * 16]


def test_collator_packed_rows_restart_positions_and_mask_boundaries():
    rows = [{"input_ids": SUM_IDS + HI_IDS, "labels": SUM_LABELS + HI_LABELS, "seq_lengths": [16, 13]},
            {"input_ids": HI_IDS, "labels": HI_LABELS, "seq_lengths": [13]}]
    batch = PackedCollator(PAD)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: it would hide the restarts
    assert batch["input_ids"].tolist() == [
        [128000, 128006, 882, 128007, 271, 17, 10, 17, 30, 128009, 128006, 78191, 128007, 271, 19, 128009,
         128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271, 9906, 128009],
        [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271, 9906, 128009] + [PAD] * 16,
    ]
    assert batch["labels"].tolist() == [
        [-100] * 14 + [19, 128009] + [-100] * 11 + [9906, 128009],
        [-100] * 11 + [9906, 128009] + [-100] * 16,
    ]
    assert batch["position_ids"].tolist() == [
        list(range(16)) + list(range(13)),
        list(range(13)) + list(range(16)),  # the padding is a block of its own
    ]


def test_collator_drops_the_label_of_each_example_start():
    """A trained first token (possible in data from elsewhere) is still never predicted across a boundary."""
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [2, 3]}]
    batch = PackedCollator(0)(rows)
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2]]


def test_pack_fills_rows_best_fit_decreasing(tmp_path, llama3_tokenizer):
    records = [{"messages": HI}, {"messages": SUM}, {"messages": HI}]
    cfg = make_cfg(tmp_path, [write_jsonl(tmp_path / "a.jsonl", records)], max_length=32)
    packed = pack(build_dataset(cfg, llama3_tokenizer), 32)
    assert sorted(packed["seq_lengths"]) == [[13], [16, 13]]  # 16 + 13 fit one row of 32, the last 13 goes alone
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"]) <= 32


def _examples(tokenizer):
    from posttrain.chat import render

    dialogs = [HI, SUM, [{"role": "system", "content": "Be brief."}, *SUM],
               [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "1, 2, 3, 4, 5."}]]
    out = []
    for messages in dialogs:
        r = render(messages, tokenizer)
        out.append({"input_ids": r.ids, "labels": [t if m else -100 for t, m in zip(r.ids, r.mask)]})
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_mean_of_single_examples(tiny_model_dir, llama3_tokenizer, attn):
    from datasets import Dataset

    from posttrain.backbone import load_model

    model = load_model(tiny_model_dir, torch.float32, attn_implementation=attn).eval()
    examples = _examples(llama3_tokenizer)
    nll_sum, n_trained = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            n = sum(t != -100 for t in ex["labels"][1:])
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
            nll_sum, n_trained = nll_sum + loss.item() * n, n_trained + n
        rows = list(pack(Dataset.from_list(examples), 42))  # lengths 29 + 13 and 24 + 16
        assert len(rows) == 2 and all(len(r["seq_lengths"]) == 2 for r in rows)
        batch = PackedCollator(PAD)(rows)  # two packed rows of different widths: one is padded
        packed_loss = model(**batch, use_cache=False).loss.item()
    assert math.isclose(packed_loss, nll_sum / n_trained, rel_tol=0, abs_tol=1e-5)


def test_packed_logits_equal_separate_logits(tiny_model_dir, llama3_tokenizer):
    """transformers turns the position restarts into a block-diagonal mask on CPU sdpa: no attention crosses."""
    from posttrain.backbone import load_model

    model = load_model(tiny_model_dir, torch.float32).eval()
    a, b = HI_IDS, SUM_IDS
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in (a, b)]
        packed = model(input_ids=torch.tensor([a + b]), position_ids=torch.tensor([list(range(13)) + list(range(16))]),
                       use_cache=False).logits[0]
    torch.testing.assert_close(packed[:13], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[13:], alone[1], rtol=0, atol=1e-5)


def test_weights_upsample_and_subsample_deterministically(tmp_path, llama3_tokenizer):
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(10)]
    path = write_jsonl(tmp_path / "a.jsonl", records)

    def rows(weight, seed=0):
        cfg = make_cfg(tmp_path, [DataSourceConfig(path=str(path), weight=weight)], seed=seed)
        return [tuple(ids) for ids in build_dataset(cfg, llama3_tokenizer)["input_ids"]]

    twice = rows(2.0)
    assert len(twice) == 20 and len(set(twice)) == 10 and all(twice.count(r) == 2 for r in twice)
    half = rows(0.5)
    assert len(half) == 5 and len(set(half)) == 5
    assert set(half) == set(rows(0.5))  # same seed, same half
    assert any(set(rows(0.5, seed=s)) != set(half) for s in (1, 2, 3))
    one_and_half = rows(1.5)
    assert len(one_and_half) == 15 and len(set(one_and_half)) == 10


def test_mixture_formats_max_records_and_eval_split(tmp_path, llama3_tokenizer):
    ours = write_jsonl(tmp_path / "ours.jsonl", [{"messages": HI}] * 4)
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "2+2?"},
                                                                     {"from": "gpt", "value": "4"}]}] * 6)
    sources = [DataSourceConfig(path=str(ours), weight=3.0),
               DataSourceConfig(path=str(sharegpt), format="sharegpt", max_records=4)]
    train_rows, eval_rows, stats = render_sources(make_cfg(tmp_path, sources, eval_fraction=0.25), llama3_tokenizer)
    assert [s["records"] for s in stats] == [4, 4]
    assert [s["eval_examples"] for s in stats] == [1, 1]
    assert [s["train_examples"] for s in stats] == [9, 3]
    assert sum(r["input_ids"] == SUM_IDS for r in train_rows) == 3
    assert [r["input_ids"] for r in eval_rows] == [HI_IDS, SUM_IDS]


def test_truncation_drop_and_truncate(tmp_path, llama3_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": HI}, {"messages": SUM}])
    _, _, stats = render_sources(make_cfg(tmp_path, [path], max_length=14, truncation="drop"), llama3_tokenizer)
    assert stats[0]["dropped_too_long"] == 1 and stats[0]["train_examples"] == 1
    cut = build_dataset(make_cfg(tmp_path, [path], max_length=15, truncation="truncate"), llama3_tokenizer)
    assert sorted(len(ids) for ids in cut["input_ids"]) == [13, 15]
    assert {tuple(lab[-1:]) for lab in cut["labels"]} == {(128009,), (19,)}  # SUM keeps "4", loses <|eot_id|>


@pytest.mark.parametrize("lines, error", [
    ([{"messages": HI}, '{"messages": [', {"messages": SUM}], r"bad\.jsonl:2: not valid JSON"),
    ([{"messages": HI}, {"id": "x"}], r"bad\.jsonl:2: messages: missing field"),
    ([{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}]}],
     r"bad\.jsonl:1: messages\[0\]\.role"),
    ([{"messages": HI}, {"messages": SUM}], r"bad\.jsonl:2: messages: 16 tokens, more than train\.max_length=15"),
])
def test_malformed_records_fail_before_training(tmp_path, lines, error):
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": HI}])
    cfg = make_cfg(tmp_path, [good, write_jsonl(tmp_path / "bad.jsonl", lines)], max_length=15)
    with pytest.raises(RecordError, match=error):
        train(cfg)
    assert not (tmp_path / "out").exists()  # nothing written: no model, manifest or DONE


def test_a_huge_record_is_truncated_as_if_tokenised_whole_without_tokenising_it_whole(tmp_path, llama3_tokenizer,
                                                                                      monkeypatch):
    from posttrain import chat
    from posttrain.sft import render_example

    text = " ".join(f"w{i}" for i in range(50_000))  # ~340k characters, far past 64 tokens
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text}]
    whole = chat.render(messages, llama3_tokenizer)
    tokenised = []
    render = chat.render

    def spy(msgs, *args, **kwargs):
        tokenised.append(sum(len(m["content"]) for m in msgs))
        return render(msgs, *args, **kwargs)

    monkeypatch.setattr(chat, "render", spy)
    cfg = make_cfg(tmp_path, ["unused.jsonl"], max_length=64, truncation="truncate")
    example = render_example({"messages": messages}, "a.jsonl:1", llama3_tokenizer, cfg)
    assert example["input_ids"] == whole.ids[:64]
    assert example["labels"] == [t if m else -100 for t, m in zip(whole.ids[:64], whole.mask[:64])]
    assert tokenised and tokenised[0] < len(text) / 4
