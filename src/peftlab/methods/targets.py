"""Which linear layers a method reaches, and how to read and write their weights whatever
their layout (nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out))."""

import re

import torch
import torch.nn as nn

from ..components import arch_of, is_conv1d, num_layers, parse_layers, where
from ..errors import UserError, close_matches
from ..spec import clip, user_regex


def dims(linear: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer, however its weight is stored."""
    if is_conv1d(linear):
        return linear.weight.shape[0], linear.nf
    return linear.in_features, linear.out_features


def base_weight(linear: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in); GPT-2's Conv1D stores (in, out)."""
    return linear.weight.T if is_conv1d(linear) else linear.weight


def write_weight(layer: nn.Module, w_out_in: torch.Tensor) -> None:
    """Store an (out, in) weight into `layer` in its own layout and dtype."""
    value = w_out_in.T if is_conv1d(layer) else w_out_in
    layer.weight.data.copy_(value.to(layer.weight.dtype))


def linear_layers(model) -> dict:
    """Path -> module for every linear layer (nn.Linear or Conv1D) inside the decoder blocks."""
    out = {}
    places = where(model)
    layers_prefix = arch_of(model).layers + "."
    for name, module in model.named_modules():
        if name.startswith(layers_prefix) and (isinstance(module, nn.Linear) or is_conv1d(module)):
            if places.get(name + ".weight") is None or places[name + ".weight"].component != "added":
                out[name] = module
    return out


def gpt2_names(model, targets) -> tuple:
    """GPT-2 keeps q, k and v in one matrix (c_attn): map those names onto it."""
    if arch_of(model).proj.get("c_attn") == "qkv":
        targets = tuple("c_attn" if t in ("q_proj", "v_proj", "k_proj") else t for t in targets)
    return tuple(dict.fromkeys(targets))


def block_of(model, path: str) -> int | None:
    """Index of the decoder block a module path lies in."""
    prefix = arch_of(model).layers + "."
    return int(path[len(prefix):].split(".")[0]) if path.startswith(prefix) else None


DEFAULT_TARGETS = ("q_proj", "v_proj")
TARGETS_HELP = "leaf module names, or all-linear (default: q_proj+v_proj, none when target_regex is given)"
REGEX_HELP = "regex searched in module paths; alone it chooses, with targets a layer either picks is chosen"
EXCLUDE_HELP = "regex searched in module paths: a layer it matches is never a target (peft's exclude_modules)"


def pick_targets(model, targets, target_regex=None, layers=None, method: str = "lora", exclude=None) -> dict:
    """Resolve `targets` (leaf names or 'all-linear'), a regex over module paths and a block
    range ('A-B', or a '+'-joined list of block indices) to {path: module}.

    targets=None (not given): DEFAULT_TARGETS, or nothing when `target_regex` is given — then
    the regex alone chooses, as peft's target_modules given as a string does. Both given: a
    layer either picks is chosen. The regex is searched in each path (anchor it with ^...$ to
    match whole paths) and must match at least one linear layer: a regex that matches none is
    a mistake, not a request for the default layers. `exclude` (a regex searched in paths, as
    peft's exclude_modules) removes layers from the choice; one that removes them all is refused."""
    candidates = linear_layers(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    span = block_set(layers, num_layers(model)) if layers else None
    if targets is None:
        targets = () if target_regex else DEFAULT_TARGETS
    targets = gpt2_names(model, targets)
    for t in targets:
        if t != "all-linear" and t not in leaves:
            raise UserError(f"target module '{t}' is not in this model{close_matches(t, leaves)}; linear layers: {', '.join(leaves)}")
    rx = user_regex(target_regex, f"{method}: target_regex") if target_regex else None
    if rx is not None and not any(rx.search(name) for name in candidates):
        example = next(iter(candidates), "")
        raise UserError(f"{method}: target_regex '{clip(target_regex, 80)}' matches no linear layer of this model; it is "
                        f"searched in module paths such as {example} (linear layers: {', '.join(leaves)})")
    chosen = {}
    for name, module in candidates.items():
        leaf = name.rsplit(".", 1)[-1]
        hit = "all-linear" in targets or leaf in targets or bool(rx and rx.search(name))
        if span is not None and block_of(model, name) not in span:
            hit = False
        if hit:
            chosen[name] = module
    if exclude and chosen:
        rx_out = user_regex(exclude, f"{method}: exclude")
        kept = {n: m for n, m in chosen.items() if not rx_out.search(n)}
        if not kept:
            raise UserError(f"{method}: exclude={clip(exclude, 80)} removes every chosen layer ({len(chosen)}, e.g. "
                            f"{next(iter(chosen))}); nothing would train")
        chosen = kept
    if not chosen:
        asked = " and ".join(x for x in (f"targets={'+'.join(targets)}" if targets else "",
                                         f"target_regex={clip(target_regex, 80)}" if target_regex else "") if x) or "targets="
        where = f" in blocks {layers}" if span is not None else ""
        raise UserError(f"{method}: no linear layer matches {asked}{where}; linear layers: {', '.join(leaves)}")
    return chosen


def block_set(text, n_layers: int) -> set:
    """'6-11', '6' or '0+3+5' -> the set of block indices, checked against the model's depth."""
    out = set()
    for part in str(text).split("+"):
        out.update(parse_layers(part, n_layers))
    return out


# ---- peft's names for the same choice (target_modules, layers_to_transform) ---------------

def peft_targets(model, hosts) -> dict:
    """peft config fields that select exactly the layers `hosts` (module paths): leaf names when
    they cover every such layer (in all blocks, or in some: layers_to_transform), else a regex
    of the exact paths."""
    leaves = sorted({h.rsplit(".", 1)[-1] for h in hosts})
    every = {n for n in linear_layers(model) if n.rsplit(".", 1)[-1] in leaves}
    layers = sorted({block_of(model, h) for h in hosts})
    if every == set(hosts):
        targets, layers = leaves, None
    elif {n for n in every if block_of(model, n) in layers} == set(hosts):
        targets = leaves  # the same leaves in a subset of blocks
    else:
        targets, layers = "(" + "|".join(re.escape(h) for h in sorted(hosts)) + ")", None
    return {"target_modules": targets, "layers_to_transform": layers, "layers_pattern": None}


def target_options(config: dict, where) -> dict:
    """targets / target_regex / layers from peft's target_modules, layers_to_transform and
    layers_pattern (shared by every peft config that targets linear layers)."""
    options = {}
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        user_regex(targets, f"{where}: target_modules")  # refused here, naming the file, if it can backtrack badly
        options["target_regex"] = f"^({targets})$"  # peft: a string is a regex matched in full
        options["targets"] = ()
    elif targets and any("." in t for t in targets):  # module paths: peft matches them as suffixes
        options["target_regex"] = r"(^|\.)(" + "|".join(re.escape(t) for t in targets) + ")$"
        options["targets"] = ()
    else:
        options["targets"] = ("all-linear",) if targets == "all-linear" else tuple(targets or ())
    if "+" in options.get("target_regex", "") or "," in options.get("target_regex", ""):
        raise UserError(f"{where}: target_modules {targets!r} holds '+' or ',', which a peftlab strategy cannot carry")
    excluded = config.get("exclude_modules")
    if excluded:  # peft: a string is a regex matched in full; a list holds paths or their endings
        if isinstance(excluded, str):
            user_regex(excluded, f"{where}: exclude_modules")
            options["exclude"] = f"^({excluded})$"
        else:
            options["exclude"] = r"(^|\.)(" + "|".join(re.escape(t) for t in excluded) + ")$"
        if "+" in options["exclude"] or "," in options["exclude"]:
            raise UserError(f"{where}: exclude_modules {excluded!r} holds '+' or ',', which a peftlab strategy cannot carry")
    layers = config.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else sorted(layers)
        options["layers"] = "+".join(map(str, layers))
        pattern = config.get("layers_pattern")
        if pattern not in (None, "", [], "layers", "h", ["layers"], ["h"]):
            raise UserError(f"{where}: layers_pattern {pattern!r} names no block list of this model (peftlab knows "
                            "each architecture's blocks: model.layers, transformer.h)")
    return options
