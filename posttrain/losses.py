"""The DPO maths of the Llama 3 recipe: sigmoid DPO on masked sequence log-probs, plus a weighted NLL on chosen.

Shapes: B pairs; a forward batch holds the B chosen rows, then the B rejected rows (2B rows of T tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token log-probs over the trained tokens, and their count.

    `token_logps[:, t]` is log p(token t+1 | tokens <= t)  # [N, T-1]; `loss_mask`  # [N, T] marks trained tokens,
    so it is shifted by one to line up with the token it scores. Returns (logps  # [N], n_tokens  # [N]).
    """
    mask = loss_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def policy_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs under `model` in one concatenated forward, and chosen's token counts.

    `model` carries TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, installed by DPOTrainer): it returns
    next-token log-probs, zero where the label is -100, projecting through the LM head in tiles instead of building
    the [2B, T, vocab] logits.
    """
    loss_mask = batch["completion_mask"].bool()  # [2B, T]
    labels = batch["input_ids"].masked_fill(~loss_mask, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)
    logps, n_tokens = sequence_logps(out.log_probs, loss_mask)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_tokens, _ = n_tokens.chunk(2)
    return chosen_logps, rejected_logps, chosen_tokens


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    nll_weight: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO (Rafailov et al. 2023) plus `nll_weight` × NLL on chosen (Pang et al. 2024; Llama 3 uses 0.2).

        r_c = β (log π(y_c|x) - log π_ref(y_c|x)),  r_r = β (log π(y_r|x) - log π_ref(y_r|x))
        loss = mean_b[-log σ(r_c - r_r)] + nll_weight · mean_b[chosen_nll]

    All inputs are per pair  # [B]; `chosen_nll` is each chosen response's mean NLL per trained token (Pang et al.
    normalise by length per sequence). With policy = reference the DPO part is ln 2. Returns the scalar loss and
    per-pair metrics (detached).
    """
    if nll_weight and chosen_nll is None:
        raise ValueError("dpo_loss: nll_weight > 0 needs chosen_nll")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    dpo = -F.logsigmoid(margins)  # [B]
    loss = dpo.mean()
    if nll_weight:
        loss = loss + nll_weight * chosen_nll.mean()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": margins,
        "rewards/accuracies": (margins > 0).float(),
        "logps/chosen": policy_chosen_logps,
        "logps/rejected": policy_rejected_logps,
        "loss/dpo": dpo,
    }
    if chosen_nll is not None:
        metrics["nll"] = chosen_nll
    return loss, {k: v.detach() for k, v in metrics.items()}
