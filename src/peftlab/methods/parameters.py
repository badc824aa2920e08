"""LoRA on parameters rather than layers (peft's target_parameters): a mixture of experts'
stacked expert weights W ∈ R^{E×m×n} get one low-rank update per expert,

    ΔW_e = s·B_e A_e,   A ∈ R^{rE×n}, B ∈ R^{m×rE} in peft's layout (A_e: rows e·r … e·r+r−1;
    B_e: columns e, e+E, e+2E, …),  s = α/r (rsLoRA: α/√r)

(2-D parameters: E = 1, ΔW = s·BA). While the host module runs, each parameter reads W + ΔW
through a torch parametrization registered by a pre-hook and removed by a post hook, so
parameter names never change (fingerprints, merged models). lora.py's `target_parameters`
option puts these on a model; peft names a host's tensors by nesting one wrapper per
parameter, in the host's registration order (`base_layer.` once per later parameter).
Trainable per parameter: rE(m+n).
"""

import math

import torch
import torch.nn as nn

from ..errors import UserError
from .attach import active
from .protocol import Added


class Factors(nn.Module):
    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)


class ParamDelta(Added):
    """LoRA on parameters of one module: for each, A (rE, n), B (m, rE) as peft lays them out,
    ΔW (E, m, n) = s·B_e A_e per expert (2-D parameters: E = 1, ΔW = s·BA)."""

    slot = "lora_param"
    label = "LoRA on parameters"

    def __init__(self, host: nn.Module, names: list, r: int, alpha: float, rslora: bool):
        super().__init__()
        self.factors = nn.ModuleDict()
        self.layout = {}  # parameter name -> (experts, transposed, dimensions)
        self.peft_keys = {}
        for i, n in enumerate(names):  # the host's registration order: peft nests one wrapper per parameter
            shape = getattr(host, n).shape
            if len(shape) not in (2, 3):
                raise UserError(f"target_parameters: {n} has {len(shape)} dimensions; LoRA takes 2-D or 3-D parameters")
            transposed = len(shape) == 3 and bool(getattr(host, "is_transposed", False))
            experts = shape[0] if len(shape) == 3 else 1
            m, k = (shape[2], shape[1]) if transposed else (shape[-2], shape[-1])  # ΔW_e is (m, k) or its transpose
            self.factors[n] = Factors(torch.zeros(r * experts, k), torch.zeros(m, r * experts))
            self.layout[n] = (experts, transposed, len(shape))
            nest = "base_layer." * (len(names) - 1 - i)
            self.peft_keys |= {f"factors.{n}.A": f"{nest}lora_A.weight", f"factors.{n}.B": f"{nest}lora_B.weight"}
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r

    def delta(self, n: str) -> torch.Tensor:
        """ΔW of parameter `n`, in its own shape, fp32."""
        f, (experts, transposed, ndim) = self.factors[n], self.layout[n]
        if ndim == 2:
            dw = f.B @ f.A  # (out, in)
        else:
            A = f.A.reshape(experts, -1, f.A.shape[-1])  # (E, r, k)
            B = f.B.reshape(f.B.shape[0], -1, experts)  # (m, r, E)
            dw = torch.einsum("ore,eri->eio" if transposed else "ore,eri->eoi", B, A)
        return dw.float() * self.scaling

    def delta_weight(self, layer: nn.Module) -> torch.Tensor:
        return torch.cat([self.delta(n).reshape(-1) for n in self.factors])

    def merge(self, layer: nn.Module) -> None:
        for n in self.factors:
            p = getattr(layer, n)
            p.data = (p.data.float() + self.delta(n)).to(p.dtype)

    def unmerge(self, layer: nn.Module) -> None:
        for n in self.factors:
            p = getattr(layer, n)
            p.data = (p.data.float() - self.delta(n)).to(p.dtype)


class _Plus(nn.Module):
    """A parametrization: the parameter reads W + ΔW while its host runs."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.delta = delta

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta.to(w.dtype)


def param_pre_hook(host, args, kwargs):
    from torch.nn.utils import parametrize

    slot = getattr(host, ParamDelta.slot)
    if slot.rows is not None:
        raise UserError("LoRA on parameters (target_parameters) changes weights every row shares; it cannot be routed per row")
    on = active(slot)
    if on:
        for n in on[0].factors:
            delta = sum(d.delta(n) for d in on)
            parametrize.register_parametrization(host, n, _Plus(delta), unsafe=True)
    return args, kwargs


def param_post_hook(host, args, output):
    from torch.nn.utils import parametrize

    for n in list(getattr(host, "parametrizations", {}) or {}):
        if any(isinstance(m, _Plus) for m in host.parametrizations[n]):
            parametrize.remove_parametrizations(host, n, leave_parametrized=False)
    return output


def parameter_hosts(model, wanted, method: str) -> dict:
    """{module path: (module, [parameter names in registration order])} for every parameter
    whose path is one of `wanted` or ends with '.' + one (peft's rule)."""
    out = {}
    for path, module in model.named_modules():
        if getattr(module, "_peftlab_added", False) or not path:
            continue
        for n, _ in module.named_parameters(recurse=False):
            key = f"{path}.{n}"
            if any(key == w or key.endswith(f".{w}") for w in wanted):
                out.setdefault(path, (module, []))[1].append(n)
    missing = [w for w in wanted if not any(f"{p}.{n}" == w or f"{p}.{n}".endswith(f".{w}") for p, (_, ns) in out.items() for n in ns)]
    if missing:
        raise UserError(f"{method}: target_parameters {missing[0]} names no parameter of this model")
    return out
