"""Bottleneck adapters (Houlsby / Pfeiffer): h' = h + W_up σ(W_down h), W_up zero-init.

`placement=houlsby` puts one after the attention sublayer and one after the MLP of every
block; `pfeiffer` only after the MLP. Trainable per adapter: 2dr + r + d (weights and biases).
"""

import torch
import torch.nn as nn

from ..components import arch_of, blocks, num_layers, parse_layers
from ..errors import UserError
from ..spec import Option, clip
from .registry import register
from .attach import apply, attach
from .protocol import Added

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(Added):
    """d -> r -> d with a nonlinearity; the up projection starts at zero, so h' = h at init."""

    slot = "adapter"
    label = "bottleneck adapters (nonlinear)"

    def __init__(self, d: int, r: int, activation: str = "relu", generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Linear(d, r)  # W_down (r, d), b_down (r,)
        self.up = nn.Linear(r, d)  # W_up (d, r), b_up (d,)
        self.act = ACTIVATIONS[activation]()
        with torch.no_grad():  # seeded: the same spec always starts from the same adapter
            bound = 1 / d**0.5
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (batch, seq, d)
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def adapter_hook(sublayer, args, output):
    """Apply the adapters to a sublayer's output (attention returns a tuple; its first item is h)."""
    h = output[0] if isinstance(output, tuple) else output
    h = apply(getattr(sublayer, Bottleneck.slot), h, lambda bottleneck, rows, hh: bottleneck(hh))
    return (h, *output[1:]) if isinstance(output, tuple) else h


@register(
    "adapter", examples=("adapter:r=8", "adapter:r=8,placement=pfeiffer"),
    r=Option(None, "int", help="bottleneck size (default: d / reduction)", low=1),
    reduction=Option(16, "int", help="bottleneck = hidden size / reduction, when r is not given", low=1),
    placement=Option("houlsby", "choice", ("houlsby", "pfeiffer")),
    activation=Option("relu", "choice", tuple(ACTIVATIONS)),
    layers=Option(None, help="block range A-B"),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)
def adapter(model, r, reduction, placement, activation, layers, name, seed):
    """Bottleneck adapters after attention and/or MLP sublayers."""
    d = model.config.hidden_size
    if r is None:
        if reduction <= 0:
            raise UserError(f"adapter: reduction must be positive, got {reduction}")
        r = max(1, d // reduction)
    if r <= 0:
        raise UserError(f"adapter: r must be a positive size, got {r}")
    if r > d:  # a bottleneck wider than h adds parameters, not capacity (and r = 10⁶ allocates gigabytes)
        raise UserError(f"adapter: r={clip(r)} is larger than the hidden size {d}; a bottleneck must be ≤ {d} "
                        f"(e.g. r={max(1, d // 16)})")
    arch = arch_of(model)
    span = parse_layers(layers, num_layers(model)) if layers else range(num_layers(model))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    for i, block in enumerate(blocks(model)):
        if i not in span:
            continue
        places = [arch.mlp] if placement == "pfeiffer" else [arch.attn.split(".")[0], arch.mlp]
        for place in places:
            attach(block.get_submodule(place), name, Bottleneck(d, r, activation, gen).to(device), adapter_hook)
