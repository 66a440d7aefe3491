"""Names that differ between the transformers releases we support (5.17, the GPU image's, through the newest)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _forward_params(model_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_cls.forward).parameters)


def cache_kwarg(model) -> str:
    """The forward keyword of the KV cache: `cache` (5.2x) or `past_key_values` (5.17, deprecated later)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def checkpointing_args(args_cls: type, enabled: bool, kwargs: dict) -> dict:
    """Activation-checkpointing fields for a TrainingArguments subclass, under whichever names it has.

    Newer releases call them `activation_checkpointing*` and can recompute every n-th layer only; older ones call
    them `gradient_checkpointing*` and recompute every layer, so `every_n_layers` is dropped there.
    """
    names = {f.name for f in dataclasses.fields(args_cls)}
    if "activation_checkpointing" in names:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    if kwargs.get("every_n_layers", 1) != 1:
        log.warning("this transformers checkpoints every layer; every_n_layers=%s is ignored", kwargs["every_n_layers"])
    kwargs = {k: v for k, v in kwargs.items() if k != "every_n_layers"}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}
