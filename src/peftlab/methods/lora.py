"""LoRA, rsLoRA and DoRA on linear layers (and GPT-2's transposed Conv1D).

    y = W x + b + s · B A x,  B ∈ R^{m×r} zero-init, A ∈ R^{r×n},  s = α/r  (rsLoRA: α/√r)
    DoRA: y = (m / ‖W + sBA‖_row) ⊙ ((W + sBA) x) + b,  m initialised to ‖W‖_row

Trainable per target: r(m+n), plus m for DoRA.
"""

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..components import arch_of, is_conv1d, num_layers, parse_layers, where
from ..errors import UserError, close_matches
from ..spec import Option
from .registry import register
from .attach import apply, attach

SLOT = "lora"


def dims(linear: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer, however its weight is stored."""
    if is_conv1d(linear):
        return linear.weight.shape[0], linear.nf
    return linear.in_features, linear.out_features


def base_weight(linear: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in); GPT-2's Conv1D stores (in, out)."""
    return linear.weight.T if is_conv1d(linear) else linear.weight


class LoraDelta(nn.Module):
    """The low-rank update of one linear layer: explicit A (r, n), B (m, r), optional magnitude (m,)."""

    _peftlab_added = True

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        self.magnitude = None  # DoRA's (m,) vector, set by `make_dora`
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = dropout
        self.active = True
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """s · B A, shape (out, in)."""
        return self.scaling * (self.B @ self.A)

    def row_norm(self, layer: nn.Module, constant: bool = False) -> torch.Tensor:
        """‖W + s·BA‖ per output row, (m,) in fp32: DoRA's denominator (its forward, its init,
        merging and the workbench all use this one). `constant`: no gradient through s·BA."""
        dw = self.delta_weight()
        return torch.linalg.norm(base_weight(layer).float() + (dw.detach() if constant else dw).float(), dim=1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # x: (..., n); base_out: (..., m) = W x + b
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        lora = F.linear(F.linear(h, self.A.to(h.dtype)), self.B.to(h.dtype)) * self.scaling
        if self.magnitude is None:
            return base_out + lora
        # DoRA: the column norm is treated as a constant (detached), as in the DoRA paper §4.3.
        norm = self.row_norm(layer, constant=True).detach()
        scale = (self.magnitude / norm).to(base_out.dtype)  # (m,)
        bias = layer.bias if layer.bias is not None else 0
        return base_out + (scale - 1) * (base_out - bias) + scale * lora


def make_dora(delta: LoraDelta, layer: nn.Module) -> None:
    """Give `delta` a magnitude vector equal to ‖W + sBA‖ per output row (so outputs start unchanged)."""
    with torch.no_grad():
        delta.magnitude = nn.Parameter(delta.row_norm(layer))


def lora_hook(layer, args, output):
    x = args[0]  # (..., n)
    return apply(layer._modules[SLOT], output, lambda d, rows, out: d(x if rows is None else x[rows], out, layer))


def linear_layers(model) -> dict:
    """Path -> module for every linear layer (nn.Linear or Conv1D) inside the decoder blocks."""
    out = {}
    places = where(model)
    layers_prefix = arch_of(model).layers + "."
    for name, module in model.named_modules():
        if name.startswith(layers_prefix) and (isinstance(module, nn.Linear) or is_conv1d(module)):
            if places.get(name + ".weight") is None or places[name + ".weight"].component != "added":
                out[name] = module
    return out


def pick_targets(model, targets, target_regex, layers) -> dict:
    """Resolve `targets` (leaf names or 'all-linear'), a regex and a block range to modules."""
    candidates = linear_layers(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    span = parse_layers(layers, num_layers(model)) if layers else None
    prefix = arch_of(model).layers + "."
    for t in targets:
        if t != "all-linear" and t not in leaves:
            raise UserError(f"target module '{t}' is not in this model{close_matches(t, leaves)}; linear layers: {', '.join(leaves)}")
    try:
        rx = re.compile(target_regex) if target_regex else None
    except re.error as e:
        raise UserError(f"bad target_regex: {e}") from None
    chosen = {}
    for name, module in candidates.items():
        leaf = name.rsplit(".", 1)[-1]
        hit = "all-linear" in targets or leaf in targets or bool(rx and rx.search(name))
        if span is not None and int(name[len(prefix):].split(".")[0]) not in span:
            hit = False
        if hit:
            chosen[name] = module
    if not chosen:
        raise UserError(f"no linear layer matches targets={'+'.join(targets)}; linear layers: {', '.join(leaves)}")
    return chosen


def init_delta(delta: LoraDelta, layer: nn.Module, init: str, seed_gen: torch.Generator) -> None:
    with torch.no_grad():
        if init == "kaiming":  # HF peft's default: A ~ kaiming-uniform(a=√5), B = 0
            bound = 1 / math.sqrt(delta.A.shape[1])  # what kaiming_uniform_(a=√5) gives for fan_in = n
            delta.A.uniform_(-bound, bound, generator=seed_gen)
        elif init == "gaussian":  # A ~ N(0, 1/r)
            delta.A.normal_(0, 1 / delta.A.shape[0], generator=seed_gen)
        elif init == "pissa":  # principal singular directions in the adapter, the residual in the base
            w = base_weight(layer).float()
            r = delta.A.shape[0]
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            root = torch.sqrt(S[:r] / delta.scaling)
            delta.A.copy_(root[:, None] * Vh[:r])
            delta.B.copy_(U[:, :r] * root[None, :])
            residual = w - delta.delta_weight()
            layer.weight.copy_(residual.T if is_conv1d(layer) else residual)


LORA_OPTIONS = dict(
    r=Option(8, "int", help="rank", low=1),
    alpha=Option(None, "float", help="scale numerator (default: 2r)", low=0),
    dropout=Option(0.0, "float", low=0, high=0.99),
    targets=Option(("q_proj", "v_proj"), "list", help="leaf module names, or all-linear"),
    target_regex=Option(None, help="regex over module paths"),
    layers=Option(None, help="block range A-B"),
    rslora=Option(False, "bool", help="scale by alpha/sqrt(r)"),
    dora=Option(False, "bool", help="add DoRA's magnitude vector"),
    init=Option("kaiming", "choice", ("kaiming", "gaussian", "pissa")),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)


def add_lora(model, r, alpha, dropout, targets, target_regex, layers, rslora, dora, init, name, seed):
    """Attach LoRA (or DoRA) deltas named `name` to the chosen linear layers."""
    if r <= 0:
        raise UserError(f"lora: r must be a positive rank, got {r}")
    if not 0 <= dropout < 1:
        raise UserError(f"lora: dropout must be in [0, 1), got {dropout}")
    if arch_of(model).proj.get("c_attn") == "qkv":  # GPT-2 names
        targets = tuple("c_attn" if t in ("q_proj", "v_proj", "k_proj") else t for t in targets)
        targets = tuple(dict.fromkeys(targets))
    alpha = 2 * r if alpha is None else alpha
    gen = torch.Generator().manual_seed(seed)
    for path, layer in pick_targets(model, targets, target_regex, layers).items():
        d_in, d_out = dims(layer)
        delta = LoraDelta(d_in, d_out, r, alpha, dropout, rslora).to(layer.weight.device)
        init_delta(delta, layer, init, gen)
        if dora:
            make_dora(delta, layer)
        attach(layer, SLOT, name, delta, lora_hook)


@register("lora", **LORA_OPTIONS)
def lora(model, **opts):
    """Low-rank update W + (α/r)·BA on chosen linear layers; dora=true, rslora=true variants."""
    add_lora(model, **opts)


@register("dora", **LORA_OPTIONS)
def dora(model, **opts):
    """LoRA direction plus a trainable magnitude per output feature."""
    add_lora(model, **(opts | {"dora": True}))
