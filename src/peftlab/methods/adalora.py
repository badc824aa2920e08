"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form whose rank budget moves, while training, to
the layers that need it; as HF peft's ADALORA.

    y = W x + b + s · B (E ⊙ A) x,   s = α / (r₀ + 10⁻⁵)   (peft: scaling α, divided by ranknum r₀)
    A ∈ R^{r₀×n} ~ N(0, 0.02²),  B ∈ R^{m×r₀} ~ N(0, 0.02²),  E ∈ R^{r₀×1} = 0 (ΔW starts at 0)

Each rank-one triplet (row i of A, E_i, column i of B) has an importance: per entry, the
smoothed sensitivity Ī = EMA_β₁ |θ·∂L/∂θ| times its uncertainty Ū = EMA_β₂ |I − Ī|; a
triplet's score is its E entry's plus the means of its A row's and B column's. The budget
(kept triplets over all layers) starts at b₀ = Σ r₀ and falls to b_T = target_r · layers:

    b(t) = b₀ for t ≤ tinit;  b_T + (b₀ − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³ until T − tfinal

and every `delta_t` steps the triplets scoring under the budget's threshold get E_i = 0 (they
may come back at the next allocation). At step T − tfinal the pattern is fixed; afterwards its
E entries are zeroed after every step. Training also adds `orth` · the mean over A and B of
‖AAᵀ − I‖_F and ‖BᵀB − I‖_F, which keeps P, Q near-orthogonal, as an SVD's are.

Training-time work is this file's `Budget` (the protocol's Training): the score EMAs and the
pattern are checkpointed, so a run killed mid-schedule resumes bit for bit. T is the run's
--steps. Saved in peft's format the folder holds only the kept triplets and their
`rank_pattern` (peft's layout); loaded back, each layer has its kept rank and the same s.
Trainable per target: r₀(m + n + 1).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..spec import Option, Step
from .attach import attach
from .lowrank import LORA_FIELDS, pattern_value, read_patterns
from .protocol import Added, Training
from .registry import PeftCodec, register, resolved
from .targets import EXCLUDE_HELP, REGEX_HELP, TARGETS_HELP, dims, peft_targets, pick_targets, target_options

EPS = 1e-5  # peft adds it to the rank in the scale's denominator


class AdaDelta(Added):
    """ΔW = s · B (E ⊙ A) for one linear layer, with r ≤ r₀ triplets (fewer once loaded
    from a finished budget); `kept` (r,) bool marks the triplets the last allocation kept."""

    slot = "adalora"
    label = "AdaLoRA"
    peft_keys = {"A": "lora_A", "B": "lora_B", "E": "lora_E"}

    def __init__(self, d_in: int, d_out: int, r: int, r0: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(r, d_in))  # (r, n)
        self.B = nn.Parameter(torch.zeros(d_out, r))  # (m, r)
        self.E = nn.Parameter(torch.zeros(r, 1))  # (r, 1): the singular values
        self.r0 = r0
        self.scale = (alpha if alpha > 0 else float(r0)) / (r0 + EPS)
        self.dropout = dropout
        self.kept = None  # (r,) bool after an allocation; None before any
        self.total_step = None  # the schedule's length T, once a run started

    def delta_weight(self, layer=None) -> torch.Tensor:
        return self.B @ (self.A * self.E) * self.scale

    def low_rank(self):
        return self.scale, self.B, self.A * self.E

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # x: (..., n); base_out: (..., m)
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        return base_out + F.linear(F.linear(h, (self.A * self.E).to(h.dtype)), self.B.to(h.dtype)) * self.scale

    def pattern(self) -> list:
        """peft's rank_pattern entry: r₀ flags, True for each triplet the adapter holds."""
        if self.kept is not None:
            return self.kept.tolist()
        r = self.A.shape[0]
        return [True] * r + [False] * (self.r0 - r)

    def peft_tensors(self) -> dict:
        """Only the kept triplets, as peft saves them."""
        keep = self.kept if self.kept is not None else slice(None)
        return {"lora_A": self.A[keep], "lora_B": self.B[:, keep], "lora_E": self.E[keep]}


class Budget(Training):
    """The rank allocator: importance EMAs, the cubic budget schedule, the masks, and the
    orthogonality term, over every AdaLoRA layer of one adapter (peft's RankAllocator)."""

    processes = "ddp"  # masks need whole tensors: every process holds the same after DDP's all-reduce

    def __init__(self, deltas: dict, target_r: int, tinit: int, tfinal: int, delta_t: int, beta1: float,
                 beta2: float, orth: float):
        self.deltas = deltas  # host path -> AdaDelta
        self.target_r, self.tinit, self.tfinal, self.delta_t = target_r, tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth = beta1, beta2, orth
        self.total = None
        self.avg, self.unc = {}, {}  # "path.A" -> EMA of |θ·g|, EMA of its deviation
        self.start_budget = sum(d.A.shape[0] for d in deltas.values())
        self.end_budget = target_r * len(deltas)

    def start(self, model, steps: int) -> None:
        if self.tinit >= steps - self.tfinal:
            raise UserError(f"adalora: tinit={self.tinit} and tfinal={self.tfinal} leave no step of a {steps}-step run "
                            f"to allocate ranks in; tinit + tfinal must be < --steps")
        self.total = steps
        for d in self.deltas.values():
            d.total_step = steps

    def budget(self, step: int) -> tuple[int, bool]:
        """(kept triplets allowed after `step`, whether this step allocates)."""
        if step <= self.tinit:
            return self.start_budget, False
        if step > self.total - self.tfinal:
            return self.end_budget, True
        left = 1 - (step - self.tinit) / (self.total - self.tfinal - self.tinit)
        return int((self.start_budget - self.end_budget) * left**3 + self.end_budget), step % self.delta_t == 0

    def loss(self, model) -> torch.Tensor | None:
        if self.orth <= 0 or not self.deltas:
            return None
        terms = []
        for d in self.deltas.values():
            for cov in (d.A @ d.A.T, d.B.T @ d.B):  # (r, r) each
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
        return self.orth * (sum(terms) / len(terms))

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:
        """peft's update_and_allocate(step), called where its docs call it: after the optimizer
        step, before the gradients are cleared."""
        final = self.total - self.tfinal
        if step < final:
            self.update_scores()
            budget, allocate = self.budget(step)
            if allocate:
                self.mask_to(budget)
        elif step == final:
            self.mask_to(self.budget(step)[0])
            self.avg, self.unc = {}, {}  # peft resets its scores once the pattern is fixed
        else:
            for d in self.deltas.values():
                d.E.masked_fill_(~d.kept[:, None], 0.0)

    def update_scores(self) -> None:
        for path, d in self.deltas.items():
            for name in ("A", "B", "E"):
                p = getattr(d, name)
                if p.grad is None:
                    continue
                key = f"{path}.{name}"
                ipt = (p * p.grad).abs()
                avg = self.avg.get(key, torch.zeros_like(p))
                unc = self.unc.get(key, torch.zeros_like(p))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.avg[key] = avg
                self.unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def scores(self) -> dict:
        """host path -> (r,) triplet scores."""
        out = {}
        for path, d in self.deltas.items():
            s = {n: self.avg[f"{path}.{n}"] * self.unc[f"{path}.{n}"] for n in ("A", "B", "E")
                 if f"{path}.{n}" in self.avg}
            if len(s) < 3:
                s = {n: torch.zeros_like(getattr(d, n)) for n in ("A", "B", "E")}  # no gradient seen yet
            out[path] = s["E"].view(-1) + s["A"].mean(dim=1) + s["B"].mean(dim=0)
        return out

    def mask_to(self, budget: int) -> None:
        """Zero E for the triplets scoring at or under the (b₀ − budget)-th smallest score."""
        scores = self.scores()
        drop = self.start_budget - budget
        if drop <= 0:  # target_r = r: nothing to prune (peft's kthvalue would fail on k = 0)
            for d in self.deltas.values():
                d.kept = torch.ones(d.A.shape[0], dtype=torch.bool, device=d.A.device)
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=drop)[0].item()
        for path, d in self.deltas.items():
            d.kept = scores[path] > threshold
            d.E.masked_fill_(~d.kept[:, None], 0.0)

    def state(self) -> tuple[dict, dict]:
        kept = {p: d.kept.tolist() for p, d in self.deltas.items() if d.kept is not None}
        tensors = {f"avg.{k}": v for k, v in self.avg.items()} | {f"unc.{k}": v for k, v in self.unc.items()}
        return {"total": self.total, "kept": kept}, tensors

    def restore(self, state: dict, tensors: dict) -> None:
        if state.get("total") not in (None, self.total):
            raise UserError(f"adalora's rank budget was scheduled over {state['total']} steps; resume with "
                            f"--steps {state['total']} (this run asks for {self.total})")
        for path, d in self.deltas.items():
            flags = state.get("kept", {}).get(path)
            d.kept = None if flags is None else torch.tensor(flags, dtype=torch.bool, device=d.A.device)
        device = next(iter(self.deltas.values())).A.device if self.deltas else "cpu"
        self.avg = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("avg.")}
        self.unc = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("unc.")}


OPTIONS = dict(
    r=Option(12, "int", help="initial rank r₀ of every layer (peft's init_r)", low=1),
    target_r=Option(8, "int", help="average rank the budget ends at", low=1),
    alpha=Option(8.0, "float", help="scale numerator: ΔW is multiplied by alpha/r₀ (peft's lora_alpha)", low=0),
    dropout=Option(0.0, "float", low=0, high=0.99),
    targets=Option(None, "list", help=TARGETS_HELP),
    target_regex=Option(None, "regex", help=REGEX_HELP),
    exclude=Option(None, "regex", help=EXCLUDE_HELP),
    layers=Option(None, help="blocks: A-B, or indices joined with +"),
    tinit=Option(0, "int", help="steps before the budget starts to fall", low=0),
    tfinal=Option(0, "int", help="last steps, with the rank pattern fixed", low=0),
    delta_t=Option(1, "int", help="steps between two allocations (peft's deltaT)", low=1),
    beta1=Option(0.85, "float", help="EMA factor of the sensitivity", low=0.0001, high=0.9999),
    beta2=Option(0.85, "float", help="EMA factor of the uncertainty", low=0.0001, high=0.9999),
    orth=Option(0.5, "float", help="weight of the orthogonality term (peft's orth_reg_weight)", low=0),
    rank_pattern=Option((), "patterns", help="kept ranks of a finished budget: PATTERN=R joined with +", of="int", low=0),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)


# ---- peft's AdaLoraConfig -----------------------------------------------------------------

def to_peft(model, step: Step, hosts: dict) -> dict:
    o = resolved(step)
    first = next(iter(hosts.values()))
    patterns = {f"{h}.lora_E": d.pattern() for h, d in hosts.items()}
    total = first.total_step or o["tinit"] + o["tfinal"] + 1  # peft needs a schedule that fits
    return {"peft_type": "ADALORA", "r": 8, "init_r": o["r"], "target_r": o["target_r"], "lora_alpha": o["alpha"],
            "lora_dropout": o["dropout"], **peft_targets(model, hosts), "tinit": o["tinit"], "tfinal": o["tfinal"],
            "deltaT": o["delta_t"], "beta1": o["beta1"], "beta2": o["beta2"], "orth_reg_weight": o["orth"],
            "total_step": total, "fan_in_fan_out": model.config.model_type == "gpt2", "bias": "none",
            "init_lora_weights": True, "rank_pattern": patterns if any(not all(p) for p in patterns.values()) else None}


def from_peft(config: dict, where) -> Step:
    for key, default in (("bias", "none"), ("use_dora", False), ("target_parameters", None)):
        if config.get(key, default) not in (default, None, {}, False, "none", []):
            raise UserError(f"{where}: peft option {key}={config[key]!r} is not supported by peftlab's adalora")
    r0 = config.get("init_r", 12)
    ranks = []
    for key, flags in (config.get("rank_pattern") or {}).items():
        host = key.removesuffix(".lora_E").removesuffix(".default")
        if "+" in host or "," in host:
            raise UserError(f"{where}: rank_pattern key '{key}' holds '+' or ',', which a peftlab strategy cannot carry")
        if len(flags) != r0:
            raise UserError(f"{where}: rank_pattern {key} has {len(flags)} flags; init_r is {r0}")
        ranks.append(f"{host}={sum(bool(f) for f in flags)}")
    options = {"r": r0, "target_r": config.get("target_r", 8), "alpha": config.get("lora_alpha", 8),
               "dropout": config.get("lora_dropout", 0.0), "tinit": config.get("tinit", 0),
               "tfinal": config.get("tfinal", 0), "delta_t": config.get("deltaT", 1), "beta1": config.get("beta1", 0.85),
               "beta2": config.get("beta2", 0.85), "orth": config.get("orth_reg_weight", 0.5), "rank_pattern": tuple(ranks)}
    return Step("adalora", options | target_options(config, where))


FIELDS = LORA_FIELDS | {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"}
# peft's rank_pattern here maps "<module path>.lora_E" to init_r flags (LoRA's maps patterns to ranks)
CHECKS = {"rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(
    isinstance(f, list) and all(isinstance(b, bool) for b in f) for f in v.values())),
    "an object mapping <module>.lora_E to lists of true/false, one per initial rank")}


@register("adalora", examples=("adalora:r=4,target_r=2",), peft=PeftCodec("ADALORA", to_peft, from_peft, fields=FIELDS, checks=CHECKS), **OPTIONS)
def adalora(model, r, target_r, alpha, dropout, targets, target_regex, exclude, layers, tinit, tfinal, delta_t, beta1,
            beta2, orth, rank_pattern, name, seed):
    """SVD-form LoRA whose rank budget moves to the layers that need it while training (AdaLoRA)."""
    if target_r > r:
        raise UserError(f"adalora: target_r={target_r} is above r={r}; the budget only falls (target_r ≤ r)")
    ranks = read_patterns(rank_pattern, "adalora: rank_pattern", "int", 0)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for path, layer in pick_targets(model, targets, target_regex, layers, "adalora", exclude).items():
        d_in, d_out = dims(layer)
        rr = pattern_value(ranks, path, r, int)
        if rr > r:
            raise UserError(f"adalora: rank_pattern gives {path} rank {rr}, above r={r}")
        if r > min(d_in, d_out):
            raise UserError(f"adalora: r={r} is larger than {path}'s smaller side ({min(d_in, d_out)}); r must be ≤ it")
        delta = AdaDelta(d_in, d_out, rr, r, alpha, dropout)
        with torch.no_grad():  # peft's init: A, B ~ N(0, 0.02²), E = 0
            delta.A.normal_(0.0, 0.02, generator=gen)
            delta.B.normal_(0.0, 0.02, generator=gen)
        attach(layer, name, delta.to(layer.weight.device))
        deltas[path] = delta
    return Budget(deltas, target_r, tinit, tfinal, delta_t, beta1, beta2, orth)
