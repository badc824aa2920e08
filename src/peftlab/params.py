"""Trainable / total parameter counts by component, for `peftlab params`."""

from collections import defaultdict

import torch

from .components import where
from .int8 import int8_bytes, is_int8

ORDER = ("embed", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp", "norm", "lm_head", "added", "other")


def logical_numel(p) -> int:
    """Parameters a tensor stands for: a packed 4-bit tensor holds two per byte."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return p.numel()


def count(model) -> dict:
    """{component: (trainable, total)} plus 'total'; tied tensors count once."""
    table = defaultdict(lambda: [0, 0])
    places = where(model)
    for name, p in model.named_parameters():
        row = table[places[name].component]
        n = logical_numel(p)
        row[1] += n
        if p.requires_grad:
            row[0] += n
    out = {c: tuple(table[c]) for c in ORDER if c in table}
    out["total"] = (sum(t for t, _ in out.values()), sum(n for _, n in out.values()))
    return out


def storage_bytes(model) -> int:
    """Bytes the model's weights occupy as stored (quantized blocks and their scales included)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        if is_int8(m):
            total += int8_bytes(m)
            continue
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def all_finite(model, what: str) -> None:
    """Refuse to write or run a model holding NaN or Inf anywhere (base and added tensors)."""
    import torch

    from .errors import UserError

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise UserError(f"{what}: tensor {name} holds NaN or Inf; refusing to use it")
