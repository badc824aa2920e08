"""Folding adapters into the base weights, and back.

    LoRA:  W ← W + s·BA                      unmerge: W ← W − s·BA
    DoRA:  W ← (m / ‖W + s·BA‖_row) ⊙ (W + s·BA)   unmerge: W ← W' ⊙ ‖W + s·BA‖_row / m − s·BA
    freeze deltas: loaded straight into the base; unmerge restores the kept originals.

Bottleneck adapters (a nonlinearity between two projections), prompts and prefixes have no
equivalent base weights and are refused. Merging into a quantized base needs
`dequantize=True`: the layer becomes a plain fp32 linear layer (with a warning).
"""

import warnings

import torch
import torch.nn as nn

from .components import is_conv1d
from .errors import UserError
from .methods.attach import attached, detach
from .methods.lora import SLOT, base_weight


def _write(layer, w_out_in: torch.Tensor) -> None:
    """Store an (out, in) weight into `layer` in its own layout and dtype."""
    value = w_out_in.T if is_conv1d(layer) else w_out_in
    layer.weight.data.copy_(value.to(layer.weight.dtype))


def _check_finite(host_name, name, delta) -> None:
    for label, t in (("A", delta.A), ("B", delta.B), ("magnitude", delta.magnitude)):
        if t is not None and not torch.isfinite(t).all():
            raise UserError(f"adapter '{name}' has NaN or Inf in {host_name} ({label}); refusing to merge it into the base")


def _is_quantized(layer) -> bool:
    return type(layer).__name__ in ("Linear4bit", "Linear8bitLt")


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


@torch.no_grad()
def merge(model, names=None) -> None:
    """Fold the active LoRA/DoRA adapters (or those in `names`) into their layers' weights."""
    for host_name, layer, slot in list(attached(model, SLOT)):
        for name, delta in slot.items():
            if delta.merged or not (delta.active if names is None else name in names):
                continue
            _check_finite(host_name, name, delta)
            if _is_quantized(layer):
                raise UserError(f"{host_name} is stored quantized; merging de-quantizes it: use merge_and_unload(dequantize=True) (peftlab merge --dequantize)")
            w = base_weight(layer).float()
            dw = delta.delta_weight().float()
            if delta.magnitude is None:
                _write(layer, w + dw)
            else:
                norm = delta.row_norm(layer)
                delta._merged_norm = norm
                _write(layer, (delta.magnitude.float() / norm)[:, None] * (w + dw))
            delta.merged = True


@torch.no_grad()
def unmerge(model) -> None:
    """Undo `merge`, and restore base tensors that a freeze-type adapter overwrote."""
    for _, layer, slot in attached(model, SLOT):
        for delta in slot.values():
            if not delta.merged:
                continue
            w = base_weight(layer).float()
            dw = delta.delta_weight().float()
            if delta.magnitude is None:
                _write(layer, w - dw)
            else:
                _write(layer, w * (delta._merged_norm / delta.magnitude.float())[:, None] - dw)
            delta.merged = False
    params = dict(model.named_parameters())
    for name, original in model.__dict__.pop("_peftlab_originals", {}).items():
        params[name].data.copy_(original)


@torch.no_grad()
def merge_and_unload(model, dequantize: bool = False):
    """Merge every active LoRA/DoRA adapter and remove all peftlab modules and hooks.

    Returns the plain transformers model (the same object), ready for `save_pretrained`.
    """
    for slot in ("adapter", "prefix", "prompt"):
        for host_name, host, children in list(attached(model, slot)):
            if any(c.active for c in children.values()):
                what = {"adapter": "bottleneck adapters (nonlinear)", "prefix": "prefix tuning", "prompt": "prompt tuning"}[slot]
                raise UserError(f"{what} cannot be folded into base weights; keep it as an adapter instead")
            detach(host, slot)
    for host_name, layer, slot in list(attached(model, SLOT)):
        if _is_quantized(layer):
            if not dequantize:
                raise UserError(f"{host_name} is stored quantized; merging would de-quantize it (pass dequantize=True / --dequantize)")
            warnings.warn(f"de-quantizing {host_name} to fp32 to merge the adapter into it", stacklevel=2)
            plain = _dequantized(layer)
            plain.add_module(SLOT, slot)  # the deltas move along, to be merged into the plain layer
            parent, _, leaf = host_name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, plain)
    merge(model)
    for _, layer, _ in list(attached(model, SLOT)):
        detach(layer, SLOT)
    model.__dict__.pop("_peftlab_originals", None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
