"""Causal self-attention for compiled training on the CPU (bf16 or fp32): flash forward, fused backward.

PyTorch's CPU flash-attention backward is a blocked loop that runs at a fraction of the GEMM
rate (SmolLM2, 4 × 256 tokens, bf16: 14 ms per layer against 5 ms forward; fp32 on an AVX2
EPYC, one layer's compiled forward and backward: median 1.13× faster this way, e.g. 52 ms
through sdpa against 44 ms; bench/README.md). Training sequences are short enough that the backward can instead recompute the (T, T) probabilities from the saved
log-sum-exp and take the five products as batched GEMMs, in blocks of query rows that skip the
keys wholly in their future; under torch.compile the elementwise work between them fuses into
a few passes. Nothing is kept beyond what flash keeps (q, k, v,
output, log-sum-exp), so memory matches sdpa.

It joins transformers as a registered attention implementation (no patching). Calls it does
not cover — masks (padding, sliding windows, virtual tokens), dropout, soft-capping, caches,
fp16, other devices — go to transformers' own sdpa function unchanged.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .compat import attention_implementation

NAME = "peftlab_sdpa"
MAX_LEN = 2048  # the backward's largest block, (B, H, T/4, T) fp32: 4·9·512·2048 floats = 150 MB
BLOCK, MAX_BLOCKS = 128, 4  # the backward's causal blocks: at least 128 query rows (GEMM-sized), at most 4 blocks


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
        c = max(BLOCK, -(-T // MAX_BLOCKS))  # query rows per block
        row = (d_out.float() * out.float()).sum(-1, keepdim=True)  # (B, H, T, 1) = Σ_j p·dp
        dq, dk, dv = [], 0, 0
        # Causal: query rows lo..hi-1 see keys 0..hi-1 only, so each block of rows takes the
        # products with the keys before its end (T = 2c: ¾ of the full (T, T) work).
        for lo in range(0, T, c):
            hi = min(lo + c, T)
            # the block's rows of the g query heads that share a k/v head, stacked: (B, Hk, g·(hi−lo), ·),
            # so one product per k/v head covers them and dk, dv sum over the group by themselves
            qb, dob, lseb, rowb = (x[:, :, lo:hi].reshape(B, Hk, g * (hi - lo), x.shape[-1])
                                   for x in (q, d_out, lse.unsqueeze(-1), row))
            kb, vb = k[:, :, :hi], v[:, :, :hi]
            scores = torch.matmul(qb, kb.transpose(-1, -2)).float()  # (B, Hk, g·(hi−lo), hi)
            future = torch.arange(hi, device=q.device) > torch.arange(lo, hi, device=q.device).repeat(g).unsqueeze(-1)
            p = torch.exp(scores * ctx.scale - lseb).masked_fill(future, 0.0)
            dvb = torch.matmul(p.to(q.dtype).transpose(-1, -2), dob)  # (B, Hk, hi, D)
            dp = torch.matmul(dob, vb.transpose(-1, -2)).float()
            ds = (p * (dp - rowb) * ctx.scale).to(q.dtype)
            dq.append(torch.matmul(ds, kb).reshape(B, Hk, g, hi - lo, D))
            dk = dk + F.pad(torch.matmul(ds.transpose(-1, -2), qb), (0, 0, 0, T - hi))  # (B, Hk, T, D)
            dv = dv + F.pad(dvb, (0, 0, 0, T - hi))
        return torch.cat(dq, 3).reshape(B, H, T, D), dk, dv, None


def covers(module, query, key, attention_mask, dropout, kwargs) -> bool:
    """True for the plain causal training call this function handles; anything else goes to sdpa."""
    T = query.shape[2]
    return (
        query.device.type == "cpu" and _dtype(query) is not None and torch.is_grad_enabled()
        and attention_mask is None and 1 < T <= MAX_LEN and key.shape[2] == T
        and query.shape[1] % key.shape[1] == 0 and (dropout == 0.0 or not module.training)
        and getattr(module, "is_causal", True) and kwargs.get("is_causal", True) is not False
        and kwargs.get("softcap") is None and kwargs.get("position_bias") is None and kwargs.get("cache") is None
    )


def _dtype(query) -> torch.dtype | None:
    """The dtype attention runs in: bf16 for bf16 queries and for fp32 ones under bf16 autocast (a
    trained fp32 embedding keeps the residual stream, and so rotary's output, in fp32; autocast
    would run sdpa in bf16 all the same); fp32 for fp32 queries outside autocast; None otherwise."""
    autocast = torch.is_autocast_enabled("cpu")
    if query.dtype == torch.bfloat16 or (
            query.dtype == torch.float32 and autocast and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return torch.bfloat16
    return torch.float32 if query.dtype == torch.float32 and not autocast else None


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature; returns ((B, T, H, D) output, None) like sdpa."""
    if not covers(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dtype = _dtype(query)
    out = CausalAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), scale)
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
