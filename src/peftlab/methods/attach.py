"""How added modules join a frozen model: as named children of the module they modify,
run by a forward hook on that module. Base parameter names never change (so a merged model
saves as a plain transformers model), and several named adapters can sit on one layer.
"""

import re
import torch
import torch.nn as nn

from ..errors import UserError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(name: str) -> str:
    """An adapter name is a plain file-name-safe word: no '/', no '..', no leading dot."""
    if not NAME.fullmatch(str(name)) or ".." in str(name):
        raise UserError(f"adapter name '{name}' is not allowed; use letters, digits, '_' and '-'")
    return name


def attach(host: nn.Module, slot: str, name: str, child: nn.Module, hook, pre: bool = False) -> None:
    """Put `child` at `host.<slot>[name]`; register `hook` once per slot.

    A post hook is `hook(host, args, output) -> output`; a pre hook (`pre=True`) is
    `hook(host, args, kwargs) -> (args, kwargs)` and sees keyword arguments.
    """
    check_name(name)
    if slot not in host._modules:
        host.add_module(slot, nn.ModuleDict())
        handles = host.__dict__.setdefault("_peftlab_hooks", {})
        if pre:
            handles[slot] = host.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handles[slot] = host.register_forward_hook(hook)
    host._modules[slot][name] = child


def attached(model: nn.Module, slot: str):
    """Yield (host_name, host, ModuleDict) for every host carrying `slot`."""
    for host_name, host in model.named_modules():
        if slot in host._modules:
            yield host_name, host, host._modules[slot]


def detach(host: nn.Module, slot: str, name: str | None = None) -> None:
    """Remove one named child (or the whole slot and its hook when it empties)."""
    children = host._modules.get(slot)
    if children is None:
        return
    if name is not None and name in children:
        del children[name]
    if name is None or len(children) == 0:
        del host._modules[slot]
        handle = host.__dict__.get("_peftlab_hooks", {}).pop(slot, None)
        if handle is not None:
            handle.remove()


class ROWS:
    """Per-row routing: `names` holds one adapter name per batch row while a routed call runs.

    A plain class attribute rather than a ContextVar so that torch.compile reads it without a
    graph break; the price is one routing per process at a time (route from one thread).
    """

    names = None

    @classmethod
    def swap(cls, names):
        """Set the routing (None: off) and return the one it replaces."""
        previous, cls.names = cls.names, names
        return previous


def active(children: nn.ModuleDict):
    """The children that currently take part in the forward pass."""
    return [c for c in children.values() if c.active and not getattr(c, "merged", False)]


def apply(children: nn.ModuleDict, out: torch.Tensor, run) -> torch.Tensor:
    """Apply `run(child, rows, out)` for the active children, or per row when ROWS is set.

    `rows` is None (the whole batch) or a list of row indices; `run` returns the new output for
    those rows. Rows routed to no adapter keep the base output.
    """
    rows = ROWS.names
    if rows is None:
        for child in active(children):
            out = run(child, None, out)
        return out
    new = out.clone()
    for name, child in children.items():
        idx = [i for i, r in enumerate(rows) if r == name]
        if idx:
            new[idx] = run(child, idx, out[idx])
    return new
