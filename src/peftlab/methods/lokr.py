"""LoKr (low-rank Kronecker product, LyCORIS) on linear layers, as HF peft's LOKR.

    y = W x + b + ΔW x,   ΔW = (W1 ⊗ W2) · α/r
    m = a·b (out) with (a, b) = factorization(m, f);  n = c·d (in) with (c, d) = factorization(n, f)
    W1 ∈ R^{a×c},  W2 ∈ R^{b×d},  so W1 ⊗ W2 ∈ R^{ab×cd} = R^{m×n}

factorization(dim, f) (peft's, from LyCORIS): when f > 0 divides dim, (f, dim/f); otherwise
the divisor pair p ≤ q of dim with p ≤ f (f = -1: no bound) that is nearest √dim (smallest
p + q). W2 is low rank, W2 = W2a W2b (b×r, r×d), when r < max(b, d)/2; with decompose_both,
so is W1 = W1a W1b (a×r, r×c) when r < max(a, c)/2. The scale is α/r in every case (peft).

Trainable per target:  (W1 full ? a·c : r(a+c)) + (W2 full ? b·d : r(b+d)).
Init (peft's): W1 (or W1a) = 0 and the other factors kaiming-uniform(a=√5), so ΔW = 0;
init=lycoris (peft's init_weights="lycoris") zeroes W2 (or W2b) instead.
GPT-2's Conv1D is trained here, but peft's LoKr takes nn.Linear only (see loha.py).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec import Option, Step
from .attach import attach
from .lowrank import kaiming_
from .lycoris import LYCORIS_FIELDS, LYCORIS_OPTIONS, linear_only, lycoris_fields, lycoris_plan, read_lycoris
from .protocol import Added
from .registry import PeftCodec, register, resolved
from .targets import dims


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(p, q), p·q = dim, p ≤ q: peft's choice of Kronecker shapes, step for step (LyCORIS's)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = dim if factor == -1 else factor
    p, q = 1, dim
    while p < q:  # walk up the divisors until p passes √dim or the bound
        new_p = p + 1
        while dim % new_p:
            new_p += 1
        if new_p + dim // new_p > 1 + dim or new_p > bound:  # peft compares with the first pair's sum
            break
        p, q = new_p, dim // new_p
    return (q, p) if p > q else (p, q)


def _factor(rows: int, cols: int, r: int, low_rank: bool):
    """(full, a, b): one (rows, cols) Kronecker factor, either whole or as a (rows, r)·(r, cols) product."""
    if low_rank:
        return None, nn.Parameter(torch.empty(rows, r)), nn.Parameter(torch.empty(r, cols))
    return nn.Parameter(torch.empty(rows, cols)), None, None


class LokrDelta(Added):
    """ΔW = (W1 ⊗ W2) · scaling for one linear layer; each factor whole or low rank."""

    slot = "lokr"
    label = "LoKr"
    peft_keys = {"w1": "lokr_w1", "w1_a": "lokr_w1_a", "w1_b": "lokr_w1_b",
                 "w2": "lokr_w2", "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b"}

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, decompose_both: bool = False, factor: int = -1):
        super().__init__()
        a, b = factorization(d_out, factor)
        c, d = factorization(d_in, factor)
        self.w1, self.w1_a, self.w1_b = _factor(a, c, r, decompose_both and r < max(a, c) / 2)  # (a, c)
        self.w2, self.w2_a, self.w2_b = _factor(b, d, r, r < max(b, d) / 2)  # (b, d)
        self.scaling = alpha / r

    def init(self, how: str, gen: torch.Generator) -> None:
        """peft: W1 (or W1a) = 0; lycoris: W2 (or W2b) = 0; every other factor kaiming-uniform."""
        zero = (self.w1 if self.w1 is not None else self.w1_a) if how == "peft" else (
            self.w2 if self.w2 is not None else self.w2_b)
        with torch.no_grad():
            for p in self.parameters():
                if p is zero:
                    p.zero_()
                else:
                    kaiming_(p, gen)

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        """ΔW (m, n) in `dtype` (the forward builds it in the activation dtype)."""
        w1 = self.w1.to(dtype) if self.w1 is not None else self.w1_a.to(dtype) @ self.w1_b.to(dtype)  # (a, c)
        w2 = self.w2.to(dtype) if self.w2 is not None else self.w2_a.to(dtype) @ self.w2_b.to(dtype)  # (b, d)
        return torch.kron(w1, w2) * self.scaling  # (ab, cd) = (m, n)

    def delta_weight(self, layer=None) -> torch.Tensor:
        return self.weight(torch.float32)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # x: (..., n); base_out: (..., m); peft adds F.linear(x, ΔW) to the layer's output
        return base_out + F.linear(x, self.weight(x.dtype))


def to_peft(model, step: Step, hosts: dict) -> dict:
    o = resolved(step)
    return lycoris_fields(model, step, hosts, "LOKR") | {
        "decompose_both": o["decompose_both"], "decompose_factor": o["decompose_factor"], "rank_dropout_scale": False,
        "init_weights": "lycoris" if o["init"] == "lycoris" else True}


def from_peft(config: dict, where) -> Step:
    """The `lokr` step equivalent to a peft LoKrConfig (rank_dropout_scale only acts with rank_dropout > 0)."""
    return Step("lokr", read_lycoris(config, where) | {
        "decompose_both": bool(config.get("decompose_both", False)), "decompose_factor": config.get("decompose_factor", -1),
        "init": "lycoris" if config.get("init_weights") == "lycoris" else "peft"})


@register("lokr", examples=("lokr:r=2",), peft=PeftCodec("LOKR", to_peft, from_peft, accepts=linear_only,
                                           fields=LYCORIS_FIELDS | {"decompose_both", "decompose_factor", "rank_dropout_scale"}), **LYCORIS_OPTIONS,
          decompose_both=Option(False, "bool", help="also factor W1 low rank when r < max(a, c)/2"),
          decompose_factor=Option(-1, "int", help="Kronecker factor size (-1: near √dim)", low=-1),
          init=Option("peft", "choice", ("peft", "lycoris"), help="which factor starts at zero: W1 (peft) or W2"))
def lokr(model, r, alpha, targets, target_regex, exclude, layers, rank_pattern, alpha_pattern, name, seed,
         decompose_both, decompose_factor, init):
    """Kronecker update (W1 ⊗ W2)·α/r, W2 (and W1) low rank, on chosen linear layers (LoKr)."""
    # r only sizes the low-rank halves of a factor, used when r < max(b, d)/2 (else the factor is
    # whole): no r allocates more than the whole factors, so r has no upper limit here.
    plan = lycoris_plan(model, "lokr", r, alpha, targets, target_regex, layers, rank_pattern, alpha_pattern, exclude)
    gen = torch.Generator().manual_seed(seed)
    for path, layer, rr, aa in plan:
        d_in, d_out = dims(layer)
        delta = LokrDelta(d_in, d_out, rr, aa, decompose_both, decompose_factor)
        delta.init(init, gen)
        attach(layer, name, delta.to(layer.weight.device))
