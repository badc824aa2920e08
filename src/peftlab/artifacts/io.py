"""Careful reading and writing of adapter folders.

Safetensors only (never pickle). Every problem with a file becomes one UserError line that
names the file. Adapter names are checked so that no name can reach outside its folder.
"""

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..methods.attach import check_name  # noqa: F401  (re-exported)

def read_json(path: Path, required: tuple = (), known: set | None = None) -> dict:
    """Read a config; missing required keys are errors, unknown keys only a warning."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object")
    missing = [k for k in required if k not in data]
    if missing:
        raise UserError(f"{path} lacks the required key '{missing[0]}'")
    if known is not None:
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{Path(path).name}: ignoring unknown key(s) {', '.join(unknown)} (written by a newer version?)", stacklevel=2)
    return data


def read_tensors(path: Path) -> dict:
    """Load a safetensors file; a truncated or corrupt file is a one-line error."""
    if not Path(path).is_file():
        raise UserError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def write_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write an adapter's tensors, refusing an empty or non-finite one, and read the file back
    to check it holds every tensor whole (a sharded run must never leave empty placeholders)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if not tensors:
        raise UserError(f"{path.name}: nothing to save; the strategy trained no tensor")
    for k, v in tensors.items():
        if v.numel() == 0:
            raise UserError(f"{path.name}: tensor {k} is empty; refusing to write an incomplete adapter")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"tensor {k} holds NaN or Inf; refusing to write a broken adapter")
    save_file(tensors, str(path), metadata={"format": "pt"} | (metadata or {}))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if written != {k: tuple(v.shape) for k, v in tensors.items()}:
        raise UserError(f"{path} does not hold what was written; refusing to publish it")


def fingerprint(model, skip: set) -> dict:
    """Per frozen floating tensor: its shape and the sum of 16 evenly spaced entries.

    Cheap (no full pass over the weights) yet enough to tell one base from another; compared
    with a tolerance so a base kept in bf16 still matches its fp32 self.
    """
    out = {}
    for name, p in model.named_parameters():
        if name in skip or not p.is_floating_point() or p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        k = min(16, flat.numel())
        idx = torch.arange(k) * (flat.numel() - 1) // max(1, k - 1)
        out[name] = [list(p.shape), float(flat[idx].double().sum())]
    return out


def check_fingerprint(model, saved: dict, skip: set, where: Path) -> None:
    """Refuse a base whose shapes or sampled values differ; name the first offending tensor."""
    mine = fingerprint(model, skip)
    for name, (shape, checksum) in saved.items():
        if name not in mine:
            raise UserError(f"{where}: the base model has no tensor {name}; this adapter was made for another model")
        my_shape, my_sum = mine[name]
        if my_shape != shape:
            raise UserError(f"{where}: base tensor {name} has shape {tuple(my_shape)}, the adapter expects {tuple(shape)}")
        if abs(my_sum - checksum) > 1e-2 * (abs(my_sum) + abs(checksum)) + 1e-3:
            raise UserError(f"{where}: base tensor {name} differs from the base this adapter was trained on")
