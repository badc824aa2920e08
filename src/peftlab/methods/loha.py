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
This file also holds what LoKr (lokr.py) shares: seeded init, peft targets, the config reader.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..components import is_conv1d
from ..errors import UserError
from ..spec import Option, Step
from .attach import attach
from .lora import check_ranks, pattern_value, read_patterns
from .protocol import Added
from .registry import PeftCodec, register, resolved
from .targets import REGEX_HELP, TARGETS_HELP, dims, linear_layers, peft_targets, pick_targets, target_options


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


def kaiming_(t: torch.Tensor, gen: torch.Generator) -> None:
    """kaiming_uniform_(a=√5) as peft calls it, seeded: U(±1/√fan_in), fan_in = t.shape[1]."""
    bound = 1 / math.sqrt(t.shape[1])
    t.uniform_(-bound, bound, generator=gen)


def layer_rank_alpha(method: str, path: str, r: int, alpha: float, rank_pattern, alpha_pattern) -> tuple:
    """(r, α) for the layer at `path` after rank_pattern / alpha_pattern (peft's suffix rule;
    'PATTERN=VALUE' items or `read_patterns`' pairs)."""
    rr = pattern_value(rank_pattern, path, r, int)
    if rr <= 0:
        raise UserError(f"{method}: rank_pattern gives {path} rank {rr}; ranks must be positive")
    return rr, pattern_value(alpha_pattern, path, alpha)


def lycoris_plan(model, method, r, alpha, targets, target_regex, layers, rank_pattern, alpha_pattern) -> list:
    """[(path, layer, rank, alpha)] for every target, every option checked (nothing allocated)."""
    ranks = read_patterns(rank_pattern, f"{method}: rank_pattern", "int")
    alphas = read_patterns(alpha_pattern, f"{method}: alpha_pattern", "float", 0)
    plan = []
    for path, layer in pick_targets(model, targets, target_regex, layers, method).items():
        plan.append((path, layer, *layer_rank_alpha(method, path, r, alpha, ranks, alphas)))
    return plan


LYCORIS_OPTIONS = dict(
    r=Option(8, "int", help="rank", low=1),
    alpha=Option(8.0, "float", help="scale numerator: ΔW is multiplied by alpha/r (peft's default 8)", low=0),
    targets=Option(None, "list", help=TARGETS_HELP),
    target_regex=Option(None, "regex", help=REGEX_HELP),
    layers=Option(None, help="blocks: A-B, or indices joined with +"),
    rank_pattern=Option((), "patterns", help="per-layer ranks: PATTERN=R joined with +", of="int"),
    alpha_pattern=Option((), "patterns", help="per-layer alphas: PATTERN=ALPHA joined with +", low=0),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)


# ---- peft's LoHaConfig / LoKrConfig (LycorisConfig) ---------------------------------------

def lycoris_fields(model, step: Step, hosts: dict, peft_type: str) -> dict:
    """The fields LoHaConfig and LoKrConfig share."""
    o = resolved(step)
    split = lambda items, kind: {k: kind(v) for k, _, v in (i.rpartition("=") for i in items)}  # noqa: E731
    return {"peft_type": peft_type, "r": o["r"], "alpha": o["alpha"], **peft_targets(model, hosts),
            "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "exclude_modules": None,
            "init_weights": True, "rank_pattern": split(o["rank_pattern"], int),
            "alpha_pattern": split(o["alpha_pattern"], float)}


def linear_only(step, model) -> bool:
    """peft's LoHa and LoKr take nn.Linear only: a model with Conv1D layers (GPT-2) saves in
    peftlab's own format instead, which peft would otherwise be unable to load."""
    return not any(is_conv1d(m) for m in linear_layers(model).values())


def read_lycoris(config: dict, where) -> dict:
    """Our options from the fields LoHaConfig and LoKrConfig share; refuse what we cannot honour.
    init_weights is not read: the saved tensors replace the init. use_effective_conv2d only
    concerns conv layers, which peftlab does not target."""
    for key in ("rank_dropout", "module_dropout"):
        if config.get(key) not in (None, 0, 0.0):
            raise UserError(f"{where}: peft option {key}={config[key]!r} is not supported by peftlab (only 0)")
    if config.get("exclude_modules") not in (None, [], ""):
        raise UserError(f"{where}: peft option exclude_modules={config['exclude_modules']!r} is not supported by peftlab")
    options = {"r": config.get("r", 8), "alpha": config.get("alpha", 8)}
    for key in ("rank_pattern", "alpha_pattern"):
        items = []
        for k, v in (config.get(key) or {}).items():
            if "+" in k or "," in k:
                raise UserError(f"{where}: {key} key '{k}' holds '+' or ',', which a peftlab strategy cannot carry")
            items.append(f"{k}={v}")
        options[key] = tuple(items)
    return options | target_options(config, where)


@register("loha", peft=PeftCodec("LOHA", lambda model, step, hosts: lycoris_fields(model, step, hosts, "LOHA"),
                                  lambda config, where: Step("loha", read_lycoris(config, where)), accepts=linear_only),
          **LYCORIS_OPTIONS)
def loha(model, r, alpha, targets, target_regex, layers, rank_pattern, alpha_pattern, name, seed):
    """Low-rank Hadamard update (W1a W1b) ⊙ (W2a W2b)·α/r on chosen linear layers (LoHa)."""
    plan = lycoris_plan(model, "loha", r, alpha, targets, target_regex, layers, rank_pattern, alpha_pattern)
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
