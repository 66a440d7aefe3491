"""GGUF files of causal Llama LMs as `posttrain export --format gguf` writes them (docs/run-dir.md).

One file holds the weights (F32, F16 or BF16; norms and other 1-D tensors stay F32), the architecture as
`llama.*` metadata and the tokenizer as `tokenizer.ggml.*` metadata, under llama.cpp's tensor names and keys (the
`gguf` package's llama map), which transformers' GGUF loader, and so `posttrain.backbone.load_model`, reads back.
The Q and K projections are stored with each head's rotary halves interleaved in pairs, the GGUF convention for
llama, which the loaders undo. Llama 3 RoPE scaling is stored twice: as the `rope_freqs.weight` divisors llama.cpp
reads, and as the exact parameters under ROPE_KEY, which `load_model` reads and transformers' loader does not.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from posttrain.tokenizer import EOM, EOT, LLAMA3_PATTERN, is_llama3

ROPE_KEY = "posttrain.rope_parameters"
# The pre-tokenizers (as tokenizers' JSON) that have a GGUF name: Llama 3's split ("llama-bpe"), GPT-2's ("gpt2").
_LLAMA3_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
]}
_GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def require_gguf() -> None:
    """Raise ValueError naming the pip command when the `gguf` package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("--format gguf needs the `gguf` package: pip install gguf")


def write(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write `model` (a causal Llama LM, weights kept in their dtype) and its tokenizer as the GGUF file `path`."""
    import gguf

    config = model.config
    if not isinstance(config, LlamaConfig) or model.get_output_embeddings() is None:
        raise ValueError(f"--format gguf: holds causal Llama LMs only, not {type(model).__name__}")
    if config.attention_bias or config.mlp_bias:
        raise ValueError("--format gguf: holds Llama LMs without biases only")
    file_type, tensor_type = {
        torch.float32: (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        torch.float16: (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
        torch.bfloat16: (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    }[model.dtype]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(file_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    rope = config.rope_parameters
    if rope["rope_type"] == "llama3":
        writer.add_string(ROPE_KEY, json.dumps(rope))
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS], _llama3_rope_divisors(config))
    elif rope["rope_type"] != "default":
        raise ValueError(f"--format gguf: RoPE of type {rope['rope_type']!r} is not written; default and llama3 are")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a file without output.weight is read as tied to token_embd.weight
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"--format gguf: no GGUF name for the tensor {hf_name}")
        tensor = tensor.detach().cpu()
        if name.endswith(".attn_q.weight"):
            tensor = _interleave_rotary(tensor, config.num_attention_heads)
        elif name.endswith(".attn_k.weight"):
            tensor = _interleave_rotary(tensor, config.num_key_value_heads)
        if tensor.dim() == 1:
            writer.add_tensor(name, tensor.float().numpy())
        elif tensor_type == gguf.GGMLQuantizationType.BF16:  # numpy has no bfloat16: the raw 16 bits
            writer.add_tensor(name, tensor.contiguous().view(torch.int16).numpy(), raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def rope_parameters(path: Path) -> dict | None:
    """The RoPE parameters stored under ROPE_KEY in a GGUF file (None when it has none, as llama.cpp's files)."""
    # transformers' metadata reader: it skips the tokenizer's arrays, which gguf.GGUFReader takes a minute to parse
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path))
    return json.loads(metadata[ROPE_KEY]) if ROPE_KEY in metadata else None


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from HF's order (first half, second half of the rotary pairs) to pairs side by side."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape)


def _llama3_rope_divisors(config: LlamaConfig) -> np.ndarray:
    """What llama.cpp divides each plain RoPE frequency by to get Llama 3's scaled ones."""
    dim = config.head_dim
    plain = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled).float().numpy()


def _add_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("--format gguf: writes byte-level BPE tokenizers (Llama 3, SmolLM2) only")
    found = json.dumps(backend["pre_tokenizer"])
    pre = {json.dumps(_LLAMA3_PRE): "llama-bpe", json.dumps(_GPT2_PRE): "gpt2"}.get(found)
    if pre is None:
        raise ValueError(f"--format gguf: no GGUF name for the pre-tokenizer {found}")
    if len(tokenizer) != vocab_size:
        raise ValueError(f"--format gguf: the tokenizer has {len(tokenizer)} ids, the model {vocab_size}")
    types = [gguf.TokenType.NORMAL] * vocab_size
    for index, token in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(vocab_size))))
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    with_specials, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    writer.add_add_bos_token(len(with_specials) > len(plain) and with_specials[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(with_specials) > len(plain) and with_specials[-1] == tokenizer.eos_token_id)
    special_ids = {writer.add_bos_token_id: tokenizer.bos_token_id, writer.add_eos_token_id: tokenizer.eos_token_id,
                   writer.add_pad_token_id: tokenizer.pad_token_id, writer.add_unk_token_id: tokenizer.unk_token_id}
    for add, token_id in special_ids.items():
        if token_id is not None:
            add(token_id)
    if is_llama3(tokenizer):
        writer.add_eot_token_id(EOT)
        writer.add_eom_token_id(EOM)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
