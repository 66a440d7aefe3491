"""The real Llama 3 tokenizer as a transformers fast tokenizer.

With no path, it is built from the `tokenizer.model` (tiktoken BPE ranks) that ships inside the PyPI package
`llama-models`, so nothing is downloaded. With a path it loads an HF tokenizer dir, a Meta-native checkpoint dir
(its `tokenizer.model`) or a GGUF file.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# The pre-tokenizer split of Llama 3 (same string as llama_models.llama3.tokenizer.Tokenizer.pat_str).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BASE_TOKENS = 128_000
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS = _NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS) + 2)
]

BEGIN_OF_TEXT, END_OF_TEXT, PAD = 128000, 128001, 128004
START_HEADER, END_HEADER, EOM, EOT, PYTHON_TAG = 128006, 128007, 128008, 128009, 128010
STOP_IDS = (END_OF_TEXT, EOM, EOT)


def llama3_tokenizer_model_path() -> Path:
    """Path of the `tokenizer.model` inside the installed `llama-models` package (the package is not imported)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Llama 3 tokenizer ships in the PyPI package `llama-models`: pip install llama-models")
    path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llama-models package")
    return path


def _from_tiktoken_file(model_file: Path) -> PreTrainedTokenizerFast:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.name_or_path = str(model_file)
    if len(tok) != NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS or tok.convert_tokens_to_ids("<|eot_id|>") != EOT:
        raise ValueError(f"{model_file}: not a Llama 3 tokenizer.model ({len(tok)} ids, expected 128256)")
    return tok


@functools.lru_cache(maxsize=4)
def _cached_llama3(model_file: str) -> PreTrainedTokenizerFast:
    return _from_tiktoken_file(Path(model_file))


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer.

    - `None`: the real Llama 3 tokenizer (128,256 ids, all 256 special tokens at their ids).
    - a dir with `tokenizer.json`/`tokenizer_config.json`: that HF tokenizer.
    - a dir with `tokenizer.model` (Meta-native checkpoint) or a `tokenizer.model` file: Llama 3 from that file.
    - a `.gguf` file: the tokenizer embedded in it.

    The cached instance is shared; callers that mutate a tokenizer should copy it first.
    """
    if path is None:
        return _cached_llama3(str(llama3_tokenizer_model_path()))
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_file() and path.name == "tokenizer.model":
        return _cached_llama3(str(path))
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(path))
        if (path / "tokenizer.model").is_file():
            return _cached_llama3(str(path / "tokenizer.model"))
        raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model in this directory")
    raise FileNotFoundError(f"{path}: not a tokenizer directory, tokenizer.model or .gguf file")


def is_llama3(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer carries the Llama 3 special tokens at their ids (then we render the Llama 3 format)."""
    # convert_tokens_to_ids, not get_vocab(): building the 128k-entry dict costs ~0.2 s per call
    return tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|eot_id|>"]) == [START_HEADER, EOT]
