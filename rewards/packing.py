"""Reward-model batches: one row per response, or responses packed into one row per prompt; the forward that reads
a reward at each response's last token.

An example is `{"prompt_ids": [...], "response_ids": [[...], ...], "order": [...]}`: the token ids its responses
share (the rendered prompt, plus any start the responses have in common), then each response's own ids in rank order
(best first), and the (seeded, shuffled) order in which the responses sit in a packed row.

Packed row (the Llama 3 RM trick): `prompt | response a | response b | ...`; each response attends to the prompt and
to itself only, and its position ids continue from the end of the prompt, so its reward equals the one it gets in a
row of its own (up to float rounding) while the prompt is encoded once.
"""

from __future__ import annotations

import torch


def row_groups(example: dict, *, pack: bool, max_length: int | None = None) -> list[list[int]]:
    """Which responses share a row: all of them in `order` when packing (a new row whenever `max_length` tokens would
    be exceeded), else one response per row."""
    if not pack:
        return [[k] for k in range(len(example["response_ids"]))]
    groups: list[list[int]] = []
    used = 0
    for k in example["order"]:
        n = len(example["response_ids"][k])
        if groups and (max_length is None or used + n <= max_length):
            groups[-1].append(k)
            used += n
        else:
            groups.append([k])
            used = len(example["prompt_ids"]) + n
    return groups


def _layout(examples: list[dict], pack: bool, max_length: int | None):
    """Rows of ids and position ids, each row's (prompt length, response spans), and every response's (row, col)."""
    ids, positions, spans, index = [], [], [], []
    for ex in examples:
        prompt = ex["prompt_ids"]
        spots: list = [None] * len(ex["response_ids"])
        for group in row_groups(ex, pack=pack, max_length=max_length):
            row, pos, row_spans = list(prompt), list(range(len(prompt))), []
            for k in group:
                response = ex["response_ids"][k]
                row_spans.append((len(row), len(row) + len(response)))
                spots[k] = (len(ids), len(row) + len(response) - 1)
                row.extend(response)
                pos.extend(range(len(prompt), len(prompt) + len(response)))
            ids.append(row)
            positions.append(pos)
            spans.append((len(prompt), row_spans))
        index.extend(spots)
    return ids, positions, spans, index


def packed_attention_mask(spans: list[tuple[int, list[tuple[int, int]]]], length: int) -> torch.Tensor:
    """Bool mask [R, 1, T, T], True = may attend: causal within the prompt; each response [start, end) sees the prompt
    and, causally, itself. Padding positions attend to themselves only, so no softmax row is empty (that gives NaN)."""
    mask = torch.zeros(len(spans), 1, length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for r, (prompt_len, row_spans) in enumerate(spans):
        mask[r, 0, :prompt_len, :prompt_len] = causal[:prompt_len, :prompt_len]
        for start, end in row_spans:
            mask[r, 0, start:end, :prompt_len] = True
            mask[r, 0, start:end, start:end] = causal[: end - start, : end - start]
        used = row_spans[-1][1] if row_spans else prompt_len
        mask[r, 0, used:, used:] = torch.eye(length - used, dtype=torch.bool)
    return mask


def collate(examples: list[dict], pad_id: int, *, pack: bool, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded model inputs plus `reward_index` [N, 2] (row, col of each response's last token; examples in
    order, responses in rank order) and `num_responses` [B]. Packed batches carry a 4D bool attention mask."""
    ids, positions, spans, index = _layout(examples, pack, max_length)
    length = max(map(len, ids))
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(ids), length), dtype=torch.long)
    padding_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for r, (row, pos) in enumerate(zip(ids, positions)):
        input_ids[r, : len(row)] = torch.tensor(row)
        position_ids[r, : len(pos)] = torch.tensor(pos)
        padding_mask[r, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": packed_attention_mask(spans, length) if pack else padding_mask,
        "position_ids": position_ids,
        "reward_index": torch.tensor(index, dtype=torch.long).reshape(-1, 2),
        "num_responses": torch.tensor([len(ex["response_ids"]) for ex in examples], dtype=torch.long),
    }


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head (`score`) of a sequence-classification model, plain or wrapped (PEFT, DDP, FSDP)."""
    for name, module in model.named_modules():
        if name == "score" or name.endswith(".score"):
            return module
    raise ValueError(f"{type(model).__name__} has no `score` head; load the model with num_labels=1")


def response_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards [N] of a `collate` batch: the score head's output at each response's last token.

    transformers' sequence-classification forward pools one token per row (the last non-pad one); a packed row holds
    several responses, so the per-token head output [R, T, 1] is caught with a forward hook and indexed here.
    A 4D mask goes to sdpa as bool (True = attend) and to eager attention as an additive float mask.
    """
    caught = []
    hook = _score_head(model).register_forward_hook(lambda module, args, output: caught.append(output))
    mask = batch["attention_mask"]
    if mask.dim() == 4 and getattr(model, "module", model).config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    try:
        model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False)
    finally:
        hook.remove()
    scores = caught[-1].squeeze(-1).float()  # [R, T]
    rows, cols = batch["reward_index"].unbind(-1)
    return scores[rows, cols]
