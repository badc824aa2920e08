"""Folding adapters into the base weights, and back, through the added-module protocol.

    additive methods (LoRA, LoHa, LoKr, VeRA...):  W ← W + ΔW      unmerge: W ← W − ΔW
    DoRA, IA3, OFT (not additive): each module's own `merge` / `unmerge`
    freeze deltas: loaded straight into the base; unmerge restores the kept originals.

Added modules with no equivalent base weight (bottleneck adapters, prompts, prefixes) are
refused. Merging into a quantized base needs `dequantize=True`: the layer becomes a plain
fp32 linear layer (with a warning).
"""

import warnings

from .fingerprint import forget_base

import torch
import torch.nn as nn

from .errors import UserError
from .int8 import is_int8, to_float
from .methods.attach import attached, detach


def _check_finite(host_name, name, child) -> None:
    for label, t in child.named_parameters():
        if not torch.isfinite(t).all():
            raise UserError(f"adapter '{name}' has NaN or Inf in {host_name} ({label}); refusing to merge it into the base")


def _is_quantized(layer) -> bool:
    return is_int8(layer) or type(layer).__name__ in ("Linear4bit", "Linear8bitLt")


def _dequantized(layer) -> nn.Linear:
    """A plain fp32 nn.Linear with the quantized layer's (dequantized) weight and bias."""
    import bitsandbytes as bnb

    if type(layer).__name__ == "Linear4bit":
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    else:
        w = layer.weight.data.float() * layer.weight.SCB.float()[:, None] / 127
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight.data.copy_(w)
    if layer.bias is not None:
        plain.bias.data.copy_(layer.bias.data.float())
    return plain.requires_grad_(False)


def _refuse(children) -> None:
    for child in children.values():
        if child.active and not child.mergeable:
            raise UserError(f"{child.label or child.slot} cannot be folded into base weights; keep it as an adapter instead")


@torch.no_grad()
def merge(model, names=None) -> None:
    """Fold the active mergeable adapters (or those in `names`) into their layers' weights."""
    for host_name, layer, slot in list(attached(model)):
        for name, child in slot.items():
            if child.merged or not child.mergeable or not (child.active if names is None else name in names):
                continue
            _check_finite(host_name, name, child)
            if _is_quantized(layer):
                raise UserError(f"{host_name} is stored quantized; merging de-quantizes it: use merge_and_unload(dequantize=True) (peftlab merge --dequantize)")
            child.merge(layer)
            child.merged = True


@torch.no_grad()
def unmerge(model) -> None:
    """Undo `merge` (newest first), and restore base tensors that a freeze-type adapter overwrote."""
    for _, layer, slot in attached(model):
        for child in reversed(list(slot.values())):
            if child.merged:
                child.unmerge(layer)
                child.merged = False
    params = dict(model.named_parameters())
    for name, original in model.__dict__.pop("_peftlab_originals", {}).items():
        params[name].data.copy_(original)


@torch.no_grad()
def merge_and_unload(model, dequantize: bool = False):
    """Merge every active adapter and remove all peftlab modules and hooks.

    Returns the plain transformers model (the same object), ready for `save_pretrained`.
    """
    for _, _, slot in attached(model):
        _refuse(slot)
    for host_name, layer, slot in list(attached(model)):
        if _is_quantized(layer):
            if not dequantize:
                raise UserError(f"{host_name} is stored quantized; merging would de-quantize it (pass dequantize=True / --dequantize)")
            warnings.warn(f"de-quantizing {host_name} to fp32 to merge the adapter into it", stacklevel=2)
            if is_int8(layer):  # in place: the added modules stay where they are
                to_float(layer)
                continue
            plain = _dequantized(layer)
            for key, children in list(layer.named_children()):
                if children is slot:  # the added modules move along, to be merged into the plain layer
                    plain.add_module(key, children)
            parent, _, leaf = host_name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, plain)
    merge(model)
    for _, host, slot in list(attached(model)):
        detach(host, slot.key)
    model.__dict__.pop("_peftlab_originals", None)
    forget_base(model)  # the merged weights are a new base: an adapter trained on it records them
    for p in model.parameters():
        p.requires_grad_(False)
    return model
