"""K samples per prompt: render, prefill each prompt once, share its KV cache across its K samples, decode.

Our own loop on torch (not `model.generate`). Prompts are bucketed by length and left-padded; a batch of prompts is
prefilled once, the cache is repeated K times in the batch dimension, and `decode_step` advances every row by one
token until each has emitted a stop id (Llama 3: end_of_text, eom, eot) or `max_new_tokens`.

Each draw uses one uniform number hashed from (prompt seed, sample index, step) (inverse-CDF sampling), so a sample
does not depend on which other prompts share its batch, and the same seed gives the same samples.
`decode_step` is the one function a GPU fast path compiles: `compile=True` on CUDA uses a static KV cache (prompt
length rounded up to a multiple of 16 to bound recompiles) and wraps the step in `torch.compile` (CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StaticCache

from posttrain import accel, chat
from posttrain.compat import cache_kwarg
from posttrain.tokenizer import load_tokenizer

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B1  # odd constant that spreads consecutive counters over 32 bits
# Static caches round the prompt length up to this, so shapes repeat across batches. Keep the cache length (prompt +
# max_new_tokens) a multiple of 16 too: on an H200 the decode attention ran 65% slower at a cache of 391 than at 400.
STATIC_LENGTH_MULTIPLE = 16
STOP_CHECK_EVERY = 8  # on a GPU, steps between checks whether every row has stopped
SAMPLE_ELEMENTS = 1 << 23  # rows x vocab sampled together: bounds the float32 probs and float64 CDF of one draw
STOP_REASONS = ("eot", "eom", "eos", "length")


@dataclasses.dataclass
class Completion:
    message: dict  # the parsed assistant message (chat.parse_completion), with tool_calls when it is a call
    text: str  # decoded completion without its stop token (special tokens such as <|python_tag|> kept)
    token_ids: list[int]  # generated ids, the stop token included when there is one
    num_tokens: int  # len(token_ids)
    stop_reason: str  # "eot", "eom" (waiting for a tool result), "eos" or "length" (hit max_new_tokens)


@dataclasses.dataclass
class Prefilled:
    logits: torch.Tensor  # [B, V] next-token logits after each prompt's last token
    cache: DynamicCache  # keys/values of the left-padded prompts, batch B
    attention_mask: torch.Tensor  # [B, L] 1 on prompt tokens, 0 on left padding
    prompt_lengths: torch.Tensor  # [B] = position id of each prompt's first generated token


def load_policy(source: str | Path, dtype: Any = None, *, attn_implementation: str = "sdpa"):
    """(model, tokenizer) from any `load_model` source, or a PEFT adapter dir merged into its base for speed."""
    from posttrain.backbone import load_model, load_tokenizer_for, merge_lora

    path = Path(str(source))
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        model = load_model(str(source), dtype, attn_implementation=attn_implementation)
        return model.eval(), load_tokenizer_for(str(source))
    from peft import PeftModel

    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_config}: base_model_name_or_path: missing; cannot tell which model to adapt")
    model = PeftModel.from_pretrained(load_model(base, dtype, attn_implementation=attn_implementation), str(path))
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return merge_lora(model).eval(), load_tokenizer(path) if has_tokenizer else load_tokenizer_for(base)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Put a steering system prompt first; an existing system message keeps its text after it."""
    if not system_prompt:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{system_prompt}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]


def stop_reasons(tokenizer) -> dict[int, str]:
    """Stop id -> stop reason: eom for <|eom_id|>, eot for <|eot_id|> / <|im_end|>, eos for the rest."""
    special = tokenizer.get_added_vocab()  # small, unlike get_vocab() on a 128k vocabulary
    reasons = {}
    for token_id in chat.stop_token_ids(tokenizer):
        if token_id == special.get("<|eom_id|>"):
            reasons[token_id] = "eom"
        elif token_id in (special.get("<|eot_id|>"), special.get("<|im_end|>")):
            reasons[token_id] = "eot"
        else:
            reasons[token_id] = "eos"
    return reasons


def _per_prompt(value: Any, n: int, is_item) -> list:
    """`value` for every prompt, or `value` itself when it is already one item per prompt."""
    if isinstance(value, (list, tuple)) and len(value) == n and all(v is None or is_item(v) for v in value):
        return list(value)
    return [value] * n


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32); constants < 2^31 keep products < 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def row_keys(prompt_seeds: list[int], k: int, device: torch.device) -> torch.Tensor:
    """[len(prompt_seeds) * k] one 32-bit key per (prompt, sample), prompt-major like the decode batch."""
    seeds = _mix32(torch.tensor([(s + _GOLDEN32) & _MASK32 for s in prompt_seeds], dtype=torch.int64, device=device))
    samples = torch.arange(k, dtype=torch.int64, device=device) * _GOLDEN32
    return _mix32(_mix32((seeds[:, None] + samples[None, :]) & _MASK32)).flatten()


def uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """[N] uniform numbers strictly inside (0, 1), a pure function of (row key, step)."""
    bits = _mix32(_mix32((keys + (step + 1) * _GOLDEN32) & _MASK32) ^ keys)
    return ((bits >> 8).to(torch.float64) + 0.5) / float(1 << 24)  # 24 random bits


def sample_tokens(logits: torch.Tensor, keys: torch.Tensor, step: int, temperature: float,
                  top_p: float) -> torch.Tensor:
    """[N] next tokens from logits [N, V]: argmax when temperature == 0, else inverse-CDF over the top-p nucleus.

    One uniform per row (not per token) keeps the cost at a softmax and a cumsum, and a row's draw independent of the
    rest of the batch. Rows are drawn in chunks of SAMPLE_ELEMENTS // V, so the buffers stay small at any batch size.
    """
    if temperature == 0:
        return logits.argmax(-1)
    rows = max(1, SAMPLE_ELEMENTS // logits.shape[-1])
    return torch.cat([_draw(logits[i:i + rows], keys[i:i + rows], step, temperature, top_p)
                      for i in range(0, logits.shape[0], rows)])


def _draw(logits: torch.Tensor, keys: torch.Tensor, step: int, temperature: float, top_p: float) -> torch.Tensor:
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p  # the mass before this token already reaches top_p
        probs = probs.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), 0.0)
    cdf = probs.to(torch.float64).cumsum(-1)  # [N, V]; float64 so the tail of a 128k vocab keeps its mass
    del probs
    targets = uniforms(keys, step)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, targets).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def prefill(model, prompts: list[list[int]], pad_id: int, *, length_multiple: int = 1) -> Prefilled:
    """One forward over the left-padded prompts; position ids count only real tokens."""
    device = next(model.parameters()).device
    length = -(-max(map(len, prompts)) // length_multiple) * length_multiple
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, length - len(ids):] = torch.tensor(ids)
        attention_mask[row, length - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **{cache_kwarg(model): cache},
                use_cache=True, logits_to_keep=1)
    return Prefilled(out.logits[:, -1].float(), cache, attention_mask, attention_mask.sum(-1))


def share_prefill(state: Prefilled, k: int, max_new_tokens: int, *, static: bool, config) -> tuple:
    """Repeat each prompt's cache K times -> (cache, attention_mask [B*K, L + max_new_tokens], prompt_lengths [B*K])."""
    batch, length = state.attention_mask.shape
    attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_zeros(batch, max_new_tokens)], dim=1)
    if static:
        cache = StaticCache(config=config, max_cache_len=length + max_new_tokens)
        for static_layer, layer in zip(cache.layers, state.cache.layers):
            static_layer.update(layer.keys.repeat_interleave(k, 0), layer.values.repeat_interleave(k, 0))
            layer.keys = layer.values = None  # free the prompt copy layer by layer: the two never peak together
    else:
        cache = state.cache
        cache.batch_repeat_interleave(k)
    return cache, attention_mask.repeat_interleave(k, 0), state.prompt_lengths.repeat_interleave(k, 0)


def decode_step(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache):
    """One token for every row: input_ids/position_ids [N, 1], attention_mask [N, S] -> logits [N, V] (float32)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **{cache_kwarg(model): cache},
                use_cache=True)
    return out.logits[:, -1].float()


def _decode_batch(model, prompts: list[list[int]], keys: torch.Tensor, *, k: int, temperature: float, top_p: float,
                  max_new_tokens: int, stop_ids: list[int], pad_id: int, static: bool, step_fn) -> list[tuple]:
    """Sample K continuations of each prompt; returns (token ids, stopped) per row, prompt-major."""
    state = prefill(model, prompts, pad_id, length_multiple=STATIC_LENGTH_MULTIPLE if static else 1)
    prompt_length = state.attention_mask.shape[1]
    cache, attention_mask, positions = share_prefill(state, k, max_new_tokens, static=static, config=model.config)
    logits = state.logits.repeat_interleave(k, 0)
    del state  # a static cache holds its own copy of the prompt keys/values
    stops = torch.tensor(stop_ids, device=logits.device)
    rows = logits.shape[0]
    tokens_out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=logits.device)
    done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    # Reading `done` makes the host wait for the device; on a GPU that is done every few steps only, so the host
    # queues steps ahead (a finished row only ever adds padding). On the CPU every extra step costs compute.
    check_every = STOP_CHECK_EVERY if logits.device.type == "cuda" else 1
    for step in range(max_new_tokens):
        tokens = sample_tokens(logits, keys, step, temperature, top_p)
        tokens_out[:, step] = tokens.masked_fill(done, pad_id)
        stopped_now = torch.isin(tokens, stops) & ~done
        lengths.masked_fill_(stopped_now, step + 1)
        done |= stopped_now
        if step + 1 == max_new_tokens or ((step + 1) % check_every == 0 and bool(done.all())):
            break
        attention_mask[:, prompt_length + step] = 1
        mask = attention_mask if static else attention_mask[:, : prompt_length + step + 1]
        logits = step_fn(model, tokens[:, None], (positions + step)[:, None], mask, cache)
    ids, lengths, done = tokens_out.tolist(), lengths.tolist(), done.tolist()
    return [(ids[row][: lengths[row]], done[row]) for row in range(rows)]


def _completion(tokenizer, token_ids: list[int], stopped: bool, reasons: dict[int, str]) -> Completion:
    body = token_ids[:-1] if stopped else token_ids
    text = tokenizer.decode(body, skip_special_tokens=False)
    stop_reason = reasons[token_ids[-1]] if stopped else "length"
    message = chat.parse_completion(text, stop_reason=stop_reason)
    return Completion(message, text, token_ids, len(token_ids), stop_reason)


def _check_args(k: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int) -> None:
    if k < 1:
        raise ValueError(f"k: {k} samples per prompt; need at least 1")
    if temperature < 0:
        raise ValueError(f"temperature: {temperature} is negative (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: {top_p} is outside (0, 1]")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1")


def generate(model, tokenizer, prompts: list[list[dict]], *, k: int = 4, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int | list[int] = 0, batch_size: int = 64, tools=None,
             system_prompt: str | list[str | None] | None = None, tool_format: str = "json", compile: bool = False,
             cuda_graph: bool = False, cache: str = "auto", progress: bool = True) -> list[list[Completion]]:
    """K completions for each prompt (a message list), in prompt order.

    model: a causal LM, or a source string for `load_policy` (tokenizer may then be None).
    seed: one int (prompt i gets its own stream from (seed, i)) or one seed per prompt (independent of order).
    batch_size: sequences decoded together, i.e. batch_size // k prompts per prefill (at least one).
    tools / system_prompt: one value for every prompt, or a list with one entry per prompt; tool_format: chat.render's.
    compile: on CUDA, static cache + torch.compile of the decode step; ignored on CPU.
    cuda_graph: on CUDA, static cache + the decode step replayed as a CUDA graph (posttrain.accel.CudaGraphStep,
    captured per batch in under a second, no compile); ignored on CPU. Either fast path switches the model to
    posttrain.accel's attention (the grouped KV cache read in place).
    cache: "dynamic", "static" or "auto" (static exactly when compiling).
    """
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer = load_policy(model)
        tokenizer = tokenizer or loaded_tokenizer
    _check_args(k, temperature, top_p, max_new_tokens, batch_size)
    if cache not in ("auto", "dynamic", "static"):
        raise ValueError(f"cache: {cache!r} is not one of auto, dynamic, static")
    device = next(model.parameters()).device
    compiling = compile and device.type == "cuda"
    graphing = cuda_graph and device.type == "cuda" and not compiling
    static = cache == "static" or (cache == "auto" and (compiling or graphing))
    if graphing and not static:
        raise ValueError("cuda_graph: needs cache static or auto (a CUDA graph replays fixed addresses)")
    step_fn = torch.compile(decode_step, mode="reduce-overhead", dynamic=False) if compiling else decode_step
    if compiling or graphing:
        accel.use_fast_attention(model)
        step_fn = accel.CudaGraphStep(decode_step) if graphing else step_fn
    tools_each = _per_prompt(tools, len(prompts), lambda v: isinstance(v, list))
    systems = _per_prompt(system_prompt, len(prompts), lambda v: isinstance(v, str))
    rendered = [chat.render(with_system_prompt(p, s), tokenizer, tools=t, add_generation_prompt=True,
                            tool_format=tool_format).ids for p, t, s in zip(prompts, tools_each, systems)]
    n = len(prompts)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [(seed + i * _GOLDEN32) & _MASK32 for i in range(n)]
    if len(seeds) != len(prompts):
        raise ValueError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts")
    reasons = stop_reasons(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(reasons))
    order = sorted(range(len(prompts)), key=lambda i: -len(rendered[i]))  # longest first: memory errors show early
    per_batch = max(1, batch_size // k)
    results: list[list[Completion]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts) * k, unit="sample", disable=not progress, desc="sampling")
    start, new_tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for first in range(0, len(order), per_batch):
            batch = order[first:first + per_batch]
            keys = row_keys([seeds[i] for i in batch], k, device)
            rows = _decode_batch(model, [rendered[i] for i in batch], keys, k=k, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, stop_ids=list(reasons), pad_id=pad_id, static=static,
                                 step_fn=step_fn)
            for row, (token_ids, stopped) in enumerate(rows):
                results[batch[row // k]].append(_completion(tokenizer, token_ids, stopped, reasons))
                new_tokens += len(token_ids)
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
    bar.close()
    return results
