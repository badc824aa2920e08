"""How much each trained weight matrix moves: ‖W_t − W_{t−1}‖_F every step, ‖W_t − W_0‖_F.

The tracker must not distort the memory it helps to compare, so it keeps no copy of large
base matrices:
- base matrices: the step change is the update AdamW just applied, recomputed from its
  moments, lr·m̂/(√v̂ + ε) (+ lr·λ·W for weight decay); the drift is taken once at the end
  against a freshly loaded base (`final_drift`).
- added modules that change a layer's weight (the protocol's `delta_weight`) are tracked as
  that effective ΔW. Low-rank ones (`low_rank()` = s, B, A) never build it: the norms come
  from r×r Gram matrices, ‖s₁B₁A₁ − s₀B₀A₀‖² = s₁²⟨B₁ᵀB₁, A₁A₁ᵀ⟩ + s₀²⟨B₀ᵀB₀, A₀A₀ᵀ⟩
  − 2s₁s₀⟨B₁ᵀB₀, A₁A₀ᵀ⟩, from copies of the small A and B only; the others (DoRA, IA3,
  LoHa, LoKr, OFT...) build ΔW once per step.
- every other added tensor (bottleneck W_down/W_up, prompt and prefix tables): plain copies.
"""

import time

import torch

from ..components import where
from ..methods.attach import attached


def _gram_dist(s1, B1, A1, s0, B0, A0) -> float:
    """‖s1·B1A1 − s0·B0A0‖_F via r×r products, in float64 against cancellation."""
    B1, A1, B0, A0 = (t.detach().double() for t in (B1, A1, B0, A0))
    sq = (s1 * s1 * ((B1.T @ B1) * (A1 @ A1.T)).sum() + s0 * s0 * ((B0.T @ B0) * (A0 @ A0.T)).sum()
          - 2 * s1 * s0 * ((B1.T @ B0) * (A1 @ A0.T)).sum())
    return float(sq.clamp_min(0).sqrt())


def _effective(child, layer):
    """A function giving `child`'s current ΔW on `layer`, (out, in) fp32, without autograd."""

    @torch.no_grad()
    def get():
        return child.delta_weight(layer).float().clone()

    return get


class WeightTracker:
    """Call `step(optimizer)` after every optimizer step; read `steps` and `drift()`."""

    def __init__(self, model, will_train: set):
        self.model = model
        places = where(model)
        params = dict(model.named_parameters())
        self.base = {n: params[n] for n in will_train if places[n].component != "added"}
        self.low_rank = []  # [label, (s, B, A) getter, A0, B0, prevA, prevB]
        self.dense = []  # [label, ΔW getter, ΔW0, prev ΔW]
        covered = set()
        for host_name, layer, slot in attached(model):
            for child in slot.values():
                trains = any(p.requires_grad for p in child.parameters())
                if not trains or not child.mergeable:
                    continue
                covered.update(id(p) for p in child.parameters())
                label = f"{host_name}.weight"
                factors = child.low_rank()
                if factors is not None:
                    s0, B0, A0 = (t.detach().clone() if torch.is_tensor(t) else t for t in factors)
                    self.low_rank.append([label, child.low_rank, A0, B0, A0, B0])
                else:
                    get = _effective(child, layer)
                    eff = get()
                    self.dense.append([label, get, eff, eff])
        self.added = {n: (p, p.detach().clone(), p.detach().clone()) for n, p in params.items()
                      if n in will_train and places[n].component == "added" and id(p) not in covered}
        # reused scratch, on the weights' device (a CPU buffer cannot hold a GPU update)
        device = next(iter(self.base.values())).device if self.base else torch.device("cpu")
        self._buffer = torch.empty(max((p.numel() for p in self.base.values()), default=0), device=device)
        self.steps: dict[str, list] = {}  # matrix -> [‖W_t − W_{t−1}‖_F per step]
        self._drift: dict[str, float] = {}
        self.seconds = 0.0

    def _record(self, name, value):
        self.steps.setdefault(name, []).append(value)

    @torch.no_grad()
    def step(self, optimizer) -> float:
        """Record this step's changes; return the seconds it took."""
        start = time.perf_counter()
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for name, p in self.base.items():
            state = optimizer.state.get(p)
            if not state or id(p) not in groups:
                self._record(name, 0.0)
                continue
            g = groups[id(p)]
            (b1, b2), eps, lr, wd = g["betas"], g["eps"], g["lr"], g["weight_decay"]
            t = float(state["step"])
            # u = lr · (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε), built in place in one reused buffer
            u = self._buffer[: p.numel()].view_as(p)
            torch.sqrt(state["exp_avg_sq"], out=u)
            u.mul_((1 - b2**t) ** -0.5).add_(eps)
            torch.div(state["exp_avg"], u, out=u)
            u.mul_(lr / (1 - b1**t))
            if wd:  # AdamW: W_t = (1 − lr·λ)·W_{t−1} − lr·u, so W_t − W_{t−1} = −(lr·λ·W_t + u) / (1 − lr·λ)
                u.add_(state.get("master", p).detach(), alpha=lr * wd).div_(1 - lr * wd)
            self._record(name, float(torch.linalg.vector_norm(u)))
        for entry in self.low_rank:
            label, factors, A0, B0, prevA, prevB = entry
            sc, B, A = factors()
            self._record(label, _gram_dist(sc, B, A, sc, prevB, prevA))
            self._drift[label] = _gram_dist(sc, B, A, sc, B0, A0)
            entry[4], entry[5] = A.detach().clone(), B.detach().clone()
        for entry in self.dense:
            label, get, eff0, prev = entry
            eff = get()
            self._record(label, float(torch.linalg.norm(eff - prev)))
            self._drift[label] = float(torch.linalg.norm(eff - eff0))
            entry[3] = eff
        for name, (p, p0, prev) in self.added.items():
            self._record(name, float(torch.linalg.norm(p.detach().float() - prev.float())))
            self._drift[name] = float(torch.linalg.norm(p.detach().float() - p0.float()))
            prev.copy_(p.detach())
        dt = time.perf_counter() - start
        self.seconds += dt
        return dt

    @torch.no_grad()
    def final_drift(self, initial: dict) -> dict:
        """‖W_T − W_0‖_F for every tracked matrix; `initial` maps base names to W_0."""
        out = dict(self._drift)
        for name, p in self.base.items():
            out[name] = float(torch.linalg.norm(p.detach().float() - initial[name].float()))
        return out
