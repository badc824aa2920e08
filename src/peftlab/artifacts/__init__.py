"""Adapters as files: save, load, detect the format.

A strategy that HF PEFT can express (one LoRA/DoRA/rsLoRA, prompt or prefix step) is saved
in peft's format, so the ecosystem loads it unchanged; everything else in peftlab's own
format (`native`). Both record the fingerprint of the base the adapter was trained on, and
loading checks it. Writes go to a temporary folder renamed into place: a crash never leaves
half an adapter.
"""

from pathlib import Path

from .. import distributed
from ..errors import UserError
from ..files import atomic_dir
from . import hf, native
from .io import check_name


def save(model, prepared, folder, name: str = "default", base_model: str = "", extra: dict | None = None) -> Path:
    """Save adapter `name` (as trained by `prepared`) into `folder`; return the folder.

    In a distributed run every process calls this (a sharded model is gathered whole for
    the moment) and only rank 0 writes."""
    named = {s.options["name"] for s in prepared.steps if "name" in s.options}
    if name == "default" and len(named) == 1:  # the strategy named its adapter (lora:name=x): save that one
        name = named.pop()
    check_name(name)
    folder = Path(folder)
    with distributed.whole_model(model):
        if distributed.is_main():
            with atomic_dir(folder) as tmp:
                if hf.expressible(prepared.saved, model) and not prepared.unfreeze_at:
                    hf.save(model, prepared.saved, tmp, name, base_model)
                else:
                    native.save(model, prepared, tmp, base_model, extra)
    distributed.barrier()
    return folder


def kind(folder) -> str:
    """'peft' or 'peftlab'; a clear error for anything else."""
    folder = Path(folder)
    if (folder / hf.CONFIG).is_file():
        return "peft"
    if (folder / native.CONFIG).is_file():
        return "peftlab"
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    raise UserError(f"{folder} is not an adapter folder (no {hf.CONFIG} or {native.CONFIG})")


def load(model, folder, name: str = "default", tokenizer=None, force_base: bool = False):
    """Load the adapter in `folder` into `model` as `name`; return the `Prepared` strategy.

    The base the adapter was trained on must be `model`'s (peftlab.fingerprint): another base
    is refused, or with `force_base` loaded with a warning. NaN or Inf anywhere in the adapter
    (tensors or config) is refused."""
    check_name(name)
    if kind(folder) == "peft":
        return hf.load(model, Path(folder), name, force_base=force_base)
    return native.load(model, Path(folder), name, tokenizer, force_base=force_base)


def size_on_disk(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
