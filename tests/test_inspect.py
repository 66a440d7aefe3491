"""`posttrain inspect`: trained spans marked, counts, ANSI on a terminal, file:line errors with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from posttrain.cli import main as cli_main
from posttrain.inspect import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sft-chat.jsonl"


def test_marks_trained_spans_on_a_pipe(capsys):
    assert cli_main(["inspect", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"== {EXAMPLES}:1 (id plain-1, sft, template of Llama 3) =="
    assert out[1:-1] == ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>", "",
                         "What is the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>", "",
                         "[[The capital of France is Paris.<|eot_id|>]]"]
    assert out[-1] == "25 tokens, 8 trained"


def test_tool_dialog_and_train_on_last(capsys):
    assert main([str(EXAMPLES), "--index", "2"]) == 0
    out = capsys.readouterr().out
    assert "[[<|python_tag|>print(2 ** 20)<|eom_id|>]]<|start_header_id|>ipython<|end_header_id|>\n\n1048576<|eot_id|>" \
        in out
    assert out.count("[[") == 2
    assert main([str(EXAMPLES), "--index", "1", "--train-on", "last"]) == 0
    out = capsys.readouterr().out
    assert out.count("[[") == 1 and "[[An insect has six legs.<|eot_id|>]]" in out


def test_ansi_colour_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main([str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert "\x1b[1;32mThe capital of France is Paris.<|eot_id|>\x1b[0m" in out
    assert "\x1b[2m<|begin_of_text|>" not in out and "\x1b[2m<|start_header_id|>user" in out
    assert "[[" not in out


def test_preference_and_prompt_kinds(tmp_path, capsys):
    pref = {"id": "p1", "prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
    path = tmp_path / "pref.jsonl"
    path.write_text(json.dumps(pref) + "\n")
    assert main([str(path), "--kind", "preference"]) == 0
    out = capsys.readouterr().out
    assert "-- chosen --" in out and "[[4<|eot_id|>]]" in out and "[[5<|eot_id|>]]" in out
    assert out.splitlines()[-1] == "chosen: 16 tokens, 2 trained | rejected: 16 tokens, 2 trained"
    path.write_text(json.dumps({"id": "q", "messages": [{"role": "user", "content": "2+2?"}]}) + "\n")
    assert main([str(path), "--kind", "prompt"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("<|start_header_id|>assistant<|end_header_id|>\n\n\n14 tokens, 0 trained")


def test_token_table(capsys):
    assert main([str(EXAMPLES), "--tokens"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["0", "128000", "'<|begin_of_text|>'", ".."]
    assert lines[-2].split() == ["24", "128009", "'<|eot_id|>'", "TF"]


def test_other_tokenizer(capsys, smollm2_dir):
    assert main([str(EXAMPLES), "--tokenizer", str(smollm2_dir)]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n[[The capital of France is Paris.<|im_end|>]]\n" in out


def test_a_model_name_renders_with_that_models_template(capsys, smollm2_dir):
    assert main([str(EXAMPLES), "--model", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"== {EXAMPLES}:1 (id plain-1, sft, template of smollm2-135m-instruct) ==\n<|im_start|>")
    assert "<|im_start|>assistant\n[[The capital of France is Paris.<|im_end|>]]\n" in out
    assert "<|eot_id|>" not in out
    assert main([str(EXAMPLES), "--tokenizer", "llama3.2-1b"]) == 0
    assert "[[The capital of France is Paris.<|eot_id|>]]" in capsys.readouterr().out


def test_samples_kind_prints_each_completion_with_its_reward(tmp_path, capsys):
    sample = {"prompt_id": "add-1", "policy": "runs/q/round_00", "system_prompt": "Be brief.", "completions": [
        {"message": {"role": "assistant", "content": "29 + 37 = 66."}, "reward": 1.42,
         "scores": {"rm": 1.42, "answer": 1.0}, "num_tokens": 9, "stop_reason": "eot"},
        {"message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {
            "a": 29, "b": 37}}}]}, "reward": -0.3125, "scores": {"rm": -0.3125, "answer": 0.0}, "num_tokens": 64,
         "stop_reason": "length"}]}
    path = tmp_path / "shard-00000.jsonl"
    path.write_text(json.dumps(sample) + "\n")
    assert main([str(path), "--kind", "samples"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"== {path}:1 (prompt add-1, samples, policy runs/q/round_00) ==",
        "system prompt: Be brief.",
        "-- completion 0: reward 1.42 | rm 1.42, answer 1 | 9 tokens, stop eot --",
        "29 + 37 = 66.",
        "-- completion 1: reward -0.3125 | rm -0.3125, answer 0 | 64 tokens, stop length (truncated) --",
        "",
        'tool_calls: [{"function": {"name": "add", "arguments": {"a": 29, "b": 37}}}]',
        "2 completions, reward 1.42 best, -0.3125 worst"]


def test_a_record_of_another_kind_names_the_kind_it_fits(tmp_path, capsys):
    pref = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    sample = {"prompt_id": "q", "completions": [{"message": {"role": "assistant", "content": "4"}, "reward": 1.0}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(pref) + "\n" + json.dumps(sample) + "\n")
    assert main([str(path)]) == 2
    assert capsys.readouterr().err == (f"posttrain inspect: error: {path}:1: messages: missing field "
                                       "(this record fits --kind preference)\n")
    assert main([str(path), "--kind", "preference", "--index", "1"]) == 2
    assert capsys.readouterr().err == (f"posttrain inspect: error: {path}:2: prompt: missing field "
                                       "(this record fits --kind samples)\n")
    path.write_text(json.dumps({"messages": "not a list"}) + "\n")
    assert main([str(path)]) == 2
    assert "fits" not in capsys.readouterr().err


def test_bad_record_exits_2_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    assert main([str(path), "--index", "1"]) == 2
    assert capsys.readouterr().err.startswith(
        f"posttrain inspect: error: {path}:2: messages[0].role: unknown role 'robot'")
    path.write_text(json.dumps(good) + "\n{not json\n")
    assert main([str(path), "--index", "1"]) == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err
    assert main([str(path), "--index", "0", "--kind", "prompt"]) == 2
    assert f"{path}:1: messages[1].role: must be user or ipython" in capsys.readouterr().err


def test_missing_file_and_index_out_of_range(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file or directory" in capsys.readouterr().err
    assert main([str(EXAMPLES), "--index", "9"]) == 2
    assert "no record at index 9 (4 records)" in capsys.readouterr().err
