"""The DPO stage of the Llama 3 recipe on trl.DPOTrainer: β 0.1, LR 1e-5, header and terminator tokens masked out of
every log-prob, + 0.2 × NLL on chosen. The reference is this round's SFT model (the policy's starting point).

Flow: read, validate and tokenize every pair (a bad pair stops here, naming file:line, before anything is written)
-> seed every RNG, load policy (LoRA or full) and reference -> train, resuming from the last complete checkpoint ->
save the model atomically -> manifest.json -> DONE. The output dir follows the stage contract of posttrain.outdir:
a dir of other files is refused, a finished run of this config and data is returned as is, one of another config
or other data refused. It holds:

    model/          merged weights (or the adapter when lora.merge is false) and the tokenizer
    checkpoints/    trainer checkpoints (resume)
    logs/           TensorBoard
    manifest.json   inputs with sha256, config, metrics, versions
    DONE            written last
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from posttrain import accel, outdir, stage
from posttrain.accel import AccelConfig
from posttrain.compat import checkpointing_args
from posttrain.backbone import apply_lora, load_model, load_tokenizer_for, resolve_dtype
from posttrain.chat import render
from posttrain.config import (ConfigError, LoRAConfig, ModelConfig, TrainConfig, blame, check_choice, check_range,
                              field, to_dict)
from posttrain.data import RecordError, UniqueIds, file_sha256, iter_raw
from posttrain.data import surely_longer_than, validate_record
from posttrain.losses import dpo_loss, policy_logps
from posttrain.tools import CUSTOM_FORMATS


@dataclasses.dataclass
class PreferenceFile:
    path: str = field("", help="preference records: JSONL, parquet or an HF datasets dir")
    weight: float = field(1.0, help="times each pair is seen per epoch: 2 = twice, 0.5 = a seeded half of the pairs")

    def __post_init__(self):
        if not self.path:
            raise ConfigError("path: required")
        if not self.weight > 0:
            raise ConfigError(f"weight: {self.weight!r} must be > 0")


@dataclasses.dataclass
class DPOStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="the policy to align: this round's SFT model")
    lora: LoRAConfig = field(default_factory=LoRAConfig, help="LoRA adapters (reference = adapters disabled) or full")
    train: TrainConfig = field(default_factory=TrainConfig, help="optimizer and schedule; batch_size counts pairs")
    data: list[PreferenceFile] = field(default_factory=list, help="preference files with weights (the latest batches)")
    beta: float = field(0.1, help="DPO β: strength of the pull towards the reference (the recipe's 0.1)")
    nll_weight: float = field(0.2, help="weight of the NLL on chosen: mean NLL per trained token of each chosen "
                                        "response, averaged over the pairs (Pang et al. 2024; recipe 0.2; 0 = off)")
    mask_format_tokens: bool = field(True, help="drop headers (<|start_header_id|>role<|end_header_id|>\\n\\n) and "
                                                "terminators (<|eot_id|>, <|eom_id|>) from all log-probs; off: the "
                                                "assistant turns' terminators count (headers never do)")
    use_edited: bool = field(True, help="when a record has `edited`, train (edited, rejected) instead of (chosen, "
                                        "rejected): the human edit is the strongest preferred response")
    ref_model_path: str | None = field(None, help="reference model; default the policy's start (model.path, or the "
                                                  "adapter-disabled base with LoRA)")
    precompute_ref_log_probs: bool = field(False, help="score the reference once before training and free it")
    max_prompt_length: int = field(0, help="prompt tokens allowed; 0 = bounded only by train.max_length")
    truncation: str = field("error", help="a pair over train.max_length (or its prompt over max_prompt_length): "
                                          "error (stop, naming file:line) or drop (skip it, counted in the manifest)")
    tool_format: str = field("json", help="how responses' custom tool calls are rendered: json, function_tag, pythonic")
    accel: AccelConfig = field(default_factory=AccelConfig, help="GPU speed levers (posttrain.accel)")

    def __post_init__(self):
        if not self.model.path:
            raise ConfigError("model.path: required (this round's SFT model)")
        if not self.train.output_dir:
            raise ConfigError("train.output_dir: required")
        if not self.data:
            raise ConfigError("data: at least one preference file is required")
        if self.beta <= 0:
            raise ConfigError(f"beta: {self.beta!r} must be > 0")
        check_range("nll_weight", self.nll_weight, low=0.0)
        check_range("max_prompt_length", self.max_prompt_length, low=0, high=self.train.max_length - 1)
        check_choice("truncation", self.truncation, ("error", "drop"))
        check_choice("tool_format", self.tool_format, CUSTOM_FORMATS)


def _message_key(msg) -> tuple:
    if not isinstance(msg, dict):
        return None, repr(msg), ""
    role = {"tool": "ipython"}.get(msg.get("role"), msg.get("role"))
    return role, msg.get("content") or "", json.dumps(msg.get("tool_calls") or [], sort_keys=True)


def split_prompt(raw: dict, where: str) -> dict:
    """Accept whole dialogs as chosen/rejected (prompt included, TRL's implicit-prompt form) and cut the prompt off.

    With `prompt` given too, each whole dialog must start with exactly that prompt; without it the prompt is the
    longest shared opening that ends on a user or ipython turn.
    """
    if not isinstance(raw, dict):
        return raw
    rec = dict(raw)
    whole = [k for k in ("chosen", "rejected", "edited") if isinstance(rec.get(k), list) and rec[k]
             and isinstance(rec[k][0], dict) and rec[k][0].get("role") != "assistant"]
    if not whole:
        return rec
    if "prompt" not in rec and {"chosen", "rejected"} <= set(whole):
        keys = [[_message_key(m) for m in rec[k]] for k in ("chosen", "rejected")]
        n = 0
        while n < min(map(len, keys)) and keys[0][n] == keys[1][n]:
            n += 1
        while n and keys[0][n - 1][0] == "assistant":
            n -= 1
        rec["prompt"] = rec["chosen"][:n]
    prompt = rec.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        return rec  # validate_record names what is missing or malformed
    for key in whole:
        head = rec[key][: len(prompt)]
        if [_message_key(m) for m in head] != [_message_key(m) for m in prompt]:
            raise RecordError(f"{where}: {key}: prompt mismatch: {key} holds a whole dialog whose first "
                              f"{len(prompt)} messages differ from prompt")
        rec[key] = rec[key][len(prompt):]
    return rec


def tokenize_pair(rec: dict, tokenizer, cfg: DPOStageConfig, where: str) -> dict | None:
    """prompt_ids, chosen/rejected ids and loss masks of one record; None when too long and truncation is drop.

    Prompt + response is rendered as one dialog; the prompt part is the prompt rendered with the assistant header.
    The loss mask keeps what `render` trains on after the prompt (assistant content and terminators), less the
    format tokens when mask_format_tokens is on.
    """
    kw = {"tools": rec.get("tools"), "tool_format": cfg.tool_format}
    chosen_key = "edited" if cfg.use_edited and rec.get("edited") else "chosen"
    huge = [key for key in (chosen_key, "rejected")
            if surely_longer_than(rec["prompt"] + rec[key], tokenizer, cfg.train.max_length)]
    if huge and cfg.truncation == "drop":
        return None
    if huge:
        raise RecordError(f"{where}: {huge[0]}: prompt + {huge[0]} is far more than train.max_length="
                          f"{cfg.train.max_length} tokens (truncation: drop skips such pairs)")
    prompt_ids = render(rec["prompt"], tokenizer, add_generation_prompt=True, **kw).ids
    n = len(prompt_ids)
    pair, too_long = {"prompt_ids": prompt_ids}, ""
    if cfg.max_prompt_length and n > cfg.max_prompt_length:
        too_long = f"prompt: {n} tokens > max_prompt_length={cfg.max_prompt_length}"
    for side, key in (("chosen", chosen_key), ("rejected", "rejected")):
        full = render(rec["prompt"] + rec[key], tokenizer, **kw)
        if full.ids[:n] != prompt_ids:
            raise RecordError(f"{where}: {key}: the prompt rendered alone is not a prefix of prompt + {key} "
                              "(the chat template renders them differently)")
        mask = [m and not (cfg.mask_format_tokens and f) for m, f in zip(full.mask[n:], full.format_mask[n:])]
        if not any(mask):
            raise RecordError(f"{where}: {key}: no trained tokens in the response")
        if len(full.ids) > cfg.train.max_length and not too_long:
            too_long = f"{key}: prompt + {key} is {len(full.ids)} tokens > train.max_length={cfg.train.max_length}"
        pair[f"{side}_ids"], pair[f"{side}_mask"] = full.ids[n:], mask
    if pair["chosen_ids"] == pair["rejected_ids"]:
        raise RecordError(f"{where}: rejected: identical to {chosen_key}")
    if too_long and cfg.truncation == "error":
        raise RecordError(f"{where}: {too_long} (truncation: drop skips such pairs)")
    return None if too_long else pair


def _weigh(pairs: list[dict], weight: float, rng: random.Random) -> list[dict]:
    copies = int(weight)
    return pairs * copies + rng.sample(pairs, round((weight - copies) * len(pairs)))


def build_pairs(cfg: DPOStageConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """Read, validate and tokenize every preference file: (pairs, one manifest entry per file).

    A bad record (identical chosen and rejected, a missing field, an empty response, a prompt mismatch, a pair too
    long under truncation: error, an id seen before in the file) or an empty file raises RecordError naming
    file:line and the field.
    """
    rng = random.Random(cfg.train.seed)
    pairs, inputs = [], []
    for i, source in enumerate(cfg.data):
        kept, dropped, edited, ids = [], 0, 0, UniqueIds()
        for where, raw in iter_raw(source.path, allow_empty=False):
            rec = validate_record(split_prompt(raw, where), "preference", where)
            ids.check(rec, where)
            pair = tokenize_pair(rec, tokenizer, cfg, where)
            dropped += pair is None
            edited += pair is not None and cfg.use_edited and bool(rec.get("edited"))
            kept += [pair] if pair is not None else []
        if not kept:
            raise ValueError(f"data[{i}].path: {source.path}: no pairs to train on ({dropped} dropped as too long)")
        weighted = _weigh(kept, source.weight, rng)
        pairs += weighted
        inputs.append({"path": source.path, "sha256": file_sha256(source.path), "weight": source.weight,
                       "records": len(kept) + dropped, "dropped_too_long": dropped, "edited_as_chosen": edited,
                       "pairs": len(weighted)})
    return pairs, inputs


@dataclasses.dataclass
class PairCollator:
    """Right-pads B pairs into 2B rows (chosen rows first); `completion_mask` is the loss mask from build_pairs."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(e["prompt_ids"] + e[f"{side}_ids"], [0] * len(e["prompt_ids"]) + [int(m) for m in e[f"{side}_mask"]])
                for side in ("chosen", "rejected") for e in examples]
        width = max(len(ids) for ids, _ in rows)
        batch = {
            "input_ids": torch.tensor([ids + [self.pad_token_id] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "completion_mask": torch.tensor([mask + [0] * (width - len(mask)) for _, mask in rows]),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


class LlamaDPOTrainer(stage.DeviceMetrics, DPOTrainer):
    """DPOTrainer with the recipe's loss: TRL's `sft` term is a token mean over the whole batch, ours a mean per
    chosen sequence (Pang et al.), so `compute_loss` goes through `posttrain.losses.dpo_loss`. Its metrics are means
    over the pairs of every micro-step and process, kept on the device until the trainer logs (posttrain.stage)."""

    def __init__(self, *args, nll_weight: float, **kwargs):
        self.nll_weight = nll_weight
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset  # pairs arrive tokenized by build_pairs, with the format-token loss masks

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        chosen_logps, rejected_logps, chosen_tokens = policy_logps(model, inputs)
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # TRL's reference pass: the reference model, or the policy with its adapters disabled
            ref = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(ref, inputs)
        loss, metrics = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=self.beta,
                                 nll_weight=self.nll_weight, chosen_nll=-chosen_logps / chosen_tokens.clamp(min=1))
        self.defer(mode, pairs=len(chosen_logps), **{key: value.sum() for key, value in metrics.items()})
        return (loss, metrics) if return_outputs else loss

    def summarize(self, mode: str, sums: dict[str, float]) -> None:
        """dpo_loss's metrics are per pair: each is logged as its mean over the pairs since the last log."""
        pairs = sums.pop("pairs")
        for key, total in sums.items():
            self._metrics[mode][key] = [total / pairs]


def load_models(cfg: DPOStageConfig):
    """(policy, reference or None). None where TRL needs no separate model: with LoRA (the adapter-disabled base)
    and with precomputed reference log-probs (the policy before its first step)."""
    kw = {"dtype": cfg.model.dtype, "attn_implementation": cfg.model.attn_implementation}
    policy = apply_lora(load_model(cfg.model.path, **kw), cfg.lora)
    separate = cfg.ref_model_path or not (cfg.lora.enabled or cfg.precompute_ref_log_probs)
    with blame("ref_model_path" if cfg.ref_model_path else "model.path"):
        ref = load_model(cfg.ref_model_path or cfg.model.path, **kw) if separate else None
    accel.apply(policy, cfg.accel)
    if ref is not None:
        accel.apply(ref, cfg.accel)
    return policy, ref


def _dataset(pairs: list[dict], cfg: DPOStageConfig, out: Path, state) -> Dataset:
    dataset = Dataset.from_list(pairs)
    if not cfg.precompute_ref_log_probs:
        return dataset
    # TRL caches the reference log-probs beside the dataset's files; an in-memory dataset would give each process
    # its own random cache path, so the main process saves the pairs and everyone reads the same files.
    path = out / "pairs"
    with state.main_process_first():
        if state.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
            dataset.save_to_disk(str(path))
    return Dataset.load_from_disk(str(path))


def _trainer_args(cfg: DPOStageConfig, out: Path) -> DPOConfig:
    """TRL's config from ours; making it sets up the (maybe distributed) process group, on CPU when there is no GPU."""
    stage.check_devices()
    t, dtype = cfg.train, resolve_dtype(cfg.model.dtype)
    return DPOConfig(
        output_dir=str(out / "checkpoints"), learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, num_train_epochs=t.num_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, seed=t.seed,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        **checkpointing_args(DPOConfig, t.gradient_checkpointing, accel.checkpointing_kwargs(cfg.accel)),
        logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 1,
        save_total_limit=1, report_to=[r for r in t.report_to if r not in ("tensorboard", "none")] or "none",
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        beta=cfg.beta, loss_type=["sigmoid"], max_length=None, remove_unused_columns=False,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # several CPU processes then form a gloo group, not one run each
        **stage.TRAINER_KWARGS,
    )


def build_trainer(cfg: DPOStageConfig, pairs: list[dict], tokenizer, out: Path) -> LlamaDPOTrainer:
    """The DPO trainer on the tokenized pairs: policy, reference, collator and arguments from the stage config."""
    args = _trainer_args(cfg, out)
    set_seed(cfg.train.seed)  # before the models: random weights (a config name) and LoRA's init repeat
    policy, ref = load_models(cfg)
    if args.distributed_state.is_main_process:
        outdir.claim(out, "dpo")
    args.distributed_state.wait_for_everyone()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with accel.device_fingerprint():  # TRL keys the precomputed reference log-probs by a hash of the weights
        trainer = LlamaDPOTrainer(
            model=policy, ref_model=ref, args=args, train_dataset=_dataset(pairs, cfg, out, args.distributed_state),
            processing_class=tokenizer, data_collator=PairCollator(tokenizer.pad_token_id),
            nll_weight=cfg.nll_weight, callbacks=stage.tensorboard(cfg.train.report_to, out / "logs"),
        )
    if trainer.is_fsdp_enabled and cfg.lora.enabled:
        raise ConfigError("lora.enabled: LoRA runs under DDP (configs/accelerate/ddp.yaml); FSDP is for full "
                          "fine-tuning")
    if "ref" in getattr(trainer.model, "peft_config", {}):
        # TRL copies a passed-in adapter as the reference; ours is fresh (B = 0), so the adapter-disabled base is
        # the same model without the extra adapter.
        trainer.model.delete_adapter("ref")
    if cfg.precompute_ref_log_probs:
        trainer.ref_model = None  # scored already; free it
    return trainer


def _final_metrics(trainer: LlamaDPOTrainer, cfg: DPOStageConfig, result) -> dict:
    """The last logged window of DPO metrics (loss = loss/dpo + nll_weight × nll over it), plus run totals."""
    last = next((h for h in reversed(trainer.state.log_history) if "rewards/margins" in h), {})
    keys = ("loss/dpo", "nll", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
            "logps/chosen", "logps/rejected")
    metrics = {k: last[k] for k in keys if k in last}
    if metrics:
        metrics["loss"] = metrics["loss/dpo"] + cfg.nll_weight * metrics["nll"]
    metrics.update(train_loss=result.training_loss, steps=trainer.state.global_step, window_end_step=last.get("step"))
    return metrics


def train(cfg: DPOStageConfig) -> dict:
    """Run the DPO stage into cfg.train.output_dir and return its manifest (a finished dir is returned as is)."""
    out = Path(cfg.train.output_dir)
    done = outdir.reuse_finished(out, "dpo", to_dict(cfg), [d.path for d in cfg.data],
                                 lambda m: [source["sha256"] for source in m["inputs"]["data"]])
    if done is not None:
        return done
    with blame("model.path"):
        tokenizer = load_tokenizer_for(cfg.model.path)
    pairs, inputs = build_pairs(cfg, tokenizer)  # bad data stops here, before anything is written
    trainer = build_trainer(cfg, pairs, tokenizer, out)
    result = trainer.train(resume_from_checkpoint=stage.last_checkpoint(out / "checkpoints"))
    if trainer.pending("train"):
        trainer.log({})  # the steps since the last logging step, so the manifest and TensorBoard see the end
    manifest = {
        "stage": "dpo",
        "inputs": {"model": cfg.model.path, "reference": cfg.ref_model_path or cfg.model.path, "data": inputs},
        "config": to_dict(cfg),
        "outputs": {"model": "model", "model_kind": outdir.model_kind(cfg.lora), "logs": "logs"},
        "metrics": {**_final_metrics(trainer, cfg, result), "pairs": len(pairs),
                    "world_size": trainer.accelerator.num_processes},
        "versions": stage.versions(),
    }
    outdir.finish(trainer, out, manifest, tokenizer=tokenizer, lora=cfg.lora, base=cfg.model.path, model_dir="model")
    return manifest
