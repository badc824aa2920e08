"""BitFit: train only the bias vectors, b ← b − η ∇_b L.

Architectures without biases (Llama, Gemma) have nothing to train; `norms=true` trains the
norm weights instead, which is the closest analogue (an elementwise affine per feature).
"""

from ..components import unfreeze, where
from ..errors import UserError
from ..spec import Option
from .registry import register


@register("bitfit", examples=("bitfit:norms=true",), norms=Option(False, "bool", help="also train norm weights (needed on bias-free models)"))
def bitfit(model, norms):
    """Train biases only (norms=true adds the norm weights)."""
    places = where(model)
    names = [n for n, w in places.items() if w.bias and w.component != "added"]
    if norms:
        names += [n for n, w in places.items() if w.component == "norm" and not w.bias]
    if not names:
        raise UserError(f"bitfit: {model.config.model_type} has no bias parameters; use bitfit:norms=true to train the norm weights instead")
    unfreeze(model, names)
