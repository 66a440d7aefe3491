"""A training stage's output dir: which dirs a stage may write into, when a finished result is reused or refused, and
how a new model takes the place of an old one.

A stage writes only into a missing or empty dir, or one it owns: one holding its manifest or its marker
(`.posttrain.json`, written when the stage first claims the dir). Any other dir is refused, naming what is in it,
so a mistyped `train.output_dir` never touches the user's files (checkpoints alone do not make a dir ours: another
trainer's output dir holds `checkpoint-*` too). A dir with DONE holds a finished result, which nothing removes
until a new one is complete: the new model is written beside it (a temp dir inside `out`, on the same filesystem)
and moved in at the end. For users: docs/errors-and-output-dirs.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import stage
from posttrain.data import atomic_write_json, file_sha256

MARKER = ".posttrain.json"


def owner(out: Path) -> str | None:
    """The stage that owns `out`, as its manifest or else its marker says (a soup copies its sources' markers along,
    its manifest names the soup); None for a dir no stage wrote."""
    for name in ("manifest.json", MARKER):
        try:
            found = json.loads((out / name).read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, str):
            return found
    return None


def check_writable(out: Path, stage_name: str) -> None:
    """Refuse an output dir that is not missing, empty, or owned by `stage_name` (ValueError naming what it holds)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"train.output_dir: {out} is a file, not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    found = owner(out)
    if found == stage_name:
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    what = f"a posttrain {found} stage" if found else "files that no posttrain stage wrote"
    raise ValueError(f"train.output_dir: {out} holds {what} ({shown}); the {stage_name} stage writes only into a "
                     "new or empty dir or one of its own: choose another train.output_dir")


def claim(out: Path, stage_name: str) -> None:
    """Check `out` as `check_writable` does, then create it and mark it as `stage_name`'s."""
    check_writable(out, stage_name)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write_json(out / MARKER, {"stage": stage_name})


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def compare_finished(out: Path, config: dict, data: list[str], recorded_hashes) -> tuple[dict | None, list[str]]:
    """(manifest, what changed) of the finished run in `out`, against this config and these data files; (None, [])
    when `out` holds no finished run. `recorded_hashes(manifest)`: the sha256 of each data file it lists, in order."""
    if not (out / "DONE").is_file():
        return None, []
    manifest = json.loads((out / "manifest.json").read_text())
    changed = changed_keys(manifest.get("config") or {}, json.loads(json.dumps(config)))
    try:
        same_data = recorded_hashes(manifest) == [file_sha256(path) for path in data]
    except (KeyError, TypeError, OSError):  # an older manifest, or a data file gone
        same_data = False
    return manifest, changed + ([] if same_data else ["the contents of the data files"])


def reuse_finished(out: Path, stage_name: str, config: dict, data: list[str], recorded_hashes) -> dict | None:
    """The manifest of the finished run in `out` when it has this config and data (None: not finished); another
    finished run raises ValueError naming what changed, and stays as it is."""
    manifest, changed = compare_finished(out, config, data, recorded_hashes)
    if changed:
        raise ValueError(f"{out}: holds a finished {stage_name} run of another config or other data (changed: "
                         f"{', '.join(changed)}); choose a new train.output_dir, or delete this one to redo it")
    return manifest


def replace_model(tmp: Path, out: Path, stale: tuple[str, ...]) -> None:
    """Make the complete new model in `tmp` the one in `out`: unmark the old result (DONE), remove its model files
    (globs in `stale`: an adapter must not linger beside merged weights), move the new files in."""
    (out / "DONE").unlink(missing_ok=True)
    for pattern in stale:
        for old in out.glob(pattern):
            old.unlink()
    stage.publish(tmp, out)
