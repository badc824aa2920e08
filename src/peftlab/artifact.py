"""peftlab's own adapter folder: the strategy spec plus the trained tensors, nothing else.

    adapter/
      peftlab_config.json   {"format": "peftlab", "strategy": "...", "base_model": "...", ...}
      adapter.safetensors   only tensors the strategy trained (names as in the prepared model)

Safetensors only (never pickle), written through a temporary folder and one rename.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .files import atomic_dir, write_json
from .methods import prepare, trainable_parameters

CONFIG = "peftlab_config.json"
TENSORS = "adapter.safetensors"


def trained_tensors(model, prepared) -> dict:
    """Name -> tensor for everything the strategy trains (including scheduled parameters)."""
    names = set(trainable_parameters(model))
    for later in prepared.unfreeze_at.values():
        names.update(later)
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32).contiguous() for n in sorted(names)}


def save(model, prepared, folder: Path, base_model: str = "", extra: dict | None = None) -> Path:
    """Write the adapter folder atomically; return its path."""
    tensors = trained_tensors(model, prepared)
    with atomic_dir(Path(folder)) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
        write_json(tmp / CONFIG, {"format": "peftlab", "version": 1, "strategy": prepared.spec,
                                  "base_model": base_model, **(extra or {})})
    return Path(folder)


def load(model, folder: Path):
    """Apply the saved strategy to `model` and load its trained tensors; return `Prepared`."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder} is not a peftlab adapter (no {CONFIG})")
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (json.JSONDecodeError, OSError, Exception) as e:  # safetensors raises its own error types
        raise UserError(f"{folder}: cannot read the adapter ({type(e).__name__}: {str(e)[:120]})") from None
    prepared = prepare(model, config["strategy"])
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise UserError(f"{folder}: tensor {name} has no place in this model; was it trained on another base?")
        if params[name].shape != value.shape:
            raise UserError(f"{folder}: tensor {name} has shape {tuple(value.shape)}, the model has {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(value)
    return prepared


def size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
