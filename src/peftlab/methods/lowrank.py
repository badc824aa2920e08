"""What the low-rank methods share (LoRA, AdaLoRA, LoHa, LoKr): per-layer patterns (peft's
suffix rule), rank checks before anything is allocated, peft's seeded kaiming init, LoftQ's
quantize-and-fit loop, and the config keys of peft's LoraConfig (AdaLoraConfig extends it)."""

import math

import torch

from ..errors import UserError
from ..spec import clip, pattern_item
from .registry import peft_fields
from .targets import dims

LORA_FIELDS = peft_fields(
    "r lora_alpha lora_dropout target_modules target_parameters exclude_modules layers_to_transform layers_pattern",
    "fan_in_fan_out bias lora_bias use_rslora use_dora use_qalora qalora_group_size use_bdlora init_lora_weights",
    "rank_pattern alpha_pattern modules_to_save trainable_token_indices ensure_weight_tying layer_replication",
    "loftq_config eva_config corda_config kasa_config lora_ga_config arrow_config velora_config monteclora_config",
    "megatron_config megatron_core alora_invocation_tokens runtime_config",
)


def read_patterns(items, what: str, of: str = "float", low=None) -> list:
    """[(compiled pattern, value)] for 'PATTERN=VALUE' items (rank_pattern, alpha_pattern), each
    checked: a safe regex, a finite number of kind `of` (int or float), ≥ low."""
    return [pattern_item(item, what, of, low) for item in items]


def pattern_value(patterns, path: str, default, kind=float):
    r"""peft's rule: the first 'pattern=value' whose pattern ends `path` after a dot wins, i.e.
    matches in full the path or a part of it after a dot (peft: re.match(rf"(.*\.)?({key})$")).
    `patterns`: 'PATTERN=VALUE' items or `read_patterns`' pairs."""
    ends = [path] + [path[i + 1:] for i, ch in enumerate(path) if ch == "."]
    for item in patterns:
        rx, value = item if isinstance(item, tuple) else pattern_item(item, "pattern", "int" if kind is int else "float")
        if any(rx.fullmatch(end) for end in ends):
            return value
    return default


def check_ranks(method: str, plan: list, r: int) -> None:
    """Refuse a rank above a target's smaller dimension before anything is allocated: such a
    rank adds parameters but no rank to ΔW (which has rank ≤ min(in, out)), and r=10⁶ would
    allocate gigabytes. `plan`: [(path, layer, rank, from a rank_pattern)]."""
    for path, layer, rank, patterned in sorted(plan, key=lambda x: min(dims(x[1]))):
        d_in, d_out = dims(layer)
        limit = min(d_in, d_out)
        if rank <= limit:
            continue
        side = f"{d_in} inputs" if d_in <= d_out else f"{d_out} outputs"
        if patterned:
            raise UserError(f"{method}: rank_pattern gives {path} rank {rank}, larger than its {side}; "
                            f"its rank must be ≤ {limit}")
        raise UserError(f"{method}: r={clip(r)} is larger than {path.rsplit('.', 1)[-1]}'s {side} ({path}); "
                        f"r must be ≤ {limit}")


def kaiming_(t: torch.Tensor, gen: torch.Generator) -> None:
    """kaiming_uniform_(a=√5) as peft calls it, seeded: U(±1/√fan_in), fan_in = t.shape[1]."""
    bound = 1 / math.sqrt(t.shape[1])
    t.uniform_(-bound, bound, generator=gen)


def layer_rank_alpha(method: str, path: str, r: int, alpha: float, rank_pattern, alpha_pattern) -> tuple:
    """(r, α) for the layer at `path` after rank_pattern / alpha_pattern (peft's suffix rule;
    'PATTERN=VALUE' items or `read_patterns`' pairs)."""
    rr = pattern_value(rank_pattern, path, r, int)
    if rr <= 0:
        raise UserError(f"{method}: rank_pattern gives {path} rank {rr}; ranks must be positive")
    return rr, pattern_value(alpha_pattern, path, alpha)


def loftq(w: torch.Tensor, r: int, bits: int, iters: int) -> tuple:
    """peft's loftq_init on any device: `iters` rounds of quantizing what the low-rank part does
    not hold and taking the best rank-r fit (SVD, √S split between the factors) of what
    quantizing lost. Returns (dequantized base, A (r, n), B (m, r)) with B A ≈ W − base."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("init=loftq quantizes with bitsandbytes: pip install 'peftlab[quant]'") from None
    res = w
    for i in range(iters):
        if bits == 4:
            q, state = bnb.functional.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
            dequantized = bnb.functional.dequantize_4bit(q, state)
        else:
            q, scales, _ = bnb.functional.int8_vectorwise_quant(res.contiguous())
            dequantized = bnb.functional.int8_vectorwise_dequant(q, scales).float()
        U, S, Vh = torch.linalg.svd(w - dequantized, full_matrices=False)
        B, A = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
        res = w - B @ A
    return dequantized, A, B
