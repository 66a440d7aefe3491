"""A small task library: each task gives prompts, a held-out split and answer checking from one definition.

A task's prompts are prompt records (DESIGN.md) whose `meta` carries what its verifier needs (`{"answer": 82}`), so
the same record feeds rejection sampling, preference labelling and eval.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rewards.verifiable import VERIFIERS


@dataclass(frozen=True)
class Addition:
    """Two-digit addition: "What is 37 + 45?" -> 82. Held-out problems never appear in the train split."""

    name: str = "addition"
    verifier: str = "answer"
    template: str = "What is {a} + {b}?"

    def _all_pairs(self) -> list[tuple[int, int]]:
        return [(a, b) for a in range(10, 100) for b in range(10, 100)]

    def _heldout_pairs(self, seed: int, n: int) -> list[tuple[int, int]]:
        pairs = self._all_pairs()
        random.Random(f"{self.name}-heldout-{seed}").shuffle(pairs)
        return pairs[:n]

    def prompts(self, split: str, n: int, *, seed: int = 0, heldout_size: int = 256, offset: int = 0) -> list[dict]:
        """`n` prompt records of `split` ("train" or "eval"); train prompts are drawn by `seed` from the pairs not held out.

        `offset` skips that many train problems, so each round can take fresh prompts from one seeded stream.
        """
        if split not in ("train", "eval"):
            raise ValueError(f"split: {split!r} is not train or eval")
        heldout = self._heldout_pairs(0, heldout_size)
        if split == "eval":
            if n > heldout_size:
                raise ValueError(f"n: {n} eval prompts asked, but the held-out split has {heldout_size}")
            chosen = heldout[:n]
        else:
            held = set(heldout)
            pool = [p for p in self._all_pairs() if p not in held]
            random.Random(f"{self.name}-train-{seed}").shuffle(pool)
            if offset + n > len(pool):
                raise ValueError(f"n: {offset + n} train prompts asked, but the train split has {len(pool)}")
            chosen = pool[offset : offset + n]
        return [
            {
                "id": f"{self.name}-{split}-{a}-{b}",
                "messages": [{"role": "user", "content": self.template.format(a=a, b=b)}],
                "meta": {"answer": a + b, "task": self.name, "tag": "math"},
            }
            for a, b in chosen
        ]

    def check(self, message: dict | str, meta: dict) -> float:
        """1.0 when the response's final answer is the sum, else 0.0."""
        return VERIFIERS[self.verifier](message, meta)


TASKS = {"addition": Addition()}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]
