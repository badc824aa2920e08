"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every targeted
layer, and two trainable scaling vectors per layer.

    y = W x + b + λ_b ⊙ (B_m (λ_d ⊙ (A_n x)))
    ΔW = diag(λ_b) · B[:m] · diag(λ_d) · A[:, :n]                          (m, n) = (out, in)
    A ∈ R^{r×n_max}, B ∈ R^{m_max×r}   frozen; n_max, m_max: the largest in / out over targets
    λ_d ∈ R^r = d_initial,  λ_b ∈ R^m = 0   trainable (λ_b = 0: the model starts at the base)

A layer uses the top-left slice of A and B it needs (peft ≥ 0.13: targets may differ in shape).
The projections are drawn as peft draws them: one CPU generator seeded with
`projection_prng_key`, A first, then B, each kaiming-uniform U(±√(6 / fan_in)) with
fan_in = n_max for A and r for B; a peft model with the same key holds the same A and B.

Trainable per target: r + m. A and B, r·(n_max + m_max) per adapter, are frozen parameters
(requires_grad=False): in the model's total, never in its trainable count or the optimizer.

Where the shared projections live: one `Projections` module per adapter, registered as the
child `proj` of every delta of that adapter (one module under many paths, as tied weights
are), so moving or casting the model moves it once and every layer sees the same tensors.
torch names a shared parameter by its first path, the first targeted layer; the delta there
`owns` the projections and its `stored()` includes them, so peftlab's folder holds A and B once
and loading copies them in instead of regenerating them (a bf16-rounded A stays what it was).
In peft's format they are `base_model.vera_A` / `base_model.vera_B` (the codec's
tensor_name), left out when save_projection=false, as peft does.

`seed` is accepted like every method's but draws nothing: the λ start at constants and the
only random tensors, A and B, come from projection_prng_key (so a peft adapter's key, which
peft also uses to rebuild unsaved projections, reproduces them here).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..spec import Option, Step, clip
from .attach import attach
from .protocol import Added
from .registry import PeftCodec, peft_fields, register
from .targets import REGEX_HELP, TARGETS_HELP, dims, peft_targets, pick_targets, target_options


def kaiming_uniform(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """peft's `_kaiming_init`: U(±√3·√2/√fan_in), fan_in = shape[1], drawn on the CPU."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


class Projections(nn.Module):
    """The frozen random pair one VeRA adapter shares across its layers: A (r, n_max), B (m_max, r)."""

    def __init__(self, r: int, n_max: int, m_max: int, key: int):
        super().__init__()
        gen = torch.Generator(device="cpu").manual_seed(key)
        self.A = nn.Parameter(kaiming_uniform((r, n_max), gen), requires_grad=False)  # drawn first, as in peft
        self.B = nn.Parameter(kaiming_uniform((m_max, r), gen), requires_grad=False)
        self.key = key


class VeraDelta(Added):
    """One layer's VeRA update: trainable λ_d (r,), λ_b (m,) and the shared `proj` (A, B)."""

    slot = "vera"
    label = "VeRA"
    peft_keys = {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d", "proj.A": "vera_A", "proj.B": "vera_B"}

    def __init__(self, proj: Projections, d_in: int, d_out: int, d_initial: float, dropout: float = 0.0,
                 save_projection: bool = True):
        super().__init__()
        self.proj = proj  # the same module on every layer of this adapter
        self.lambda_d = nn.Parameter(torch.full((proj.A.shape[0],), float(d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(d_out))
        self.d_in = d_in
        self.dropout = dropout
        self.save_projection = save_projection
        self.owns = False  # set on the one delta whose path names proj's parameters (see add_vera)

    def factors(self) -> tuple:
        """This layer's slices: B[:m] (m, r), A[:, :n] (r, n)."""
        return self.proj.B[: self.lambda_b.shape[0]], self.proj.A[:, : self.d_in]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # x: (..., n); base_out: (..., m); peft's order: λ_b ⊙ (B (λ_d ⊙ (A x)))
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        B, A = self.factors()
        z = self.lambda_d.to(h.dtype) * F.linear(h, A.to(h.dtype))  # (..., r)
        return base_out + self.lambda_b.to(h.dtype) * F.linear(z, B.to(h.dtype))

    def low_rank(self):
        """ΔW = 1 · (λ_b ⊙ B[:m]) (λ_d ⊙ A[:, :n]): a rank-r product, so VeRA exports like LoRA."""
        B, A = self.factors()
        return 1.0, self.lambda_b[:, None] * B, self.lambda_d[:, None] * A

    def delta_weight(self, layer=None) -> torch.Tensor:
        _, B, A = self.low_rank()
        return B.float() @ A.float()  # (m, n)

    def stored(self) -> dict:
        mine = {"lambda_b": self.lambda_b, "lambda_d": self.lambda_d}
        return mine | ({"proj.A": self.proj.A, "proj.B": self.proj.B} if self.owns else {})

    def peft_tensors(self) -> dict:
        out = super().peft_tensors()
        return out if self.save_projection else {k: v for k, v in out.items() if k not in ("vera_A", "vera_B")}


def add_vera(model, r, d_initial, projection_prng_key, save_projection, dropout, targets, target_regex, layers,
             name, seed):
    """Attach VeRA deltas named `name`, sharing one pair of projections sized to the largest target."""
    chosen = pick_targets(model, targets, target_regex, layers, "vera")
    shapes = [dims(layer) for layer in chosen.values()]  # (in, out)
    check_size(model, r, max(i for i, _ in shapes) + max(o for _, o in shapes))
    proj = Projections(r, max(i for i, _ in shapes), max(o for _, o in shapes), projection_prng_key)
    proj = proj.to(next(iter(chosen.values())).weight.device)
    for layer, (d_in, d_out) in zip(chosen.values(), shapes):
        attach(layer, name, VeraDelta(proj, d_in, d_out, d_initial, dropout, save_projection).to(layer.weight.device))
    # torch names proj.A after its first path in module order: that delta saves the projections
    first = next(n for n, p in model.named_parameters() if p is proj.A)
    for path in chosen:
        delta = chosen[path]._modules[VeraDelta.slot][name]
        delta.owns = first == f"{path}.{VeraDelta.slot}.{name}.proj.A"


def check_size(model, r: int, n_plus_m: int) -> None:
    """VeRA's r has no limit of its own (peft's default, 256, exceeds a tiny model's width);
    but the frozen projections hold r·(n_max + m_max) values, and projections larger than the
    whole model are a mistake (r = 10⁶ would allocate gigabytes): refused before allocating."""
    total = sum(p.numel() for p in model.parameters())
    if r * n_plus_m > total:
        raise UserError(f"vera: r={clip(r)} makes the shared projections A and B {r * n_plus_m:,} values, more than the "
                        f"whole model ({total:,}); r must be ≤ {max(1, total // n_plus_m)}")


OPTIONS = dict(
    r=Option(256, "int", help="rank of the shared projections (peft's default 256)", low=1),
    d_initial=Option(0.1, "float", help="initial value of every λ_d"),
    projection_prng_key=Option(0, "int", help="seed of the shared random projections (as peft)", low=0),
    save_projection=Option(True, "bool", help="peft format: store A and B (false: rebuilt from the key)"),
    dropout=Option(0.0, "float", low=0, high=0.99),
    targets=Option(None, "list", help=TARGETS_HELP),
    target_regex=Option(None, "regex", help=REGEX_HELP),
    layers=Option(None, help="blocks: A-B, or indices joined with +"),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0, help="unused: VeRA's only random tensors come from projection_prng_key"),
)


# ---- peft's VeraConfig ------------------------------------------------------------------

def to_peft(model, step: Step, hosts: dict) -> dict:
    """VeraConfig fields for the VeRA deltas `hosts` ({module path: VeraDelta}) made by `step`."""
    o = {k: opt.default for k, opt in OPTIONS.items()} | step.options
    first = next(iter(hosts.values()))
    return {
        "peft_type": "VERA", "r": first.lambda_d.shape[0], **peft_targets(model, hosts),
        "projection_prng_key": first.proj.key, "save_projection": first.save_projection,
        "vera_dropout": first.dropout, "d_initial": o["d_initial"], "fan_in_fan_out": model.config.model_type == "gpt2",
        "bias": "none", "init_weights": True,
    }


def from_peft(config: dict, where) -> Step:
    """The `vera` step equivalent to a peft VeraConfig (the tensors then load over its init)."""
    for key, default in (("bias", "none"), ("exclude_modules", None), ("target_parameters", None)):
        if config.get(key, default) not in (default, None, [], "none"):
            raise UserError(f"{where}: peft option {key}={config[key]!r} is not supported by peftlab's VeRA")
    options = {"r": config.get("r", 256), "d_initial": config.get("d_initial", 0.1),
               "projection_prng_key": config.get("projection_prng_key", 0),
               "save_projection": bool(config.get("save_projection", True)), "dropout": config.get("vera_dropout", 0.0)}
    options.update(target_options(config, where))
    return Step("vera", options)


def tensor_name(host: str, suffix: str, alone: bool) -> str:
    """peft keeps the shared projections at the model's top, once: base_model.vera_A / vera_B."""
    return f"base_model.{suffix}" if suffix in ("vera_A", "vera_B") else f"base_model.model.{host}.{suffix}"


@register("vera", examples=("vera:r=8",), peft=PeftCodec("VERA", to_peft, from_peft, tensor_name=tensor_name, fields=peft_fields(
    "r target_modules projection_prng_key save_projection vera_dropout d_initial fan_in_fan_out bias modules_to_save",
    "init_weights layers_to_transform layers_pattern")), **OPTIONS)
def vera(model, **opts):
    """Shared frozen random projections, trainable per-layer scaling vectors λ_b, λ_d (VeRA)."""
    add_vera(model, **opts)
