"""Which part of the network each parameter belongs to, read from the module structure.

Names alone mislead (GPT-Neo's `wte`/`wpe` are embeddings, GPT-2's `c_attn` holds q, k and v
at once), so each architecture declares where its blocks, attention and MLP live; within that
frame a module's *type* decides embeddings and norms. `select` picks base parameters by
component, block range and name patterns (what the freezing methods train).
"""

import re
from dataclasses import dataclass, field

import torch.nn as nn

from .errors import UserError, close_matches
from .spec import user_regex


@dataclass(frozen=True)
class Arch:
    layers: str  # path of the nn.ModuleList of decoder blocks
    attn: str  # attention module, relative to a block
    mlp: str  # MLP module, relative to a block
    proj: dict = field(default_factory=dict)  # projection module name -> 'q' | 'k' | 'v' | 'o' | 'qkv'


_LLAMA = Arch("model.layers", "self_attn", "mlp", {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"})
ARCHS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma3_text": _LLAMA,
    "gemma2": _LLAMA,
    "mixtral": _LLAMA,  # mixtures of experts: the MLP is a router and stacked expert weights
    "qwen3_moe": _LLAMA,
    "gpt_neo": Arch("transformer.h", "attn.attention", "mlp",
                    {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}),
    "gpt2": Arch("transformer.h", "attn", "mlp", {"c_attn": "qkv", "c_proj": "o"}),
}

# Components a user can name in `freeze:train=...`; `attention` is q+k+v+o.
COMPONENTS = ("embed", "q", "k", "v", "o", "attention", "mlp", "norm", "lm_head", "bias")


def arch_of(model) -> Arch:
    mtype = getattr(model.config, "model_type", "?")
    if mtype not in ARCHS:
        raise UserError(f"architecture '{mtype}' is not supported; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[mtype]


def blocks(model) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers)


def num_layers(model) -> int:
    return len(blocks(model))


@dataclass(frozen=True)
class Where:
    """Where one parameter sits: component, block index (None outside blocks), is it a bias."""

    component: str  # embed | attn.q | attn.k | attn.v | attn.o | attn.qkv | mlp | norm | lm_head | added | other
    layer: int | None
    bias: bool


def _is_norm(module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def classify_module(model, name: str, module) -> tuple[str, int | None]:
    """Component and layer of module `name` (a path from model.named_modules())."""
    arch = arch_of(model)
    if isinstance(module, nn.Embedding):
        component = "embed"
    elif module is model.get_output_embeddings():
        component = "lm_head"
    elif _is_norm(module):
        component = "norm"
    else:
        component = "other"
    m = re.match(re.escape(arch.layers) + r"\.(\d+)(?:\.(.*))?$", name)
    if not m:
        return component, None
    layer, rel = int(m.group(1)), m.group(2) or ""
    if component == "other":
        if rel == arch.mlp or rel.startswith(arch.mlp + "."):
            component = "mlp"
        elif rel.startswith(arch.attn + "."):
            proj = rel[len(arch.attn) + 1 :].split(".")[0]
            component = "attn." + arch.proj[proj] if proj in arch.proj else "other"
    return component, layer


def where(model) -> dict[str, Where]:
    """Map every (de-duplicated) parameter name to its Where."""
    modules = dict(model.named_modules())
    added = tuple(n + "." for n, m in modules.items() if getattr(m, "_peftlab_added", False))
    out = {}
    for pname, _ in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        component, layer = classify_module(model, owner, modules[owner])
        if (owner + ".").startswith(added):  # inside a module a method added
            component = "added"
        out[pname] = Where(component, layer, leaf == "bias")
    return out


def matches(w: Where, wanted: str) -> bool:
    """Does a parameter at `w` belong to the user-facing component `wanted`?"""
    c = w.component
    if wanted == "bias":
        return w.bias and c != "added"
    if wanted == "attention":
        return c.startswith("attn.")
    if wanted in ("q", "k", "v"):
        return c in (f"attn.{wanted}", "attn.qkv")
    if wanted == "o":
        return c == "attn.o"
    return c == wanted


def check_component(name: str) -> str:
    if name not in COMPONENTS:
        raise UserError(f"unknown component '{name}'{close_matches(name, COMPONENTS)}; valid: {', '.join(COMPONENTS)}")
    return name


def parse_layers(text: str, n_layers: int) -> range:
    """'6-11' or '6' -> range of block indices; checked against the model's depth."""
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", str(text).strip())
    if not m:
        raise UserError(f"bad layer range '{text}': write A-B (e.g. 6-11) or a single index")
    a, b = int(m.group(1)), int(m.group(2) or m.group(1))
    if a > b or b >= n_layers:
        raise UserError(f"layer range {text} is outside the model, which has blocks 0-{n_layers - 1}")
    return range(a, b + 1)


def is_conv1d(module) -> bool:
    """GPT-2's Conv1D: a linear layer that stores its weight as (in, out), not (out, in)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def select(model, train=(), layers=None, include=None, exclude=None) -> list[str]:
    """Names of base parameters picked by components, a block range and name regexes."""
    for c in train:
        check_component(c)
    wanted_qkv = {"q", "k", "v"} & set(train)
    if arch_of(model).proj.get("c_attn") == "qkv" and wanted_qkv and wanted_qkv != {"q", "k", "v"}:
        raise UserError(f"{model.config.model_type} fuses q, k and v in one matrix; train q+k+v together or 'attention'")
    span = parse_layers(layers, num_layers(model)) if layers else None
    inc = user_regex(include, "freeze: include") if include else None
    exc = user_regex(exclude, "freeze: exclude") if exclude else None
    picked = []
    for name, w in where(model).items():
        if w.component == "added":
            continue
        hit = any(matches(w, c) for c in train) or bool(inc and inc.search(name))
        if span is not None and w.layer not in span:
            hit = False
        if exc and exc.search(name):
            hit = False
        if hit:
            picked.append(name)
    return picked


def unfreeze(model, names) -> None:
    """Make the named base parameters trainable (freeze, bitfit, schedule)."""
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
