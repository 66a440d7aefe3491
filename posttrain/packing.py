"""Packing several examples into one row, and the collator that keeps them apart.

A packed row holds whole examples back to back (`seq_lengths` says where each ends). The collator gives every
example its own `position_ids` starting at 0 and passes no `attention_mask`: transformers then derives a
block-diagonal causal mask from the position restarts (masking_utils.find_packed_sequence_indices, for sdpa, eager
and flex; flash attention reads the same restarts as varlen boundaries). The first label of each example is -100,
so the last token of one example is never trained to predict the first token of the next. Padding at the end of a
row is one more block (positions 0, 1, ...) with labels -100, so it neither attends to nor is attended by real tokens.

The model must be called with `use_cache=False` (TRL's trainers do): with a cache, transformers ignores the restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from trl import pack_dataset

IGNORE_INDEX = -100


def pack(dataset: Dataset, max_length: int) -> Dataset:
    """Best-fit-decreasing packing of whole examples into rows of at most `max_length` tokens (TRL's `bfd`).

    Every example must already fit `max_length` (bfd would cut longer ones). Adds `seq_lengths` per row.
    """
    longest = max(len(ids) for ids in dataset["input_ids"])
    assert longest <= max_length, f"an example of {longest} tokens does not fit a row of {max_length}"
    return pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_length, strategy="bfd")


@dataclass
class PackedCollator:
    """Rows of `input_ids` + `labels` (+ `seq_lengths` when packed) -> a right-padded batch of tensors.

    Packed rows give `input_ids`, `labels`, `position_ids` [B, L] and no attention mask; unpacked rows give
    `input_ids`, `labels`, `attention_mask` [B, L].
    """

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
        if "seq_lengths" not in rows[0]:
            lengths = torch.tensor([len(row["input_ids"]) for row in rows])
            attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
            return {"input_ids": ids, "labels": labels, "attention_mask": attention_mask}
        position_ids = torch.stack([packed_positions(row["seq_lengths"], width) for row in rows])
        labels[position_ids == 0] = IGNORE_INDEX  # no loss across the boundary between two examples
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def packed_positions(seq_lengths: list[int], width: int) -> torch.Tensor:
    """Positions restarting at 0 for each example, then for the padding block: [3, 2], 7 -> [0 1 2 0 1 0 1]."""
    blocks = list(seq_lengths)
    padding = width - sum(blocks)
    assert padding >= 0, f"examples of {sum(blocks)} tokens in a row of {width}"
    if padding:
        blocks.append(padding)
    return torch.cat([torch.arange(n) for n in blocks])
