"""How added modules join a frozen model: as named children of the module they modify,
run by a forward hook on that module. Base parameter names never change (so a merged model
saves as a plain transformers model), and several named adapters can sit on one layer.
"""

import torch.nn as nn


def attach(host: nn.Module, slot: str, name: str, child: nn.Module, hook, pre: bool = False) -> None:
    """Put `child` at `host.<slot>[name]`; register `hook` once per slot.

    A post hook is `hook(host, args, output) -> output`; a pre hook (`pre=True`) is
    `hook(host, args, kwargs) -> (args, kwargs)` and sees keyword arguments.
    """
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
        host.__dict__.get("_peftlab_hooks", {}).pop(slot).remove()


def active(children: nn.ModuleDict):
    """The children that currently take part in the forward pass."""
    return [c for c in children.values() if c.active]
