"""(IA)³: a learned vector l per target layer rescales its activations (Liu et al., 2022).

    ordinary targets:     y = l ⊙ (W x + b),   l ∈ R^m, stored (m, 1)  (peft's ia3_l)
    feedforward targets:  y = W (l ⊙ x) + b,   l ∈ R^n, stored (1, n)

l starts at 1 (the identity). Trainable: Σ m over ordinary targets + Σ n over feedforward ones;
on Llama-style models peft's default is k_proj, v_proj (ordinary) and down_proj (feedforward).

Merging is multiplicative, not additive: W' = diag(l) W, b' = l ⊙ b (ordinary) and
W' = W diag(l) (feedforward). Both are `W * l` with l in its stored shape, because (m, 1) and
(1, n) broadcast against W (m, n); unmerge divides. The effective ΔW is W ⊙ (l − 1).

A feedforward vector scales the layer's *input*, so it runs as a forward pre-hook: the layer
computes W (l ⊙ x) + b itself, with no second matmul to correct a finished output. Several
active adapters on one layer multiply their vectors, as in peft.
"""

import re

import torch
import torch.nn as nn

from ..components import is_conv1d
from ..errors import UserError
from ..spec import Option, Step, user_regex
from .attach import apply, attach
from .protocol import Added
from .registry import PeftCodec, peft_fields, register
from .targets import base_weight, dims, linear_layers, pick_targets, target_options, write_weight

# peft 0.21's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_MODULES_MAPPING
# for the architectures peftlab knows: (targets, feedforward). An entry with a dot is a path
# suffix (GPT-2 has c_proj twice: attn.c_proj and mlp.c_proj).
DEFAULTS = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
}


class IA3(Added):
    """Output scaling of one linear layer: y ← l ⊙ y, l stored (out, 1) like peft's ia3_l."""

    slot = "ia3"
    label = "IA3"
    peft_keys = {"l": "ia3_l"}
    feedforward = False

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.l = nn.Parameter(torch.ones(d_out, 1))  # (out, 1): broadcasts over W's rows

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # base_out: (..., out) = W x + b; computed in l's dtype, returned in the layer's (as peft)
        return (base_out * self.l.reshape(-1)).to(base_out.dtype)

    def delta_weight(self, layer: nn.Module) -> torch.Tensor:
        """W ⊙ (l − 1), (out, in) fp32: the unmerged layer's effective change."""
        return base_weight(layer).float() * (self.l.float() - 1)

    def merge(self, layer: nn.Module) -> None:
        w, l = base_weight(layer).float(), self.l.detach().float()
        bias = layer.bias if not self.feedforward else None
        # A zero in l erases what it scales; keep the originals then, so unmerge stays exact.
        self._kept = None if bool((l != 0).all()) else (w.clone(), None if bias is None else bias.detach().clone())
        write_weight(layer, w * l)
        if bias is not None:
            bias.data.copy_((bias.float() * l.reshape(-1)).to(bias.dtype))

    def unmerge(self, layer: nn.Module) -> None:
        bias = layer.bias if not self.feedforward else None
        if getattr(self, "_kept", None) is not None:
            w, b = self._kept
            write_weight(layer, w)
            if b is not None:
                bias.data.copy_(b)
            self._kept = None
            return
        l = self.l.detach().float()
        write_weight(layer, base_weight(layer).float() / l)
        if bias is not None:
            bias.data.copy_((bias.float() / l.reshape(-1)).to(bias.dtype))


class IA3Input(IA3):
    """Input scaling of one feedforward linear layer: x ← l ⊙ x, l stored (1, in) like peft's."""

    slot = "ia3_in"
    feedforward = True

    def __init__(self, d_in: int, d_out: int):
        Added.__init__(self)
        self.l = nn.Parameter(torch.ones(1, d_in))  # (1, in): broadcasts over W's columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in), the layer's input; the layer then computes W (l ⊙ x) + b
        return (x * self.l.reshape(-1)).to(x.dtype)


def input_hook(layer, args, kwargs):
    """Forward pre-hook of feedforward targets: scale the input (per row when routed)."""
    # linear layers take their input positionally: args = (x,)
    x = apply(getattr(layer, IA3Input.slot), args[0], lambda child, rows, xx: child(xx))
    return (x, *args[1:]), kwargs


def _suffix_regex(entries) -> str:
    return r"(^|\.)(" + "|".join(re.escape(t) for t in entries) + r")$"


def _is_feedforward(path: str, feedforward, feedforward_regex) -> bool:
    """peft's rule: a list entry matches when the path ends with it; a regex (text or compiled)
    must match the whole path."""
    if isinstance(feedforward_regex, str):
        feedforward_regex = user_regex(feedforward_regex, "ia3: feedforward_regex")
    return any(path.endswith(f) for f in feedforward) or bool(feedforward_regex and feedforward_regex.fullmatch(path))


def choose(model, targets, feedforward, target_regex, feedforward_regex, layers) -> dict:
    """{path: (layer, is feedforward)} for the options (None: peft's default for the architecture)."""
    mtype = model.config.model_type
    if (targets is None and target_regex is None) or feedforward is None:
        if mtype not in DEFAULTS:
            raise UserError(f"ia3: no default targets for architecture '{mtype}'; give targets=... and feedforward=...")
    if targets is None:
        targets = DEFAULTS[mtype][0] if target_regex is None else ()
    given_ff = feedforward is not None
    feedforward = DEFAULTS[mtype][1] if feedforward is None else feedforward
    paths = [t for t in targets if "." in t]  # path suffixes such as mlp.c_proj
    for t in paths:
        if not any(n.endswith("." + t) for n in linear_layers(model)):
            raise UserError(f"ia3: target '{t}' names no linear layer of this model")
    if target_regex:  # checked alone: the suffix regex below must not hide that it matches nothing
        pick_targets(model, (), target_regex, None, "ia3")
    rx = "|".join(f"(?:{r})" for r in ([target_regex] if target_regex else []) + ([_suffix_regex(paths)] if paths else []))
    ff_rx = user_regex(feedforward_regex, "ia3: feedforward_regex") if feedforward_regex else None
    chosen = pick_targets(model, tuple(t for t in targets if "." not in t), rx or None, layers, "ia3")
    if given_ff:
        leaves = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in chosen}))
        for f in feedforward:
            if not any(p.endswith(f) for p in chosen):
                raise UserError(f"ia3: feedforward '{f}' names none of the targets ({leaves})")
    return {p: (m, _is_feedforward(p, feedforward, ff_rx)) for p, m in chosen.items()}


# ---- peft's IA3Config --------------------------------------------------------------------

def _suffixes(paths: set, universe) -> list | None:
    """The shortest path endings (leaf, or parent.leaf) that peft's list matching turns into
    exactly `paths` among `universe`; None when no such list exists (then a regex is written)."""
    groups = {}
    for p in paths:
        groups.setdefault(p.rsplit(".", 1)[-1], set()).add(p)
    out = []
    for group in groups.values():
        for k in (1, 2):
            names = {".".join(p.split(".")[-k:]) for p in group}
            if {u for u in universe if any(u == s or u.endswith("." + s) for s in names)} == group:
                out += sorted(names)
                break
        else:
            return None
    return sorted(out)


def to_peft(model, step: Step, hosts: dict) -> dict:
    """IA3Config fields for the vectors `hosts` ({module path: IA3 / IA3Input})."""
    paths = set(hosts)
    ff = {h for h, c in hosts.items() if c.feedforward}
    exact = lambda ps: "(" + "|".join(re.escape(p) for p in sorted(ps)) + ")"  # noqa: E731  peft: re.fullmatch
    targets = _suffixes(paths, linear_layers(model))
    if not ff:
        feedforward = []
    elif targets is not None:
        feedforward = [t for t in targets if all(p in ff for p in paths if p == t or p.endswith("." + t))]
        if {p for p in paths if any(p.endswith(f) for f in feedforward)} != ff:  # peft's raw endswith
            feedforward = exact(ff)
    else:
        feedforward = exact(ff)
    return {"peft_type": "IA3", "target_modules": exact(paths) if targets is None else targets,
            "feedforward_modules": feedforward, "exclude_modules": None, "init_ia3_weights": True,
            "fan_in_fan_out": any(is_conv1d(model.get_submodule(h)) for h in hosts)}


def from_peft(config: dict, where) -> Step:
    """The `ia3` step equivalent to a peft IA3Config (None lists: peft's architecture default)."""
    if config.get("exclude_modules") not in (None, [], ""):
        raise UserError(f"{where}: peft option exclude_modules={config['exclude_modules']!r} is not supported by peftlab")
    options = target_options(config, where) if config.get("target_modules") is not None else {}
    ff = config.get("feedforward_modules")
    if isinstance(ff, str):
        options["feedforward_regex"] = ff
    elif ff is not None:
        options["feedforward"] = tuple(ff)
    if any(c in x for x in (str(options.get("feedforward_regex", "")), *options.get("feedforward", ())) for c in "+,"):
        raise UserError(f"{where}: feedforward_modules {ff!r} holds '+' or ',', which a peftlab strategy cannot carry")
    return Step("ia3", options)


@register(
    "ia3", peft=PeftCodec("IA3", to_peft, from_peft, fields=peft_fields(
        "target_modules exclude_modules feedforward_modules fan_in_fan_out modules_to_save init_ia3_weights")),
    targets=Option(None, "list", help="leaf names or path suffixes, or all-linear (default: peft's for the model)"),
    feedforward=Option(None, "list", help="targets that scale their input: path endings (default: the MLP's down projection)"),
    target_regex=Option(None, "regex", help="regex searched in module paths (alone, it replaces the default targets)"),
    feedforward_regex=Option(None, "regex", help="regex a feedforward target's whole path matches"),
    layers=Option(None, help="blocks: A-B, or indices joined with +"),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0, help="unused: l starts at 1"),
)
def ia3(model, targets, feedforward, target_regex, feedforward_regex, layers, name, seed):
    """(IA)³: learned vectors rescale chosen layers' outputs (or, feedforward, their inputs)."""
    for path, (layer, ff) in choose(model, targets, feedforward, target_regex, feedforward_regex, layers).items():
        child = (IA3Input if ff else IA3)(*dims(layer)).to(layer.weight.device)
        attach(layer, name, child, input_hook if ff else None, pre=ff)
