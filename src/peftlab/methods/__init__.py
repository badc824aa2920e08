"""`prepare`, the seam between methods and the training loop (the registry is registry.py).

A method is a function `apply(model, **options)` registered under a name with the options it
accepts. It changes the model in place: it marks base parameters trainable (freezing methods)
or adds trainable modules (LoRA, adapters, prompts...). It may return a `Training`
(protocol.py): what it does while training (parameters that start training later, learning-
rate multipliers, a loss term, hooks around the optimizer step, state for checkpoints). The
training loop sees which parameters require gradients and those objects; it never asks which
method made them.
"""

import inspect
from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import UserError
from ..fingerprint import record as record_base
from ..spec import Step, parse
from .protocol import Added, Training
from .registry import REGISTRY, Method, discover, register  # noqa: F401  (the package's face)


@dataclass
class Prepared:
    """What `prepare` did to a model: the parsed steps and each step's `Training`."""

    steps: list
    training: list = field(default_factory=list)  # [Training], in step order
    saved: list = field(default_factory=list)  # the steps as an adapter records them (saved_as applied)

    @property
    def spec(self) -> str:
        return "/".join(str(s) for s in self.steps)

    @property
    def unfreeze_at(self) -> dict:
        """step -> [parameter names] that start training at that step, over all steps."""
        plan = {}
        for t in self.training:
            for at, names in t.unfreeze_at.items():
                plan.setdefault(at, []).extend(names)
        return plan

    def loss(self, model: nn.Module):
        """The sum of the loss terms the steps add (a tensor), or None when none adds one."""
        terms = [t for t in (tr.loss(model) for tr in self.training) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def lr_scales(self, model: nn.Module) -> dict:
        """parameter name -> learning-rate multiplier (1 where no step asks for another)."""
        return {n: s for t in self.training for n, s in t.lr_scales(model).items()}


def parse_strategy(spec: str) -> list[Step]:
    """Parse and validate a strategy string without touching any model."""
    return parse(spec, REGISTRY)


def prepare(model: nn.Module, spec: str, tokenizer=None, calibration=None) -> Prepared:
    """Apply strategy `spec` to `model` in place: freeze everything, then apply each method.

    `tokenizer` reaches methods that ask for it (prompt tuning's text init), `calibration`
    (batches: id tensors, (ids, labels) pairs or dicts, see methods/calibration.py) those that
    initialise from data (LoRA's init=eva, init=corda). The first call on a model records its
    base fingerprint (peftlab.fingerprint), before anything changes it.
    """
    steps = parse_strategy(spec)
    record_base(model)
    for p in model.parameters():
        p.requires_grad_(False)
    prepared = Prepared(steps)
    places = {}  # (host path, slot) -> the step whose module sits there (see _one_step_per_place)
    for step in steps:
        method = REGISTRY[step.method]
        opts = {k: o.default for k, o in method.options.items()} | step.options
        asks = inspect.signature(method.apply).parameters
        opts |= {k: v for k, v in (("tokenizer", tokenizer), ("calibration", calibration)) if k in asks}
        before = {id(m) for m in model.modules()}
        training = method.apply(model, **opts)
        for m in model.modules():
            if isinstance(m, Added) and id(m) not in before:
                m.method = step.method  # which step made it: the peft codec of that step saves it
        _one_step_per_place(model, step, before, places)
        if training is not None:
            if not isinstance(training, Training):
                raise TypeError(f"method {step.method} returned {type(training).__name__}; apply returns a Training or None")
            training.method = step.method  # how messages name it
            prepared.training.append(training)
        saved_as = (method.saved_as or {}) | (training.saved_as if training is not None else {})
        prepared.saved.append(Step(step.method, step.options | saved_as))
    if not trainable_parameters(model) and 0 not in prepared.unfreeze_at:
        raise UserError(f"strategy '{spec}' leaves nothing to train on this model")
    return prepared


def _one_step_per_place(model: nn.Module, step: Step, before: set, places: dict) -> None:
    """Refuse a step that puts a module where an earlier step of the same strategy put one:
    same layer, same kind of module (lora then dora: both LoRA deltas). Under one adapter name
    the second silently replaced the first; under two, the strategy could not be saved and
    loaded back (a saved strategy holds one adapter name)."""
    from .attach import attached

    for host, _, slot in attached(model):
        for child in slot.values():
            if id(child) in before:
                continue
            earlier = places.setdefault((host, slot.key), step.method)
            if earlier != step.method:
                raise UserError(f"{earlier} and {step.method} both put a {slot.key} module on {host}; a strategy holds one "
                                f"of them per layer (keep one step, or train them as separate adapters)")


def parameter_groups(prepared: Prepared, model: nn.Module, params, base: dict | None = None) -> list[dict]:
    """Optimizer groups for `params` (tensors of `model`), one per learning-rate multiplier the
    strategy's steps ask for, the plain group (×1) first; each is `base` plus params and `lr_scale`."""
    by_name = prepared.lr_scales(model)
    scale = {id(p): float(by_name[n]) for n, p in model.named_parameters() if n in by_name}
    groups = {}
    for p in params:
        groups.setdefault(scale.get(id(p), 1.0), []).append(p)
    return [(base or {}) | {"params": ps, "lr_scale": s} for s, ps in sorted(groups.items(), key=lambda kv: kv[0] != 1.0)]


def trainable_parameters(model: nn.Module) -> dict:
    """Name -> parameter for every parameter that currently requires a gradient."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


discover()  # every method file registers itself; nothing lists them
