"""QLoRA: the frozen base's linear layers stored in 8-bit or 4-bit NF4 (bitsandbytes, which
runs on CPU and CUDA), LoRA on top in full precision.

    y = dequant(W_q) x + b + s · B A x

Trainable: r(m+n) per target, as LoRA. `params.storage_bytes` reports what the base really occupies.
"""

import warnings

import torch
import torch.nn as nn

from ..components import is_conv1d
from ..errors import UserError
from ..spec import Option
from .registry import register
from .lora import DATA_INITS, LORA_OPTIONS, add_lora, lora_plan
from .targets import linear_layers


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("qlora needs bitsandbytes: pip install 'peftlab[quant]'") from None
    # bitsandbytes on CPU announces every int8 matmul's fp16 cast and an autograd fallback whose
    # input gradients we checked against the dequantized matmul; keep the progress bar readable.
    # (Installed when a qlora strategy is applied, not when peftlab is imported.)
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
    warnings.filterwarnings("ignore", message=r"bitsandbytes::gemv_4bit: an autograd kernel")
    return bnb


def quantize_linear(linear: nn.Linear, bits: int) -> nn.Module:
    """A bitsandbytes copy of `linear` with its weight stored in `bits` bits (4: NF4)."""
    bnb = _bnb()
    w = linear.weight.data.float().cpu()
    if bits == 4:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.float().clone(), requires_grad=False)
    return q.to(linear.weight.device)  # moving to a device is what quantizes


@register("qlora", examples=("qlora:bits=4,r=4,targets=all-linear",),
          exempt={"gpt2": "GPT-2's Conv1D layers have no bitsandbytes form (qlora refuses them)",
                  "trains-its-own": "bitsandbytes repacks the frozen 4-bit weights for CPU on the first eval-mode forward "
                                    "(another layout), so raw tensors differ; test_method_bitfit_schedule_qlora.py "
                                    "checks that only LoRA's tensors train"},
          bits=Option(4, "int", help="4 (NF4) or 8", low=4, high=8), **{k: v for k, v in LORA_OPTIONS.items() if k not in ("dora", "init", "lora_bias", "loftq_bits", "loftq_iter", *DATA_INITS)})
def qlora(model, bits, **opts):
    """Quantize the frozen base (int8 or NF4) and train LoRA on top."""
    if bits not in (4, 8):
        raise UserError(f"qlora: bits must be 4 or 8, got {bits}")
    if is_conv1d(next(iter(linear_layers(model).values()))):
        raise UserError(f"qlora: {model.config.model_type} stores its layers as Conv1D, which bitsandbytes cannot quantize; use lora")
    lora_plan(model, "qlora", opts["r"], opts["targets"], opts["target_regex"], opts["layers"], opts["rank_pattern"],
              opts["alpha_pattern"], opts["alpha"], opts["exclude"])  # every option checked before the base is quantized
    for path, linear in linear_layers(model).items():
        if type(linear) is nn.Linear:
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, quantize_linear(linear, bits))
    add_lora(model, dora=False, init="kaiming", lora_bias=False, method="qlora", **opts)
