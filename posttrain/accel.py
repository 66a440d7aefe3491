"""GPU speed levers the stages switch on from their `accel:` config section; on a machine without CUDA none applies.

- `attn: varlen` registers one transformers attention function (`ATTENTION`) for three cases:
  packed or padded rows without a KV cache (training, scoring, prefill) go through flash attention over each example
  (cu_seqlens from the position-id restarts and padding edges: no work across examples or on padding, where SDPA
  with the block mask does the whole row); one-token decoding reads the grouped KV cache in place (the query heads of
  a KV head become that head's query rows) instead of copying it once per query head; anything else is plain SDPA.
- `liger: true` swaps RMSNorm and SwiGLU forwards for Liger's Triton kernels (on this model instance only).
- `lean_lora: true` runs each PEFT LoRA linear as one extra low-rank GEMM whose sum lands inside the base output
  (addmm) in the activations' dtype: PEFT casts the input to the adapters' float32 (a copy per projection, kept for
  backward) and adds the update in two more passes over the output.
- `checkpoint_every: n` recomputes every n-th decoder layer only, when train.gradient_checkpointing is on.
- `device_fingerprint()` keys TRL's cache of precomputed reference log-probs by a checksum computed on the device
  (TRL hashes every weight on the host: minutes for an 8B model).
- `CudaGraphStep` captures the decode step once per KV cache and replays it (`generate(..., cuda_graph=True)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import types
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from posttrain.config import check_choice, check_range, field

log = logging.getLogger(__name__)

ATTENTION = "posttrain_varlen"
_FLASH_DTYPES = (torch.bfloat16, torch.float16)


@dataclasses.dataclass
class AccelConfig:
    attn: str = field("varlen", help="attention on CUDA: varlen (flash attention per packed example, decoding reads "
                                     "the grouped KV cache in place) or model (keep model.attn_implementation)")
    liger: bool = field(True, help="Liger Triton kernels for RMSNorm and SwiGLU on CUDA (needs liger-kernel)")
    lean_lora: bool = field(True, help="LoRA update added inside one GEMM, in the activations' dtype (CUDA)")
    checkpoint_every: int = field(1, help="with train.gradient_checkpointing: recompute every n-th decoder layer "
                                          "only (1 = all; 2 = half the layers, more memory, less recompute)")

    def __post_init__(self):
        check_choice("attn", self.attn, ("varlen", "model"))
        check_range("checkpoint_every", self.checkpoint_every, low=1)


def apply(model, cfg: AccelConfig) -> list[str]:
    """Switch on the configured levers when training will run on CUDA; returns the names of those switched on."""
    if not torch.cuda.is_available():
        return []
    applied = []
    if cfg.attn == "varlen":
        use_fast_attention(model)
        applied.append("varlen")
    if cfg.lean_lora and (patched := use_lean_lora(model)):
        applied.append(f"lean_lora({patched} modules)")
    if cfg.liger:
        try:
            patched = use_liger_kernels(model)
        except ImportError as e:  # liger-kernel is an optional dependency; say so instead of failing the run
            log.warning("accel.liger: liger-kernel is not importable (%s); training without its kernels", e)
        else:
            applied.append(f"liger({patched} modules)")
    log.info("accel: %s", ", ".join(applied) or "no levers")
    return applied


def checkpointing_kwargs(cfg: AccelConfig) -> dict:
    """The trainer's `activation_checkpointing_kwargs` for `checkpoint_every` (used only when checkpointing is on)."""
    return {"use_reentrant": False, "every_n_layers": cfg.checkpoint_every}


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_fast_attention(model) -> None:
    """Route every attention layer of `model` through `attention` (works on CPU too, through the SDPA fallback)."""
    _base(model).config._attn_implementation = ATTENTION


# ---------------------------------------------------------------------------------------------------- attention


def segment_bounds(position_ids: torch.Tensor | None, padding_mask: torch.Tensor | None, batch: int, length: int,
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [S+1], longest segment) of the rows flattened to batch*length tokens.

    A segment starts at each row start, where the position does not continue the previous one (+1), and where
    padding begins or ends: [[0 1 2 0 1 0]] -> [0 3 5 6], 3. Left padding (positions 0 0 0 then 0 1 2) gives one
    segment per pad token.
    """
    positions = torch.arange(length, device=device)[None] if position_ids is None else position_ids
    positions = positions.expand(batch, length)
    starts = torch.ones(batch, length, dtype=torch.bool, device=device)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    if padding_mask is not None:
        real = padding_mask[:, -length:].bool()
        starts[:, 1:] |= real[:, 1:] != real[:, :-1]
    first = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([first, first.new_tensor([batch * length])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


class _LastSegments:
    """Segment bounds of the current forward: every layer gets the same position_ids / mask objects, so they are
    computed (two host syncs) once per forward instead of once per layer."""

    def __init__(self):
        self.keys: tuple = ()
        self.value = None

    def get(self, position_ids, padding_mask, batch: int, length: int, device: torch.device):
        tensors = (position_ids, padding_mask)
        same = len(self.keys) == 2 and all((ref is None and t is None) or (ref is not None and ref() is t)
                                           for ref, t in zip(self.keys, tensors))
        if not (same and self.value[0] == (batch, length)):
            self.keys = tuple(None if t is None else weakref.ref(t) for t in tensors)
            self.value = ((batch, length), segment_bounds(position_ids, padding_mask, batch, length, device))
        return self.value[1]


_segments = _LastSegments()


def _packed_attention(query, key, value, padding_mask, position_ids, scaling):
    """Causal attention inside each segment. query [B, Hq, T, D], key/value [B, Hk, T, D] -> [B, T, Hq, D]."""
    batch, heads, length, dim = query.shape
    cu_seqlens, longest = _segments.get(position_ids, padding_mask, batch, length, query.device)
    if query.is_cuda and query.dtype in _FLASH_DTYPES:
        def tokens(x):  # [B, H, T, D] -> [B*T, H, D]
            return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)
        out = torch.ops.aten._flash_attention_forward(
            tokens(query), tokens(key), tokens(value), cu_seqlens, cu_seqlens, longest, longest, 0.0, True, False,
            scale=scaling)[0]
        return out.view(batch, length, heads, dim)
    # CPU / float32: the same function through SDPA with the block-diagonal causal mask
    segment = torch.zeros(batch * length, dtype=torch.long, device=query.device)
    segment[cu_seqlens[1:-1].long()] = 1
    segment = segment.cumsum(0).view(batch, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def _decode_attention(query, key, value, mask, scaling):
    """One query token per row against a grouped KV cache, without copying the cache per query head.

    query [B, Hq, 1, D], key/value [B, Hk, S, D], mask [B, 1, 1, S] (bool, True = attend) or None -> [B, 1, Hq, D].
    The Hq / Hk query heads sharing a KV head are that head's query rows: one SDPA over [B, Hk, Hq/Hk, D].
    """
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, 1, heads, dim)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              position_ids: torch.Tensor | None = None, **kwargs):
    """transformers AttentionInterface function (see the module docstring): returns (output [B, T, Hq, D], None)."""
    if query.shape[2] == key.shape[2] and (attention_mask is None or attention_mask.dim() == 2):
        return _packed_attention(query, key, value, attention_mask, position_ids, scaling), None
    if query.shape[2] == 1 and (attention_mask is None or attention_mask.dtype == torch.bool):
        return _decode_attention(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def build_mask(batch_size: int, q_length: int, kv_length: int, attention_mask=None, **kwargs):
    """Mask builder for `ATTENTION`: the 2D padding mask as is where queries and keys are the same tokens (the
    attention reads segments from it and the position ids), SDPA's 4D mask where a cache adds keys."""
    if q_length == kv_length and kwargs.get("kv_offset", 0) == 0:
        return attention_mask
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     **kwargs)


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, build_mask)


# ---------------------------------------------------------------------------------------------------- Liger


def _liger_rms_norm(self, hidden_states):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # "llama" casting: fp32 statistics, cast back before the weight, as LlamaRMSNorm does
    return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _liger_swiglu(self, x):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def use_liger_kernels(model) -> int:
    """Liger forwards for this model's RMSNorm and SiLU-gated MLP modules (PEFT-wrapped projections included);
    returns how many modules were patched. Other instances of the same classes keep their forwards."""
    import liger_kernel.ops.rms_norm  # noqa: F401  (fail here, not in the first forward, when it is missing)
    import liger_kernel.ops.swiglu  # noqa: F401

    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_liger_rms_norm, module)
            patched += 1
        elif name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")) \
                and getattr(module.config, "hidden_act", "") in ("silu", "swish"):
            module.forward = types.MethodType(_liger_swiglu, module)
            patched += 1
    return patched


# ---------------------------------------------------------------------------------------------------- LoRA, DPO


def _lean_lora(self, x, *args, **kwargs):
    """base(x) + scaling * (x A^T) B^T for one plain adapter; anything else (disabled, merged, several adapters,
    DoRA, a bias on B, extra arguments) goes through PEFT's own forward."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or name in getattr(self, "lora_variant", {}) or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    out = self.base_layer(x)  # [..., out]
    low = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight.to(x.dtype))  # [..., r]
    up = self.lora_B[name].weight.to(x.dtype)  # [out, r]
    summed = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), up.t(),
                         alpha=self.scaling[name])
    return summed.view(out.shape)


def use_lean_lora(model) -> int:
    """`_lean_lora` as the forward of every PEFT LoRA Linear in `model`; returns how many were patched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    patched = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_lean_lora, module)
            patched += 1
    return patched


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A checksum of `module`'s weights computed where they live: per tensor its name, shape, dtype and three sums."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            values = tensor.detach().flatten().float()
            sums = torch.stack([values.sum(), values.square().sum(), values[::3].sum()]).tolist()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{sums}".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def device_fingerprint():
    """While active, TRL's DPOTrainer keys its precomputed reference log-probs by `weights_fingerprint` instead of
    a sha256 of every weight copied to the host in float32 (32 GB for an 8B model)."""
    import trl.trainer.dpo_trainer as dpo_trainer

    real = dpo_trainer.hash_module
    dpo_trainer.hash_module = weights_fingerprint
    try:
        yield
    finally:
        dpo_trainer.hash_module = real


# ---------------------------------------------------------------------------------------------------- decoding


class CudaGraphStep:
    """A decode step `step(model, input_ids [N,1], position_ids [N,1], attention_mask [N,S], cache)` run as a CUDA
    graph: the first call for a cache runs eagerly on a side stream (warming cuBLAS and the allocator), the second
    captures and replays, later calls copy their inputs into the captured buffers and replay. Needs a static cache
    (fixed addresses); the 2D mask becomes a 4D bool mask inside the graph, so mask building stays out of it.
    The returned logits are overwritten by the next replay."""

    def __init__(self, step):
        self.step = step
        self._reset(None)

    def _reset(self, cache) -> None:
        self.cache, self.calls, self.graph, self.inputs, self.output = cache, 0, None, (), None

    def _run(self, model, input_ids, position_ids, attention_mask, cache):
        return self.step(model, input_ids, position_ids, attention_mask.bool()[:, None, None, :], cache)

    def __call__(self, model, input_ids, position_ids, attention_mask, cache):
        if cache is not self.cache:
            self._reset(cache)
        self.calls += 1
        if self.calls == 1:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._run(model, input_ids, position_ids, attention_mask, cache)
            torch.cuda.current_stream().wait_stream(side)
            out.record_stream(torch.cuda.current_stream())  # allocated on the side stream, read on this one
            return out
        if self.graph is None:
            self.inputs = (input_ids.clone(), position_ids.clone(), attention_mask.clone())
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records only: this call's step runs in the replay below
                self.output = self._run(model, *self.inputs, cache)
        for static, new in zip(self.inputs, (input_ids, position_ids, attention_mask)):
            static.copy_(new)
        self.graph.replay()
        return self.output
