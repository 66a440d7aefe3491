"""`posttrain export SOURCE --to DIR --format hf|merged|meta|gguf`: a model in the form another tool reads.

SOURCE is any model source `posttrain.backbone.load_model` takes, or a LoRA adapter dir (`adapter_config.json`,
as SFT, DPO and the RM save with `lora.merge: false`). Formats:
  hf      an HF dir; an adapter stays an adapter (its base recorded as an absolute path), a full model stays full
  merged  an HF dir of the full model, a LoRA adapter folded into its base
  meta    a Meta-native dir (params.json + consolidated.00.pth + tokenizer.model), adapters merged
  gguf    a dir with one GGUF file, model.gguf (weights as --dtype, unquantized; the tokenizer inside), adapters merged
The target dir must be new or empty; everything is written beside it and moved in at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

FORMATS = ("hf", "merged", "meta", "gguf")
GGUF_FILE = "model.gguf"
DTYPES = ("float32", "bfloat16", "float16")
# A LoRA adapter dir's own files: what an `hf` export of an adapter copies.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _is_adapter(source: str) -> bool:
    return (Path(source) / "adapter_config.json").is_file()


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--to: {target} exists and is not an empty dir; choose a new dir or delete this one")


def _copy_adapter(source: Path, tmp: Path) -> None:
    """Copy an adapter dir's weights, config and tokenizer; the base becomes an absolute path if it is a local one."""
    for item in source.iterdir():
        if item.is_file() and (item.name in ADAPTER_FILES or item.name.startswith(("tokenizer", "special_tokens"))
                               or item.name == "chat_template.jinja"):
            shutil.copyfile(item, tmp / item.name)
    config = json.loads((source / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if base and Path(base).exists():
        config["base_model_name_or_path"] = str(Path(base).resolve())
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_into(target: Path, write) -> None:
    """Run `write(tmp)` on a temp dir beside `target`, then move it to `target` (an empty target is replaced)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if target.is_dir():
            target.rmdir()  # empty: _check_target said so
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(source: str, target: str | Path, fmt: str, *, dtype: str = "float32") -> Path:
    """Write `source` to `target` in format `fmt`; returns what loads back: `target`, or the GGUF file in it."""
    from posttrain import gguf_format
    from posttrain.backbone import save_model
    from posttrain.generate import load_policy

    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if fmt == "gguf":
        gguf_format.require_gguf()
    target = Path(target)
    _check_target(target)
    if fmt == "hf" and _is_adapter(source):
        _write_into(target, lambda tmp: _copy_adapter(Path(source), tmp))
        return target
    model, tokenizer = load_policy(source, getattr(torch, dtype))  # an adapter comes back merged into its base
    if fmt == "gguf":
        _write_into(target, lambda tmp: gguf_format.write(model, tokenizer, tmp / GGUF_FILE))
        return target / GGUF_FILE

    def write(tmp: Path) -> None:
        saved = save_model(model, tmp / "model", format="meta" if fmt == "meta" else "hf", tokenizer=tokenizer)
        for item in saved.iterdir():  # up out of save_model's own dir, so `target` is the model dir
            os.replace(item, tmp / item.name)
        saved.rmdir()

    _write_into(target, write)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="posttrain export", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("source", help="HF dir, LoRA adapter dir, Meta-native dir, .gguf file or model name")
    p.add_argument("--to", required=True, help="the dir to write (new or empty)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf (an adapter stays an adapter), merged (adapter folded into its base), meta, gguf "
                        f"(DIR/{GGUF_FILE}, adapter merged; F32, F16 or BF16 weights per --dtype, not quantized)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weight dtype written (default float32; gguf: F32, F16, BF16)")
    args = p.parse_args(argv)
    written = export(args.source, args.to, args.format, dtype=args.dtype)
    print(f"exported {args.source} as {args.format}: {written}")
    return 0
