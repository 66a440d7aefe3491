"""Stable identities of prompts, so that a held-out split keeps a prompt on one side however often it recurs."""

from __future__ import annotations

import hashlib
import json


def prompt_key(messages: list[dict] | str, tools: list | None = None) -> str:
    """sha256 of a prompt's messages (or text) and tool definitions, independent of record ids and key order."""
    text = json.dumps([messages, tools or None], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seeded_rank(key: str, seed: int) -> str:
    """A seeded order of keys that does not depend on which other keys are present."""
    return hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()
