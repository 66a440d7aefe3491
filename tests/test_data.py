import json

import pytest

from posttrain.data import RecordError, from_openai, from_sharegpt, read_records, validate_record, write_jsonl


def _jsonl(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


GOOD = {"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_reads_valid_records_and_fills_ids(tmp_path):
    path = _jsonl(tmp_path, [GOOD, {"messages": GOOD["messages"]}])
    recs = read_records(path, "sft")
    assert [r["id"] for r in recs] == ["a", "data-2"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"data.jsonl:2: not valid JSON"),
        ({"id": "b"}, r"data.jsonl:2: messages: missing field"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, r"data.jsonl:2: messages\[0\].role: the dialog must open"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"data.jsonl:2: messages\[0\].role: unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"data.jsonl:2: messages\[0\].role: must be assistant"),
        ({"messages": []}, r"data.jsonl:2: messages: empty dialog"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content: expected a string"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]},
            r"messages\[0\].tool_calls: only assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "x"},
                          {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}]},
            r"messages\[1\].tool_calls\[0\].function.arguments: expected an object",
        ),
    ],
)
def test_bad_sft_records_name_file_line_and_field(tmp_path, bad, message):
    with pytest.raises(RecordError, match=message):
        read_records(_jsonl(tmp_path, [GOOD, bad]), "sft")


def test_tool_alias_and_preference_strings_are_normalised():
    rec = validate_record({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "preference")
    assert rec["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert rec["chosen"] == [{"role": "assistant", "content": "4"}]
    msgs = validate_record({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}, "prompt")
    assert msgs["messages"][1]["role"] == "ipython"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "q", "chosen": "same", "rejected": " same "}, "rejected: identical to chosen"),
        ({"prompt": "q", "chosen": "a"}, "rejected: missing field"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen: empty response"),
    ],
)
def test_bad_preference_records(bad, message):
    with pytest.raises(RecordError, match=message):
        validate_record(bad, "preference", "p.jsonl:4")


def test_converters():
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert from_sharegpt(sharegpt)["messages"][1] == {"role": "assistant", "content": "yo"}
    openai = {"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"city\": \"Oslo\"}"}}]}]}
    call = from_openai(openai)["messages"][1]["tool_calls"][0]
    assert call == {"type": "function", "function": {"name": "get", "arguments": {"city": "Oslo"}}}


def test_write_jsonl_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.jsonl"
    assert write_jsonl(path, [{"a": 1}, {"b": "é"}]) == 2
    assert path.read_text(encoding="utf-8").splitlines() == ['{"a": 1}', '{"b": "é"}']
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    write_jsonl(tmp_path / "m.jsonl", [{"a": 1}])
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask
