"""LoHa (low-rank Hadamard product, FedPara / LyCORIS) on linear layers, as HF peft's LOHA.

    y = W x + b + ΔW x,   ΔW = (W1a W1b) ⊙ (W2a W2b) · α/r
    W1a, W2a ∈ R^{m×r},  W1b, W2b ∈ R^{r×n}   (m = out, n = in)

The Hadamard product of two rank-r matrices has rank up to r², so LoHa reaches a richer ΔW
than LoRA for twice LoRA's parameters. Init (peft's, after FedPara): W1a, W1b, W2a
kaiming-uniform(a=√5) (bound 1/√fan_in, fan_in = the factor's second dimension), W2b = 0,
so ΔW = 0 and the model starts at its base. Trainable per target: 2r(m+n).
`rank_pattern` / `alpha_pattern` give chosen layers their own r / α (peft's rule, as LoRA).

peft applies LoHa to nn.Linear only: GPT-2's Conv1D (c_attn, c_fc, c_proj) is trained here
(through the (out, in) layout helpers) but peft cannot load such a folder.
What LoKr shares with it lives in lycoris.py and lowrank.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec import Step
from .attach import attach
from .lowrank import check_ranks, kaiming_
from .lycoris import LYCORIS_FIELDS, LYCORIS_OPTIONS, linear_only, lycoris_fields, lycoris_plan, read_lycoris
from .protocol import Added
from .registry import PeftCodec, register
from .targets import dims


class LohaDelta(Added):
    """ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · scaling for one linear layer."""

    slot = "loha"
    label = "LoHa"
    peft_keys = {"w1_a": "hada_w1_a", "w1_b": "hada_w1_b", "w2_a": "hada_w2_a", "w2_b": "hada_w2_b"}

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float):
        super().__init__()
        self.w1_a = nn.Parameter(torch.empty(d_out, r))  # (m, r)
        self.w1_b = nn.Parameter(torch.empty(r, d_in))  # (r, n)
        self.w2_a = nn.Parameter(torch.empty(d_out, r))  # (m, r)
        self.w2_b = nn.Parameter(torch.zeros(r, d_in))  # (r, n), zero: ΔW starts at 0
        self.scaling = alpha / r

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        """ΔW (m, n) in `dtype` (the forward builds it in the activation dtype)."""
        w = [p.to(dtype) for p in (self.w1_a, self.w1_b, self.w2_a, self.w2_b)]
        return (w[0] @ w[1]) * (w[2] @ w[3]) * self.scaling

    def delta_weight(self, layer=None) -> torch.Tensor:
        return self.weight(torch.float32)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # x: (..., n); base_out: (..., m); peft adds F.linear(x, ΔW) to the layer's output
        return base_out + F.linear(x, self.weight(x.dtype))


# ---- peft's LoHaConfig / LoKrConfig (LycorisConfig) ---------------------------------------


@register("loha", examples=("loha:r=2",), peft=PeftCodec("LOHA", lambda model, step, hosts: lycoris_fields(model, step, hosts, "LOHA"),
                                  lambda config, where: Step("loha", read_lycoris(config, where)), accepts=linear_only,
                                  fields=LYCORIS_FIELDS),
          **LYCORIS_OPTIONS)
def loha(model, r, alpha, targets, target_regex, exclude, layers, rank_pattern, alpha_pattern, name, seed):
    """Low-rank Hadamard update (W1a W1b) ⊙ (W2a W2b)·α/r on chosen linear layers (LoHa)."""
    plan = lycoris_plan(model, "loha", r, alpha, targets, target_regex, layers, rank_pattern, alpha_pattern, exclude)
    # Each Hadamard factor W1a W1b, W2a W2b has rank ≤ min(in, out) whatever r is: a larger r
    # only adds parameters (r = 10⁶ would allocate gigabytes); refused before allocating.
    check_ranks("loha", [(path, layer, rr, rr != r) for path, layer, rr, _ in plan], r)
    gen = torch.Generator().manual_seed(seed)
    for path, layer, rr, aa in plan:
        d_in, d_out = dims(layer)
        delta = LohaDelta(d_in, d_out, rr, aa)
        with torch.no_grad():
            for p in (delta.w1_a, delta.w1_b, delta.w2_a):
                kaiming_(p, gen)
        attach(layer, name, delta.to(layer.weight.device))
