"""Reward model: Bradley-Terry training (Llama 3: no margin term; edited > chosen > rejected) and batched scoring.

`train(cfg)` = `posttrain rm CONFIG.yaml`: read the preference files (a bad record fails with file:line before
anything is written) -> drop unclear preferences (`margin` below `min_margin`, a label outside `keep_labels`) ->
seeded train / held-out split by prompt -> render prompt + each response with `posttrain.chat.render` -> TRL's
RewardTrainer with the recipe's loss over every implied pair (rows optionally packed, see rewards/packing.py) ->
held-out pairwise accuracy -> the RM dir (the stage contract of posttrain.outdir): model + score head (merged, or
base + LoRA adapter), tokenizer, manifest.json, logs/ (TensorBoard), DONE written last.
`RewardModel.from_pretrained(dir).score(prompts, completions)` scores (prompt, completion) pairs in length-sorted
batches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import set_seed
from tqdm.auto import tqdm
from trl import RewardConfig, RewardTrainer

from posttrain import accel, backbone, outdir, stage
from posttrain.chat import render
from posttrain.compat import checkpointing_args
from posttrain.config import (ConfigError, LoRAConfig, ModelConfig, TrainConfig, blame, check_choice, check_range,
                              field, to_dict)
from posttrain.tokenizer import load_tokenizer
from posttrain.data import file_sha256, read_records, surely_longer_than
from rewards.packing import collate, response_rewards

RESPONSE_KEYS = ("edited", "chosen", "rejected")  # rank order, best first


@dataclasses.dataclass
class RMStageConfig:
    """The reward-model stage: base checkpoint, LoRA, trainer settings, preference files and filters."""

    model: ModelConfig = field(default_factory=ModelConfig, help="base checkpoint (the recipe: the pre-trained model)")
    lora: LoRAConfig = field(default_factory=LoRAConfig, help="LoRA adapters; the score head is always fully trained")
    train: TrainConfig = field(
        default_factory=TrainConfig,
        help="trainer settings; batch_size counts preference records; learning_rate defaults to 1e-5 (the recipe's "
        "SFT/DPO rate, the paper states none for the RM; LoRA usually wants ~1e-4); max_length bounds prompt + "
        "response (and a packed row), longer records are dropped and counted",
    )
    data: list[str] = field(default_factory=list, help="preference record files: JSONL, parquet or HF datasets dirs")
    min_margin: float | None = field(None, help="drop records whose `margin` is below this (null: no margin filter)")
    label_key: str = field("rating", help="record field with a human preference label (dotted for nested: meta.rating)")
    keep_labels: list[str] = field(
        default_factory=lambda: ["significantly better", "better"],
        help="labels kept (case-insensitive; the recipe drops 'slightly/negligibly better'); records without the "
        "field are kept; [] keeps every label",
    )
    pack_responses: bool = field(False, help="prompt + its responses (shuffled) in one row: the prompt encoded once")
    eval_fraction: float = field(0.1, help="share of prompts whose records are held out for pairwise accuracy "
                                           "(seeded); 0 = none")

    def __post_init__(self):
        if not self.model.path:
            raise ConfigError("model.path: required (HF dir, Meta dir, .gguf or a config name)")
        if not self.data:
            raise ConfigError("data: list at least one preference file")
        if not self.train.output_dir:
            raise ConfigError("train.output_dir: the RM stage needs an output dir")
        check_range("eval_fraction", self.eval_fraction, low=0.0, high=0.5)
        if self.pack_responses:
            check_choice("model.attn_implementation", self.model.attn_implementation, ("sdpa", "eager"))


def ranked_pairs(n_responses: int) -> list[tuple[int, int]]:
    """Every (better, worse) pair implied by responses ranked best first: edited > chosen > rejected gives
    (0, 1), (0, 2), (1, 2); chosen > rejected gives (0, 1)."""
    return [(i, j) for i in range(n_responses) for j in range(i + 1, n_responses)]


def pair_indices(num_responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(better [P], worse [P]) indices into a batch's flat rewards [N], records laid out one after another."""
    better, worse, first = [], [], 0
    for n in num_responses.tolist():
        for i, j in ranked_pairs(n):
            better.append(first + i)
            worse.append(first + j)
        first += n
    device = num_responses.device
    return torch.tensor(better, device=device, dtype=torch.long), torch.tensor(worse, device=device, dtype=torch.long)


def bt_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, num_records: int | None = None
            ) -> torch.Tensor:
    """Bradley-Terry loss of the Llama 3 RM: -log σ(r_chosen - r_rejected), no margin term (Llama 2 had one).

    Inputs are per pair [P] (a 3-response record contributes its 3 implied pairs, see `ranked_pairs`). The pairwise
    losses are summed and divided by `num_records`: each record's loss is the sum of its pairs' losses, averaged
    over the records of the micro-batch (the Trainer then averages micro-batches and processes). Default
    `num_records` = P, i.e. the mean over pairs (all records 2-way).
    """
    losses = -F.logsigmoid(rewards_chosen - rewards_rejected)  # [P]
    return losses.sum() / (num_records or len(losses))


def _label(record: dict, dotted_key: str) -> Any:
    value: Any = record
    for part in dotted_key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def load_preferences(cfg: RMStageConfig) -> tuple[list[dict], dict[str, int]]:
    """Read every file (RecordError `file:line: field: ...` on a bad record), keep clear preferences; with counts."""
    records = [rec for path in cfg.data for rec in read_records(path, "preference", strict=True)]
    keep = {label.strip().lower() for label in cfg.keep_labels}
    kept, low_margin, unclear_label = [], 0, 0
    for rec in records:
        label = _label(rec, cfg.label_key)
        if cfg.min_margin is not None and rec.get("margin") is not None and rec["margin"] < cfg.min_margin:
            low_margin += 1
        elif keep and label is not None and str(label).strip().lower() not in keep:
            unclear_label += 1
        else:
            kept.append(rec)
    counts = {"records_read": len(records), "filtered_margin": low_margin, "filtered_label": unclear_label}
    return kept, counts


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split by prompt: (train, held out). Every record of one prompt (same messages and tools) falls on one
    side, so held-out accuracy never counts a prompt the RM trained on, however many rounds' pairs repeat it."""
    from posttrain.keys import prompt_key, seeded_rank

    keys = [prompt_key(r.get("prompt"), r.get("tools")) for r in records]
    prompts = sorted(set(keys), key=lambda k: seeded_rank(k, seed))
    n_eval = max(1, round(len(prompts) * eval_fraction)) if eval_fraction > 0 else 0
    if len(prompts) - n_eval < 1:
        raise ValueError(f"data: {len(records)} usable preference records over {len(prompts)} distinct prompts; "
                         f"holding out {n_eval} prompt(s) needs at least {n_eval + 1}")
    held = set(prompts[:n_eval])
    return [r for r, k in zip(records, keys) if k not in held], [r for r, k in zip(records, keys) if k in held]


def encode_record(record: dict, tokenizer) -> dict:
    """Render prompt + each response; split off the ids all responses share (the prompt) for packing."""
    responses = [record[key] for key in RESPONSE_KEYS if record.get(key)]
    full = [render(record["prompt"] + response, tokenizer, tools=record.get("tools")).ids for response in responses]
    shared = 0
    # every response keeps at least its last token, where its reward is read
    while shared < min(map(len, full)) - 1 and all(ids[shared] == full[0][shared] for ids in full):
        shared += 1
    return {"prompt_ids": full[0][:shared], "response_ids": [ids[shared:] for ids in full]}


def encode_records(records: list[dict], tokenizer, *, max_length: int, seed: int) -> tuple[list[dict], int]:
    """Encoded examples with a seeded shuffled packing `order`, and the count dropped for exceeding `max_length`."""
    rng = random.Random(seed)
    examples, too_long = [], 0
    for record in records:
        if any(surely_longer_than(record["prompt"] + record[key], tokenizer, max_length)
               for key in RESPONSE_KEYS if record.get(key)):
            too_long += 1  # without tokenizing it whole
            continue
        ex = encode_record(record, tokenizer)
        if len(ex["prompt_ids"]) + max(map(len, ex["response_ids"])) > max_length:
            too_long += 1
            continue
        ex["order"] = rng.sample(range(len(ex["response_ids"])), len(ex["response_ids"]))
        examples.append(ex)
    return examples, too_long


class _RMTrainer(stage.DeviceMetrics, RewardTrainer):
    """TRL's RewardTrainer with the recipe's loss over every implied pair, on our pre-rendered (maybe packed) rows.
    Pairwise accuracy and margin are counted on the device and reduced when the trainer logs (posttrain.stage)."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset  # already rendered and length-filtered by encode_records

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt_ids", "response_ids", "order"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        rewards = response_rewards(model, inputs)  # [N]
        better, worse = pair_indices(inputs["num_responses"])
        loss = bt_loss(rewards[better], rewards[worse], num_records=len(inputs["num_responses"]))
        with torch.no_grad():
            diff = rewards[better] - rewards[worse]
            # over processes, a duplicated last eval sample under DDP counts twice (negligible)
            self.defer(mode, pairs_correct=(diff > 0).sum(), pairs=len(diff), margin_sum=diff.sum())
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def summarize(self, mode: str, sums: dict[str, float]) -> None:
        """Exact pairwise accuracy, mean margin and pair count since the last log (for eval: the held-out set)."""
        if sums["pairs"]:
            self._metrics[mode].update(accuracy=[sums["pairs_correct"] / sums["pairs"]],
                                       margin=[sums["margin_sum"] / sums["pairs"]], scored_pairs=[sums["pairs"]])


def _load_base(cfg: RMStageConfig, pad_id: int):
    """Base checkpoint with a fresh scalar head (seeded), LoRA-wrapped when enabled."""
    set_seed(cfg.train.seed)  # the head's init (and a config-name base's random weights)
    model = backbone.load_model(cfg.model.path, cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                                num_labels=1)
    model.config.pad_token_id = pad_id
    if cfg.lora.enabled:
        model = backbone.apply_lora(model, cfg.lora)
        head_trains = any(p.requires_grad for name, p in model.named_parameters() if ".score." in f".{name}")
        assert head_trains, "apply_lora must train the score head in full (modules_to_save)"
    return model


def _trainer_args(cfg: RMStageConfig, out: Path) -> RewardConfig:
    stage.check_devices()
    t = cfg.train
    dtype = backbone.resolve_dtype(cfg.model.dtype)
    return RewardConfig(
        output_dir=str(out / "checkpoints"),
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        num_train_epochs=t.num_epochs, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, seed=t.seed,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        **checkpointing_args(RewardConfig, t.gradient_checkpointing, {}),
        logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=max(t.save_steps, 1), save_total_limit=2, eval_strategy="no", prediction_loss_only=True,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, max_length=None,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # several CPU processes then form a gloo group, not one run each
        report_to=[r for r in t.report_to if r not in ("tensorboard", "none")] or "none",
        **stage.TRAINER_KWARGS,
    )


def _build_trainer(cfg: RMStageConfig, tokenizer, train_examples: list[dict], eval_examples: list[dict], out: Path):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    callbacks = stage.tensorboard(cfg.train.report_to, out / "logs")  # next to the model, not checkpoints/runs/<date>
    model = _load_base(cfg, pad_id)
    args = _trainer_args(cfg, out)
    if args.distributed_state.is_main_process:  # before the trainer creates checkpoints/
        outdir.claim(out, "rm")
    args.distributed_state.wait_for_everyone()
    return _RMTrainer(
        model=model,
        args=args,
        data_collator=functools.partial(collate, pad_id=pad_id, pack=cfg.pack_responses,
                                        max_length=cfg.train.max_length),
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _prepare_data(cfg: RMStageConfig, tokenizer) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Train and held-out examples, and the counts of records read, filtered and kept, and of pairs."""
    records, counts = load_preferences(cfg)
    train_records, eval_records = split_records(records, cfg.eval_fraction, cfg.train.seed)
    max_length, seed = cfg.train.max_length, cfg.train.seed
    train_examples, too_long_train = encode_records(train_records, tokenizer, max_length=max_length, seed=seed)
    eval_examples, too_long_eval = encode_records(eval_records, tokenizer, max_length=max_length, seed=seed + 1)
    if not train_examples:
        raise ValueError(f"data: no training record fits train.max_length={max_length} tokens")
    counts.update(
        filtered_too_long=too_long_train + too_long_eval,
        train_records=len(train_examples),
        eval_records=len(eval_examples),
        train_pairs=sum(len(ranked_pairs(len(ex["response_ids"]))) for ex in train_examples),
        eval_pairs=sum(len(ranked_pairs(len(ex["response_ids"]))) for ex in eval_examples),
    )
    return train_examples, eval_examples, counts


def train(cfg: RMStageConfig) -> dict:
    """Train the RM into `cfg.train.output_dir`; returns its metrics (also in manifest.json). A dir with DONE of this
    config and data is finished and returned as is, one of another refused (posttrain.outdir); one without DONE
    resumes from its last checkpoint. Under `accelerate launch` every rank builds the same data and trains; rank 0
    writes the model, manifest and DONE."""
    out = Path(cfg.train.output_dir)
    done = outdir.reuse_finished(out, "rm", to_dict(cfg), cfg.data, lambda m: [m["inputs"][path] for path in cfg.data])
    if done is not None:
        return done["metrics"]
    with blame("model.path"):
        tokenizer = backbone.load_tokenizer_for(cfg.model.path)
    train_examples, eval_examples, counts = _prepare_data(cfg, tokenizer)  # bad records fail before any write
    trainer = _build_trainer(cfg, tokenizer, train_examples, eval_examples, out)
    if trainer.is_fsdp_enabled and cfg.lora.enabled:
        raise ConfigError("lora.enabled: LoRA runs under DDP (configs/accelerate/ddp.yaml); FSDP is for full weights")
    checkpoints = out / "checkpoints"
    result = trainer.train(resume_from_checkpoint=stage.last_checkpoint(checkpoints))
    # TRL's log adds the last logging window's accuracy and margin to the train metrics: name them as such
    train_metrics = {f"train_{k}" if k in ("accuracy", "margin", "scored_pairs") else k: v
                     for k, v in result.metrics.items()}
    metrics = {**train_metrics, **(trainer.evaluate() if eval_examples else {}), **counts,
               "world_size": trainer.accelerator.num_processes}
    manifest = {"stage": "rm", "format": outdir.model_kind(cfg.lora), "base_model": cfg.model.path,
                "inputs": {str(path): file_sha256(path) for path in cfg.data},
                "config": to_dict(cfg), "metrics": metrics, "versions": stage.versions()}
    outdir.finish(trainer, out, manifest, tokenizer=tokenizer, lora=cfg.lora, base=cfg.model.path)
    if trainer.accelerator.is_main_process:
        shutil.rmtree(checkpoints, ignore_errors=True)  # only needed to resume an unfinished run
    return metrics


def load_reward_model(path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"):
    """A sequence-classification model (num_labels=1) from an RM dir: merged weights, or base + LoRA adapter (merged
    on load; the adapter carries the trained score head)."""
    path = Path(path)
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        return backbone.load_model(str(path), dtype, attn_implementation=attn_implementation, num_labels=1)
    from peft import PeftModel

    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_config}: base_model_name_or_path: missing; cannot tell which model to adapt")
    model = backbone.load_model(base, dtype, attn_implementation=attn_implementation, num_labels=1)
    return backbone.merge_lora(PeftModel.from_pretrained(model, str(path)))


class RewardModel:
    """A trained RM for scoring: `RewardModel.from_pretrained(dir).score(prompts, completions)`."""

    def __init__(self, model, tokenizer, device: torch.device):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        pad_id = tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else tokenizer.eos_token_id
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.pad_id
        if torch.device(device).type == "cuda":  # flash attention over each sequence, none over the padding
            accel.use_fast_attention(self.model)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None) -> RewardModel:
        """Load an RM dir (merged or base + adapter). Defaults: CUDA if available, bf16 there, fp32 on CPU."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = backbone.resolve_dtype(dtype)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = load_reward_model(path, dtype).to(device)
        return cls(model, load_tokenizer(str(path)), device)

    def encode(self, prompt: list[dict], completion: dict | list[dict], max_length: int | None = None,
               tools: list | None = None) -> list[int]:
        """Token ids of prompt + completion as scored (rendered as in training); past `max_length` the start is cut,
        since the reward is read at the end."""
        messages = prompt + ([completion] if isinstance(completion, dict) else list(completion))
        ids = render(messages, self.tokenizer, tools=tools).ids
        return ids[-max_length:] if max_length else ids

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], completions: list[dict | list[dict]], *, batch_size: int = 8,
              max_length: int | None = None, progress: bool = False, tools: list[list | None] | None = None
              ) -> list[float]:
        """One reward per (prompt, completion), in input order; batches are length-sorted to cut padding.
        `tools`: per prompt, the tool definitions its dialog was rendered with (None: no tools)."""
        tools = tools if tools is not None else [None] * len(prompts)
        if not len(prompts) == len(completions) == len(tools):
            raise ValueError(f"score: {len(prompts)} prompts, {len(completions)} completions, {len(tools)} tool lists")
        ids = [self.encode(p, c, max_length, t) for p, c, t in zip(prompts, completions, tools)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # longest first: OOM shows early
        scores = [0.0] * len(ids)
        with tqdm(total=len(ids), desc="scoring", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                examples = [{"prompt_ids": [], "response_ids": [ids[i]]} for i in chunk]
                batch = {k: v.to(self.device) for k, v in collate(examples, self.pad_id, pack=False).items()}
                for i, reward in zip(chunk, response_rewards(self.model, batch).tolist()):
                    scores[i] = reward
                bar.update(len(chunk))
        return scores
