"""LoRA+: LoRA whose B matrices learn `ratio` times faster than their A matrices.

    y = W x + b + s · B A x   as LoRA;   lr(B) = ratio · lr(A),  ratio = λ (16 in the paper)

Hayou et al. (2024) show that with one learning rate for both factors, feature learning in
wide layers is inefficient: B (zero-init, out × r) needs a larger step than A. The adapter is
plain LoRA (it saves as peft's LORA and merges like it); only the optimizer differs, through
the training protocol's `lr_scales`. Trainable per target: r(m+n), as LoRA.
"""

from ..spec import Option
from .lora import LORA, LORA_OPTIONS, add_lora
from .protocol import Added, Training
from .registry import register


class FasterB(Training):
    """B matrices of the modules this step added learn `ratio` × faster."""

    def __init__(self, modules: list, ratio: float):
        self.modules, self.ratio = modules, ratio

    def lr_scales(self, model) -> dict:
        mine = {id(m) for m in self.modules}  # every B: a layer's, and each expert parameter's (factors.<name>.B)
        return {f"{path}.{n}": self.ratio for path, m in model.named_modules() if id(m) in mine
                for n, _ in m.named_parameters() if n.rsplit(".", 1)[-1] == "B"}


@register("loraplus", examples=("loraplus:r=4",), peft=LORA.writer(), ratio=Option(16.0, "float", help="learning-rate ratio lr(B) / lr(A)", low=1),
          **{k: v for k, v in LORA_OPTIONS.items() if k != "dora"})
def loraplus(model, ratio, calibration=None, **opts):
    """LoRA with B trained at ratio × the learning rate of A (LoRA+)."""
    before = {id(m) for m in model.modules()}
    saved = add_lora(model, dora=False, method="loraplus", calibration=calibration, **opts)
    faster = FasterB([m for m in model.modules() if isinstance(m, Added) and id(m) not in before], ratio)
    faster.saved_as = saved.saved_as if saved else {}  # init=eva|corda: the plain LoRA it saves as
    return faster
