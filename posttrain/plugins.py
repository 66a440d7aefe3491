"""User code named in a config as `module:function` (or `module:Class.method`), importable from the Python path."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def load_callable(spec: str) -> Callable:
    """The callable `spec` names; a ValueError saying which part does not resolve."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{spec!r}: expected module:function")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{spec!r}: cannot import module {module_name!r} ({e})") from e
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec!r}: {target!r} is not callable")
    return target
