"""DPO pairs: tokens and loss masks from render(), the collator, bad pairs, weights, truncation, config checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain.config import ConfigError, from_dict, load_config
from posttrain.data import RecordError
from posttrain.dpo import DPOStageConfig, PairCollator, build_pairs, split_prompt, train

BOT, SH, EH, EOM, EOT, PY = 128000, 128006, 128007, 128008, 128009, 128010
USER, ASSISTANT, NN = 882, 78191, 271
HI_PROMPT = [BOT, SH, USER, EH, NN, 13347, EOT, SH, ASSISTANT, EH, NN]  # "Hi" + the assistant header
HI = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}  # Hello! = [9906, 0], Go. = [11087, 13]
TOOL_PAIR = {
    "prompt": "What is 2+3?",
    "chosen": [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
    ],
    "rejected": "It is 6.",
}


def _cfg(tmp_path, records, **overrides) -> DPOStageConfig:
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    train_cfg = {"output_dir": str(tmp_path / "out"), **overrides.pop("train", {})}
    return from_dict(DPOStageConfig, {"model": {"path": "tiny"}, "data": [{"path": str(data)}], "train": train_cfg,
                                      **overrides})


def test_pair_tokens_and_masks(tmp_path, llama3_tokenizer):
    (pair,), inputs = build_pairs(_cfg(tmp_path, [HI]), llama3_tokenizer)
    assert pair == {"prompt_ids": HI_PROMPT, "chosen_ids": [9906, 0, EOT], "chosen_mask": [True, True, False],
                    "rejected_ids": [11087, 13, EOT], "rejected_mask": [True, True, False]}
    assert inputs[0]["records"] == inputs[0]["pairs"] == 1 and len(inputs[0]["sha256"]) == 64
    (pair,), _ = build_pairs(_cfg(tmp_path, [HI], mask_format_tokens=False), llama3_tokenizer)
    assert pair["chosen_mask"] == pair["rejected_mask"] == [True, True, True]


def test_multi_turn_response_masks_headers_terminators_and_tool_output(tmp_path, llama3_tokenizer):
    tok = llama3_tokenizer
    (pair,), _ = build_pairs(_cfg(tmp_path, [TOOL_PAIR]), tok)
    ids, mask = pair["chosen_ids"], pair["chosen_mask"]
    trained = [i for i, m in zip(ids, mask) if m]
    call = ('<|python_tag|>{\n    "type": "function",\n    "name": "add",\n    "parameters": {\n        "a": 2,\n'
            '        "b": 3\n    }\n}')
    assert tok.decode(trained) == call + "It is 5."
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert untrained == ("<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n5<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>")
    (pair,), _ = build_pairs(_cfg(tmp_path, [TOOL_PAIR], mask_format_tokens=False), tok)
    trained_specials = [i for i, m in zip(pair["chosen_ids"], pair["chosen_mask"]) if m and i >= BOT]
    assert trained_specials == [PY, EOM, EOT]  # the assistant turns' terminators; the tool's eot stays out


def test_assistant_turns_inside_the_prompt_are_not_trained(tmp_path, llama3_tokenizer):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "2+2?"}]
    (pair,), _ = build_pairs(_cfg(tmp_path, [{"prompt": prompt, "chosen": "4", "rejected": "5"}]), llama3_tokenizer)
    assert pair["prompt_ids"][:13] == HI_PROMPT + [9906, 0]
    assert pair["chosen_ids"] == [19, EOT] and pair["chosen_mask"] == [True, False]


def test_collator_pads_chosen_rows_then_rejected_rows():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "chosen_mask": [True, False], "rejected_ids": [5],
         "rejected_mask": [True], "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5},
        {"prompt_ids": [6], "chosen_ids": [7], "chosen_mask": [True], "rejected_ids": [8, 9, 10],
         "rejected_mask": [True, True, False], "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0},
    ]
    batch = PairCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0]]
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -3.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.5, -4.0]


def test_whole_dialogs_as_chosen_and_rejected():
    user = {"role": "user", "content": "Hi"}
    a, b = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "Go."}
    assert split_prompt({"chosen": [user, a], "rejected": [user, b]}, "p.jsonl:1") == {
        "chosen": [a], "rejected": [b], "prompt": [user]}
    assert split_prompt({"prompt": "Hi", "chosen": [user, a], "rejected": [b]}, "p.jsonl:1") == {
        "prompt": "Hi", "chosen": [a], "rejected": [b]}
    with pytest.raises(RecordError, match=r"^p.jsonl:1: rejected: prompt mismatch"):
        split_prompt({"prompt": "Hi", "chosen": [a], "rejected": [{"role": "user", "content": "Bye"}, b]}, "p.jsonl:1")


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Hi", "chosen": "Hello!", "rejected": " Hello! "}, "rejected: identical to chosen"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}],
      "rejected": "Go."}, "chosen: prompt mismatch"),
    ({"prompt": "Hi", "chosen": "", "rejected": "Go."}, "chosen: empty response"),
    ({"prompt": "Hi", "chosen": "Hello!"}, "rejected: missing field"),
])
def test_bad_pairs_fail_with_file_line(tmp_path, llama3_tokenizer, bad, message):
    with pytest.raises(RecordError, match=rf"p.jsonl:2: {message}"):
        build_pairs(_cfg(tmp_path, [HI, bad]), llama3_tokenizer)


def test_bad_pairs_stop_the_stage_before_anything_is_written(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, [HI, HI, {**HI, "rejected": "Hello!"}], model={"path": str(tiny_model_dir)})
    with pytest.raises(RecordError, match=r"p.jsonl:3: rejected: identical to chosen"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_edited_replaces_chosen_when_asked(tmp_path, llama3_tokenizer):
    record = {**HI, "edited": "Hi!"}  # Hi! = [13347, 0]
    (pair,), inputs = build_pairs(_cfg(tmp_path, [record]), llama3_tokenizer)
    assert pair["chosen_ids"] == [13347, 0, EOT] and inputs[0]["edited_as_chosen"] == 1
    (pair,), inputs = build_pairs(_cfg(tmp_path, [record], use_edited=False), llama3_tokenizer)
    assert pair["chosen_ids"] == [9906, 0, EOT] and inputs[0]["edited_as_chosen"] == 0
    with pytest.raises(RecordError, match=r"p.jsonl:1: rejected: identical to edited"):
        build_pairs(_cfg(tmp_path, [{**HI, "edited": "Go."}]), llama3_tokenizer)


def test_file_weights_repeat_or_sample_pairs(tmp_path, llama3_tokenizer):
    cfg = _cfg(tmp_path, [{**HI, "rejected": f"No {i}."} for i in range(4)])
    cfg.data[0].weight = 2.0
    pairs, inputs = build_pairs(cfg, llama3_tokenizer)
    assert len(pairs) == 8 and pairs[:4] == pairs[4:] and inputs[0]["pairs"] == 8
    cfg.data[0].weight = 0.5
    pairs, _ = build_pairs(cfg, llama3_tokenizer)
    assert len(pairs) == 2 and len({tuple(p["rejected_ids"]) for p in pairs}) == 2


def test_too_long_pairs_fail_or_are_dropped(tmp_path, llama3_tokenizer):
    records = [HI, {**HI, "chosen": "Hello there, my friend!"}]  # 11 + 3 tokens fit 14; the second does not
    with pytest.raises(RecordError, match=r"p.jsonl:2: chosen: prompt \+ chosen is 18 tokens > train.max_length=14"):
        build_pairs(_cfg(tmp_path, records, train={"max_length": 14}), llama3_tokenizer)
    pairs, inputs = build_pairs(_cfg(tmp_path, records, train={"max_length": 14}, truncation="drop"), llama3_tokenizer)
    assert len(pairs) == 1 and inputs[0]["dropped_too_long"] == 1 and inputs[0]["records"] == 2
    with pytest.raises(RecordError, match=r"p.jsonl:1: prompt: 11 tokens > max_prompt_length=10"):
        build_pairs(_cfg(tmp_path, records, max_prompt_length=10), llama3_tokenizer)


@pytest.mark.parametrize("overrides, key", [
    ({"beta": 0.0}, "beta"),
    ({"nll_weight": -0.1}, "nll_weight"),
    ({"truncation": "cut"}, "truncation"),
    ({"tool_format": "xml"}, "tool_format"),
    ({"betta": 0.1}, "betta: unknown key (did you mean beta?)"),
    ({"data": [{"path": "p.jsonl", "weight": -1}]}, "data[0].weight"),
    ({"data": []}, "data"),
    ({"model": {"path": ""}}, "model.path"),
    ({"max_prompt_length": 4096}, "max_prompt_length"),
])
def test_config_errors_name_the_key(overrides, key):
    raw = {"model": {"path": "tiny"}, "data": [{"path": "p.jsonl"}], "train": {"output_dir": "out"}, **overrides}
    with pytest.raises(ConfigError, match=rf"^x.yaml: {re.escape(key)}"):
        from_dict(DPOStageConfig, raw, source="x.yaml")


def test_defaults_are_the_recipe():
    cfg = from_dict(DPOStageConfig, {"model": {"path": "tiny"}, "data": [{"path": "p.jsonl"}],
                                     "train": {"output_dir": "out"}})
    assert (cfg.beta, cfg.nll_weight, cfg.mask_format_tokens, cfg.train.learning_rate) == (0.1, 0.2, True, 1e-5)
    assert cfg.ref_model_path is None and not cfg.precompute_ref_log_probs and cfg.truncation == "error"


def test_quickstart_config_and_example_pairs_load(monkeypatch, llama3_tokenizer):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_config(DPOStageConfig, "configs/dpo-quickstart.yaml", ["train.max_steps=1"])
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.train.max_steps == 1
    pairs, inputs = build_pairs(cfg, llama3_tokenizer)
    assert len(pairs) == inputs[0]["records"] == 8 and inputs[0]["edited_as_chosen"] == 1
