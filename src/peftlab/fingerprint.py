"""Which base an adapter was trained on: a cheap fingerprint of a base model's tensors.

Per floating base tensor: its shape and the sum of 16 evenly spaced entries. Cheap (no full
pass over the weights) yet enough to tell one base from another; compared with a tolerance so
a base kept in bf16 still matches its fp32 self.

The fingerprint is taken once per model, when a strategy is first applied to it
(`methods.prepare`, before anything trains), and kept on the model: tensors that a full or
freeze strategy later trains and saves are fingerprinted by their original values, and a
second strategy stacked on the same model reuses the first fingerprint. Parameters of modules
a method added are not base and are left out.

This module imports nothing of peftlab but its errors, so `methods` and `artifacts` both use it.
"""

import torch

from .errors import UserError, warn

ATTR = "_peftlab_fingerprint"  # on model.__dict__: {name: (shape, sum, sum of |entries|)}
SAMPLES = 16
FORCE = "(--force-base loads it anyway)"


def added_names(model) -> set:
    """Names of the parameters inside modules a method added (not base)."""
    added = tuple(n + "." for n, m in model.named_modules() if getattr(m, "_peftlab_added", False))
    return {n for n, _ in model.named_parameters() if added and n.startswith(added)}


def _sampled(model, skip) -> dict:
    """{name: (shape, sum of the sampled entries, sum of their absolute values)}; one transfer
    per device, not one per tensor."""
    names, shapes, stats = [], [], {}
    for name, p in model.named_parameters():
        if name in skip or not p.is_floating_point() or p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        k = min(SAMPLES, flat.numel())
        idx = torch.arange(k) * (flat.numel() - 1) // max(1, k - 1)
        v = flat[idx].double()
        names.append(name)
        shapes.append(list(p.shape))
        stats.setdefault(v.device, []).append((len(names) - 1, torch.stack([v.sum(), v.abs().sum()])))
    values = [None] * len(names)
    for pairs in stats.values():
        for (i, _), (s, a) in zip(pairs, torch.stack([t for _, t in pairs]).tolist()):
            values[i] = (s, a)
    return {n: (shape, s, a) for n, shape, (s, a) in zip(names, shapes, values)}


def fingerprint(model, skip=frozenset()) -> dict:
    """{name: [shape, checksum]} of the model's floating tensors as they are now, but `skip`."""
    return {n: [shape, s] for n, (shape, s, _) in _sampled(model, skip).items()}


def record(model) -> dict:
    """The model's base fingerprint, taken now unless already taken (see the module docstring)."""
    if ATTR not in model.__dict__:
        model.__dict__[ATTR] = _sampled(model, added_names(model))
    return model.__dict__[ATTR]


def of_base(model, skip=frozenset()) -> dict:
    """What an adapter saved from `model` records: the fingerprint taken before training, or,
    for a model no strategy was applied to, its tensors now but `skip` (the trained ones)."""
    if ATTR in model.__dict__:
        return {n: [shape, s] for n, (shape, s, _) in model.__dict__[ATTR].items()}
    return fingerprint(model, set(skip) | added_names(model))


def checked(saved, where) -> dict:
    """A saved fingerprint's form: {name: [[int, ...], number]}; anything else is one error."""
    if not isinstance(saved, dict):
        raise UserError(f"{where}: the base fingerprint should be a JSON object, not {type(saved).__name__}")
    for name, entry in saved.items():
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[0])
              and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool))
        if not ok:
            raise UserError(f"{where}: the base fingerprint's entry for {name} should be [shape, checksum], not {str(entry)[:60]}")
    return saved


def difference(model, saved: dict) -> str | None:
    """The first tensor (in the adapter's order) where `model`'s base differs from `saved`."""
    mine = record(model)
    for name, (shape, checksum) in saved.items():
        if name not in mine:
            return f"the base model has no tensor {name}; this adapter was made for another model"
        my_shape, my_sum, my_abs = mine[name]
        if list(my_shape) != list(shape):
            return f"base tensor {name} has shape {tuple(my_shape)}, the adapter expects {tuple(shape)}"
        # relative to the sums, plus bf16's rounding of each sampled entry (2^-9 relative, twice over)
        if abs(my_sum - checksum) > 1e-2 * (abs(my_sum) + abs(checksum)) + 4e-3 * my_abs + 1e-3:
            return f"base tensor {name} differs from the base this adapter was trained on"
    return None


def check(model, saved: dict | None, where, force: bool = False) -> None:
    """Refuse (or with `force`, warn about) a base that differs from the one the adapter in
    `where` was trained on; an adapter that records no fingerprint loads with a warning."""
    if not saved:
        warn(f"{where}: the adapter records no fingerprint of its base model, so the base could not be checked")
        return
    problem = difference(model, saved)
    if problem is None:
        return
    if force:
        warn(f"{where}: {problem}; loading it anyway (--force-base)")
    else:
        raise UserError(f"{where}: {problem} {FORCE}")


def forget_base(model) -> None:
    """Drop the recorded base (after merging, the merged weights are the next adapter's base)."""
    model.__dict__.pop(ATTR, None)
