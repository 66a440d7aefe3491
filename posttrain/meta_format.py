"""Meta-native Llama 3 checkpoints (`params.json` + `consolidated.NN.pth`) and their HF equivalent.

Meta's layout differs from HF's in names, in model-parallel shards, and in the rotary layout of wq/wk: Meta rotates
adjacent pairs of a head's dims (0,1), (2,3), ...; HF rotates the two halves (0, hd/2), (1, hd/2+1), ...
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from transformers import LlamaConfig

LLAMA3_BOS, LLAMA3_EOS = 128000, 128009  # <|begin_of_text|>, <|eot_id|> (instruct models end turns with it)
DEFAULT_ROPE_FACTOR = 8.0  # what Meta's reference code applies whenever use_scaled_rope is set
ORIGINAL_CONTEXT = 8192
SCALED_CONTEXT = 131072
# (dim, FFN size) -> Meta's (multiple_of, ffn_dim_multiplier), from llama_models.sku_list, so params.json round-trips.
KNOWN_FFN = {
    (4096, 14336): (1024, 1.3),
    (8192, 28672): (4096, 1.3),
    (16384, 53248): (4096, 1.2),
    (2048, 8192): (256, 1.5),
    (3072, 8192): (256, 1.0),
}
_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
# Meta name pattern -> HF name pattern ({} = layer index).
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden size as Meta's FeedForward computes it from params.json."""
    hidden = int(8 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def ffn_params(dim: int, ffn: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's formula give `ffn`."""
    if (dim, ffn) in KNOWN_FFN:
        return KNOWN_FFN[(dim, ffn)]
    for multiple_of in (1024, 256, 64, 32, 16):
        if ffn % multiple_of == 0 and ffn_size(dim, multiple_of, None) == ffn:
            return multiple_of, None
    base = int(8 * dim / 3)
    # Rounding up to a multiple of `ffn` itself lands on `ffn` from anything in [1, ffn].
    return ffn, (None if ffn >= base else ffn / base)


def llama3_rope(theta: float, factor: float | None) -> dict:
    """transformers `rope_parameters` for Llama 3: plain RoPE, or the "llama3" frequency scaling of 3.1+."""
    if factor is None:
        return {"rope_type": "default", "rope_theta": float(theta)}
    return {"rope_type": "llama3", "rope_theta": float(theta), "factor": float(factor), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT}


def config_from_params(params: dict, where: str = "params.json") -> LlamaConfig:
    """LlamaConfig for a Meta params.json; a missing or bad field raises ValueError naming `where` and the field."""
    for key in ("dim", "n_layers", "n_heads", "vocab_size"):
        if not isinstance(params.get(key), int) or params[key] <= 0:
            raise ValueError(f"{where}: {key}: expected a positive integer, got {params.get(key)!r}")
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if dim % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"{where}: n_heads: dim {dim}, n_heads {n_heads} and n_kv_heads {n_kv_heads} do not divide")
    scaled = bool(params.get("use_scaled_rope", False))
    factor = params.get("rope_scaling_factor", DEFAULT_ROPE_FACTOR) if scaled else None
    return LlamaConfig(
        vocab_size=params["vocab_size"],
        hidden_size=dim,
        intermediate_size=ffn_size(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=dim // n_heads,
        max_position_embeddings=SCALED_CONTEXT if scaled else ORIGINAL_CONTEXT,
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_parameters=llama3_rope(params.get("rope_theta", 500000.0), factor),
        tie_word_embeddings=False,
        bos_token_id=LLAMA3_BOS,
        eos_token_id=LLAMA3_EOS,
    )


def params_from_config(config: LlamaConfig) -> dict:
    """Meta params.json for a Llama config (raises ValueError for what Meta's layout cannot hold)."""
    dim, n_heads = config.hidden_size, config.num_attention_heads
    if config.head_dim != dim // n_heads or config.attention_bias or config.mlp_bias:
        raise ValueError("format='meta': needs head_dim == hidden_size / num_attention_heads and no biases")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ValueError(f"format='meta': rope type {rope.get('rope_type')!r} has no Meta equivalent")
    multiple_of, multiplier = ffn_params(dim, config.intermediate_size)
    params = {"dim": dim, "n_layers": config.num_hidden_layers, "n_heads": n_heads,
              "n_kv_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
              "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier, "norm_eps": config.rms_norm_eps,
              "rope_theta": rope.get("rope_theta", 500000.0), "use_scaled_rope": rope.get("rope_type") == "llama3"}
    if params["use_scaled_rope"] and rope["factor"] != DEFAULT_ROPE_FACTOR:
        params["rope_scaling_factor"] = rope["factor"]  # the key Meta's Llama 4 args use; 3.1 code assumes 8
    return params


def _to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape  # [heads * head_dim, dim], each head's rows in (pair, 2) order
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape  # [heads * head_dim, dim], each head's rows in (half, pair) order
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Rename Meta tensors to HF names, permuting wq/wk into HF's rotary layout."""
    out = {}
    for name, tensor in state.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
            continue
        _, layer, rest = name.split(".", 2)
        if rest == "attention.wq.weight":
            tensor = _to_hf_rotary(tensor, config.num_attention_heads)
        elif rest == "attention.wk.weight":
            tensor = _to_hf_rotary(tensor, config.num_key_value_heads)
        out[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = tensor
    return out


def hf_to_meta(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Inverse of `meta_to_hf` (exact: the permutation only moves elements)."""
    top = {hf: meta for meta, hf in _TOP_NAMES.items()}
    per_layer = {hf: meta for meta, hf in _LAYER_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None or match.group(2) not in per_layer:
            raise ValueError(f"format='meta': {name}: no Meta-native name for this tensor (only causal Llama LMs)")
        rest = per_layer[match.group(2)]
        if rest == "attention.wq.weight":
            tensor = _to_meta_rotary(tensor, config.num_attention_heads)
        elif rest == "attention.wk.weight":
            tensor = _to_meta_rotary(tensor, config.num_key_value_heads)
        out[f"layers.{match.group(1)}.{rest}"] = tensor
    if "output.weight" not in out:  # tied models: Meta's Transformer always has its own output matrix
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of a whole (unsharded) Meta checkpoint."""
    dim, ffn, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"tok_embeddings.weight": (config.vocab_size, dim), "norm.weight": (dim,),
              "output.weight": (config.vocab_size, dim)}
    per_layer = {"attention.wq.weight": (q_rows, dim), "attention.wk.weight": (kv_rows, dim),
                 "attention.wv.weight": (kv_rows, dim), "attention.wo.weight": (dim, q_rows),
                 "feed_forward.w1.weight": (ffn, dim), "feed_forward.w2.weight": (dim, ffn),
                 "feed_forward.w3.weight": (ffn, dim), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
    for layer in range(config.num_hidden_layers):
        shapes.update({f"layers.{layer}.{rest}": shape for rest, shape in per_layer.items()})
    return shapes


def shard_files(directory: Path) -> list[Path]:
    """consolidated.00.pth ... in order; a gap in the numbering raises ValueError naming the missing file."""
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := _SHARD_NAME.fullmatch(p.name))}
    if not found:
        raise ValueError(f"{directory}: no consolidated.NN.pth shard next to params.json")
    for rank in range(max(found) + 1):
        if rank not in found:
            raise ValueError(f"{directory / f'consolidated.{rank:02d}.pth'}: missing from a {max(found) + 1}-shard set")
    return [found[rank] for rank in sorted(found)]


def _merge(key: str, tensors: list[torch.Tensor], files: list[Path], full: tuple[int, ...]) -> torch.Tensor:
    """Concatenate one tensor's model-parallel pieces along the dim the pieces do not cover in full.

    Shards split wq/wk/wv/w1/w3/output by rows and wo/w2 by columns; tok_embeddings by vocab rows in Llama 3
    (by columns in Llama 2), so the dim is read from the shapes; norms are replicated.
    """
    first = tuple(tensors[0].shape)
    for path, tensor in zip(files[1:], tensors[1:]):
        if tuple(tensor.shape) != first:
            raise ValueError(f"{path}: {key}: shape {tuple(tensor.shape)}, but {files[0].name} has {first}")
    if first == full:
        return tensors[0]
    split = [d for d, (part, whole) in enumerate(zip(first, full)) if part != whole]
    if len(first) != len(full) or len(split) != 1 or first[split[0]] * len(tensors) != full[split[0]]:
        raise ValueError(f"{files[0]}: {key}: shape {first} in each of {len(files)} shard(s) does not make {full} "
                         f"from params.json (a shard missing or from another model?)")
    return torch.cat(tensors, dim=split[0])


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    """(merged state dict with Meta names, LlamaConfig) of a Meta-native dir; ragged shards raise ValueError."""
    params_path = directory / "params.json"
    try:
        params = json.loads(params_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{params_path}: not valid JSON: {e}") from None
    config = config_from_params(params, str(params_path))
    files = shard_files(directory)
    shards = [torch.load(path, map_location="cpu", mmap=True, weights_only=True) for path in files]
    shards = [{k: v for k, v in shard.items() if k != "rope.freqs"} for shard in shards]  # precomputed, unused
    for path, shard in zip(files[1:], shards[1:]):
        for key in sorted(set(shards[0]) ^ set(shard)):
            where = f"present in {files[0].name}, missing here" if key in shards[0] else f"not in {files[0].name}"
            raise ValueError(f"{path}: {key}: {where}")
    full = expected_shapes(config)
    for key in sorted(set(full) ^ set(shards[0])):
        if key == "output.weight":
            continue  # checked below: a tied checkpoint may leave it out
        raise ValueError(f"{files[0]}: {key}: {'missing' if key in full else 'unexpected'} for {params_path.name}")
    state = {key: _merge(key, [s[key] for s in shards], files, full[key]) for key in shards[0]}
    if "output.weight" not in state or torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
        state.pop("output.weight", None)
        config.tie_word_embeddings = True
    return state, config


def write_checkpoint(directory: Path, params: dict, state: dict[str, torch.Tensor]) -> None:
    """params.json + one consolidated.00.pth (model-parallel size 1) into an existing dir."""
    (directory / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    torch.save({k: v.contiguous() for k, v in state.items()}, directory / "consolidated.00.pth")
