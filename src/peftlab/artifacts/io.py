"""Careful reading and writing of adapter folders.

Safetensors only (never pickle). Every problem with a file becomes one UserError line that
names the file; NaN and Inf are refused in adapters' tensors and configs (`refuse_nonfinite*`).
Adapter names are checked so that no name can reach outside its folder. Base fingerprints live
in peftlab.fingerprint.
"""

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..fingerprint import fingerprint  # noqa: F401  (re-exported: train.run_identity)
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


def read_metadata(path: Path) -> dict:
    """A safetensors file's metadata (str -> str); call after `read_tensors` read the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def refuse_nonfinite(path: Path, tensors: dict) -> None:
    """An adapter tensor holding NaN or Inf is one error naming the file and the tensor."""
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path}: tensor {k} holds NaN or Inf; refusing to load a broken adapter")


def refuse_nonfinite_json(path: Path, data, key: str = "") -> None:
    """A config number that is NaN or ±Infinity (Python's json reads them) is one error naming
    the file and the key."""
    if isinstance(data, float) and not math.isfinite(data):
        raise UserError(f"{path}: {key or 'the config'} is {data}, not a finite number; refusing to load a broken adapter")
    if isinstance(data, dict):
        for k, v in data.items():
            refuse_nonfinite_json(path, v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            refuse_nonfinite_json(path, v, f"{key}[{i}]")


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
