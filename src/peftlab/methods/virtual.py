"""Shared bookkeeping for methods that put k virtual tokens in front of the sequence
(prompt tuning: k input embeddings; prefix tuning: k keys/values per layer).

The model call must then see an attention mask, cache positions and position ids that count
those k tokens. During generation `transformers` keeps its own count without them, so every
call on a cache that carries virtual tokens is shifted by k.
"""

import torch

from ..errors import UserError
from ..spec import clip
from .attach import active

MARK = "_peftlab_virtual"  # attribute on a cache object: how many virtual tokens it holds


def positions(config) -> int | None:
    """How many positions the model takes (models.max_positions: max_position_embeddings,
    GPT-2's n_positions, rope scaling), or None."""
    from ..models import max_positions

    return max_positions(config)


def check_tokens(model, method: str, k: int) -> None:
    """k virtual tokens must leave the text at least one of the model's positions (checked
    before the k rows are allocated)."""
    n = positions(model.config)
    if n is not None and k >= n:
        raise UserError(f"{method}: tokens={clip(k)} is not less than the model's {n} positions; tokens must be ≤ {n - 1} "
                        f"(the text needs positions too; e.g. tokens=20)")


def check_room(model, method: str, k: int, length: int) -> None:
    """A sequence whose k virtual tokens and `length` text tokens pass the model's positions is
    one line, not an index error deep inside GPT-2's position embedding (checked on the first
    chunk of a sequence)."""
    n = positions(model.config)
    if n is not None and k + length > n:
        raise UserError(f"{method}: {k} virtual tokens + {length} text tokens need {k + length} positions; the model has "
                        f"{n}; use fewer tokens or a shorter sequence (at most {max(0, n - k)} text tokens)")


def the_active(model, slot: str):
    """The one active virtual-token module in `model.<slot>`, or None."""
    children = getattr(model, slot)
    if children.rows is not None and children:
        raise UserError(f"per-row adapter routing covers LoRA and bottleneck adapters, not {slot} tuning")
    live = active(children)
    return live[0] if live else None


def call_inputs(args, kwargs):
    """Move a positional input_ids into kwargs; return (batch, length, device)."""
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs["inputs_embeds"]
    return args, x.shape[0], x.shape[1], x.device


def cache_key(kwargs) -> str:
    """The keyword a call carries its KV cache under: `cache` (transformers >= 5.24, where
    generation passes it so) or `past_key_values` (the older name, still accepted)."""
    return "cache" if kwargs.get("cache") is not None else "past_key_values"


def cache_of(kwargs):
    return kwargs.get(cache_key(kwargs))


def is_fresh(kwargs) -> bool:
    """True on the first chunk of a sequence (no cache, or an empty one)."""
    cache = cache_of(kwargs)
    return cache is None or cache.get_seq_length() == 0


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype activations have right now (bf16 under autocast)."""
    kind = param.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else param.dtype


def shift(kwargs, k: int, batch: int, length: int, device, prepend_positions: bool) -> None:
    """Account for k virtual tokens in mask, cache_position and position_ids.

    `prepend_positions`: the virtual tokens are part of this call's input (prompt tuning,
    first chunk), so positions 0..k-1 are added in front instead of only shifting.
    """
    cache = cache_of(kwargs)
    past = cache.get_seq_length() if cache is not None else 0
    mask = kwargs.get("attention_mask")
    want = past + length + (k if prepend_positions else 0)
    if mask is not None and mask.shape[-1] == want - k:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], k), mask], dim=-1)
    front = torch.arange(k, device=device)
    cp = kwargs.get("cache_position")
    if cp is not None:
        kwargs["cache_position"] = torch.cat([front, cp + k]) if prepend_positions else cp + k
    pid = kwargs.get("position_ids")
    if pid is not None:
        kwargs["position_ids"] = torch.cat([front.expand(pid.shape[0], k), pid + k], -1) if prepend_positions else pid + k
