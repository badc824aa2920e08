"""Modules to save: a full trainable copy of chosen modules (peft's modules_to_save).

    y = f(x; θ')   θ' = a copy of the module's own parameters θ, trained; θ stays frozen

The copy starts equal to θ, so the model starts at its base. Trainable: Σ |θ| over the named
modules (lm_head on SmolLM2: V·d = 49152·576). A tied lm_head (its weight *is* the input
embedding's) gets a copy of its own: only the output layer changes, as in peft. With
`tie=true` (peft's ensure_weight_tying) the copy is shared instead: the module tied to it gets
a copy whose weight is the same trained tensor, so input and output embeddings stay one
matrix — trained once, counted once, saved under both names, merged into the one base weight.

Cost: the copy runs after the base module (a forward hook replaces the output), so each named
module computes twice; the base pass is wasted work, largest for lm_head (B·T·V·d flops).

Names follow peft's rule: a module is chosen when its path ends with a name (`norm` also picks
`input_layernorm`; write a path, `model.norm`, for one module). Only leaf modules with weights
(linear, embedding, norm layers) can be copied: a hook sees a module's positional input only.

Merging copies θ' into the module and keeps θ for `unmerge`; refused for a tied module without
`tie=true`, whose weight is another module's too. ΔW (tracking) = W' − W.

peft's format has no standalone type for it: it rides inside a LoRA config as
`modules_to_save`, tensors base_model.model.<module>.<parameter name> (e.g. lm_head.weight).
"""

import copy

import torch
import torch.nn as nn

from ..compat import drop_forward_hooks
from ..errors import UserError, close_matches
from ..spec import Option, Step
from .attach import Slot, attach, base_modules
from .protocol import Added
from .registry import PeftCodec, register
from .targets import base_weight

DEFAULT = ("lm_head",)


class ModuleCopy(Added):
    """A trainable deep copy (`module`) of one leaf module; its output replaces the base's."""

    slot = "copy"
    label = "modules to save"

    def __init__(self, module: nn.Module, shared_with: str | None = None, follows: str | None = None):
        super().__init__()
        self.module = module
        self.peft_keys = {f"module.{n}": n for n, _ in module.named_parameters(remove_duplicate=False)}
        self.shared_with = shared_with  # another module whose weight is the host's (tied, not tie=true), or None
        self.follows = follows  # tie=true: the module whose copy holds the trained weight (that one merges)
        self._originals = {}  # the host's own parameters while merged

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return self.module(x)  # the base output is discarded

    def head_weight(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The output layer's weight as a loss that multiplies hidden states by it itself
        sees it (loss.py's chunked head bypasses the layer's hooks): the copy's, (V, d)."""
        return self.module.weight

    def delta_weight(self, layer: nn.Module) -> torch.Tensor:
        """W' − W in (out, in) layout (Conv1D transposed); modules without a weight: all
        parameters' differences, flattened."""
        if getattr(layer, "weight", None) is not None:
            return base_weight(self.module).float() - base_weight(layer).float()
        own = dict(layer.named_parameters(recurse=False))
        return torch.cat([(p.float() - own[n].float()).reshape(-1) for n, p in self.module.named_parameters()])

    def stored(self) -> dict:
        return dict(self.named_parameters(remove_duplicate=False))

    def merge(self, layer: nn.Module) -> None:
        if self.shared_with:
            raise UserError(f"modules: this module's weight is also {self.shared_with} (tied); merging its trained "
                            "copy would change that module too; train it with tie=true, or keep the copy as an adapter")
        if self.follows:  # the base weight is the followed module's: its copy writes it once
            return
        self._originals = {n: p.detach().clone() for n, p in layer.named_parameters(recurse=False)}
        for n, p in self.module.named_parameters():
            getattr(layer, n).data.copy_(p.detach())

    def unmerge(self, layer: nn.Module) -> None:
        if self.follows:
            return
        for n, p in self._originals.items():
            getattr(layer, n).data.copy_(p)
        self._originals = {}


def fresh_copy(host: nn.Module) -> nn.Module:
    """A deep copy of `host` without the adapters and hooks peftlab attached to it."""
    slots = {k: v for k, v in host.named_children() if isinstance(v, Slot)}
    clone = copy.deepcopy(host, {id(v): None for v in slots.values()})  # slots are not copied
    for k in slots:
        delattr(clone, k)
    clone.__dict__.pop("_peftlab_hooks", None)
    drop_forward_hooks(clone)
    return clone


def chosen(model, names) -> dict:
    """{path: module} for every module whose path ends with one of `names` (peft's rule)."""
    modules = {p: m for p, m in base_modules(model).items() if p}
    leaves = sorted({p.rsplit(".", 1)[-1] for p, m in modules.items() if _is_leaf(m)})
    out = {}
    for name in names:
        hits = {p: m for p, m in modules.items() if p.endswith(name)}
        if not hits:
            raise UserError(f"modules: '{name}' is not in this model{close_matches(name, leaves)}; modules with weights: "
                            f"{', '.join(leaves)}")
        for p, m in hits.items():
            if not _is_leaf(m):
                raise UserError(f"modules: {p} is a block of modules; name leaf modules with weights: {', '.join(leaves)}")
        out.update(hits)
    return out


def _is_leaf(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) and not any(
        not isinstance(c, Slot) for c in m.children())


def _shared(model, path: str, host: nn.Module) -> str | None:
    """Another module's parameter name that is one of `host`'s parameters (tied weights)."""
    own = {id(p) for p in host.parameters(recurse=False)}
    mine = {f"{path}.{n}" for n, _ in host.named_parameters(recurse=False)}
    return next((n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in own and n not in mine), None)


# ---- modules_to_save inside a LoraConfig ------------------------------------------------

def inside(model, step: Step, hosts: dict) -> dict:
    return {"modules_to_save": list(step.options.get("names", DEFAULT)), "ensure_weight_tying": bool(step.options.get("tie"))}


def read_inside(config: dict, where):
    names = config.get("modules_to_save")
    if not names:
        return None
    if isinstance(names, str):
        names = [names]
    for n in names:
        if any(c in n for c in ",+/"):
            raise UserError(f"{where}: modules_to_save entry {n!r} holds ',', '+' or '/', which a peftlab strategy cannot carry")
    return Step("modules", {"names": tuple(names), "tie": bool(config.get("ensure_weight_tying"))})


@register(
    "modules", examples=("modules:names=lm_head",), peft=PeftCodec(None, inside=inside, read_inside=read_inside, fields=frozenset({"modules_to_save"})),  # peft: only inside LoRA
    names=Option(DEFAULT, "list", help="modules to copy and train: names or paths (peft's suffix rule), joined with +"),
    tie=Option(False, "bool", help="a module tied to a chosen one shares its trained copy (peft's ensure_weight_tying)"),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)
def modules(model, names, tie, name, seed):
    """Train a full copy of chosen modules (peft's modules_to_save), e.g. lm_head."""
    if not names:
        raise UserError("modules: give the modules to train, e.g. modules:names=lm_head")
    done = set()
    for path, host in chosen(model, names).items():
        if path in done:
            continue
        partner = _shared(model, path, host)  # "<other module>.<parameter>" sharing host's weight, or None
        child = ModuleCopy(fresh_copy(host), None if tie else partner).requires_grad_(True)
        attach(host, name, child)
        done.add(path)
        if not tie:
            continue
        if partner is None:
            raise UserError(f"modules: tie=true, but {path}'s weight is tied to no other module of this model")
        other_path, param = partner.rsplit(".", 1)
        other = model.get_submodule(other_path)
        mirror = fresh_copy(other)
        setattr(mirror, param, child.module.weight)  # (V, d): the same tensor as the chosen copy's weight
        attach(other, name, ModuleCopy(mirror, follows=path).requires_grad_(True))
        done.add(other_path)
