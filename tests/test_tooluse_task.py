"""The shipped tool-use task (examples/tasks/tooluse/, configs/tasks/tooluse-3round*.yaml): its files load with
JSON-schema tools, no eval prompt is a train prompt, the tool_call verifier scores calls against each record's expected
calls, the prompt shows the tools and the call format (the reference reply passes), both configs load alike, and one
tiny round of the full loop runs on the real SmolLM2."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import from_dict, load_config
from posttrain.tools import encode_tool_calls, format_tool_definitions, make_call
from rewards.tool_eval import OPTIONAL, ONE_OF
from rewards.verifiable import get_verifier
from rounds import collect
from rounds.orchestrator import RunConfig
from rounds.state import RunDir
from rounds.tasks import Task, TaskConfig

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "configs" / "tasks" / "tooluse-3round.yaml"
BASELINE = REPO / "configs" / "tasks" / "tooluse-3round-rs-sft.yaml"
JSON_TYPES = {"string", "integer", "number", "boolean", "array", "object"}


def _config(path: Path) -> dict:
    """A shipped config as a mapping, its task files taken from the repo root."""
    data = yaml.safe_load(path.read_text())
    data["task"] = {**data["task"], **{k: [str(REPO / p) for p in data["task"][k]] for k in ("train", "eval")}}
    return data


@pytest.fixture(scope="module")
def task() -> Task:
    return Task(from_dict(TaskConfig, _config(FULL)["task"], source=str(FULL)))


def _by_request(task: Task, request: str) -> dict:
    return next(p for p in task.eval_prompts() if p["meta"]["request"] == request)


def _types(schema: dict) -> set[str]:
    """Every type name a schema uses, nested properties and items included."""
    found = {schema["type"]} if "type" in schema else set()
    for sub in [*schema.get("properties", {}).values(), *([schema["items"]] if "items" in schema else [])]:
        found |= _types(sub)
    return found


def _literal(spec):
    """One acceptable value of an expected argument; None for an optional one, which the reply leaves out."""
    if isinstance(spec, dict) and set(spec) == {OPTIONAL}:
        return None
    if isinstance(spec, dict) and set(spec) == {ONE_OF}:
        return spec[ONE_OF][0]
    return spec


def _reference_calls(meta: dict) -> list[dict]:
    return [make_call(c["name"], {k: _literal(v) for k, v in c["arguments"].items() if _literal(v) is not None})
            for c in meta["expected_calls"]]


def test_the_files_hold_distinct_requests_over_json_schema_tools(task):
    train, held = task.train_prompts(0, 1600), task.eval_prompts()
    assert (len(train), len(held)) == (1600, 200)
    for record in train + held:
        names = [t["function"]["name"] for t in record["tools"]]
        assert len(names) == 3 == len(set(names))
        assert set().union(*(_types(t["function"]["parameters"]) for t in record["tools"])) <= JSON_TYPES
        assert {c["name"] for c in record["meta"]["expected_calls"]} <= set(names)
    categories = [p["meta"]["category"] for p in held]
    assert 20 <= categories.count("parallel") <= 80 and all(c in ("simple", "parallel") for c in categories)
    assert {t for p in held for tool in p["tools"] for t in _types(tool["function"]["parameters"])} == JSON_TYPES


def test_no_eval_prompt_is_a_train_prompt(task):
    train = task.train_prompts(0, 1600)
    assert not {Task.key(p) for p in train} & task.eval_keys
    assert not {p["meta"]["request"] for p in train} & {p["meta"]["request"] for p in task.eval_prompts()}


def test_the_verifier_scores_hand_written_calls(task):
    email = _by_request(task, 'Email noah.dubois@example.com about "Weekly summary".')
    right = make_call("send_email", {"to": "noah.dubois@example.com", "subject": "Weekly summary"})
    assert task.check({"role": "assistant", "content": "", "tool_calls": [right]}, email["meta"]) == 1.0
    loose = make_call("send_email", {"to": "Noah.Dubois@example.com", "subject": "weekly summary", "urgent": False})
    assert task.check({"tool_calls": [loose]}, email["meta"]) == 1.0  # BFCL compares strings case-blind
    urgent = make_call("send_email", {"to": "noah.dubois@example.com", "subject": "Weekly summary", "urgent": True})
    assert task.check({"tool_calls": [urgent]}, email["meta"]) == 0.0
    assert task.check({"content": "I have sent the email."}, email["meta"]) == 0.0

    currency = _by_request(task, "I have 3629 CNY. How much is that in ZAR? Then change 3781 MXN into DKK.")
    text = ('<|python_tag|>{"type": "function", "name": "convert_currency", "parameters": {"amount": 3781, '
            '"from_currency": "MXN", "to_currency": "DKK"}}\n{"type": "function", "name": "convert_currency", '
            '"parameters": {"amount": 3629, "from_currency": "CNY", "to_currency": "ZAR"}}')
    assert task.check(text, currency["meta"]) == 1.0  # either order; an int where a number is declared
    assert task.check(text.split("\n")[0], currency["meta"]) == 0.0  # one of the two calls
    swapped = text.replace('"CNY", "to_currency": "ZAR"', '"ZAR", "to_currency": "CNY"')
    assert task.check(swapped, currency["meta"]) == 0.0

    contact = _by_request(task, "Save a contact for Grace Moreau, phone 555-7088, who lives in Seville.")
    details = {"phone": "555-7088", "city": "Seville"}
    assert task.check({"tool_calls": [make_call("create_contact", {"name": "Grace Moreau", "details": details})]},
                      contact["meta"]) == 1.0
    assert task.check({"tool_calls": [make_call("create_contact", {"name": "Grace Moreau", "details": "Seville"})]},
                      contact["meta"]) == 0.0
    assert task.check({"tool_calls": [make_call("send_email", {"to": "Grace Moreau", "subject": "hi"})]},
                      contact["meta"]) == 0.0
    malformed = [{"type": "function", "function": {"name": "create_contact", "arguments": "{name: Grace"}}]
    assert task.check({"tool_calls": malformed}, contact["meta"]) == 0.0
    assert task.check('{"type": "function", "name": "create_contact", "parameters": {"name": "Grace', contact["meta"]) == 0.0


def test_the_tool_call_verifier_with_and_without_expected_calls():
    verify = get_verifier("tool_call")
    tools = [{"type": "function", "function": {"name": "set_timer", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
        "required": ["minutes"]}}}]
    ten, seven = make_call("set_timer", {"minutes": 10}), make_call("set_timer", {"minutes": 7})
    assert verify({"tool_calls": [seven]}, {"tools": tools}) == 1.0  # no expected calls: any valid call passes
    expected = {"tools": tools, "expected_calls": [{"name": "set_timer", "arguments": {"minutes": 10}}]}
    assert verify({"tool_calls": [ten]}, expected) == 1.0
    assert verify({"tool_calls": [seven]}, expected) == 0.0
    assert verify({"tool_calls": [make_call("set_timer", {"minutes": 10.0})]}, expected) == 0.0  # BFCL: no float for an int
    labelled = {"tools": tools, "expected_calls": [{"name": "set_timer", "arguments": {"minutes": 10, "label": "pasta"}}]}
    pasta = make_call("set_timer", {"minutes": 10, "label": "Pasta!"})
    assert verify({"tool_calls": [pasta]}, labelled) == 0.0  # "!" is no punctuation BFCL removes
    pasta = make_call("set_timer", {"minutes": 10, "label": "Pasta."})
    assert verify({"tool_calls": [pasta]}, labelled) == 1.0
    assert verify({"tool_calls": [pasta]}, {**labelled, "rules": "strict"}) == 0.0
    two = {"tools": tools, "expected_calls": [{"name": "set_timer", "arguments": {"minutes": 7}},
                                              {"name": "set_timer", "arguments": {"minutes": 10}}]}
    assert verify({"tool_calls": [ten, seven]}, two) == 1.0
    assert verify({"tool_calls": [ten, seven]}, {**two, "order": "exact"}) == 0.0
    assert verify({"tool_calls": [{"function": {"arguments": {"minutes": 10}}}]}, expected) == 0.0
    assert verify({"content": "done"}, {"expected_calls": []}) == 1.0  # no call expected, none made
    with pytest.raises(ValueError, match="rules: 'loose'"):
        verify({"tool_calls": [ten]}, {**expected, "rules": "loose"})


def test_the_prompt_shows_the_tools_and_the_reference_reply_passes(task, smollm2_dir):
    from posttrain.chat import render
    from posttrain.tokenizer import load_tokenizer

    smollm2_tokenizer = load_tokenizer(smollm2_dir)
    prompt = _by_request(task, "Calculate the tip on 14.38 at 20%.")
    text = smollm2_tokenizer.decode(render(prompt["messages"], smollm2_tokenizer, tools=prompt["tools"],
                                           add_generation_prompt=True).ids)
    assert format_tool_definitions(prompt["tools"], "json") in text
    assert text.endswith('Calculate the tip on 14.38 at 20%. Reply with only the function call(s) as JSON, one object '
                         'per call, like {"type": "function", "name": "get_time", "parameters": {"zone": "UTC"}}'
                         "<|im_end|>\n<|im_start|>assistant\n")
    for record in task.eval_prompts():  # the reply in the prompt's format scores 1: accuracy is not 0 by construction
        assert task.check(encode_tool_calls(_reference_calls(record["meta"]), "json"), record["meta"]) == 1.0


def test_preference_pairs_keep_the_prompts_tools(task, tmp_path):
    prompt = _by_request(task, "Calculate the tip on 14.38 at 20%.")
    right = {"role": "assistant", "content": "", "tool_calls": _reference_calls(prompt["meta"])}
    wrong = {"role": "assistant", "content": "A 20% tip is 2.88."}
    completions = [{"message": m, "reward": r, "scores": {"tool_call": r}, "num_tokens": 9, "stop_reason": "eot"}
                   for m, r in ((right, 1.0), (wrong, 0.0))]
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "shard-00000.jsonl").write_text(
        json.dumps({"prompt_id": prompt["id"], "policy": "p", "completions": completions}) + "\n")
    [pair] = collect._labelled_pairs(collect.PrefsConfig(), tmp_path, {prompt["id"]: prompt})
    assert pair["tools"] == prompt["tools"] and pair["chosen"] == [right] and pair["rejected"] == [wrong]


def test_both_configs_load_with_the_same_shared_settings(monkeypatch):
    monkeypatch.chdir(REPO)
    full, baseline = load_config(RunConfig, FULL, []), load_config(RunConfig, BASELINE, [])
    assert full.task == baseline.task and full.task.verifier_name == "tool_call"
    assert full.rounds * (full.task.pref_prompts + full.task.rs_prompts) <= 1600
    assert full.evals == baseline.evals and full.sft == baseline.sft and full.model == baseline.model
    assert {k: v for k, v in full.rs.items() if k != "rewards"} == {k: v for k, v in baseline.rs.items()
                                                                   if k != "rewards"}
    assert (full.stages.rm, full.stages.dpo, baseline.stages.rm, baseline.stages.dpo) == (True, True, False, False)
    assert baseline.prefs.rounds == [] and full.prefs.labeler == "verifier"
    for path in (FULL, BASELINE):
        assert "not yet measured" in path.read_text() and f"posttrain run configs/tasks/{path.name}" in path.read_text()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_one_tiny_round_of_the_full_loop_runs(task, tiny_model_dir, tmp_path):
    """Every stage of a round on the task's prompts and tools (the tiny Llama 3 model: SmolLM2's tool rendering is
    checked above, and a round on SmolLM2 takes minutes on 2 cores)."""
    train = task.train_prompts(0, 1)[0]
    right = {"role": "assistant", "content": "", "tool_calls": _reference_calls(train["meta"])}
    wrong = {"role": "assistant", "content": "I cannot do that."}
    (tmp_path / "sft.jsonl").write_text(json.dumps({"id": "given-0", "messages": [*train["messages"], right],
                                                    "tools": train["tools"]}) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"id": "given-0", "prompt": train["messages"], "chosen": [right],
                                                      "rejected": [wrong], "tools": train["tools"]}) + "\n")
    config = _config(FULL)
    tiny_train = {"max_steps": 1, "batch_size": 1, "report_to": ["none"]}
    config.update({
        "runs_dir": str(tmp_path / "runs"), "model": {"path": str(tiny_model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8}, "rounds": 1,
        "task": {**config["task"], "pref_prompts": 2, "rs_prompts": 2, "eval_prompts": 2},
        "prefs": {**config["prefs"], "k": 2, "max_new_tokens": 8, "batch_size": 4,
                  "given": {"1": [str(tmp_path / "pairs.jsonl")]}},
        "rm": {**config["rm"], "train": {**config["rm"]["train"], **tiny_train}, "eval_fraction": 0.0},
        "rs": {**config["rs"], "k": 2, "max_new_tokens": 8, "shard_size": 2, "batch_size": 4,
               "rewards": [{"kind": "rm", "batch_size": 4}]},
        "sft": {**config["sft"], "train": {**config["sft"]["train"], **tiny_train},
                "data": [{"path": str(tmp_path / "sft.jsonl")}]},
        "dpo": {**config["dpo"], "pairs_from": ["prefs", "given"], "train": {**config["dpo"]["train"], **tiny_train}},
        "evals": [{"name": "heldout", "max_new_tokens": 8, "batch_size": 4}],
    })
    path = tmp_path / "tooluse.yaml"
    path.write_text(yaml.safe_dump(config))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "tooluse-3round"
    root = run / "round_01"
    for stage in ("prefs", "rm", "samples", "sft", "dpo"):
        assert (root / stage / "DONE").is_file() and "skipped" not in RunDir.manifest(root / stage), stage
    rs = json.loads((root / "samples" / "manifest.json").read_text())["metrics"]
    assert rs["gates"] == {"task_verifier": 1.0} and rs["prompts"] == 2
    prompts = {p["id"]: p for p in _read_jsonl(root / "samples" / "prompts.jsonl")}
    for shard in sorted((root / "samples" / "samples").glob("shard-*.jsonl")):
        for sample in _read_jsonl(shard):  # RS scores every sample with the task's verifier on the prompt's calls
            meta = prompts[sample["prompt_id"]]["meta"]
            assert all(c["scores"]["task_verifier"] == task.check(c["message"], meta) for c in sample["completions"])
    evals = [json.loads((run / f"round_0{r}" / "eval.json").read_text()) for r in (0, 1)]
    assert [e["evals"]["heldout"]["num_prompts"] for e in evals] == [2, 2]
    assert {r["id"] for r in evals[0]["results"]} == {p["id"] for p in task.eval_prompts(2)}
