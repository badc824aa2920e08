"""What the machine could do at best: measured GEMM throughput, and the tokens/s it implies.

FLOPs per trained token: forward 2N, backward activation gradients 2N, weight gradients
2·N_trainable (N: weights that take part in matrix products, the tied lm_head included),
plus causal attention 6·T·d·L (forward 2·2·(T/2)·d per layer, backward twice that).
The GEMM rate is measured on the model's own linear shapes at batch × sequence rows.
"""

import time

import torch

from ..methods.targets import dims, linear_layers


def gemm_flops_per_s(model, rows: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of x @ Wᵀ over the model's linear shapes (each shape once per use), best of repeats."""
    shapes = {}
    for m in linear_layers(model).values():
        shapes[dims(m)] = shapes.get(dims(m), 0) + 1
    head = model.get_output_embeddings().weight
    shapes[(head.shape[1], head.shape[0])] = 1
    tensors = {s: (torch.randn(rows, s[0], dtype=dtype), torch.randn(s[1], s[0], dtype=dtype)) for s in shapes}
    best = 0.0
    for _ in range(repeats):
        flops, seconds = 0.0, 0.0
        for s, count in shapes.items():
            x, w = tensors[s]
            torch.nn.functional.linear(x, w)  # warm
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            seconds += (time.perf_counter() - start) * count
            flops += 2.0 * rows * s[0] * s[1] * count
        best = max(best, flops / seconds)
    return best


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
