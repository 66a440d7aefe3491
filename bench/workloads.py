"""The bench's workloads: stock and ours for LoRA SFT, LoRA DPO, sampling and RM scoring, and the loss checks.

Each function builds a fresh seeded model, runs one variant and returns its figures (see bench/run.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification, TrainerCallback

from bench.traces import ProfileSteps, profile_call
from posttrain import accel, backbone, chat, dpo, sft
from posttrain.config import LoRAConfig, ModelConfig, TrainConfig
from posttrain.tokenizer import PAD, load_tokenizer


@dataclasses.dataclass(frozen=True)
class Sizes:
    model: str = "llama3.1-8b"
    check_model: str = "llama3.2-1b"  # the 20-step loss checks: same code, a smaller model
    sft_lengths: tuple = (128, 2048)  # example lengths, uniform
    sft_examples: int = 400
    max_length: int = 2048  # packed row
    rows: int = 8  # packed rows per optimizer step
    stock_steps: int = 6
    ours_steps: int = 8
    dpo_lengths: tuple = (256, 384)  # prompt, each response
    pairs: int = 4  # per optimizer step
    dpo_steps: int = 8
    prompts: int = 32
    k: int = 8
    prompt_tokens: int = 128
    new_tokens: int = 256
    rm_sequences: int = 128
    rm_tokens: int = 1024
    check_steps: int = 20
    check_length: int = 1024
    attribution: bool = True  # also run the variants that take one lever away (--dry: stock and ours only)


DRY = Sizes(model="tiny", check_model="tiny", sft_lengths=(16, 64), sft_examples=24, max_length=128, rows=2,
            stock_steps=3, ours_steps=3, dpo_lengths=(8, 12), pairs=2, dpo_steps=3, prompts=2, k=2, prompt_tokens=16,
            new_tokens=6, rm_sequences=6, rm_tokens=48, check_steps=3, check_length=96, attribution=False)

LORA = LoRAConfig(r=16, alpha=32, dropout=0.0)


# ---------------------------------------------------------------------------------------------------- plumbing


def device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else 0.0


def make_model(name: str, *, classifier: bool = False):
    """A seeded random-init model built on the bench device (bf16 on CUDA, fp32 on CPU)."""
    config = backbone.llama3_config(name)
    config.pad_token_id = PAD
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if not classifier:
        return model
    config.num_labels = 1  # the RM: the same backbone under a scalar head, built without a second 8B init
    with torch.device("meta"):
        rm = LlamaForSequenceClassification(config)
    rm.model = model.model
    rm.score = torch.nn.Linear(config.hidden_size, 1, bias=False, device=device(), dtype=dtype)
    return rm.eval()


@contextlib.contextmanager
def stage_model(model):
    """The stages load their model by name; hand them the one built here (a CPU random init of 8B takes minutes)."""
    real = backbone.load_model
    users = [m for m in (backbone, sft, dpo) if getattr(m, "load_model", None) is real]

    def load(path, dtype=None, *, attn_implementation="sdpa", num_labels=None):
        model.config._attn_implementation = attn_implementation
        return model

    for module in users:
        module.load_model = load
    try:
        yield
    finally:
        for module in users:
            module.load_model = real


class StepTimer(TrainerCallback):
    """Wall time at the end of each optimizer step (after a device sync)."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.ends.append(time.perf_counter())

    def step_s(self) -> float:
        gaps = [b - a for a, b in zip(self.ends[1:], self.ends[2:])]  # the first two steps warm up
        return statistics.median(gaps)


def row_tokens(row: dict) -> int:
    """Real tokens a row puts through the model: a (packed) SFT row, or a DPO pair (the prompt runs twice)."""
    if "input_ids" in row:
        return len(row["input_ids"])
    return 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])


class CountingCollator:
    """Counts the real (unpadded) tokens of the rows it collates."""

    def __init__(self, collate):
        self.collate, self.tokens, self.calls = collate, 0, 0

    def __call__(self, rows):
        self.tokens += sum(map(row_tokens, rows))
        self.calls += 1
        return self.collate(rows)


def train_timed(trainer, micro_per_step: int, profile: Path | None = None) -> dict:
    """Step time (median), real tokens per step and peak memory of `trainer.train()`; with `profile`, steps 3-4 are
    also profiled (the median over the later steps stays clear of them)."""
    timer, counter = StepTimer(), CountingCollator(trainer.data_collator)
    trainer.add_callback(timer)
    profiler = ProfileSteps(profile) if profile else None
    if profiler:
        trainer.add_callback(profiler)
    trainer.data_collator = counter
    reset_peak()
    start = time.perf_counter()
    trainer.train()
    step_s = timer.step_s()
    tokens_per_step = counter.tokens / counter.calls * micro_per_step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    figures = {"step_s": round(step_s, 3), "tokens_per_step": round(tokens_per_step),
               "tokens_per_s": round(tokens_per_step / step_s), "peak_gib": peak_gib(),
               "first_step_s": round(timer.ends[0] - start, 1), "losses": [round(x, 4) for x in losses]}
    if profiler and profiler.figures:
        figures["profile"] = profiler.figures
    return figures


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 120000) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------- SFT


def sft_rows(sizes: Sizes, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(sizes.sft_examples):
        ids = random_ids(rng, rng.randint(*sizes.sft_lengths))
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def sft_stock(sizes: Sizes, out: Path, profile: Path | None = None) -> dict:
    """TRL SFTTrainer with packing (bfd, padding-free) and gradient checkpointing, as stock_baseline.py."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = sft_rows(sizes)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=sizes.rows, max_steps=sizes.stock_steps,
                     logging_steps=1, bf16=torch.cuda.is_available(), gradient_checkpointing=True,
                     max_length=sizes.max_length, packing=True, report_to=[], save_strategy="no", learning_rate=1e-4,
                     dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    peft = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=make_model(sizes.model), args=args,
                         train_dataset=Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows]}),
                         processing_class=copy.deepcopy(load_tokenizer()), peft_config=peft)
    return train_timed(trainer, 1, profile)


def sft_cfg(sizes: Sizes, out: Path, *, model: str, micro: int, ckpt: bool, attn: str, liger: bool,
            steps: int, rows: int, max_length: int, lean_lora: bool = True) -> sft.SFTStageConfig:
    micro = min(micro, rows)
    train = TrainConfig(output_dir=str(out), learning_rate=1e-4, lr_scheduler="constant", warmup_ratio=0.0,
                        max_steps=steps, batch_size=micro, grad_accum=rows // micro, max_length=max_length,
                        gradient_checkpointing=ckpt, logging_steps=1, report_to=["none"])
    return sft.SFTStageConfig(model=ModelConfig(path=model), lora=LORA, train=train,
                              data=[sft.DataSourceConfig(path="<bench>")],
                              accel=accel.AccelConfig(attn=attn, liger=liger, lean_lora=lean_lora))


def sft_ours(sizes: Sizes, out: Path, profile: Path | None = None, **levers) -> dict:
    """The SFT stage's trainer (packed rows, posttrain.packing) with the given levers. Under `accelerate launch`
    each of the W processes takes rows/W rows per step, so the global batch stays `rows`."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = sft_cfg(sizes, out, model=sizes.model, steps=sizes.ours_steps, rows=sizes.rows // world,
                  max_length=sizes.max_length, **levers)
    with stage_model(make_model(sizes.model)):
        trainer = build_sft_trainer(cfg, sft_rows(sizes))
    figures = train_timed(trainer, cfg.train.grad_accum, profile if int(os.environ.get("RANK", 0)) == 0 else None)
    if world > 1:  # tokens were counted on this process only
        figures.update(tokens_per_step=figures["tokens_per_step"] * world, tokens_per_s=figures["tokens_per_s"] * world)
    return figures


def build_sft_trainer(cfg: sft.SFTStageConfig, rows: list[dict]):
    """The trainer `posttrain.sft.train` builds, on rows that are already rendered."""
    args = sft._trainer_args(cfg, has_eval=False)
    return sft._build_trainer(cfg, args, copy.deepcopy(load_tokenizer()), rows, [], sft.SessionMeter())


SFT_VARIANTS = {  # name -> levers; "ours" is the recommended configuration
    # Checkpointing with 4 rows per micro-step: at 1 row the host cannot issue a micro-step's ~6k kernels as fast as
    # the GPU runs them (profile: GPU busy 40%); 4 rows amortise that and recomputing stays cheaper than the idle.
    "ours": dict(attn="varlen", liger=True, ckpt=True, micro=4),
    "ours without checkpointing, micro-batch 1": dict(attn="varlen", liger=True, ckpt=False, micro=1),
    "ours, micro-batch 8": dict(attn="varlen", liger=True, ckpt=True, micro=8),
    "ours without lean LoRA": dict(attn="varlen", liger=True, lean_lora=False, ckpt=True, micro=4),
    "ours without liger or lean LoRA": dict(attn="varlen", liger=False, lean_lora=False, ckpt=True, micro=4),
    "varlen only, checkpointing, batch 8": dict(attn="varlen", liger=False, lean_lora=False, ckpt=True, micro=8),
}


# ---------------------------------------------------------------------------------------------------- DPO


def dpo_pairs(sizes: Sizes, n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    prompt, response = sizes.dpo_lengths
    return [{"prompt_ids": random_ids(rng, prompt),
             "chosen_ids": random_ids(rng, response), "chosen_mask": [True] * response,
             "rejected_ids": random_ids(rng, response), "rejected_mask": [True] * response} for _ in range(n)]


def dpo_stock(sizes: Sizes, out: Path) -> dict:
    """TRL DPOTrainer on text pairs: live reference (adapters off), checkpointing, sigmoid + 0.2 sft."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tok = copy.deepcopy(load_tokenizer())
    pairs = dpo_pairs(sizes, sizes.pairs * sizes.dpo_steps)
    data = {key: [tok.decode(p[f"{key}_ids"]) for p in pairs] for key in ("prompt", "chosen", "rejected")}
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=sizes.pairs, max_steps=sizes.dpo_steps,
                     logging_steps=1, bf16=torch.cuda.is_available(), gradient_checkpointing=True, max_length=1024,
                     beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], report_to=[],
                     save_strategy="no", learning_rate=1e-5, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    peft = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=make_model(sizes.model), args=args, train_dataset=Dataset.from_dict(data),
                         processing_class=tok, peft_config=peft)
    timer = StepTimer()
    trainer.add_callback(timer)
    reset_peak()
    trainer.train()
    step_s = timer.step_s()
    return {"step_s": round(step_s, 3), "pairs_per_s": round(sizes.pairs / step_s, 2), "peak_gib": peak_gib()}


def dpo_cfg(sizes: Sizes, out: Path, *, model: str, steps: int, micro: int, ckpt: bool, attn: str, liger: bool,
            precompute: bool, lean_lora: bool = True) -> dpo.DPOStageConfig:
    micro = min(micro, sizes.pairs)
    train = TrainConfig(output_dir=str(out), learning_rate=1e-5, lr_scheduler="constant", warmup_ratio=0.0,
                        max_steps=steps, batch_size=micro, grad_accum=sizes.pairs // micro, max_length=1024,
                        gradient_checkpointing=ckpt, logging_steps=1, report_to=["none"])
    return dpo.DPOStageConfig(model=ModelConfig(path=model), lora=LORA, train=train,
                              data=[dpo.PreferenceFile(path="<bench>")], beta=0.1, nll_weight=0.2,
                              precompute_ref_log_probs=precompute,
                              accel=accel.AccelConfig(attn=attn, liger=liger, lean_lora=lean_lora))


def dpo_ours(sizes: Sizes, out: Path, profile: Path | None = None, **levers) -> dict:
    """The DPO stage's trainer (posttrain.losses: sigmoid + 0.2 NLL on chosen) with the given levers."""
    cfg = dpo_cfg(sizes, out, model=sizes.model, steps=sizes.dpo_steps, **levers)
    pairs = dpo_pairs(sizes, sizes.pairs * sizes.dpo_steps)
    reset_peak()
    start = time.perf_counter()
    with stage_model(make_model(sizes.model)):  # build_trainer scores the reference here when precomputing
        trainer = dpo.build_trainer(cfg, pairs, copy.deepcopy(load_tokenizer()), out)
    build_s = time.perf_counter() - start
    figures = train_timed(trainer, cfg.train.grad_accum, profile)
    step_s = figures["step_s"]
    figures.update(pairs_per_s=round(sizes.pairs / step_s, 2), build_s=round(build_s, 1),
                   pairs_per_s_with_ref_pass=round(len(pairs) / (len(pairs) / sizes.pairs * step_s + build_s), 2))
    return figures


DPO_VARIANTS = {  # "ours": checkpointing at 4 pairs per micro-step ran faster and lighter than without (run 2)
    "ours": dict(precompute=True, ckpt=True, micro=4, attn="varlen", liger=True),
    "ours without checkpointing, micro-batch 2": dict(precompute=True, ckpt=False, micro=2, attn="varlen", liger=True),
    "ours, live reference": dict(precompute=False, ckpt=True, micro=4, attn="varlen", liger=True),
}


# ---------------------------------------------------------------------------------------------------- sampling


def gen_prompts(sizes: Sizes, n: int, seed: int = 2) -> list[list[dict]]:
    """User messages whose rendered prompt is exactly `prompt_tokens` long, as stock's prompts are: the same cache."""
    rng, tok = random.Random(seed), load_tokenizer()
    prompts = []
    while len(prompts) < n:
        ids = random_ids(rng, sizes.prompt_tokens)
        for words in range(len(ids), 0, -1):  # decoded ids can re-encode longer: the longest prefix that fits ...
            messages = [{"role": "user", "content": tok.decode(ids[:words])}]
            if (length := len(chat.render(messages, tok, add_generation_prompt=True).ids)) <= sizes.prompt_tokens:
                break
        if length == sizes.prompt_tokens:  # ... kept only if it fits exactly
            prompts.append(messages)
    return prompts


def gen_stock(sizes: Sizes) -> dict:
    """HF `generate` at batch prompts*K: every sequence prefills its own prompt, sampling at temperature 1."""
    model = make_model(sizes.model).eval()
    batch = sizes.prompts * sizes.k
    ids = torch.randint(1000, 100000, (batch, sizes.prompt_tokens), device=device())
    kw = dict(max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens, do_sample=True, temperature=1.0,
              top_p=1.0, pad_token_id=PAD)
    with torch.no_grad():
        model.generate(ids[:, :16], max_new_tokens=8, min_new_tokens=8, pad_token_id=PAD)
        reset_peak()
        sync()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        sync()
        seconds = time.perf_counter() - start
    new = (out.shape[1] - sizes.prompt_tokens) * batch
    return {"new_tokens": new, "s": round(seconds, 2), "tokens_per_s": round(new / seconds), "peak_gib": peak_gib()}


def gen_ours(sizes: Sizes, profile: Path | None = None, **options) -> dict:
    """posttrain.generate: K samples share their prompt's prefill; the first call warms up, the second is timed
    (with `profile`, a third call is profiled as `new_tokens` steps)."""
    from posttrain.generate import generate

    model, tok = make_model(sizes.model).eval(), load_tokenizer()
    prompts = gen_prompts(sizes, sizes.prompts)
    kw = dict(k=sizes.k, max_new_tokens=sizes.new_tokens, batch_size=sizes.prompts * sizes.k, temperature=1.0,
              top_p=1.0, progress=False, **options)
    start = time.perf_counter()
    generate(model, tok, prompts, seed=1, **kw)
    sync()
    warmup_s = time.perf_counter() - start
    reset_peak()
    start = time.perf_counter()
    done = generate(model, tok, prompts, seed=0, **kw)
    sync()
    seconds = time.perf_counter() - start
    new = sum(c.num_tokens for group in done for c in group)
    figures = {"new_tokens": new, "s": round(seconds, 2), "tokens_per_s": round(new / seconds),
               "peak_gib": peak_gib(), "warmup_s": round(warmup_s, 1)}
    if profile:
        with profile_call(profile, sizes.new_tokens, figures):
            generate(model, tok, prompts, seed=0, **kw)
    return figures


GEN_VARIANTS = {"ours": dict(cuda_graph=True), "ours, no CUDA graph (static cache, sdpa)": dict(cache="static")}


# ---------------------------------------------------------------------------------------------------- RM scoring


def rm_texts(sizes: Sizes, seed: int = 3) -> tuple[list, list]:
    """(prompts, completions) rendering to about `rm_tokens` tokens each, lengths spread by +-10%."""
    rng, tok = random.Random(seed), load_tokenizer()
    prompts, completions = [], []
    for _ in range(sizes.rm_sequences):
        total = rng.randint(int(sizes.rm_tokens * 0.9), int(sizes.rm_tokens * 1.1)) - 12
        split = rng.randint(total // 4, total * 3 // 4)
        prompts.append([{"role": "user", "content": tok.decode(random_ids(rng, split))}])
        completions.append({"role": "assistant", "content": tok.decode(random_ids(rng, total - split))})
    return prompts, completions


def rm_stock(sizes: Sizes, batch_size: int = 8) -> dict:
    """HF sequence-classification forward on right-padded batches in arrival order (ids encoded beforehand)."""
    from rewards.model import RewardModel

    rm = RewardModel(make_model(sizes.model, classifier=True), load_tokenizer(), device())  # used for encode only
    rm.model.config._attn_implementation = "sdpa"
    ids = [rm.encode(p, c) for p, c in zip(*rm_texts(sizes))]

    def run(batches):
        for batch in batches:
            width = max(map(len, batch))
            x = torch.tensor([row + [PAD] * (width - len(row)) for row in batch], device=device())
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch], device=device())
            rm.model(input_ids=x, attention_mask=mask).logits.float().cpu()

    batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    with torch.no_grad():
        run(batches[:1])
        reset_peak()
        sync()
        start = time.perf_counter()
        run(batches)
        sync()
        seconds = time.perf_counter() - start
    tokens = sum(map(len, ids))
    return {"tokens": tokens, "s": round(seconds, 2), "tokens_per_s": round(tokens / seconds), "peak_gib": peak_gib()}


def rm_ours(sizes: Sizes, *, batch_size: int, varlen: bool, profile: Path | None = None) -> dict:
    """rewards.model.RewardModel.score (renders, sorts by length, scores); the timed call includes rendering (with
    `profile`, a third call is profiled, one step per batch)."""
    from rewards.model import RewardModel

    rm = RewardModel(make_model(sizes.model, classifier=True), load_tokenizer(), device())  # varlen on CUDA
    if not varlen:
        rm.model.config._attn_implementation = "sdpa"
    prompts, completions = rm_texts(sizes)
    rm.score(prompts[:batch_size], completions[:batch_size], batch_size=batch_size)
    reset_peak()
    sync()
    start = time.perf_counter()
    rm.score(prompts, completions, batch_size=batch_size)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(rm.encode(p, c)) for p, c in zip(prompts, completions))
    figures = {"tokens": tokens, "s": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
               "peak_gib": peak_gib()}
    if profile:
        with profile_call(profile, -(-len(prompts) // batch_size), figures):
            rm.score(prompts, completions, batch_size=batch_size)
    return figures


RM_VARIANTS = {"ours": dict(batch_size=16, varlen=True), "ours, sdpa": dict(batch_size=16, varlen=False)}


# ---------------------------------------------------------------------------------------------------- loss checks


def loss_check(sizes: Sizes, out: Path) -> dict:
    """Per-step losses over `check_steps` steps with every lever off vs on (same data, seed and init): SFT and DPO."""
    plain = dict(attn="model", liger=False, lean_lora=False, ckpt=True)
    levers = dict(attn="varlen", liger=True, lean_lora=True, ckpt=False)
    checks = {}
    for name, run in (("sft", _check_sft), ("dpo", _check_dpo)):
        curves = [run(sizes, out / f"{name}{i}", **kw) for i, kw in enumerate((plain, levers))]
        diffs = [abs(a - b) for a, b in zip(*curves)]
        checks[name] = {"steps": len(diffs), "losses_off": curves[0], "losses_on": curves[1],
                        "max_abs_diff": round(max(diffs), 4),
                        "max_rel_diff": round(max(d / abs(a) for d, a in zip(diffs, curves[0])), 4)}
    return checks


def _check_sft(sizes: Sizes, out: Path, *, ckpt: bool, **levers) -> list[float]:
    small = dataclasses.replace(sizes, sft_lengths=(sizes.sft_lengths[0], sizes.check_length),
                                sft_examples=sizes.check_steps * 8)
    cfg = sft_cfg(small, out, model=sizes.check_model, micro=4 if ckpt else 1, ckpt=ckpt, steps=sizes.check_steps,
                  rows=4, max_length=sizes.check_length, **levers)
    with stage_model(make_model(sizes.check_model)):
        trainer = build_sft_trainer(cfg, sft_rows(small))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _check_dpo(sizes: Sizes, out: Path, *, ckpt: bool, **levers) -> list[float]:
    small = dataclasses.replace(sizes, dpo_lengths=(sizes.dpo_lengths[0] // 4, sizes.dpo_lengths[1] // 4))
    cfg = dpo_cfg(small, out, model=sizes.check_model, steps=sizes.check_steps, micro=small.pairs if ckpt else 1,
                  ckpt=ckpt, precompute=not ckpt, **levers)
    cfg.train.learning_rate = 1e-4
    with stage_model(make_model(sizes.check_model)):
        pairs = dpo_pairs(small, small.pairs * sizes.check_steps)
        trainer = dpo.build_trainer(cfg, pairs, copy.deepcopy(load_tokenizer()), out)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
