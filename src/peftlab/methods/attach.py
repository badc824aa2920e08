"""How added modules join a frozen model: as named children of the module they modify,
`host.<slot>[adapter name]`, run by a forward hook on that module. Base parameter names
never change (so a merged model saves as a plain transformers model), and several named
adapters can sit on one layer.

Per-row routing (one adapter per batch row) is a property of the call, stored on the slots
of the model being called (`Slot.rows`) for the duration of that call and reset after it;
there is no process-wide state, so two models can be routed independently. torch.compile
reads the attribute as a guarded constant (no graph break; a new routing recompiles).
"""

import re
from functools import partial

import torch
import torch.nn as nn

from ..errors import UserError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(name: str) -> str:
    """An adapter name is a plain file-name-safe word: no '/', no '..', no leading dot."""
    if not NAME.fullmatch(str(name)) or ".." in str(name):
        raise UserError(f"adapter name '{name}' is not allowed; use letters, digits, '_' and '-'")
    return name


class Slot(nn.ModuleDict):
    """Adapter name -> added module, on one host. `rows`: one adapter name per batch row while
    a routed call runs, else None."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key  # the slot's name on its host
        self.rows = None


def attach(host: nn.Module, name: str, child: nn.Module, hook=None, pre: bool = False, after=None) -> None:
    """Put `child` at `host.<child.slot>[name]`; register `hook` once per slot.

    A post hook is `hook(host, args, output) -> output` (default: `output_hook`, for modules
    whose forward is `child(x, base_out, host)`); a pre hook (`pre=True`) is
    `hook(host, args, kwargs) -> (args, kwargs)` and sees keyword arguments; `after`, with a
    pre hook, is a post hook that undoes what it did (LoRA on parameters).
    """
    check_name(name)
    slot = child.slot
    if slot not in dict(host.named_children()):
        host.add_module(slot, Slot(slot))
        handles = host.__dict__.setdefault("_peftlab_hooks", {})
        if pre:
            handles[slot] = [host.register_forward_pre_hook(hook, with_kwargs=True)]
            if after is not None:
                handles[slot].append(host.register_forward_hook(after))
        else:
            handles[slot] = [host.register_forward_hook(hook or partial(output_hook, slot))]
    getattr(host, slot)[name] = child


def attached(model: nn.Module, slot: str | None = None):
    """Yield (host_name, host, Slot) for every host carrying `slot` (None: any slot)."""
    for host_name, host in model.named_modules():
        for key, children in list(host.named_children()):
            if isinstance(children, Slot) and slot in (None, key):
                yield host_name, host, children


def detach(host: nn.Module, slot: str, name: str | None = None) -> None:
    """Remove one named child (or the whole slot and its hook when it empties)."""
    children = dict(host.named_children()).get(slot)
    if children is None:
        return
    if name is not None and name in children:
        del children[name]
    if name is None or len(children) == 0:
        delattr(host, slot)
        for handle in host.__dict__.get("_peftlab_hooks", {}).pop(slot, []):
            handle.remove()


def active(children: nn.ModuleDict):
    """The children that currently take part in the forward pass."""
    return [c for c in children.values() if c.active and not c.merged]


def apply(children: Slot, out: torch.Tensor, run) -> torch.Tensor:
    """Apply `run(child, rows, out)` for the active children, or per row when routed.

    `rows` is None (the whole batch) or a list of row indices; `run` returns the new output for
    those rows. Rows routed to no adapter keep the base output.
    """
    rows = children.rows
    if rows is None:
        for child in active(children):
            out = run(child, None, out)
        return out
    if len(rows) != out.shape[0]:
        raise UserError(f"rows are routed to {len(rows)} adapter names but the batch has {out.shape[0]} rows; "
                        "give one name per row")
    new = out.clone()
    for name, child in children.items():
        idx = [i for i, r in enumerate(rows) if r == name]
        if idx:
            new[idx] = run(child, idx, out[idx])
    return new


def output_hook(slot: str, layer, args, output):
    """The hook of methods that change a layer's output: y ← child(x, y, layer) per active child."""
    x = args[0]  # (..., in)
    return apply(getattr(layer, slot), output, lambda c, rows, out: c(x if rows is None else x[rows], out, layer))


def route(model: nn.Module, rows) -> list:
    """Set per-row routing on every slot of `model` (None: off); return what each had before."""
    slots = [children for _, _, children in attached(model)]
    before = [s.rows for s in slots]
    for s in slots:
        s.rows = rows
    return list(zip(slots, before))


def unroute(saved: list) -> None:
    for s, rows in saved:
        s.rows = rows


def base_modules(model) -> dict:
    """{path: module} of the model's own modules: none that peftlab added (slots, added
    modules and what they hold)."""
    every = dict(model.named_modules())

    def added(path, module):
        parts = path.split(".")
        return isinstance(module, Slot) or getattr(module, "_peftlab_added", False) or any(
            getattr(every.get(".".join(parts[:i])), "_peftlab_added", False) for i in range(1, len(parts)))

    return {p: m for p, m in every.items() if not added(p, m)}
