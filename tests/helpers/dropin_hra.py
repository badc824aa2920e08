"""HRA (Householder reflection adaptation, Yuan et al., 2024) as one method file, HF peft's HRA.

test_method_dropin.py copies this file into the methods package of a fresh process, edits
nothing else, and shows that registration alone gives it the strategy parser, training,
the shared checks, and save/load in peft's format (peft loads it with equal logits).

    y = (W H) x + b,   H = Π_{i=1..r} (I − 2 ûᵢ ûᵢᵀ),  ûᵢ = uᵢ / ‖uᵢ‖,   U = [u₁ … u_r] ∈ R^{n×r}

Init (peft's): r/2 kaiming-uniform columns, each repeated twice, so the reflections pair up
and H = I at the start. Trainable per target: n·r.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftlab.errors import UserError
from peftlab.methods.attach import attach
from peftlab.methods.protocol import Added
from peftlab.methods.registry import PeftCodec, peft_fields, register
from peftlab.methods.targets import base_weight, dims, linear_layers, peft_targets, pick_targets, target_options
from peftlab.spec import Option, Step


class Reflections(Added):
    """H (n, n) from r Householder vectors U (n, r); the layer computes x (W H)ᵀ."""

    slot = "hra"
    label = "HRA"
    peft_keys = {"U": "hra_u"}

    def __init__(self, d_in: int, r: int):
        super().__init__()
        self.U = nn.Parameter(torch.zeros(d_in, r))  # (n, r)

    def rotation(self) -> torch.Tensor:
        """H (n, n) in fp32, reflections applied in peft's order."""
        u = self.U.float() / self.U.float().norm(dim=0)
        h = torch.eye(u.shape[0], device=u.device)
        for i in range(u.shape[1]):
            ui = u[:, i : i + 1]
            h = h - 2 * h @ ui @ ui.T
        return h

    def delta_weight(self, layer) -> torch.Tensor:
        w = base_weight(layer).float()  # (out, in)
        return w @ self.rotation() - w

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # the base output is replaced: y = x (W H)ᵀ + b
        weight = base_weight(layer).float() @ self.rotation()
        return F.linear(x, weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


def to_peft(model, step: Step, hosts: dict) -> dict:
    return {"peft_type": "HRA", "r": step.options.get("r", 8), "apply_GS": False, "init_weights": True, "bias": "none",
            **peft_targets(model, hosts)}


def from_peft(config: dict, where) -> Step:
    if config.get("apply_GS"):
        raise UserError(f"{where}: peft option apply_GS=true is not supported by this HRA")
    return Step("hra", {"r": config.get("r", 8)} | target_options(config, where))


def linear_only(step, model) -> bool:
    return all(isinstance(m, nn.Linear) for m in linear_layers(model).values())


@register("hra", examples=("hra:r=4",),
          exempt={"gpt2": "GPT-2's Conv1D layers are not nn.Linear (peft's HRA takes Linear and Conv2d only)"},
          peft=PeftCodec("HRA", to_peft, from_peft, accepts=linear_only, fields=peft_fields(
              "r apply_GS target_modules exclude_modules init_weights layers_to_transform layers_pattern bias modules_to_save")),
          r=Option(8, "int", help="number of reflections (even: the start is the identity)", low=2),
          targets=Option(None, "list"), target_regex=Option(None, "regex"), layers=Option(None),
          name=Option("default"), seed=Option(0, "int", low=0))
def hra(model, r, targets, target_regex, layers, name, seed):
    """Householder reflections W·Π(I − 2uuᵀ) on chosen linear layers (HRA)."""
    if r % 2:
        raise UserError(f"hra: r={r} must be even (pairs of equal reflections start at the identity)")
    gen = torch.Generator().manual_seed(seed)
    for path, layer in pick_targets(model, targets, target_regex, layers, "hra").items():
        if not isinstance(layer, nn.Linear):
            raise UserError(f"hra: {path} is not nn.Linear; HRA takes linear layers")
        d_in, _ = dims(layer)
        module = Reflections(d_in, r)
        with torch.no_grad():
            half = torch.empty(d_in, r // 2).uniform_(-1 / math.sqrt(r // 2), 1 / math.sqrt(r // 2), generator=gen)
            module.U.copy_(half.repeat_interleave(2, dim=1))
        attach(layer, name, module.to(layer.weight.device))
