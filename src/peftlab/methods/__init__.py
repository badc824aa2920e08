"""`prepare`, the seam between methods and the training loop (the registry is registry.py).

A method is a function `apply(model, **options)` registered under a name with the options it
accepts. It changes the model in place: it marks base parameters trainable (freezing methods)
or adds trainable modules (LoRA, adapters, prompts...). It may return a schedule
`{step: [parameter names]}` of parameters that become trainable later. The training loop only
sees which parameters require gradients; it never asks which method made them.
"""

import inspect
from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import UserError
from ..fingerprint import record as record_base
from ..spec import Step, parse
from .protocol import Added
from .registry import REGISTRY, Method, discover, register  # noqa: F401  (the package's face)


@dataclass
class Prepared:
    """What `prepare` did to a model: the parsed steps and any delayed unfreezing."""

    steps: list
    unfreeze_at: dict = field(default_factory=dict)  # step -> [parameter names]

    @property
    def spec(self) -> str:
        return "/".join(str(s) for s in self.steps)


def parse_strategy(spec: str) -> list[Step]:
    """Parse and validate a strategy string without touching any model."""
    return parse(spec, REGISTRY)


def prepare(model: nn.Module, spec: str, tokenizer=None) -> Prepared:
    """Apply strategy `spec` to `model` in place: freeze everything, then apply each method.

    `tokenizer` reaches methods that ask for it (prompt tuning's text init). The first call on
    a model records its base fingerprint (peftlab.fingerprint), before anything changes it.
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
        if "tokenizer" in inspect.signature(method.apply).parameters:
            opts["tokenizer"] = tokenizer
        before = {id(m) for m in model.modules()}
        schedule = method.apply(model, **opts)
        for m in model.modules():
            if isinstance(m, Added) and id(m) not in before:
                m.method = step.method  # which step made it: the peft codec of that step saves it
        _one_step_per_place(model, step, before, places)
        for at, names in (schedule or {}).items():
            prepared.unfreeze_at.setdefault(at, []).extend(names)
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


def lr_scales(model: nn.Module) -> dict:
    """id(parameter) -> learning-rate multiplier, for the parameters added modules scale
    (`Added.lr_scale`; LoRA+ trains B faster than A)."""
    scale = {}
    for m in model.modules():
        if isinstance(m, Added):
            for name, s in m.lr_scale.items():
                p = getattr(m, name, None)
                if p is not None:
                    scale[id(p)] = float(s)
    return scale


def parameter_groups(model: nn.Module, params, base: dict | None = None) -> list[dict]:
    """Optimizer groups for `params` (tensors of `model`), one per learning-rate multiplier,
    the plain group (×1) first; each group is `base` plus params and its `lr_scale`."""
    scale = lr_scales(model)
    groups = {}
    for p in params:
        groups.setdefault(scale.get(id(p), 1.0), []).append(p)
    return [(base or {}) | {"params": ps, "lr_scale": s} for s, ps in sorted(groups.items(), key=lambda kv: kv[0] != 1.0)]


def trainable_parameters(model: nn.Module) -> dict:
    """Name -> parameter for every parameter that currently requires a gradient."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


discover()  # every method file registers itself; nothing lists them
