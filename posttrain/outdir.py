"""The contract every training stage (SFT, DPO, RM) keeps with its output dir: which dirs it may write into, what
finished means, and how a new model is published. For users: docs/errors-and-output-dirs.md and docs/run-dir.md.

A stage writes only into a missing or empty dir, or one it owns: one holding its manifest or its marker
(`.posttrain.json`, written when the stage first claims the dir). Any other dir is refused, naming what is in it,
so a mistyped `train.output_dir` never touches the user's files (checkpoints alone do not make a dir ours: another
trainer's output dir holds `checkpoint-*` too).

A dir with DONE holds a finished result (`reuse_finished`): with the same config (numbers compared by value) and
data files of the same contents it is returned as is, with one line saying so; with anything else it is refused,
naming each changed key and data file, and stays as it is. A dir without DONE is trained into, from the last
checkpoint. `finish` publishes the result: the model is saved into a temp dir inside `out` (the same filesystem),
then rank 0 moves it into place (`out` itself, or `out/model` for DPO), writes manifest.json, and DONE last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from posttrain import backbone
from posttrain.config import LoRAConfig
from posttrain.data import atomic_write_json, atomic_write_text, file_sha256

MARKER = ".posttrain.json"
TMP_MODEL_DIR = ".model.tmp"
# A model's files at the top of a stage dir: removed before a new model moves in, so that an adapter_config.json, say,
# cannot linger beside merged weights.
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "adapter_config.json", "*.bin", "*.pth")
# A number as YAML 1.2 writes it but YAML 1.1 (PyYAML) reads as a string: an exponent without a dot, like 1e-4.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
    """Check `out` as `check_writable` does, then create it, mark it as `stage_name`'s and drop the temp dir of a
    model save that never finished."""
    check_writable(out, stage_name)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write_json(out / MARKER, {"stage": stage_name})
    shutil.rmtree(out / TMP_MODEL_DIR, ignore_errors=True)


def _number(value) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    return None


def same_value(a, b) -> bool:
    """Whether two config values mean the same: numbers by value (1 and 1.0, '1e-4' and 0.0001), lists and
    mappings item by item, anything else by == (True is not 1)."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return x == y
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_value, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return not changed_keys(a, b)
    return a == b


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings (`same_value`)."""
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif not same_value(a, b):
            keys.append(f"{prefix}{key}")
    return keys


def _changed_data(manifest: dict, data: list[str], recorded_hashes) -> list[str]:
    """The data files whose contents differ from those the finished run recorded (all of them when the manifest
    records none, as an older one may not)."""
    try:
        recorded = list(recorded_hashes(manifest))
    except (KeyError, TypeError):
        recorded = []
    changed = []
    for i, path in enumerate(data):
        try:
            same = i < len(recorded) and recorded[i] == file_sha256(path)
        except OSError:  # a data file gone
            same = False
        if not same:
            changed.append(f"the contents of {path}")
    return changed


def reuse_finished(out: Path, stage_name: str, config: dict, data: list[str], recorded_hashes: Callable
                   ) -> dict | None:
    """Check that `stage_name` may write into `out` (`check_writable`), then: the manifest of the finished run in
    `out` when it has this config and data files of the same contents, said in one line (the run is returned as
    is); None when `out` holds no finished run. Another finished run raises ValueError naming each changed key and
    data file, and stays as it is. `recorded_hashes(manifest)`: the sha256 of each data file it lists, in order."""
    check_writable(out, stage_name)
    if not (out / "DONE").is_file():
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    changed = changed_keys(manifest.get("config") or {}, json.loads(json.dumps(config)))
    changed += _changed_data(manifest, data, recorded_hashes)
    if changed:
        raise ValueError(f"{out}: holds a finished {stage_name.upper()} run of another config or other data "
                         f"(changed: {', '.join(changed)}); choose a new train.output_dir, or delete this one to "
                         "redo it")
    if os.environ.get("RANK", "0") == "0":
        print(f"{stage_name}: {out} already holds this run, finished with the same config and data: returned as is")
    return manifest


def model_kind(lora: LoRAConfig) -> str:
    """What a stage saves: the adapter alone, LoRA merged into the base, or full weights."""
    return "adapter" if lora.enabled and not lora.merge else "merged" if lora.enabled else "full"


def base_reference(path: str) -> str:
    """What an adapter's `base_model_name_or_path` should say: an absolute path when the base is on disk."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def save_model(trainer, tmp: Path, tokenizer, lora: LoRAConfig, base: str) -> None:
    """Write the trained model and its tokenizer into `tmp`: under FSDP the gathered full weights (every rank takes
    part); else, on rank 0, the adapter naming its base (`model_kind` adapter; for an RM it carries the score head)
    or the merged or full weights."""
    if trainer.is_fsdp_enabled:
        trainer.save_model(str(tmp))  # the trainer saves the tokenizer (processing_class) too
        return
    if not trainer.accelerator.is_main_process:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if model_kind(lora) != "adapter":
        backbone.save_model(backbone.merge_lora(model), tmp, format="hf", tokenizer=tokenizer)
        return
    model.peft_config["default"].base_model_name_or_path = base_reference(base)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))


def _move_in(tmp: Path, out: Path, model_dir: str) -> None:
    """Make the complete new model in `tmp` the one of `out`: unmark the old result (DONE, manifest), then replace
    `out/model_dir` whole, or at the top of `out` its model files (MODEL_FILES) with those in `tmp`."""
    (out / "DONE").unlink(missing_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    if model_dir:
        shutil.rmtree(out / model_dir, ignore_errors=True)
        tmp.replace(out / model_dir)
        return
    for pattern in MODEL_FILES:
        for old in out.glob(pattern):
            old.unlink()
    for entry in tmp.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    tmp.rmdir()


def finish(trainer, out: Path, manifest: dict, *, tokenizer, lora: LoRAConfig, base: str, model_dir: str = ""
           ) -> None:
    """Publish a trained stage into `out`: save the model into a temp dir there (`save_model`), wait for every
    rank, then on rank 0 move it into place (`out/model_dir`, or the top of `out`), write `manifest`, and DONE
    last. The temp dir is removed whatever happens; a failed or killed save leaves the dir without DONE, to be
    trained into again."""
    accelerator = trainer.accelerator
    tmp = out / TMP_MODEL_DIR
    try:
        save_model(trainer, tmp, tokenizer, lora, base)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _move_in(tmp, out, model_dir)
            atomic_write_json(out / "manifest.json", manifest)
            atomic_write_text(out / "DONE", "")
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
