"""How several task tensors (one per adapter, same shape) become one: task arithmetic, TIES,
DARE and magnitude pruning — the rules peft's add_weighted_adapter applies, so combinations
made here equal peft's on the same adapters (DARE's random masks too, from the same seed).

    linear           Σ w_i T_i
    magnitude_prune  Σ w_i top_density(T_i)                      keep the largest |entries|
    ties             disjoint mean of w_i top_density(T_i) over the entries whose sign agrees
                     with the majority sign (sum of pruned T_i, or the count of signs: `sign`)
    dare_linear      Σ w_i (m_i ⊙ T_i) / density,  m_i ~ Bernoulli(density)
    dare_ties        DARE's masks, then TIES' sign election and disjoint mean

`density` is the fraction of entries kept (1: nothing pruned). Masks are drawn from `gen`
in the order the tensors come.
"""

import torch

HOW = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def top_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its int(density · numel) largest-magnitude entries zeroed."""
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def random_keep(t: torch.Tensor, density: float, gen: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability `density`, the kept ones scaled by 1/density."""
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density


def majority_agrees(stacked: torch.Tensor, sign: str) -> torch.Tensor:
    """(k, ...) bool: which entries share the sign elected over the k tensors (ties go to +)."""
    votes = stacked.sum(dim=0) if sign == "total" else stacked.sign().sum(dim=0)
    return stacked.sign() == torch.where(votes >= 0, 1, -1)


def mix(tensors: list, weights: list, how: str, density: float = 1.0, sign: str = "total",
        gen: torch.Generator | None = None) -> torch.Tensor:
    """One tensor from `tensors` (same shape) and their `weights`, by rule `how` (see above)."""
    if how not in HOW:
        raise ValueError(f"unknown combination {how}")
    if density < 1 and how != "linear":
        if how in ("ties", "magnitude_prune"):
            tensors = [top_magnitude(t, density) for t in tensors]
        else:
            tensors = [random_keep(t, density, gen) for t in tensors]
    stacked = torch.stack(tensors)  # (k, ...)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if how in ("ties", "dare_ties"):
        agree = majority_agrees(stacked, sign)
        return (stacked * w * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return (stacked * w).sum(dim=0)
