"""Typed configs behind every YAML file.

A config is a dataclass; nested dataclasses are YAML mappings. `load_config(cls, path, overrides)` reads the YAML,
applies `key=value` overrides (dotted keys reach nested fields, values parsed as YAML scalars) and checks every key
and type, so that a typo fails at load with the key's name instead of silently training the wrong thing.
Field docstrings live in the `metadata={"help": ...}` of each field; `__post_init__` checks ranges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# transformers' attention backends (accel.attn: varlen swaps in posttrain's own at load)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


class ConfigError(ValueError):
    """A bad config key or value; the message names the file and the dotted key."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a one-line help text (unit and meaning)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# transformers' SchedulerType values
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")


@dataclasses.dataclass
class ModelConfig:
    path: str = field("", help="HF dir, Meta-native dir, .gguf file, or a config name (llama3.1-8b, tiny, smollm2-135m-instruct)")
    dtype: str = field("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16")
    attn_implementation: str = field("sdpa", help="transformers attention backend: " + ", ".join(ATTN_IMPLEMENTATIONS))

    def __post_init__(self):
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = field(True, help="train LoRA adapters (True) or all weights (False)")
    r: int = field(16, help="adapter rank")
    alpha: int = field(32, help="LoRA alpha (>= 1); the update is scaled by alpha / r")
    dropout: float = field(0.0, help="dropout on the adapter input, in [0, 1)")
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], help="module names, or all-linear")
    merge: bool = field(True, help="save merged weights (True) or base + adapter (False)")

    def __post_init__(self):
        check_range("r", self.r, low=1)
        check_range("alpha", self.alpha, low=1)
        check_range("dropout", self.dropout, low=0.0, below=1.0)
        if not self.target_modules:
            raise ConfigError("target_modules: empty; name the modules to adapt, or all-linear")


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = field("", help="where the stage writes its model, manifest.json and logs")
    learning_rate: float = field(1e-5, help="peak learning rate, > 0 (the recipe's 1e-5)")
    lr_scheduler: str = field("cosine", help="transformers scheduler: " + ", ".join(SCHEDULERS))
    warmup_ratio: float = field(0.03, help="fraction of the steps spent warming up, in [0, 1)")
    num_epochs: float = field(1.0, help="passes over the data, > 0 (ignored when max_steps >= 1)")
    max_steps: int = field(-1, help="optimizer steps, >= 1; -1 = from num_epochs")
    batch_size: int = field(8, help="sequences (or packed rows) per device per micro-step")
    grad_accum: int = field(1, help="micro-steps per optimizer step")
    max_length: int = field(2048, help="tokens per sequence (or packed row)")
    seed: int = field(0, help="seed for data order, init of adapters and dropout")
    weight_decay: float = field(0.0, help="AdamW weight decay, >= 0")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0 = no clipping)")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")
    logging_steps: int = field(10, help="log every N optimizer steps, >= 1")
    save_steps: int = field(0, help="checkpoint every N steps (0 = only at the end); resume starts from the last one")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], help="trainer loggers: tensorboard, none")

    def __post_init__(self):
        check_range("learning_rate", self.learning_rate, above=0.0)
        check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        check_range("warmup_ratio", self.warmup_ratio, low=0.0, below=1.0)
        if self.max_steps != -1:
            check_range("max_steps", self.max_steps, low=1)
        else:
            check_range("num_epochs", self.num_epochs, above=0.0)
        check_range("batch_size", self.batch_size, low=1)
        check_range("grad_accum", self.grad_accum, low=1)
        check_range("max_length", self.max_length, low=8)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("max_grad_norm", self.max_grad_norm, low=0.0)
        check_range("logging_steps", self.logging_steps, low=1)
        check_range("save_steps", self.save_steps, low=0)


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def check_range(key: str, value: float, *, low: float | None = None, high: float | None = None,
                above: float | None = None, below: float | None = None) -> None:
    """Refuse a value outside the bounds (low/high inclusive, above/below exclusive), and NaN or infinity."""
    start = f"[{low}" if low is not None else f"({above}" if above is not None else "(-inf"
    end = f"{high}]" if high is not None else f"{below})" if below is not None else "inf)"
    finite = not isinstance(value, float) or math.isfinite(value)  # ints: exact, never NaN, maybe beyond a float
    inside = (finite and (low is None or value >= low) and (high is None or value <= high)
              and (above is None or value > above) and (below is None or value < below))
    if not inside:
        raise ConfigError(f"{key}: {value!r} is outside {start}, {end}")


@contextlib.contextmanager
def blame(key: str):
    """Put the config key a value came from in front of a ValueError raised while using it: `model.path: ...`."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got str {value!r}") from None
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a mapping")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `a.b=value` strings to a raw config mapping; values are parsed as YAML (so `lr=1e-5`, `x=[1,2]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"{item}: an override must look like key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: {raw!r} is not a YAML value ({getattr(e, 'problem', None) or e})") from None
        _set_dotted(data, key.strip(), value)
    return data


def from_dict(cls: type[T], data: dict, *, source: str = "<config>") -> T:
    """Build `cls` from a mapping; errors are ConfigError('{source}: {key}: ...')."""
    try:
        return _build(cls, data or {})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read YAML at `path` (or start empty), apply overrides, and build the dataclass `cls`."""
    data: dict = {}
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a directory, not a YAML config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}:{_yaml_where(e)} not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    try:
        apply_overrides(data, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return from_dict(cls, data, source=source)


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config (for manifests and the resolved config.yaml)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
