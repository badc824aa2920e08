"""Many named adapters on one base: switch, disable, delete, combine, route per row.

    load(model, "runs/a/adapter", name="a"); load(model, "runs/b/adapter", name="b")
    set_active(model, "b")
    with disabled(model): ...            # base outputs
    combine(model, {"a": 0.5, "b": 0.5}, "ab", how="cat")
    model(input_ids=ids, adapter_names=["a", "b", "__base__"])   # one adapter per row
"""

from contextlib import contextmanager

import torch

from .errors import UserError
from .mixing import HOW
from .methods.attach import attached, check_name, detach, route, unroute

BASE = "__base__"  # a row that should see no adapter


def adapter_names(model) -> list[str]:
    """Names of every adapter attached anywhere in `model`, in first-seen order."""
    names = {}
    for _, _, children in attached(model):
        names.update(dict.fromkeys(children))
    return list(names)


def _children(model):
    for host_name, host, children in attached(model):
        yield children.key, host, children


def _known(model, names) -> None:
    have = adapter_names(model)
    for n in names:
        if n not in have:
            raise UserError(f"no adapter named '{n}'; loaded: {', '.join(have) or 'none'}")


def set_active(model, *names: str) -> None:
    """Make exactly `names` active (several LoRA adapters add up)."""
    _known(model, names)
    for _, _, children in _children(model):
        for n, child in children.items():
            child.active = n in names


def active_names(model) -> list[str]:
    return [n for n in adapter_names(model) if any(c[n].active for _, _, c in _children(model) if n in c)]


@contextmanager
def disabled(model):
    """Inside the block the model computes as its base; the previous state returns after."""
    before = [(child, child.active) for _, _, children in _children(model) for child in children.values()]
    try:
        for child, _ in before:
            child.active = False
        yield model
    finally:
        for child, state in before:
            child.active = state


def delete(model, name: str) -> None:
    """Remove adapter `name` everywhere (its hooks too, where a layer is left without adapters)."""
    _known(model, [name])
    for slot, host, children in list(_children(model)):
        if name in children:
            detach(host, slot, name)


def _check_routes(model, names, rows: int | None = None) -> list:
    """What routing must refuse, as peft does, one line each: names that are not loaded, a count
    of names that is not the batch's row count, and any merged adapter (its ΔW is in the base
    weights, so every row — `__base__` ones too — would get it, and rows naming it twice)."""
    if isinstance(names, str) or not hasattr(names, "__len__"):
        raise UserError(f"adapter_names must be a list with one adapter name per batch row, got {names!r}")
    _known(model, [n for n in names if n not in (None, BASE)])
    if rows is not None and len(names) != rows:
        raise UserError(f"adapter_names has {len(names)} names for a batch of {rows} rows; give one per row")
    merged = sorted({n for _, _, children in _children(model) for n, c in children.items() if c.merged})
    if merged:
        raise UserError(f"adapter {', '.join(repr(n) for n in merged)} is merged into the base weights, so every row "
                        "would get it; unmerge it (peftlab.merge.unmerge) before routing rows")
    return [BASE if n is None else n for n in names]


@contextmanager
def per_row(model, names: list):
    """Route batch row i through adapter names[i] (`__base__` or None: no adapter). A batch of
    another size than len(names) is refused when it runs (attach.apply)."""
    saved = route(model, _check_routes(model, names))
    try:
        yield model
    finally:
        unroute(saved)


def _route_kwarg(model, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        batch = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        names = _check_routes(model, names, batch.shape[0] if batch is not None else None)
        model.__dict__["_peftlab_rows_before"] = route(model, names)
    return args, kwargs


def _unroute(model, args, output):
    if "_peftlab_rows_before" in model.__dict__:
        unroute(model.__dict__.pop("_peftlab_rows_before"))
    return output


def enable_adapter_names_kwarg(model) -> None:
    """Let `model(..., adapter_names=[...])` route rows, like HF peft (idempotent)."""
    if "_peftlab_route" not in model.__dict__:
        model.__dict__["_peftlab_route"] = (
            model.register_forward_pre_hook(_route_kwarg, with_kwargs=True),
            model.register_forward_hook(_unroute, always_call=True),  # also when the forward raises
        )


COMBINATIONS = ("cat", "svd", *HOW, *(f"{h}_svd" for h in HOW if h != "linear"))


@torch.no_grad()
def combine(model, weights: dict, name: str, how: str = "cat", rank: int | None = None, density: float = 1.0,
            sign: str = "total", seed: int = 0) -> None:
    """Add adapter `name` = a weighted combination of existing low-rank adapters (LoRA), as
    peft's add_weighted_adapter makes it (the same ways, the same numbers).

    how="cat":    A = [A_1; …; A_k], B = [w_1 s_1 B_1, …, w_k s_k B_k], s = 1
                  → ΔW = Σ w_i ΔW_i exactly; rank Σ r_i (mixed ranks are fine).
    how="svd":    ΔW = Σ w_i ΔW_i truncated to `rank` by SVD: B = U_r S_r, A = V_rᵀ, s = 1.
    how="linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" (mixing.py): equal
                  ranks; the rule applied to the A_i weighted by sign(w_i)√|w_i s_i| and to the
                  B_i weighted by √|w_i s_i|, s = 1 (linear: exact when the adapters share A or B).
    how="<rule>_svd": the rule applied to the whole ΔW_i, then truncated to `rank` by SVD.
    `density`: the fraction of entries TIES / DARE / magnitude pruning keep; `sign`: TIES'
    election by "total" (sum) or "frequency" (count); `seed`: DARE's random masks.
    Each added module type says whether and how it combines (the protocol's `combine`).
    """
    check_name(name)
    _known(model, weights)
    if name in adapter_names(model):
        raise UserError(f"an adapter named '{name}' exists already; delete it or choose another name")
    if how not in COMBINATIONS:
        raise UserError(f"combine: how must be one of {', '.join(COMBINATIONS)}, got '{how}'")
    if how.endswith("svd") and (rank is None or rank <= 0):
        raise UserError(f"combine: how={how} needs a positive rank")
    if not 0 < density <= 1:
        raise UserError(f"combine: density={density} must be in (0, 1], the fraction of entries kept")
    if sign not in ("total", "frequency"):
        raise UserError(f"combine: sign must be total or frequency, got '{sign}'")
    gen = torch.Generator().manual_seed(seed)
    for host_name, layer, slot in list(attached(model)):
        parts = [(slot[n], w) for n, w in weights.items() if n in slot]
        if not parts:
            continue
        kind = type(parts[0][0])
        if any(type(d) is not kind for d, _ in parts):
            raise UserError(f"combine works on adapters of one kind; {host_name} holds {kind.slot} and others")
        new = kind.combine(parts, how, rank, density, sign, gen)
        new.method = parts[0][0].method
        new.active = False
        new.requires_grad_(False)
        slot[name] = new
