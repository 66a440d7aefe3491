"""`posttrain chat`: one-shot and interactive on the tiny model, the dialog history carried from turn to turn."""

from __future__ import annotations

import io
import subprocess
import sys

import torch

from posttrain import chat_cli
from posttrain.cli import main
from posttrain.generate import generate, load_policy

TOKENS = "3"


def _greedy(model_dir, history: list[dict], seed: int, system: str | None = None):
    model, tokenizer = load_policy(model_dir, torch.float32)
    return generate(model, tokenizer, [history], k=1, temperature=0.0, max_new_tokens=int(TOKENS), seed=seed,
                    system_prompt=system, progress=False)[0][0]


def test_one_shot_prints_the_greedy_reply_to_the_prompt(tiny_model_dir, capsys):
    assert main(["chat", str(tiny_model_dir), "--prompt", "Hello", "--system", "Be brief.",
                 "--max-new-tokens", TOKENS]) == 0
    expected = _greedy(tiny_model_dir, [{"role": "user", "content": "Hello"}], 0, "Be brief.")
    assert capsys.readouterr().out == expected.text + "\n"


def test_interactive_keeps_the_dialog_and_stops_at_exit(tiny_model_dir, monkeypatch, capsys):
    prompts = []

    def recording(model, tokenizer, batch, **kwargs):
        prompts.append([dict(m) for m in batch[0]])
        return generate(model, tokenizer, batch, **kwargs)

    monkeypatch.setattr(chat_cli, "generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n\nWhat is 2+2?\n/exit\nnever read\n"))
    assert main(["chat", str(tiny_model_dir), "--max-new-tokens", TOKENS]) == 0
    first = _greedy(tiny_model_dir, [{"role": "user", "content": "Hi"}], 0)
    history = [{"role": "user", "content": "Hi"}, first.message, {"role": "user", "content": "What is 2+2?"}]
    assert prompts == [history[:1], history]  # the blank line is no turn; the second turn sees the first
    assert capsys.readouterr().out == f"{first.text}\n{_greedy(tiny_model_dir, history, 1).text}\n"


def test_interactive_from_a_pipe_exits_0_at_eof(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "posttrain", "chat", str(tiny_model_dir), "--max-new-tokens", TOKENS],
                          input="Hi\nAnd again\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(_greedy(tiny_model_dir, [{"role": "user", "content": "Hi"}], 0).text + "\n")
    assert proc.stdout.endswith("\n")


def test_a_bad_option_is_one_line(tiny_model_dir, capsys):
    assert main(["chat", str(tiny_model_dir), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err == "posttrain chat: error: --max-new-tokens: 0; need at least 1\n"
