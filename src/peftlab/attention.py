"""Causal self-attention for compiled bf16 training on the CPU: flash forward, fused backward.

PyTorch's CPU flash-attention backward is a blocked loop that runs at a fraction of the GEMM
rate (SmolLM2, 4 × 256 tokens: 14 ms per layer against 5 ms forward). Training sequences are
short enough that the backward can instead recompute the (T, T) probabilities from the saved
log-sum-exp and take the five products as batched GEMMs; under torch.compile the elementwise
work between them fuses into a few passes. Nothing is kept beyond what flash keeps (q, k, v,
output, log-sum-exp), so memory matches sdpa.

It joins transformers as a registered attention implementation (no patching). Calls it does
not cover — masks (padding, sliding windows, virtual tokens), dropout, soft-capping, caches,
fp32, other devices — go to transformers' own sdpa function unchanged.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .compat import attention_implementation

NAME = "peftlab_sdpa"
MAX_LEN = 2048  # the backward holds one (B, H, T, T) fp32 block per layer: 4·9·2048² floats = 600 MB


class CausalAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + causal) v with grouped k/v heads.

    q: (B, H, T, D); k, v: (B, Hk, T, D) with H = g·Hk; returns (B, H, T, D).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        g = q.shape[1] // k.shape[1]
        kr, vr = (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kr, vr, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        Hk = k.shape[1]
        g = H // Hk
        # The g query heads that share a k/v head are stacked along the rows: (B, Hk, g·T, D),
        # so one product per k/v head covers them and dk, dv sum over the group by themselves.
        q2, do2, o2 = (x.reshape(B, Hk, g * T, D) for x in (q, d_out, out))
        scores = torch.matmul(q2, k.transpose(-1, -2)).float()  # (B, Hk, g·T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1).repeat(g, 1)  # (g·T, T)
        p = torch.exp(scores * ctx.scale - lse.reshape(B, Hk, g * T, 1)).masked_fill(future, 0.0)
        dv = torch.matmul(p.to(q.dtype).transpose(-1, -2), do2)  # (B, Hk, T, D)
        dp = torch.matmul(do2, v.transpose(-1, -2)).float()  # (B, Hk, g·T, T)
        row = (do2.float() * o2.float()).sum(-1, keepdim=True)  # (B, Hk, g·T, 1) = Σ_j p·dp
        ds = (p * (dp - row) * ctx.scale).to(q.dtype)
        dq = torch.matmul(ds, k).reshape(B, H, T, D)
        dk = torch.matmul(ds.transpose(-1, -2), q2)  # (B, Hk, T, D)
        return dq, dk, dv, None


def covers(module, query, key, attention_mask, dropout, kwargs) -> bool:
    """True for the plain causal training call this function handles; anything else goes to sdpa."""
    T = query.shape[2]
    return (
        query.device.type == "cpu" and _bf16(query) and torch.is_grad_enabled()
        and attention_mask is None and 1 < T <= MAX_LEN and key.shape[2] == T
        and query.shape[1] % key.shape[1] == 0 and (dropout == 0.0 or not module.training)
        and getattr(module, "is_causal", True) and kwargs.get("is_causal", True) is not False
        and kwargs.get("softcap") is None and kwargs.get("position_bias") is None and kwargs.get("cache") is None
    )


def _bf16(query) -> bool:
    """bf16 queries, or fp32 ones under bf16 autocast (a trained fp32 embedding keeps the residual
    stream, and so rotary's output, in fp32; autocast would run sdpa in bf16 all the same)."""
    return query.dtype == torch.bfloat16 or (
        query.dtype == torch.float32 and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature; returns ((B, T, H, D) output, None) like sdpa."""
    if not covers(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bf16 = torch.bfloat16
    out = CausalAttention.apply(query.to(bf16), key.to(bf16), value.to(bf16), scale)
    return out.transpose(1, 2).contiguous(), None


def use(model) -> str | None:
    """Switch a model that runs sdpa to this attention; return the name to restore (None: unchanged)."""
    if attention_implementation(model) != "sdpa":
        return None
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # same masks as sdpa: None for plain causal
    model.set_attn_implementation(NAME)
    return "sdpa"


def restore(model, previous: str | None) -> None:
    if previous is not None:
        model.set_attn_implementation(previous)
