"""Causal-LM loss without the full (B, T, V) logits.

transformers computes logits for every position, upcasts them to fp32 and keeps them for
backward: for SmolLM2 at batch 4 × 256 that is 4·256·49152 floats, 200 MB, plus its
gradient. Here the model runs up to its last hidden state (the lm_head sees one position),
then the loss is taken over chunks of positions; each chunk's logits are recomputed in
backward instead of stored, and positions whose label is -100 never reach the lm_head.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(hidden, weight, targets, softcap):
    # hidden: (n, d), weight: (V, d), targets: (n,) -> summed token loss
    logits = F.linear(hidden, weight.to(hidden.dtype)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, k+T, d) final hidden states for `input_ids` (B, T), through every hook on `model`
    (prompt tuning puts k virtual positions in front; k = 0 otherwise)."""
    captured = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.base_model.register_forward_hook(grab)
    try:
        model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (as transformers)."""
    h = hidden_states(model, input_ids)
    k = h.shape[1] - input_ids.shape[1]
    if k > 0:  # the last virtual position predicts the first real token (as transformers and peft)
        h, targets = h[:, k - 1 : -1], labels.reshape(-1)
    else:  # position t predicts token t+1
        h, targets = h[:, :-1], labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    h = h.reshape(-1, h.shape[-1])[keep]
    targets = targets[keep]
    weight = model.get_output_embeddings().weight
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), chunk):
        args = (h[i : i + chunk], weight, targets[i : i + chunk], softcap)
        total = total + (checkpoint(_chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_loss(*args))
    return total / keep.sum().clamp_min(1)
