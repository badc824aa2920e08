"""Trainable / total parameter counts by component, for `peftlab params`."""

from collections import defaultdict

from .components import where

ORDER = ("embed", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp", "norm", "lm_head", "added", "other")


def count(model) -> dict:
    """{component: (trainable, total)} plus 'total'; tied tensors count once."""
    table = defaultdict(lambda: [0, 0])
    places = where(model)
    for name, p in model.named_parameters():
        row = table[places[name].component]
        row[1] += p.numel()
        if p.requires_grad:
            row[0] += p.numel()
    out = {c: tuple(table[c]) for c in ORDER if c in table}
    out["total"] = (sum(t for t, _ in out.values()), sum(n for _, n in out.values()))
    return out
