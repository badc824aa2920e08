"""The one protocol every module a method adds follows; the rest of peftlab (switching,
merging, saving, tracking, reports) works through it and never names a method.

An added module lives at `host.<slot>[adapter name]` (see attach.py) and carries:

    slot              where it is stored on its host ("lora", "ia3", ...); part of tensor names
    active, merged    take part in the forward pass? folded into the host's weight?
    forward(...)      the method's own computation (its hook knows the signature)
    delta_weight(L)   the effective change of host layer L's weight, (out, in) fp32, or None
                      when the method has no equivalent weight (bottlenecks, prompts)
    merge(L)/unmerge(L)  fold into / take out of L's weight; additive by default, W ± ΔW
    low_rank()        (s, B, A) when ΔW = s·B·A, so norms can be taken without building ΔW
    head_weight(L, W) on the output layer: the weight the loss should multiply by (None: the
                      loss runs the layer, which is slower: loss.py never builds all logits otherwise)
    peft_keys         parameter name -> the tensor name peft stores it under on the host
    stored()          parameter name -> tensor as saved (a reparametrisation may fold here)
    combine(parts, how, ...)  (class method) one module from several adapters' (TIES, DARE, SVD…)

A method whose added module overrides nothing but `forward` still switches, disables,
deletes, saves and loads; `delta_weight` makes it mergeable and tracked as a weight change.

What a method does while it trains, beyond its modules' forward pass, is a `Training` object
that its `apply` returns (the training loops, loop.py and trainer.py, call it; they never
ask which method made it):

    start(model, steps)       the run's length is known (AdaLoRA's budget schedule needs it)
    unfreeze_at               {step: [parameter names]} that start training at that step
    lr_scales(model)          parameter name -> learning-rate multiplier (LoRA+: B × ratio)
    loss(model)               a term added to every micro-batch's mean loss, or None
    after_backward(model, s)  the step's gradients are summed (unclipped), before the optimizer
    after_step(model, s)      after the optimizer step, gradients still there (AdaLoRA masks)
    state() / restore(s, t)   (JSON, {name: tensor}) a checkpoint saves and a resume puts back,
                              so a resumed run continues bit for bit
    processes                 "any", "ddp" (state that needs whole tensors: not under FSDP) or
                              "one" (a single process)
    saved_as                  options a saved adapter records in place of the step's own: an
                              init from data (EVA, CorDA) resolved into the ranks it chose, so
                              loading rebuilds the same shapes without the data
"""

from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import UserError
from .targets import base_weight, write_weight


class Added(nn.Module):
    """Base of every module a method adds to a model (see the module docstring)."""

    _peftlab_added = True  # components.where() reads this: parameters below are "added"
    slot: ClassVar[str] = ""
    peft_keys: ClassVar[dict] = {}
    label: ClassVar[str] = ""  # how errors name the method, e.g. "bottleneck adapters"

    def __init__(self):
        super().__init__()
        self.active = True
        self.merged = False
        self.method = ""  # the strategy step that added it (set by `prepare`)

    def delta_weight(self, layer: nn.Module) -> torch.Tensor | None:
        """ΔW for host `layer`, shape (out, in), or None when the method has no such weight."""
        return None

    @property
    def mergeable(self) -> bool:
        return type(self).delta_weight is not Added.delta_weight or type(self).merge is not Added.merge

    def merge(self, layer: nn.Module) -> None:
        """W ← W + ΔW (a method whose update is not additive overrides this and `unmerge`)."""
        write_weight(layer, base_weight(layer).float() + self.delta_weight(layer).float())

    def unmerge(self, layer: nn.Module) -> None:
        write_weight(layer, base_weight(layer).float() - self.delta_weight(layer).float())

    def low_rank(self):
        """(s, B (out, r), A (r, in)) when ΔW = s·B·A; else None."""
        return None

    def head_weight(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
        """On the output layer: `weight` (V, d) as this module changes it, or None."""
        return None

    @classmethod
    def combine(cls, parts: list, how: str, rank: int | None, density: float = 1.0, sign: str = "total", gen=None):
        """A new module of this kind from [(module, weight)] of several adapters on one host
        (adapters.combine names the ways); a kind that cannot be combined says so."""
        raise UserError(f"{cls.label or cls.slot} cannot be combined; combine works on LoRA adapters")

    def stored(self) -> dict:
        """Parameter name -> tensor, as it is saved and loaded."""
        return dict(self.named_parameters())

    def peft_tensors(self) -> dict:
        """peft's tensor name suffix -> our tensor, for the parameters peft knows."""
        mine = self.stored()
        return {suffix: mine[name] for name, suffix in self.peft_keys.items() if mine.get(name) is not None}


class Training:
    """A strategy step's training-time behaviour (see the module docstring). Every hook does
    nothing by default; a method overrides what it needs."""

    unfreeze_at: dict = {}
    processes: str = "any"
    saved_as: dict = {}
    method: str = ""  # the strategy step that returned it (set by `prepare`)

    def start(self, model: nn.Module, steps: int) -> None:
        pass

    def lr_scales(self, model: nn.Module) -> dict:
        return {}

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def state(self) -> tuple[dict, dict]:
        return {}, {}

    def restore(self, state: dict, tensors: dict) -> None:
        pass
