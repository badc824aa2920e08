"""Prefix tuning: k trainable keys and values per layer, P ∈ R^{k×d_kv}, inside attention.

    attention over [P_k; K] and [P_v; V] in every layer   (d_kv = kv_heads · head_dim)

Trainable: 2·k·d_kv·L. With `projection=true` the prefixes come from a small MLP while
training (more stable, as in Li & Liang); `fold` turns it into plain prefixes for saving.
The layout (k, L·2·d_kv) is HF peft's, so weights move between the two unchanged.
"""

from functools import cache

import torch
import torch.nn as nn

from ..compat import keep_cache_under_checkpointing
from ..components import blocks, num_layers
from ..errors import UserError
from ..spec import Option, Step, clip
from .registry import PeftCodec, peft_fields, register
from .attach import attach
from .protocol import Added
from .virtual import MARK, cache_key, call_inputs, check_room, check_tokens, compute_dtype, is_fresh, shift, the_active


class PrefixKV(Added):
    """Per-layer key/value prefixes; `prefix` is (k, L·2·d_kv), or an MLP produces it."""

    slot = "prefix"
    label = "prefix tuning"
    peft_keys = {"prefix": "prompt_embeddings"}

    def __init__(self, k: int, layers: int, kv_heads: int, head_dim: int, projection: int = 0):
        super().__init__()
        self.k, self.layers, self.kv_heads, self.head_dim = k, layers, kv_heads, head_dim
        d_kv = kv_heads * head_dim
        if projection:  # reparametrisation: embedding (k, d_kv) -> MLP -> (k, L·2·d_kv)
            self.register_parameter("prefix", None)
            self.embedding = nn.Parameter(torch.empty(k, d_kv))
            self.transform = nn.Sequential(nn.Linear(d_kv, projection), nn.Tanh(), nn.Linear(projection, layers * 2 * d_kv))
        else:
            self.prefix = nn.Parameter(torch.empty(k, layers * 2 * d_kv))
            self.embedding, self.transform = None, None

    def table(self) -> torch.Tensor:
        return self.transform(self.embedding) if self.transform is not None else self.prefix

    def stored(self) -> dict:
        """Saved as the plain prefixes it produces (the reparametrisation MLP is folded)."""
        return {"prefix": self.table()}

    def forward(self, batch: int, dtype) -> list:
        """[(key, value)] per layer, each (B, kv_heads, k, head_dim)."""
        p = self.table().to(dtype).view(self.k, 2 * self.layers, self.kv_heads, self.head_dim)
        p = p.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, heads, k, hd)
        return [(p[2 * i], p[2 * i + 1]) for i in range(self.layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparametrisation MLP by the prefixes it produces."""
        if self.transform is not None:
            table = self.table().detach().clone()
            self.transform, self.embedding = None, None
            self.prefix = nn.Parameter(table)


@cache
def _prefix_only_cache_class():
    """The cache class below, defined once (transformers is imported on first use)."""
    from transformers import DynamicCache

    class PrefixOnlyCache(DynamicCache):
        """Holds the prefixes and never stores what a forward pass adds (see read_only_cache)."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

        def fill(self, key_states, value_states, layer_idx):
            return DynamicCache.update(self, key_states, value_states, layer_idx)

    return PrefixOnlyCache


def read_only_cache(config):
    """A cache holding only the prefixes that never stores what a forward pass adds.

    Training needs no KV cache, and gradient checkpointing replays each block's forward in
    backward: a cache that grew on the first pass would be wrong on the replay. This one
    answers every `update` with [prefix; new] and stays as it was, so replays see the same.
    """
    return _prefix_only_cache_class()(config=config)


def prefix_hook(model, args, kwargs):
    prefix = the_active(model, PrefixKV.slot)
    if prefix is None:
        return args, kwargs
    args, batch, length, device = call_inputs(args, kwargs)
    cache_kw = cache_key(kwargs)
    cache = kwargs.get(cache_kw)
    if is_fresh(kwargs):
        check_room(model, "prefix", prefix.k, length)
        if cache is None and (model.training or kwargs.get("use_cache") is False):
            cache = read_only_cache(model.config)
        elif cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        write = getattr(cache, "fill", cache.update)
        dtype = compute_dtype(prefix.prefix if prefix.prefix is not None else prefix.embedding)
        for i, (key, value) in enumerate(prefix(batch, dtype)):
            write(key, value, i)
        setattr(cache, MARK, prefix.k)
        kwargs[cache_kw] = cache
    if getattr(cache, MARK, 0):
        shift(kwargs, prefix.k, batch, length, device, prepend_positions=False)
    return args, kwargs


def kv_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def to_peft(model, step: Step, hosts: dict) -> dict:
    """PrefixTuningConfig fields (prefix_projection=False: a reparametrised prefix is saved folded)."""
    prefix = next(iter(hosts.values()))
    kv_heads, head_dim = kv_shape(model.config)
    return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": prefix.k, "token_dim": kv_heads * head_dim,
            "num_transformer_submodules": 1, "num_attention_heads": kv_heads, "num_layers": model.config.num_hidden_layers,
            "encoder_hidden_size": kv_heads * head_dim, "prefix_projection": False}


def from_peft(config: dict, where) -> Step:
    if config.get("prefix_projection"):
        raise UserError(f"{where}: prefix_projection=true adapters keep peft's MLP; peftlab reads folded prefixes only")
    return Step("prefix", {"tokens": config["num_virtual_tokens"]})


def check_projection(model, projection: int, d_kv: int, layers: int) -> None:
    """The reparametrisation MLP (d_kv → projection → L·2·d_kv) has no size limit of its own
    (Li & Liang use 512-800), but one larger than the whole model is a mistake
    (projection = 10⁶ would allocate gigabytes): refused before allocating."""
    per_unit = d_kv + 1 + layers * 2 * d_kv  # one hidden unit: its input weights, bias, output weights
    total = sum(p.numel() for p in model.parameters())
    if projection * per_unit > total:
        raise UserError(f"prefix: projection={clip(projection)} makes the reparametrisation MLP {projection * per_unit:,} "
                        f"values, more than the whole model ({total:,}); projection must be ≤ {max(1, total // per_unit)}")


@register(
    "prefix", examples=("prefix:tokens=4", "prefix:tokens=4,projection=16"), peft=PeftCodec("PREFIX_TUNING", to_peft, from_peft, fields=peft_fields(
        "num_virtual_tokens token_dim num_transformer_submodules num_attention_heads num_layers modules_to_save",
        "encoder_hidden_size prefix_projection init_weights")), saved_as={"projection": 0},
    tokens=Option(20, "int", help="prefix length k", low=1),
    projection=Option(0, "int", help="hidden size of the reparametrisation MLP (0: none)", low=0),
    name=Option("default"),
    seed=Option(0, "int", low=0),
)
def prefix(model, tokens, projection, name, seed):
    """k trainable key/value vectors per layer inside attention."""
    if tokens <= 0:
        raise UserError(f"prefix: tokens must be positive, got {tokens}")
    check_tokens(model, "prefix", tokens)
    kv_heads, head_dim = kv_shape(model.config)
    check_projection(model, projection, kv_heads * head_dim, num_layers(model))
    p = PrefixKV(tokens, num_layers(model), kv_heads, head_dim, projection)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in p.parameters():
            param.normal_(0, 0.02, generator=gen) if param.dim() > 1 else param.zero_()
    attach(model, name, p.to(next(model.parameters()).device), prefix_hook, pre=True)
    for block in blocks(model):
        # transformers drops the cache of a checkpointed block unless the block declares it
        # only reads it (GradientCheckpointingLayer's documented opt-in); ours is read-only.
        keep_cache_under_checkpointing(block)
