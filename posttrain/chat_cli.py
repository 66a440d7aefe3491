"""`posttrain chat MODEL`: talk to a model in its own chat template, one-shot (`--prompt`) or line by line.

Interactive mode reads one user turn per line from stdin until EOF or `/exit` and prints each reply; the whole
dialog so far is the prompt of the next turn. Greedy by default; `--temperature` > 0 samples (seeded per turn).
MODEL is any source `posttrain.generate.load_policy` takes: an HF, Meta or LoRA adapter dir, a .gguf, a model name.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.generate import Completion, generate, load_policy

EXIT_WORDS = ("/exit", "/quit")


def reply(model, tokenizer, history: list[dict], args: argparse.Namespace, turn: int) -> Completion:
    """The completion that answers `history` (which ends in a user turn)."""
    ((completion,),) = generate(model, tokenizer, [history], k=1, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, seed=turn, system_prompt=args.system or None,
                                progress=False)
    return completion


def _turns(first: str | None):
    """The user turns: the one --prompt, or stdin lines (blank ones skipped) until EOF or an exit word."""
    if first is not None:
        yield first
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in EXIT_WORDS:
            return
        if line.strip():
            yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="posttrain chat", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("model", help="HF dir, LoRA adapter dir, Meta-native dir, .gguf file or model name")
    p.add_argument("--prompt", default=None, help="one user turn: print the reply and exit")
    p.add_argument("--system", default="", help="a system prompt put before the dialog")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: {args.max_new_tokens}; need at least 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature: {args.temperature} is negative (0 = greedy)")
    model, tokenizer = load_policy(args.model)
    history: list[dict] = []
    for turn, text in enumerate(_turns(args.prompt)):
        history.append({"role": "user", "content": text})
        completion = reply(model, tokenizer, history, args, turn)
        history.append(completion.message)
        print(completion.text, flush=True)
    return 0
