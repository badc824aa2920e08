"""Selective freezing: train chosen components of the base model and nothing else.

`full` trains every parameter. `freeze:train=mlp+norm,layers=6-11` trains the named
components, optionally only inside a block range (then parameters outside every block, such
as embeddings and the final norm, stay frozen), and `include=`/`exclude=` regexes over
parameter names refine the choice. Two presets reproduce published studies:
`freeze-attention` (train MLP + norms) and `targeted-qkv` (W_Q, W_K, W_V of blocks >= 6).
"""

from ..components import num_layers, select, unfreeze
from ..errors import UserError
from ..spec import Option
from .registry import register


@register("full")
def full(model):
    """Train every parameter (the reference point)."""
    for p in model.parameters():
        p.requires_grad_(True)


@register(
    "freeze", examples=("freeze:train=mlp+norm", "freeze:train=mlp"),
    train=Option((), "list", help="components to train: " + "+".join(("embed", "attention", "q", "k", "v", "o", "mlp", "norm", "lm_head", "bias"))),
    layers=Option(None, help="block range A-B; only parameters inside these blocks train"),
    include=Option(None, "regex", help="regex searched in parameter names to also train"),
    exclude=Option(None, "regex", help="regex searched in parameter names never to train"),
)
def freeze(model, train, layers, include, exclude):
    """Train only the chosen components / blocks / name patterns; freeze the rest."""
    if not train and not include:
        raise UserError("freeze: say what trains, e.g. freeze:train=mlp+norm or freeze:include=<regex>")
    names = select(model, train, layers, include, exclude)
    if not names:
        raise UserError("freeze: the selection matches no parameter of this model")
    unfreeze(model, names)


@register("freeze-attention")
def freeze_attention(model):
    """Freeze attention and embeddings; train MLP and norms."""
    unfreeze(model, select(model, ("mlp", "norm")))


@register("targeted-qkv", examples=("targeted-qkv:from_layer=1", "targeted-qkv:from_layer=1/lora:r=4"), from_layer=Option(6, "int", help="first block whose W_Q, W_K, W_V train", low=0))
def targeted_qkv(model, from_layer):
    """Train only W_Q, W_K, W_V of blocks >= from_layer."""
    n = num_layers(model)
    if not 0 <= from_layer < n:
        raise UserError(f"targeted-qkv: from_layer={from_layer} is outside the model, which has blocks 0-{n - 1}")
    unfreeze(model, select(model, ("q", "k", "v"), f"{from_layer}-{n - 1}"))
