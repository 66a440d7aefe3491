"""The DPO maths by hand, and the format-token mask through the real forward of a tiny Llama 3 model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config import from_dict
from posttrain.dpo import DPOStageConfig, PairCollator, build_pairs, build_trainer
from posttrain.losses import dpo_loss, sequence_logps

T = torch.tensor


def test_dpo_loss_of_two_pairs_by_hand():
    # pair A: r_c = 0.1 * (-5 - -6) = 0.1, r_r = 0.1 * (-7 - -6) = -0.1, margin 0.2,
    #         loss = -log σ(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694
    # pair B: r_c = 0.1 * (-4 - -4) = 0,   r_r = 0.1 * (-3 - -4) = 0.1,  margin -0.1,
    #         loss = log(1 + e^0.1) = log(2.1051709181) = 0.7443966601
    # mean = (0.5981388694 + 0.7443966601) / 2 = 0.6712677647
    loss, metrics = dpo_loss(T([-5.0, -4.0]), T([-7.0, -3.0]), T([-6.0, -4.0]), T([-6.0, -4.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.6712677647, abs=1e-7)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([0.1, 0.0])
    assert metrics["rewards/rejected"].tolist() == pytest.approx([-0.1, 0.1])
    assert metrics["rewards/margins"].tolist() == pytest.approx([0.2, -0.1])
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert metrics["loss/dpo"].tolist() == pytest.approx([0.5981388694, 0.7443966601])


def test_nll_on_chosen_is_a_mean_per_sequence():
    # chosen NLL per trained token: pair A 5.0 / 4 tokens = 1.25, pair B 4.0 / 2 tokens = 2.0; mean 1.625
    # loss = 0.6712677647 + 0.2 * 1.625 = 0.9962677647
    # (TRL's `sft` term is a token mean over the batch: (5 + 4) / 6 = 1.5, which would give 0.9712677647)
    chosen_logps, chosen_tokens = T([-5.0, -4.0]), T([4.0, 2.0])
    loss, metrics = dpo_loss(chosen_logps, T([-7.0, -3.0]), T([-6.0, -4.0]), T([-6.0, -4.0]), beta=0.1,
                             nll_weight=0.2, chosen_nll=-chosen_logps / chosen_tokens)
    assert loss.item() == pytest.approx(0.9962677647, abs=1e-7)
    assert metrics["nll"].tolist() == [1.25, 2.0]
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(chosen_logps, T([-7.0, -3.0]), T([-6.0, -4.0]), T([-6.0, -4.0]), beta=0.1, nll_weight=0.2)


def test_policy_equal_to_reference_gives_ln2():
    logps = T([-12.5, -3.25, -40.0])
    loss, metrics = dpo_loss(logps, logps - 2, logps, logps - 2, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"].tolist() == [0.0, 0.0, 0.0]


def test_the_mask_changes_which_token_logps_count():
    # One pair; rows: chosen, rejected. token_logps[:, t] scores token t+1, so loss_mask[:, 0] (a prompt token) never
    # counts. Chosen ends in <|eot_id|> (its 4th token), rejected in <|eot_id|> (3rd) then a pad.
    policy = T([[-1.0, -1.5, -2.5, -0.25], [-3.0, -4.0, -0.5, 0.0]])
    ref = T([[-1.0, -2.0, -3.0, -0.25], [-2.0, -4.0, -1.5, 0.0]])
    masked = T([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]])  # format tokens out
    unmasked = T([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])  # eot trained
    # masked:   π_c = -5, π_r = -7, ref_c = -6, ref_r = -6 -> margin 0.2 -> log(1 + e^-0.2) = 0.5981388694
    # unmasked: π_c = -5.25, π_r = -7.5, ref_c = -6.25, ref_r = -7.5 -> r_c = 0.1, r_r = 0 -> margin 0.1
    #           -> log(1 + e^-0.1) = log(1.9048374180) = 0.6443966601
    for mask, expected, chosen_sum in ((masked, 0.5981388694, -5.0), (unmasked, 0.6443966601, -5.25)):
        (pc, pr), n_tokens = sequence_logps(policy, mask)
        (rc, rr), _ = sequence_logps(ref, mask)
        assert pc.item() == chosen_sum and n_tokens[0].item() == mask[0, 1:].sum().item()
        loss, _ = dpo_loss(pc[None], pr[None], rc[None], rr[None], beta=0.1)
        assert loss.item() == pytest.approx(expected, abs=1e-7)


TOOL_PAIR = {
    "prompt": "What is 2+3?",
    "chosen": [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "ipython", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
    ],
    "rejected": "It is 6.",
}


def _setup(tmp_path, model_dir, tokenizer, records, **overrides):
    """A trainer on `records` and the batch of all its pairs (with reference log-probs when precomputed)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {"model": {"path": str(model_dir)}, "data": [{"path": str(data)}],
           "train": {"output_dir": str(tmp_path / "out"), "report_to": ["none"]}, **overrides}
    cfg = from_dict(DPOStageConfig, raw)
    pairs, _ = build_pairs(cfg, tokenizer)
    trainer = build_trainer(cfg, pairs, tokenizer, tmp_path / "out")
    return trainer, PairCollator(tokenizer.pad_token_id)(list(trainer.train_dataset))


@pytest.mark.parametrize("lora", [True, False])
def test_tiny_model_at_initialisation_gives_ln2(tmp_path, tiny_model_dir, llama3_tokenizer, lora):
    # LoRA: a fresh adapter (B = 0) against the adapter-disabled base; full: against a second copy of the model.
    records = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."},
               {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    trainer, batch = _setup(tmp_path, tiny_model_dir, llama3_tokenizer, records, lora={"enabled": lora}, nll_weight=0.0)
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"].abs().max().item() < 1e-6


def _loss_with_hidden_noise(trainer, batch, row: int, positions: list[int]) -> float:
    """The loss with the final hidden states (hence the logits) of the policy changed at `positions` of `row`."""
    def perturb(module, args, output):
        output = output.clone()
        noise = torch.randn(len(positions), output.size(-1), generator=torch.Generator().manual_seed(0))
        output[row, positions] += 3.0 * noise
        return output

    handle = trainer.model.model.norm.register_forward_hook(perturb) if positions else None
    try:
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()
    finally:
        if handle:
            handle.remove()


@pytest.mark.parametrize("mask_format_tokens", [True, False])
def test_logits_at_masked_positions_do_not_change_the_loss(tmp_path, tiny_model_dir, llama3_tokenizer,
                                                           mask_format_tokens):
    # the reference is scored once up front (precompute), so each loss below is one policy forward
    trainer, batch = _setup(tmp_path, tiny_model_dir, llama3_tokenizer, [TOOL_PAIR], lora={"enabled": False},
                            mask_format_tokens=mask_format_tokens, precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in batch
    ids, trained = batch["input_ids"][0].tolist(), batch["completion_mask"][0].tolist()
    end = batch["attention_mask"][0].sum().item()
    start = ids.index(128007, ids.index(78191)) + 2  # after the prompt's assistant header and "\n\n"
    untrained = [j for j in range(start, end) if not trained[j]]  # headers, role names, the tool output
    terminators = [j for j in range(start, end) if ids[j] in (128008, 128009)]  # eom, ipython's eot, final eot
    assert len(terminators) == 3
    baseline = _loss_with_hidden_noise(trainer, batch, 0, [])
    # logits at t score token t+1: perturb the positions whose next token is the one named
    assert _loss_with_hidden_noise(trainer, batch, 0, [j - 1 for j in untrained]) == pytest.approx(baseline, abs=1e-6)
    content = next(j for j in range(start, end) if trained[j])
    assert _loss_with_hidden_noise(trainer, batch, 0, [content - 1]) != pytest.approx(baseline, abs=1e-4)
    at_terminators = _loss_with_hidden_noise(trainer, batch, 0, [j - 1 for j in terminators])
    if mask_format_tokens:
        assert at_terminators == pytest.approx(baseline, abs=1e-6)
    else:  # the assistant turns' terminators (eom, final eot) count again, so their logits matter
        assert [ids[j] for j in terminators if trained[j]] == [128008, 128009]
        assert at_terminators != pytest.approx(baseline, abs=1e-4)
