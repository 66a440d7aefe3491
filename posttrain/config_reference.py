"""The config keys of a typed config, read from its dataclass fields: dotted key, type, default and help text.

`posttrain CMD --help` prints them; a list of dataclasses shows its item's keys as `key[].subkey`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


@dataclasses.dataclass
class Key:
    key: str  # dotted, e.g. train.learning_rate
    type: str
    default: str  # "required" for a field without one; "" for a section
    help: str


def _type_text(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _item_class(tp: Any) -> type | None:
    """The dataclass a field holds, itself or as the items of a list (else None)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (None,)
        return item if dataclasses.is_dataclass(item) else None
    return None


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else repr(value)
    return "required"


def config_keys(cls: type, prefix: str = "") -> list[Key]:
    """Every key of `cls` in field order, a nested section's keys after the section's own line."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        keys.append(Key(prefix + f.name, _type_text(tp), _default(f), f.metadata.get("help", "")))
        nested = _item_class(tp)
        if nested is not None:
            inner = f"{f.name}[]." if typing.get_origin(tp) is list else f"{f.name}."
            keys.extend(config_keys(nested, prefix + inner))
    return keys


def format_keys(cls: type) -> str:
    """One line per key: `  key  (type, default)  help`, keys aligned."""
    keys = config_keys(cls)
    width = max(len(k.key) for k in keys)
    lines = []
    for k in keys:
        what = k.type if not k.default else f"{k.type} = {k.default}"
        lines.append(f"  {k.key:<{width}}  {k.help} ({what})")
    return "\n".join(lines)
