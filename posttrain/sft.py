"""The SFT stage on trl.SFTTrainer: cross-entropy on the tokens `chat.render` marks as trained, prompts masked.

`train(cfg)` reads and validates every record (errors name file:line and field, before any training), renders each
to input_ids + labels (-100 where the render mask is False), mixes the sources by weight, packs whole examples into
rows (packing.py), seeds every RNG, builds the model (LoRA or all weights) and trains, resuming from the last
checkpoint in `train.output_dir`. The output dir follows the stage contract of posttrain.outdir: a dir of other
files is refused; a finished run of the same config and data is returned as is, one of another config or other data
refused; the model is saved to a temp dir and moved in, then `manifest.json`, then `DONE`. Under
`accelerate launch` every rank builds the same data and trains; only rank 0 writes the model, manifest and DONE.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback, set_seed
from trl import SFTTrainer

from posttrain import accel, backbone, chat, outdir, stage
from posttrain.accel import AccelConfig
from posttrain.compat import checkpointing_args
from posttrain.config import (ConfigError, LoRAConfig, ModelConfig, TrainConfig, blame, check_choice, check_range,
                              field, to_dict)
from posttrain.data import CONVERTERS, RecordError, UniqueIds, file_sha256
from posttrain.data import clip_contents, iter_raw, surely_longer_than, validate_record
from posttrain.packing import IGNORE_INDEX, PackedCollator, pack
from posttrain.tools import CUSTOM_FORMATS

log = logging.getLogger(__name__)

TRUNCATION = ("error", "drop", "truncate")


@dataclasses.dataclass
class DataSourceConfig:
    path: str = field("", help="SFT records: a JSONL or parquet file, or an HF datasets dir")
    format: str = field("posttrain", help="record schema: posttrain, sharegpt or openai")
    weight: float = field(1.0, help="upsampling factor: 2.0 = every record twice, 0.5 = a seeded half of them")
    max_records: int = field(0, help="read only the first N records (0 = all)")

    def __post_init__(self):
        if not self.path:
            raise ConfigError("path: required")
        check_choice("format", self.format, tuple(CONVERTERS))
        if not self.weight > 0:
            raise ConfigError(f"weight: {self.weight!r} must be > 0")
        check_range("max_records", self.max_records, low=0)


@dataclasses.dataclass
class SFTStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="the base model (SFT starts from it every round)")
    lora: LoRAConfig = field(default_factory=LoRAConfig, help="LoRA adapters, or full fine-tuning when disabled")
    train: TrainConfig = field(default_factory=TrainConfig, help="optimiser, schedule, batch and output dir")
    data: list[DataSourceConfig] = field(default_factory=list, help="SFT sources, mixed by their weights")
    packing: bool = field(True, help="pack whole examples into rows of train.max_length (False: one per row, padded)")
    truncation: str = field("error", help="a dialog over train.max_length: error, drop, or truncate (keep its start)")
    train_on: str = field("all", help="assistant turns trained on: all, or only the last")
    tool_format: str = field("json", help="wire format of custom tool calls: json, function_tag, pythonic")
    resume: bool = field(True, help="continue from the last checkpoint in train.output_dir (False: start over)")
    eval_fraction: float = field(0.0, help="fraction of each source's records held out for eval loss (0 = none)")
    accel: AccelConfig = field(default_factory=AccelConfig, help="GPU speed levers (posttrain.accel)")

    def __post_init__(self):
        if not self.model.path:
            raise ConfigError("model.path: required (HF dir, Meta dir, .gguf or a config name)")
        if not self.train.output_dir:
            raise ConfigError("train.output_dir: required")
        if Path(self.train.output_dir).resolve() == Path(self.model.path).resolve():
            raise ConfigError("train.output_dir: must differ from model.path (a run replaces the model files there)")
        if not self.data:
            raise ConfigError("data: at least one source is required")
        check_choice("truncation", self.truncation, TRUNCATION)
        check_choice("train_on", self.train_on, ("all", "last"))
        check_choice("tool_format", self.tool_format, CUSTOM_FORMATS)
        check_range("eval_fraction", self.eval_fraction, low=0.0, high=0.5)


# ---------------------------------------------------------------------------------------------------- data


def read_source(source: DataSourceConfig) -> list[tuple[str, dict]]:
    """(`file:line`, validated record) for the records of one source; the first bad one (or a repeated id, or an
    empty file) raises RecordError."""
    converter = CONVERTERS[source.format]
    out, ids = [], UniqueIds()
    for where, raw in itertools.islice(iter_raw(source.path, allow_empty=False), source.max_records or None):
        if converter is not None:
            try:
                raw = converter(raw)
            except (KeyError, TypeError, ValueError) as e:
                raise RecordError(f"{where}: {e}") from None
        record = validate_record(raw, "sft", where)
        ids.check(record, where)
        out.append((where, record))
    return out


def render_example(record: dict, where: str, tokenizer, cfg: SFTStageConfig) -> dict | None:
    """input_ids + labels of one record (-100 where not trained); None when it is too long and truncation drops it."""
    max_length = cfg.train.max_length
    if surely_longer_than(record["messages"], tokenizer, max_length):
        if cfg.truncation == "drop":
            return None
        if cfg.truncation == "error":
            raise RecordError(f"{where}: messages: far more than train.max_length={max_length} tokens "
                              "(set truncation: drop or truncate to allow it)")
        record = {**record, "messages": clip_contents(record["messages"], tokenizer, max_length)}
    try:
        rendered = chat.render(record["messages"], tokenizer, tools=record.get("tools"), train_on=cfg.train_on,
                               tool_format=cfg.tool_format)
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"{where}: messages: {e}") from None
    ids = list(rendered.ids)
    labels = [t if trained else IGNORE_INDEX for t, trained in zip(ids, rendered.mask)]
    if len(ids) > max_length:
        if cfg.truncation == "error":
            raise RecordError(f"{where}: messages: {len(ids)} tokens, more than train.max_length={max_length} "
                              "(set truncation: drop or truncate to allow it)")
        if cfg.truncation == "drop":
            return None
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None  # truncation cut every trained token
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordError(f"{where}: messages: no token is trained on (train_on={cfg.train_on})")
    return {"input_ids": ids, "labels": labels}


def _upsample(rows: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """Every row int(weight) times, plus a seeded sample of the fractional part: 2.0 -> twice, 0.5 -> half."""
    whole, fraction = int(weight), weight - int(weight)
    return rows * whole + rng.sample(rows, round(fraction * len(rows)))


def render_sources(cfg: SFTStageConfig, tokenizer) -> tuple[list[dict], list[dict], list[dict]]:
    """(train rows, eval rows, per-source stats). Every record of every source is checked before any is rendered."""
    sources = [read_source(src) for src in cfg.data]
    train_rows, eval_rows, stats = [], [], []
    for i, (src, records) in enumerate(zip(cfg.data, sources)):
        rng = random.Random(f"{cfg.train.seed}/{i}")
        examples = [render_example(rec, where, tokenizer, cfg) for where, rec in records]
        kept = [ex for ex in examples if ex is not None]
        held_out = set(rng.sample(range(len(kept)), round(cfg.eval_fraction * len(kept))))
        train_part = [ex for j, ex in enumerate(kept) if j not in held_out]
        mixed = _upsample(train_part, src.weight, rng)
        train_rows += mixed
        eval_rows += [kept[j] for j in sorted(held_out)]
        stats.append({"path": src.path, "format": src.format, "weight": src.weight, "records": len(records),
                      "dropped_too_long": len(examples) - len(kept), "eval_examples": len(held_out),
                      "train_examples": len(mixed), "train_tokens": sum(len(ex["input_ids"]) for ex in mixed)})
    if not train_rows:
        raise ValueError("data: no training example left (every record was dropped or held out)")
    random.Random(cfg.train.seed).shuffle(train_rows)  # interleave the sources before packing
    return train_rows, eval_rows, stats


def build_dataset(cfg: SFTStageConfig, tokenizer) -> Dataset:
    """The training examples (input_ids, labels), mixed by weight and shuffled with the seed; not packed."""
    train_rows, _, _ = render_sources(cfg, tokenizer)
    return Dataset.from_list(train_rows)


# ---------------------------------------------------------------------------------------------------- training


class SessionMeter(TrainerCallback):
    """Step, tokens and wall time of this session; the trainer's own counters include the steps of a resumed run."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen
        self.started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.started
        self.tokens = state.num_input_tokens_seen - self.start_tokens


class _SFTTrainer(stage.DeviceMetrics, SFTTrainer):
    """TRL's SFTTrainer loss (the fused head's log-probs, a token mean over the accumulated batch), with its entropy,
    token accuracy and token count kept on the device until the trainer logs (posttrain.stage)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # num_items_in_batch counts every rank's tokens
        self.defer(mode, valid=outputs.label_mask.sum(), entropy=outputs.entropy.detach().sum(),
                   correct=outputs.is_top1.sum())
        if mode == "train":
            self.count_tokens((inputs["input_ids"] != self.processing_class.pad_token_id).sum())
        return (loss, outputs) if return_outputs else loss

    def summarize(self, mode: str, sums: dict[str, float]) -> None:
        if sums["valid"] > 0:
            self._metrics[mode]["entropy"] = [sums["entropy"] / sums["valid"]]
            self._metrics[mode]["mean_token_accuracy"] = [sums["correct"] / sums["valid"]]
        if mode == "train":
            self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]


def _trainer_args(cfg: SFTStageConfig, has_eval: bool):
    """TRL's config from ours; making it sets up the (maybe distributed) process group, on CPU when there is no GPU."""
    stage.check_devices()
    from trl import SFTConfig

    t, dtype = cfg.train, backbone.resolve_dtype(cfg.model.dtype)
    return SFTConfig(
        output_dir=t.output_dir,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        seed=t.seed,
        data_seed=t.seed,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        **checkpointing_args(SFTConfig, t.gradient_checkpointing, accel.checkpointing_kwargs(cfg.accel)),
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,  # unused when 0: no checkpoints, the model is saved at the end
        eval_strategy="steps" if has_eval and t.save_steps else "no",
        eval_steps=t.save_steps or None,
        report_to=[r for r in t.report_to if r not in ("tensorboard", "none")] or "none",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        max_length=None,  # rows are already cut and packed to train.max_length
        dataset_kwargs={"skip_prepare_dataset": True},  # the dataset is tokenized, labelled and packed here
        include_num_input_tokens_seen="no",  # counted on the device by _SFTTrainer
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        **stage.TRAINER_KWARGS,
    )


def _build_model(cfg: SFTStageConfig):
    """The model to train: seeded first, so that random weights (a config name) and LoRA's init repeat."""
    set_seed(cfg.train.seed)
    model = backbone.load_model(cfg.model.path, backbone.resolve_dtype(cfg.model.dtype),
                                attn_implementation=cfg.model.attn_implementation)
    if cfg.lora.enabled:
        model = backbone.apply_lora(model, cfg.lora)
    accel.apply(model, cfg.accel)
    return model


def _build_trainer(cfg: SFTStageConfig, args, tokenizer, train_rows: list[dict], eval_rows: list[dict], meter):
    """The model, then the output dir claimed (before the trainer creates it), then the trainer on packed rows."""
    model = _build_model(cfg)
    state = args.distributed_state
    if state.is_main_process:
        _prepare_output_dir(Path(cfg.train.output_dir), cfg.resume)
    state.wait_for_everyone()
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    if cfg.packing:
        train_ds = pack(train_ds, cfg.train.max_length)
        eval_ds = pack(eval_ds, cfg.train.max_length) if eval_ds is not None else None
    _choose_pad_token(tokenizer, train_rows)
    trainer = _SFTTrainer(
        model=model,
        args=args,
        data_collator=PackedCollator(tokenizer.pad_token_id),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[meter, *stage.tensorboard(cfg.train.report_to, Path(cfg.train.output_dir) / "logs")],
    )
    if trainer.is_fsdp_enabled and cfg.lora.enabled:
        raise ConfigError("lora.enabled: LoRA runs under DDP (configs/accelerate/ddp.yaml); FSDP is for full weights")
    return trainer


def _choose_pad_token(tokenizer, rows: list[dict]) -> None:
    """A pad token that no example uses (SmolLM2 pads with its <|im_end|>), so the trainer's count of non-pad input
    tokens, behind tokens_trained and tokens/s, is exact. Padding is masked out: which token it is does not matter."""
    if tokenizer.pad_token_id is not None and not any(tokenizer.pad_token_id in r["input_ids"] for r in rows):
        return
    used = set().union(*(r["input_ids"] for r in rows))
    free = [i for i in tokenizer.all_special_ids if i not in used]
    if free:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(free[0])
    elif tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _prepare_output_dir(out: Path, resume: bool) -> None:
    """Claim `out` for SFT; without resume, drop old checkpoints, so none is picked up."""
    outdir.claim(out, "sft")
    if not resume:
        for old in out.glob("checkpoint-*"):
            shutil.rmtree(old)


def _metrics(trainer, result, meter: SessionMeter, eval_metrics: dict) -> dict:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "first_loss": losses[0] if losses else result.training_loss,
        "final_loss": losses[-1] if losses else result.training_loss,
        "mean_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "start_step": meter.start_step,
        "tokens_trained": trainer.state.num_input_tokens_seen,
        "session_tokens": meter.tokens,
        "train_seconds": round(meter.seconds, 3),
        "tokens_per_s": round(meter.tokens / meter.seconds, 1) if meter.seconds > 0 else 0.0,
        "world_size": trainer.accelerator.num_processes,
    }
    return {**metrics, **eval_metrics}


def _manifest(cfg: SFTStageConfig, sources: list[dict], metrics: dict) -> dict:
    inputs = [{**s, "sha256": file_sha256(s["path"])} for s in sources]
    model_path = Path(cfg.model.path)
    model = {"path": outdir.base_reference(cfg.model.path)}
    if model_path.is_file():
        model["sha256"] = file_sha256(model_path)
    elif (model_path / "config.json").is_file():
        model["config_sha256"] = file_sha256(model_path / "config.json")
    return {"stage": "sft", "inputs": inputs, "model": model, "config": to_dict(cfg), "metrics": metrics,
            "versions": stage.versions()}


def train(cfg: SFTStageConfig) -> dict:
    """Run the SFT stage; returns its metrics (also in output_dir/manifest.json; a finished dir's as they are)."""
    out = Path(cfg.train.output_dir)
    done = outdir.reuse_finished(out, "sft", to_dict(cfg), [d.path for d in cfg.data],
                                 lambda m: [source["sha256"] for source in m["inputs"]])
    if done is not None:
        return done["metrics"]
    with blame("model.path"):
        tokenizer = backbone.load_tokenizer_for(cfg.model.path)
    train_rows, eval_rows, sources = render_sources(cfg, tokenizer)  # every record checked before anything is written
    args = _trainer_args(cfg, has_eval=bool(eval_rows))
    meter = SessionMeter()
    trainer = _build_trainer(cfg, args, tokenizer, train_rows, eval_rows, meter)
    checkpoint = stage.last_checkpoint(out) if cfg.resume else None
    if checkpoint:
        log.info("sft: resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = {"eval_loss": trainer.evaluate()["eval_loss"]} if eval_rows else {}
    metrics = _metrics(trainer, result, meter, eval_metrics)
    outdir.finish(trainer, out, _manifest(cfg, sources, metrics), tokenizer=tokenizer, lora=cfg.lora,
                  base=cfg.model.path)
    return metrics
