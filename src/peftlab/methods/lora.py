"""LoRA, rsLoRA and DoRA on linear layers (and GPT-2's transposed Conv1D).

    y = W x + b + s · (B A x + b_B),  B ∈ R^{m×r} zero-init, A ∈ R^{r×n},  s = α/r  (rsLoRA: α/√r)
    DoRA: y = (m / ‖W + sBA‖_row) ⊙ ((W + sBA) x) + b,  m initialised to ‖W‖_row

Trainable per target: r(m+n), plus m for DoRA, plus m for `lora_bias` (b_B, zero-init).
`rank_pattern` / `alpha_pattern` give chosen layers their own r / α (peft's rule: a pattern
matches a module path when the path ends in it after a dot).

`target_parameters` (peft's name) puts LoRA on parameters rather than layers — a mixture of
experts' stacked expert weights, one update per expert (parameters.py). Inits: see init_delta;
the two that read data first (eva.py, corda.py) save as the plain LoRA they amount to.
"""

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..mixing import mix
from ..spec import Option, Step
from .attach import attach
from .corda import corda_factors, covariances
from .eva import eva_init
from .lowrank import LORA_FIELDS, check_ranks, loftq, pattern_value, read_patterns
from .parameters import ParamDelta, param_post_hook, param_pre_hook, parameter_hosts
from .protocol import Added, Training
from .registry import PeftCodec, register
from .targets import (EXCLUDE_HELP, REGEX_HELP, TARGETS_HELP, base_weight, dims, peft_targets, pick_targets, target_options,
                      write_weight)


class LoraDelta(Added):
    """The low-rank update of one linear layer: explicit A (r, n), B (m, r), optional magnitude
    (m,) and bias b_B (m,)."""

    slot = "lora"
    peft_keys = {"A": "lora_A.weight", "B": "lora_B.weight", "B_bias": "lora_B.bias", "magnitude": "lora_magnitude_vector"}

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 bias: bool = False):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        self.B_bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.magnitude = None  # DoRA's (m,) vector, set by `make_dora`
        self.initial = None  # CorDA: (A₀, B₀) its base gave up, W_res = W − s·B₀A₀ (see `stored`)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = dropout

    @property
    def label(self) -> str:
        return "LoRA" if self.magnitude is None else "DoRA"

    def delta_weight(self, layer=None) -> torch.Tensor:
        """s · B A, shape (out, in); for DoRA the full effective change (see `effective`)."""
        if self.magnitude is not None and layer is not None:
            w = base_weight(layer).float()
            return self.effective(layer) - w
        return self.scaling * (self.B @ self.A)

    def low_rank(self):
        return None if self.magnitude is not None else (self.scaling, self.B, self.A)

    def stored(self) -> dict:
        """As saved: when the base holds W − s·B₀A₀ (CorDA), the plain LoRA of rank 2r that gives
        the same layer on the original base, s·[B, −B₀][A; A₀] = s·(BA − B₀A₀) (peft's conversion)."""
        mine = dict(self.named_parameters())
        if self.initial is not None:
            A0, B0 = (t.to(self.A.device) for t in self.initial)
            mine |= {"A": torch.cat([self.A, A0]), "B": torch.cat([self.B, -B0], 1)}
        return mine

    def row_norm(self, layer: nn.Module, constant: bool = False) -> torch.Tensor:
        """‖W + s·BA‖ per output row, (m,) in fp32: DoRA's denominator (its forward, its init,
        merging and the workbench all use this one). `constant`: no gradient through s·BA."""
        dw = self.scaling * (self.B @ self.A)
        return torch.linalg.norm(base_weight(layer).float() + (dw.detach() if constant else dw).float(), dim=1)

    def effective(self, layer) -> torch.Tensor:
        """DoRA's merged weight (m / ‖W + sBA‖) ⊙ (W + sBA), (out, in) fp32."""
        merged = base_weight(layer).float() + (self.scaling * (self.B @ self.A)).float()
        return (self.magnitude.float() / self.row_norm(layer))[:, None] * merged

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # x: (..., n); base_out: (..., m) = W x + b
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        lora = F.linear(F.linear(h, self.A.to(h.dtype)), self.B.to(h.dtype),
                        None if self.B_bias is None else self.B_bias.to(h.dtype)) * self.scaling
        if self.magnitude is None:
            return base_out + lora
        # DoRA: the column norm is treated as a constant (detached), as in the DoRA paper §4.3.
        norm = self.row_norm(layer, constant=True).detach()
        scale = (self.magnitude / norm).to(base_out.dtype)  # (m,)
        bias = layer.bias if layer.bias is not None else 0
        return base_out + (scale - 1) * (base_out - bias) + scale * lora

    def merge(self, layer) -> None:
        if self.B_bias is not None:
            if layer.bias is None:
                raise UserError("lora_bias adapters merge into layers that have a bias; this layer has none")
            layer.bias.data.add_((self.scaling * self.B_bias).to(layer.bias.dtype))
        if self.magnitude is None:
            return super().merge(layer)
        self._merged_norm = self.row_norm(layer)
        write_weight(layer, self.effective(layer))

    def unmerge(self, layer) -> None:
        if self.B_bias is not None:
            layer.bias.data.sub_((self.scaling * self.B_bias).to(layer.bias.dtype))
        if self.magnitude is None:
            return super().unmerge(layer)
        w = base_weight(layer).float()
        write_weight(layer, w * (self._merged_norm / self.magnitude.float())[:, None] - self.scaling * (self.B @ self.A).float())

    @classmethod
    @torch.no_grad()
    def combine(cls, parts: list, how: str, rank: int | None, density: float = 1.0, sign: str = "total", gen=None):
        """One new delta from [(delta, weight)] (see adapters.combine for the ways), scaling 1."""
        if any(d.magnitude is not None or d.B_bias is not None for d, _ in parts):
            raise UserError("combine works on plain LoRA adapters; DoRA magnitudes and lora_bias do not add up")
        if how == "cat":
            A = torch.cat([d.A for d, _ in parts], 0)
            B = torch.cat([w * d.scaling * d.B for d, w in parts], 1)
        elif how.endswith("svd"):  # the rule on the whole ΔW_i, then the best rank-`rank` approximation
            rule = "linear" if how == "svd" else how.removesuffix("_svd")
            dw = mix([d.delta_weight().float() for d, _ in parts], [w for _, w in parts], rule, density, sign, gen)
            U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
            r = min(rank, S.numel())
            B, A = U[:, :r] * S[:r], Vh[:r]
        else:  # the rule on the factors, each weighted by √|w s| (A carries the sign), as peft does
            if len({d.A.shape[0] for d, _ in parts}) > 1:
                raise UserError(f"combine how={how} needs equal ranks; use how=cat or an _svd way for mixed ranks")
            k = [abs(w * d.scaling) ** 0.5 for d, w in parts]
            signs = [1.0 if w * d.scaling >= 0 else -1.0 for d, w in parts]
            A = mix([d.A.float() for d, _ in parts], [s * kk for s, kk in zip(signs, k)], how, density, sign, gen)
            B = mix([d.B.float() for d, _ in parts], k, how, density, sign, gen)
        new = cls(A.shape[1], B.shape[0], A.shape[0], alpha=A.shape[0]).to(A.device)  # alpha = r → s = 1
        new.A.copy_(A)
        new.B.copy_(B)
        return new


def make_dora(delta: LoraDelta, layer: nn.Module) -> None:
    """Give `delta` a magnitude vector equal to ‖W + sBA‖ per output row (so outputs start unchanged)."""
    with torch.no_grad():
        delta.magnitude = nn.Parameter(delta.row_norm(layer))


def lora_plan(model, method, r, targets, target_regex, layers, rank_pattern=(), alpha_pattern=(), alpha=None,
              exclude=None, target_parameters=()) -> list:
    """[(path, layer, rank, alpha)] for every target, every option checked (nothing allocated).
    With `target_parameters` and targets= (empty), no layer is a target."""
    alpha = 2 * r if alpha is None else alpha
    ranks = read_patterns(rank_pattern, f"{method}: rank_pattern", "int")
    alphas = read_patterns(alpha_pattern, f"{method}: alpha_pattern", "float", 0)
    if target_parameters and targets == () and not target_regex:
        return []
    chosen = pick_targets(model, targets, target_regex, layers, method, exclude)
    plan = [(path, layer, pattern_value(ranks, path, None), pattern_value(alphas, path, alpha)) for path, layer in chosen.items()]
    for path, _, rr, _ in plan:
        if rr is not None and rr <= 0:
            raise UserError(f"{method}: rank_pattern gives {path} rank {rr}; ranks must be positive")
    check_ranks(method, [(path, layer, r if rr is None else rr, rr is not None) for path, layer, rr, _ in plan], r)
    return [(path, layer, r if rr is None else rr, aa) for path, layer, rr, aa in plan]


def init_delta(delta: LoraDelta, layer: nn.Module, init: str, seed_gen: torch.Generator, loftq_bits: int = 4,
               loftq_iter: int = 1) -> None:
    """Initialise A and B (and, for the data-free SVD/QR inits, the base weight: W ← W − s·BA,
    so the model still starts at its base; such adapters save in peftlab's format, their base
    being another)."""
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
            write_weight(layer, w - delta.delta_weight())
        elif init == "olora":  # OLoRA: W = QR; B = Q[:, :r] (orthonormal columns), A = R[:r], as peft
            w = base_weight(layer).float()
            Q, R = torch.linalg.qr(w)
            r = delta.A.shape[0]
            delta.A.copy_(R[:r])
            delta.B.copy_(Q[:, :r])
            write_weight(layer, w - delta.delta_weight())
        elif init == "loftq":  # LoftQ: W ≈ Q(W') + s·BA, Q = NF4 (or int8) quantization, alternating
            w = base_weight(layer).float()
            dequantized, A, B = loftq(w, delta.A.shape[0], loftq_bits, loftq_iter)
            delta.A.copy_(A)
            delta.B.copy_(B / delta.scaling)
            write_weight(layer, dequantized)


LORA_OPTIONS = dict(
    r=Option(8, "int", help="rank", low=1),
    alpha=Option(None, "float", help="scale numerator (default: 2r)", low=0),
    dropout=Option(0.0, "float", low=0, high=0.99),
    targets=Option(None, "list", help=TARGETS_HELP),
    target_regex=Option(None, "regex", help=REGEX_HELP),
    exclude=Option(None, "regex", help=EXCLUDE_HELP),
    layers=Option(None, help="blocks: A-B, or indices joined with +"),
    rslora=Option(False, "bool", help="scale by alpha/sqrt(r)"),
    dora=Option(False, "bool", help="add DoRA's magnitude vector"),
    init=Option("kaiming", "choice", ("kaiming", "gaussian", "pissa", "olora", "loftq", "eva", "corda")),
    calibration_batches=Option(32, "int", help="init=eva|corda: batches of data to read (EVA: at most)", low=1, high=100000),
    eva_rho=Option(2.0, "float", help="init=eva: a layer's rank may grow to r·rho", low=1, high=1000),
    eva_tau=Option(0.99, "float", help="init=eva: components have converged at this cosine similarity", low=0, high=1),
    eva_whiten=Option(False, "bool", help="init=eva: divide A's rows by √singular values"),
    eva_adjust=Option(True, "bool", help="init=eva: alpha follows a layer's new rank (s unchanged)"),
    corda_method=Option("ipm", "choice", ("ipm", "kpm"), help="init=corda: adapt the largest (ipm) or smallest (kpm) part"),
    loftq_bits=Option(4, "int", help="init=loftq: quantize the base to 4 (NF4) or 8 bits", low=4, high=8),
    loftq_iter=Option(1, "int", help="init=loftq: alternating rounds", low=1, high=100),
    rank_pattern=Option((), "patterns", help="per-layer ranks: PATTERN=R joined with +", of="int"),
    alpha_pattern=Option((), "patterns", help="per-layer alphas: PATTERN=ALPHA joined with +", low=0),
    lora_bias=Option(False, "bool", help="also train a bias on B (peft's lora_bias)"),
    target_parameters=Option((), "list", help="parameters (MoE experts' stacked weights), names or path endings; "
                                              "with targets= alone"),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)
DATA_INITS = ("calibration_batches", "eva_rho", "eva_tau", "eva_whiten", "eva_adjust", "corda_method")  # init=eva|corda's keys


def add_lora(model, r, alpha, dropout, targets, target_regex, layers, rslora, dora, init, name, seed,
             rank_pattern=(), alpha_pattern=(), lora_bias=False, method="lora", exclude=None, target_parameters=(),
             loftq_bits=4, loftq_iter=1, calibration=None, calibration_batches=32, eva_rho=2.0, eva_tau=0.99,
             eva_whiten=False, eva_adjust=True, corda_method="ipm"):
    """Attach LoRA (or DoRA) deltas named `name` to the chosen linear layers (`method`: the
    strategy's name, for messages), and to the chosen parameters. With init=eva|corda, returns
    the Training that says how the adapter is saved (the plain LoRA it amounts to)."""
    plan = lora_plan(model, method, r, targets, target_regex, layers, rank_pattern, alpha_pattern, alpha, exclude,
                     target_parameters)
    if init == "corda" and dora:
        raise UserError(f"{method}: init=corda takes plain LoRA (no dora): its saved form subtracts the initial update")
    if init == "eva":
        rows = eva_init(model, plan, calibration, eva_rho, eva_tau, eva_whiten, calibration_batches)
        plan = [(p, layer, rows[p].shape[0], a * (rows[p].shape[0] / rr) if eva_adjust else a) for p, layer, rr, a in plan]
    if init == "corda":
        covs = covariances(model, {p: layer for p, layer, _, _ in plan}, calibration, calibration_batches)
    hosts = parameter_hosts(model, target_parameters, method)
    if hosts and (dropout or dora or lora_bias or init not in ("kaiming", "gaussian")):
        raise UserError(f"{method}: target_parameters takes plain LoRA (no dropout, dora, lora_bias or SVD/QR init), as peft's")
    if init == "loftq" and loftq_bits not in (4, 8):
        raise UserError(f"{method}: loftq_bits={loftq_bits}; LoftQ quantizes to 4 (NF4) or 8 bits")
    gen = torch.Generator().manual_seed(seed)
    for path, layer, rr, aa in plan:
        if rr == 0:  # EVA gave its rank to other layers
            continue
        d_in, d_out = dims(layer)
        delta = LoraDelta(d_in, d_out, rr, aa, dropout, rslora, lora_bias).to(layer.weight.device)
        init_delta(delta, layer, init, gen, loftq_bits, loftq_iter)
        if init == "eva":
            delta.A.data.copy_(rows[path])
        if init == "corda":
            with torch.no_grad():
                A, B = corda_factors(layer, covs[path], rr, delta.scaling, corda_method)
                delta.A.copy_(A)
                delta.B.copy_(B)
                write_weight(layer, base_weight(layer).float() - delta.delta_weight())
                delta.initial = (A.detach().clone(), B.detach().clone())
        if dora:
            make_dora(delta, layer)
        attach(layer, name, delta)
    for path, (host, names) in hosts.items():
        delta = ParamDelta(host, names, r, 2 * r if alpha is None else alpha, rslora)
        with torch.no_grad():
            for f in delta.factors.values():
                f.A.uniform_(-1 / math.sqrt(f.A.shape[1]), 1 / math.sqrt(f.A.shape[1]), generator=gen)
        attach(host, name, delta.to(next(host.parameters()).device), param_pre_hook, pre=True, after=param_post_hook)
    if init in ("eva", "corda"):
        return as_saved(plan, r, 2 * r if alpha is None else alpha, rslora, exclude, doubled=init == "corda")


def as_saved(plan: list, r: int, alpha: float, rslora: bool, exclude, doubled: bool) -> Training:
    """What an init from data saves as: plain LoRA with the ranks and alphas it chose per layer
    (EVA), or of twice the rank relative to the original base (CorDA, see LoraDelta.stored);
    loading needs no data. `plan`: [(path, layer, rank, α)] as trained, rank 0 = no LoRA."""
    grow = 2 if doubled else 1
    lift = (2 ** 0.5 if rslora else 2) if doubled else 1  # keeps s = α/r (α/√r) at twice the rank
    ranks = tuple(f"{p}={rr * grow}" for p, _, rr, _ in plan if rr and rr * grow != r * grow)
    alphas = tuple(f"{p}={a * lift!r}" for p, _, rr, a in plan if rr and a * lift != alpha * lift)
    dropped = [p for p, _, rr, _ in plan if rr == 0]
    if dropped:
        exclude = "|".join(([f"(?:{exclude})"] if exclude else []) + ["^(?:" + "|".join(map(re.escape, dropped)) + ")$"])
    saved = Training()
    saved.saved_as = {"init": "kaiming", "r": r * grow, "alpha": alpha * lift, "rank_pattern": ranks, "alpha_pattern": alphas,
                      "exclude": exclude}
    return saved


# ---- peft's LoraConfig ------------------------------------------------------------------

def to_peft(model, step: Step, hosts: dict) -> dict:
    """LoraConfig fields for adapter deltas `hosts` ({module path: LoraDelta}) made by `step`."""
    o = step.options
    rslora = o.get("rslora", False)
    layers = {h: d for h, d in hosts.items() if isinstance(d, LoraDelta)}
    first = next(iter(layers.values()), None)
    r = o.get("r", 8)
    alpha = o.get("alpha") if o.get("alpha") is not None else 2 * r
    split = lambda items, kind: {k: kind(v) for k, _, v in (i.rpartition("=") for i in items)}  # noqa: E731
    targets = peft_targets(model, layers) if layers else {"target_modules": [], "layers_to_transform": None,
                                                            "layers_pattern": None}
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, **targets, "lora_dropout": first.dropout if first else 0.0,
        "use_rslora": rslora, "use_dora": first is not None and first.magnitude is not None,
        "fan_in_fan_out": model.config.model_type == "gpt2", "bias": "none",
        "lora_bias": first is not None and first.B_bias is not None, "init_lora_weights": True,
        "rank_pattern": split(o.get("rank_pattern", ()), int), "alpha_pattern": split(o.get("alpha_pattern", ()), float),
        "target_parameters": list(o.get("target_parameters", ())) or None,
    }


def _pattern_items(config: dict, key: str, where) -> tuple:
    items = []
    for k, v in (config.get(key) or {}).items():
        if "+" in k or "," in k:
            raise UserError(f"{where}: {key} key '{k}' holds '+' or ',', which a peftlab strategy cannot carry")
        items.append(f"{k}={v}")
    return tuple(items)


def from_peft(config: dict, where) -> Step:
    """The `lora` step equivalent to a peft LoraConfig."""
    for key, default in (("bias", "none"), ("use_qalora", False), ("layer_replication", None)):
        if config.get(key, default) not in (default, None, {}, False, "none", []):
            raise UserError(f"{where}: peft option {key}={config[key]!r} is not supported by peftlab")
    options = {"r": config["r"], "alpha": config.get("lora_alpha", 8), "dropout": config.get("lora_dropout", 0.0),
               "rslora": bool(config.get("use_rslora")), "dora": bool(config.get("use_dora")),
               "lora_bias": bool(config.get("lora_bias")),
               "rank_pattern": _pattern_items(config, "rank_pattern", where),
               "alpha_pattern": _pattern_items(config, "alpha_pattern", where)}
    options.update(target_options(config, where))
    params = config.get("target_parameters") or ()
    if isinstance(params, str) or any(not isinstance(p, str) or any(c in p for c in "+,/") for p in params):
        raise UserError(f"{where}: target_parameters {params!r} should be a list of parameter names without '+', ',' or '/'")
    if params:
        options["target_parameters"] = tuple(params)
    return Step("lora", options)


# An adapter whose init changed the base (pissa, olora, loftq) needs that base: peftlab's format.
LORA = PeftCodec("LORA", to_peft, from_peft, fields=LORA_FIELDS,
                 accepts=lambda step, model: step.options.get("init", "kaiming") in ("kaiming", "gaussian"))


@register("lora", examples=("lora:r=4", "lora:r=4,targets=all-linear,rslora=true", "lora:r=4,init=pissa"), peft=LORA, **LORA_OPTIONS)
def lora(model, calibration=None, **opts):
    """Low-rank update W + (α/r)·BA on chosen linear layers; dora=true, rslora=true variants."""
    return add_lora(model, method="lora", calibration=calibration, **opts)


@register("dora", examples=("dora:r=4",), peft=LORA.writer(), **LORA_OPTIONS)
def dora(model, calibration=None, **opts):
    """LoRA direction plus a trainable magnitude per output feature."""
    return add_lora(model, method="dora", calibration=calibration, **(opts | {"dora": True}))
