"""Model soups: uniform or weighted averages of full checkpoints or of LoRA adapters.

Full checkpoints average every tensor. Adapters average their A and B matrices separately, as PEFT's linear
`add_weighted_adapter` does; that is exact for the adapters themselves (averaging an adapter with itself changes
nothing) but is not the average of the merged updates B·A, so adapters of one soup should share an initialisation.
Sums run in float64 and are cast back to each tensor's dtype.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict:
    """Weighted mean of state dicts with identical keys and shapes; weights are normalised to sum to 1."""
    if not state_dicts:
        raise ValueError("average: no state dicts given")
    weights = [1.0] * len(state_dicts) if weights is None else list(weights)
    if len(weights) != len(state_dicts) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights: need {len(state_dicts)} non-negative weights with a positive sum, got {weights}")
    total = sum(weights)
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(keys):
            missing = sorted(set(keys) ^ set(sd))[:3]
            raise ValueError(f"average: checkpoint {i} has different tensors from checkpoint 0 (e.g. {missing})")
    out = {}
    for key in keys:
        ref = state_dicts[0][key]
        if any(sd[key].shape != ref.shape for sd in state_dicts):
            raise ValueError(f"average: {key}: shapes differ across checkpoints")
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        acc = sum(sd[key].to(torch.float64) * (w / total) for sd, w in zip(state_dicts, weights))
        out[key] = acc.to(ref.dtype)
    return out


def _weights_file(path: Path) -> Path:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    if (path / "model.safetensors.index.json").is_file():
        raise ValueError(f"{path}: sharded checkpoints are averaged per shard; save it unsharded first")
    raise FileNotFoundError(f"{path}: no {' or '.join(WEIGHT_FILES)} in this directory")


def average_checkpoints(paths: list[str | Path], output: str | Path, weights: list[float] | None = None) -> Path:
    """Average HF model dirs (or PEFT adapter dirs) into `output`; other files are copied from the first dir."""
    paths = [Path(p) for p in paths]
    files = [_weights_file(p) for p in paths]
    if len({f.name for f in files}) != 1:
        raise ValueError(f"average: cannot mix full checkpoints and adapters: {[str(f) for f in files]}")
    averaged = average_state_dicts([load_file(str(f)) for f in files], weights)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        for item in paths[0].iterdir():
            if item.is_file() and item.name != files[0].name:
                shutil.copy2(item, tmp / item.name)
        save_file(averaged, str(tmp / files[0].name), metadata={"format": "pt"})
        (tmp / "soup.json").write_text(json.dumps({"sources": [str(p) for p in paths], "weights": weights}, indent=2))
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
