"""peftlab's own adapter folder, for what HF PEFT's format cannot express (bottleneck
adapters, freeze / targeted / bitfit deltas, schedules, stacks, PiSSA):

    adapter/
      peftlab_config.json   {"format": "peftlab", "strategy": "...", "architecture": "...",
                             "base_model": "...", "fingerprint": {tensor: [shape, checksum]}}
      adapter.safetensors   only the tensors the strategy trained

The fingerprint is the base's as it was before training (peftlab.fingerprint), the tensors a
full or freeze strategy trained included. Loading refuses a base whose shapes or sampled values
differ (naming the first offending tensor; `force_base` only warns) and NaN or Inf anywhere,
re-applies the strategy to the base, then copies the trained tensors in. Base tensors
that a freeze strategy trained overwrite the base's; their originals are kept so that
`merge.unmerge` can restore them.
"""

import re
from pathlib import Path

import torch

from .. import fingerprint
from ..errors import UserError
from ..methods import REGISTRY, parse_strategy, prepare, trainable_parameters
from ..methods.attach import attached
from ..models import reference
from ..spec import Step
from .io import read_json, read_tensors, refuse_nonfinite, refuse_nonfinite_json, write_tensors

CONFIG = "peftlab_config.json"
TENSORS = "adapter.safetensors"
KNOWN = {"format", "version", "strategy", "architecture", "base_model", "base_model_name_or_path", "fingerprint", "step",
         "name"}

def trained_tensors(model, prepared) -> dict:
    """Name -> fp32 tensor for everything the strategy trains (scheduled parameters too).

    An added module is saved as its `stored()` tensors (a reparametrised prefix: the plain
    prefixes it produces).
    """
    names = set(trainable_parameters(model))
    for later in prepared.unfreeze_at.values():
        names.update(later)
    params = dict(model.named_parameters())
    out = {}
    for host_name, _, slot in attached(model):
        for adapter, child in slot.items():
            path = ".".join(x for x in (host_name, slot.key, adapter) if x)
            own = {f"{path}.{n}" for n, _ in child.named_parameters()}
            if own & names:
                out.update({f"{path}.{n}": t.detach() for n, t in child.stored().items() if t is not None})
                names -= own
    for n in sorted(names):
        out[n] = params[n].detach()
    return {n: t.to("cpu", torch.float32).contiguous() for n, t in sorted(out.items())}


def renamed(steps: list, name: str) -> list:
    """Give every method that takes a `name` the adapter name `name`."""
    return [Step(s.method, s.options | {"name": name}) if "name" in REGISTRY[s.method].options else s for s in steps]


def rename_tensor(key: str, old: str, new: str, slots) -> str:
    return re.sub(rf"(^|\.)({'|'.join(map(re.escape, slots))})\.{re.escape(old)}\.", rf"\1\2.{new}.", key)


def save(model, prepared, folder: Path, base_model: str = "", extra: dict | None = None) -> None:
    """Write config and tensors into `folder` (the caller makes it atomic)."""
    from ..files import write_json

    tensors = trained_tensors(model, prepared)
    write_tensors(folder / TENSORS, tensors)
    steps = prepared.saved  # a method may record other options for what it stores (a folded prefix, an init from data)
    write_json(folder / CONFIG, {
        "format": "peftlab", "version": 1, "strategy": "/".join(map(str, steps)),
        "architecture": model.config.model_type, "base_model": base_model,
        "base_model_name_or_path": reference(base_model) if base_model else None,
        "fingerprint": fingerprint.of_base(model, set(tensors)), **(extra or {}),
    })


def _added_names(model) -> set:
    from ..components import where

    return {n for n, w in where(model).items() if w.component == "added"}


def load(model, folder: Path, name: str = "default", tokenizer=None, force_base: bool = False):
    """Apply the saved strategy to `model` under adapter name `name` and load its tensors
    (`force_base`: a base other than the adapter's is a warning, not an error)."""
    folder = Path(folder)
    config = read_json(folder / CONFIG, required=("format", "strategy"), known=KNOWN)
    refuse_nonfinite_json(folder / CONFIG, config)
    if config["format"] != "peftlab":
        raise UserError(f"{folder / CONFIG}: format is '{config['format']}', expected 'peftlab'")
    if not isinstance(config["strategy"], str):
        raise UserError(f"{folder / CONFIG}: strategy should be a string such as 'freeze:train=mlp', not {config['strategy']!r}")
    if config.get("architecture") not in (None, model.config.model_type):
        raise UserError(f"{folder}: made for a {config['architecture']} model, this base is {model.config.model_type}")
    tensors = read_tensors(folder / TENSORS)
    refuse_nonfinite(folder / TENSORS, tensors)
    steps = parse_strategy(config["strategy"])
    saved = fingerprint.checked(config.get("fingerprint") or {}, folder / CONFIG)
    fingerprint.check(model, saved, folder, force=force_base)
    old = next((s.options.get("name", "default") for s in steps if "name" in REGISTRY[s.method].options), "default")
    steps = renamed(steps, name)
    prepared = prepare(model, "/".join(map(str, steps)), tokenizer)
    slots = {slot.key for _, _, slot in attached(model)}
    tensors = {rename_tensor(k, old, name, slots): v for k, v in tensors.items()} if slots else tensors
    added = _added_names(model)
    params = dict(model.named_parameters())
    expected = trained_tensors(model, prepared)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise UserError(f"{folder / TENSORS} lacks tensor {missing[0]}")
    originals = model.__dict__.setdefault("_peftlab_originals", {})
    for key, value in tensors.items():
        if key not in params:
            raise UserError(f"{folder}: tensor {key} has no place in this model; was it trained on another base?")
        target = params[key]
        if target.shape != value.shape:
            raise UserError(f"{folder}: tensor {key} has shape {tuple(value.shape)}, the model has {tuple(target.shape)}")
        with torch.no_grad():
            if key not in added and key not in originals:
                originals[key] = target.detach().clone()
            target.copy_(value.to(target.dtype))
    return prepared
