"""The run report reads eval.json files and stage manifests: the table and the HTML show their literal numbers."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.data import write_jsonl
from rounds import report


def _stage(root: Path, name: str, metrics: dict, done: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).mkdir()
    (root / name / "manifest.json").write_text(json.dumps({"stage": name, "metrics": metrics}))
    if done:
        (root / name / "DONE").write_text("")


def _eval(root: Path, accuracy: float, mean_reward: float, lengths: list[int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    results = [{"id": str(i), "rewards": [1.0], "num_tokens": [n]} for i, n in enumerate(lengths)]
    (root / "eval.json").write_text(json.dumps({"accuracy": accuracy, "mean_reward": mean_reward,
                                                "mean_length": sum(lengths) / len(lengths), "results": results}))


def fake_run(root: Path) -> Path:
    _eval(root / "round_00", 0.1875, 0.1875, [40, 42])
    r1 = root / "round_01"
    _eval(r1, 0.8125, 0.8125, [9, 12])
    _stage(r1, "prefs", {"pairs": 37})
    _stage(r1, "rm", {"eval_accuracy": 0.75, "eval_loss": 0.5})
    _stage(r1, "samples", {"kept": 60, "pairs": 52, "mean_reward": 0.4321, "prompts_accepted": 58, "checks": {
        "regex": {"kept_pass_rate": 0.5},  # a check that is not the task's verifier: not the one shown
        "task_verifier": {"kept_pass_rate": 1.0, "picked": 0.625, "random": 0.4375, "oracle": 0.875}}})
    (r1 / "samples" / "samples").mkdir()
    write_jsonl(r1 / "samples" / "samples" / "shard-00000.jsonl", [{"prompt_id": "p", "completions": [
        {"reward": 1.5, "text": "one\u2028two\x85three\u2029four"},  # separators str.splitlines() would split at
        {"reward": -0.5, "text": "x"}]}])
    _stage(r1, "sft", {"final_loss": 0.4567})
    _stage(r1, "dpo", {"loss": 0.6543, "train_loss": 0.7})
    r2 = root / "round_02"
    _stage(r2, "rm", {"eval_accuracy": 0.9}, done=False)  # killed before DONE: not reported
    (r2 / "dpo").mkdir()
    (r2 / "dpo" / "manifest.json").write_text(json.dumps({"stage": "dpo", "skipped": "no preference pairs"}))
    (r2 / "dpo" / "DONE").write_text("")
    return root


def test_rows_and_table_show_the_literal_numbers(tmp_path):
    rows = report.collect_rows(fake_run(tmp_path))
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1] == {"round": 1, "accuracy": 0.8125, "mean_reward": 0.8125, "mean_length": 10.5, "prefs_pairs": 37,
                       "rm_accuracy": 0.75, "rs_kept": 60, "rs_pairs": 52, "rs_reward": 0.4321, "sft_loss": 0.4567,
                       "dpo_loss": 0.6543, "rs_accepted": 58, "rs_pass": 1.0, "rs_picked": 0.625,
                       "rs_random": 0.4375, "rs_oracle": 0.875}
    table = report.format_table(rows).splitlines()
    assert [line.split() for line in table] == [
        ["round", "eval", "acc", "eval", "reward", "eval", "len", "pref", "pairs", "RM", "acc", "RS", "kept", "RS",
         "pairs", "RS", "reward", "SFT", "loss", "DPO", "loss", "RS", "prompts", "ok", "RS", "pass", "pick",
         "random", "oracle"],
        ["-" * 158],
        ["0", "(base)", "18.8%", "0.188", "41.0", *["-"] * 12],
        ["1", "81.2%", "0.812", "10.5", "37", "75.0%", "60", "52", "0.432", "0.4567", "0.6543", "58", "100.0%",
         "62.5%", "43.8%", "87.5%"],
        ["2", *["-"] * 15],
    ]
    assert table[3] == "       1     81.2%        0.812      10.5          37   75.0%       60        52      0.432" \
                       "    0.4567    0.6543             58   100.0%  62.5%   43.8%   87.5%"  # right-aligned

def test_every_further_eval_gets_a_column_named_after_it(tmp_path):
    root = fake_run(tmp_path)
    for r, accuracy in ((0, 0.25), (1, 0.5)):
        path = root / f"round_{r:02d}" / "eval.json"
        data = json.loads(path.read_text())
        data["evals"] = {"heldout": {"accuracy": data["accuracy"]}, "pass8": {"accuracy": accuracy}}
        path.write_text(json.dumps(data))
    rows = report.collect_rows(root)
    assert [r.get("eval:pass8") for r in rows] == [0.25, 0.5, None]
    table = [line.split() for line in report.format_table(rows).splitlines()]
    assert table[0][-1] == "pass8" and [line[-1] for line in table[2:]] == ["25.0%", "50.0%", "-"]
    assert "<th>pass8</th>" in report.to_html(rows, b"", "", "x")


def test_report_files_embed_the_table_and_the_plot(tmp_path):
    root = fake_run(tmp_path)
    (root / "config.yaml").write_text("name: fake\nrounds: 2\n")
    rows = report.write_report(root)
    assert len(rows) == 3
    png = (root / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (root / "report.html").read_text()
    for literal in ("18.8%", "81.2%", "0.4567", "0.6543", "75.0%", "<td>37</td>", "<td>52</td>", "name: fake"):
        assert literal in page, literal
    assert "data:image/png;base64," in page and "<script" not in page and 'src="http' not in page


def test_rewards_plot_reads_shards_whose_text_holds_unicode_line_separators(tmp_path):
    rewards, lengths = report._distributions(fake_run(tmp_path))
    assert rewards == {1: [1.5, -0.5]} and lengths == {0: [40, 42], 1: [9, 12]}
