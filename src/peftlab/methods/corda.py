"""LoRA's CorDA initialisation (context-oriented decomposition; peft's init_lora_weights="corda").

Per target layer W (m, n): C = the mean over calibration sequences of XᵀX (n, n), each
sequence's inputs X (t, n) divided by |max X|; the SVD of W·C (C damped until it inverts well)
gives U (m, n'), S, and V = (Vh C⁻¹)ᵀ (n, n'). `ipm` (instruction-previewed) keeps the r largest
components for the adapter, `kpm` (knowledge-preserved) the r smallest; S is divided by the
LoRA scale s, then A = √S Vᵀ (r, n), B = U √S (m, r) and the base becomes W − s·BA, so the
model starts where it was. Same numbers as peft (its per-forward normalisation, damping loop
and crop), for batches of one sequence each; longer batches count each sequence as peft
counts one forward pass.
"""

import torch

from ..errors import UserError
from .calibration import run_hooked, take
from .targets import base_weight


@torch.no_grad()
def covariances(model, layers: dict, calibration, count: int) -> dict:
    """{path: C (n, n) fp32}: the mean of each sequence's normalised XᵀX over `count` batches."""
    sums, seen = {}, {}

    def add(path, x, keep):
        for row, kept in zip(x, keep):  # one sequence: (t, n) and its real tokens
            h = row[kept].float()
            h = h / torch.max(h).abs()
            if not torch.isfinite(h).all():
                raise UserError(f"lora init=corda: the inputs of {path} hold NaN or Inf on the calibration data "
                                f"(or a sequence whose largest input is 0); check the model's weights and the data")
            sums[path] = sums.get(path, 0) + h.t() @ h
            seen[path] = seen.get(path, 0) + 1

    for batch in take(calibration, count, "lora init=corda"):
        run_hooked(model, layers, {k: v for k, v in batch.items() if k != "labels"}, add)  # every token counts, as peft's
    return {path: sums[path] / seen[path] for path in layers}


@torch.no_grad()
def corda_factors(layer, C: torch.Tensor, r: int, scaling: float, mode: str) -> tuple:
    """(A (r, n), B (m, r)) for `layer` from its input covariance C, with s·BA its `mode`
    ('ipm' | 'kpm') part of W."""
    w = base_weight(layer).float()
    eye = torch.eye(C.shape[0], device=C.device)
    damp = 0.01
    for _ in range(60):  # peft doubles the damping until C + δI inverts to within 0.05 (no limit there)
        fixed = C + torch.diag(torch.ones(C.shape[0], device=C.device) * torch.mean(torch.diag(C)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise UserError("lora init=corda: an input covariance does not invert however much it is damped; "
                        "give more, or more varied, calibration data")
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    V = (Vh @ inverse).t()
    part = slice(None, r) if mode == "ipm" else slice(-r, None)
    U, S, V = U[:, part], S[part] / scaling, V[:, part]
    return V.t().mul(S.sqrt().view(-1, 1)).contiguous(), U.mul(S.sqrt()).contiguous()
