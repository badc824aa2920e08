"""What the machine could do at best: measured GEMM throughput, and the tokens/s it implies.

FLOPs per trained token: forward 2N, backward activation gradients 2N, weight gradients
2·N_trainable (N: weights that take part in matrix products, the tied lm_head included),
plus causal attention 6·T·d·L (forward 2·2·(T/2)·d per layer, backward twice that).
The GEMM rate is measured on the model's own linear shapes at batch × sequence rows. The
bench measures it in every run's own process, right after the timed steps: on a shared host
whose speed moves by 2× within minutes, a ceiling taken at another time says more about the
host's minute than about the run.
"""

import time

import torch

from ..methods.targets import dims, linear_layers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the bench's precisions


def linear_shapes(model) -> dict:
    """(in, out) -> how many of the model's matrix products have that shape (the tied head once)."""
    shapes = {}
    for m in linear_layers(model).values():
        shapes[dims(m)] = shapes.get(dims(m), 0) + 1
    head = model.get_output_embeddings().weight
    shapes[(head.shape[1], head.shape[0])] = shapes.get((head.shape[1], head.shape[0]), 0) + 1
    return shapes


def gemm_flops_per_s(shapes: dict, rows: int, dtype: torch.dtype, repeats: int = 3, min_s: float = 0.02) -> float:
    """FLOP/s of x (rows, in) @ Wᵀ over `shapes` ((in, out) -> uses), each shape at its best:
    the fastest of `repeats` loops of calls lasting at least `min_s` (one call of a small
    shape takes well under a millisecond, too short to time once on a loaded host)."""
    flops, seconds = 0.0, 0.0
    for (k, n), uses in shapes.items():
        x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        torch.nn.functional.linear(x, w)  # warm: the kernel is set up
        best = float("inf")
        for _ in range(repeats):
            start, calls = time.perf_counter(), 0
            while calls < 2 or time.perf_counter() - start < min_s:
                torch.nn.functional.linear(x, w)
                calls += 1
            best = min(best, (time.perf_counter() - start) / calls)
        seconds += best * uses
        flops += 2.0 * rows * k * n * uses
    return flops / seconds


def flops_per_token(model, n_trainable_matmul: int, seq_len: int) -> float:
    n = sum(i * o for i, o in (dims(m) for m in linear_layers(model).values()))
    n += model.get_output_embeddings().weight.numel()
    c = model.config
    return 4.0 * n + 2.0 * n_trainable_matmul + 6.0 * seq_len * c.hidden_size * c.num_hidden_layers


def trainable_matmul_params(model) -> int:
    """Trainable parameters whose gradient is a matrix product (weights of 2+ dims, no embeddings)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    out = 0
    for p in model.parameters():
        if p.requires_grad and p.dim() >= 2 and (p is not emb or p is head):
            out += p.numel()
    return out
