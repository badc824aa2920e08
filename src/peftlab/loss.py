"""Causal-LM loss without the (B, T, V) logits, and without recomputing them in backward.

transformers computes logits for every position, upcasts them to fp32 and keeps them for
backward: for SmolLM2 at batch 4 × 256 that is 4·256·49152 floats, 200 MB, plus its
gradient. Here the model runs up to its last hidden state (the lm_head sees no position);
then, one chunk of positions at a time, the loss *and its gradient* are taken in the forward
pass (softmax − one-hot is the gradient of cross-entropy with respect to the logits), so
only the (n, d) gradient of the hidden states outlives a chunk (and, when the head trains,
the logits' gradient in the compute dtype). Backward merely scales them. Positions whose label is -100 never
reach the lm_head.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, kernels, runtime

IGNORE = -100


def _chunk(h, w, targets, softcap, want_grad=True):
    """Summed loss of one chunk and d(loss)/d(logits) in h's dtype (None unless `want_grad`).
    h: (c, d), w: (V, d), targets: (c,). The softmax is taken in fp32 and cast once at the
    end: compiled, that cast is part of the same pass (no (c, V) fp32 tensor is written)."""
    logits = F.linear(h, w).float()  # (c, V) fp32
    if softcap:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    rows = torch.arange(len(targets), device=h.device)
    loss = (lse - logits[rows, targets]).sum()
    if not want_grad:  # evaluation: no softmax pass
        return loss, None
    p = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (c, V)
    # softmax − one-hot as one elementwise expression (an indexed -= 1 would make a compiled
    # chunk write the fp32 softmax out before the cast)
    grad = torch.where(torch.arange(p.shape[1], device=p.device) == targets[:, None], p - 1, p)
    if softcap:
        grad = grad * (1 - capped.square())  # d(softcap·tanh(z/softcap))/dz
    return loss, grad.to(h.dtype)


def _onednn_linear():
    """oneDNN's matmul as torch registers it (the op inductor's CPU passes call), or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_LINEAR = _onednn_linear()


def _logits_into(h, w, out):
    """out (c, V) = h (c, d) @ w (V, d)ᵀ. In fp32 on the CPU through oneDNN: torch's fp32 mm
    goes to MKL, which runs this wide, shallow product (V = 49,152 outputs from d = 576) at
    ~60% of oneDNN's rate on an AVX2 EPYC (alternating pairs, c = 256: median 1.46× with the
    copy below). Both compute plain fp32 products (no reduced-precision math mode is set);
    the copy into `out` costs 5–10% of the product."""
    if _LINEAR is not None and h.dtype == torch.float32 and h.device.type == "cpu":
        out.copy_(_LINEAR(h, w, None, "none", [], ""))
    else:
        torch.mm(h, w.t(), out=out)


def _chunk_in_place(h, w, targets, out):
    """`_chunk`'s work with the built kernel: the (c, V) logits into `out` (h's dtype), which
    becomes their gradient; returns the (c,) per-position losses, or None where the inputs do
    not qualify (nothing written is then used)."""
    _logits_into(h, w, out)
    return kernels.softmax_xent(out, targets)


_compiled_chunk = None


def compiled_chunk():
    """`_chunk` fused by torch.compile: one or two passes over the (c, V) logits instead of five."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk, dynamic=True)
    return _compiled_chunk


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i Wᵀ, t_i) for h (n, d), W (V, d); gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk, fused=False, grad_enabled=True):
        w = weight.to(h.dtype)
        # needs_input_grad follows requires_grad even under no_grad: evaluation of a model whose
        # head trains would still build the (n, V) logit gradients. The caller's grad mode decides.
        want_h, want_w = ctx.needs_input_grad[0] and grad_enabled, ctx.needs_input_grad[1] and grad_enabled
        grad_h = torch.empty_like(h) if want_h else None
        # A trained head needs d(loss)/d(logits) of every position for one (V, n) @ (n, d)
        # product: kept in the compute dtype (bf16: half of transformers' fp32 logits), which is
        # faster than a product and an fp32 sum per chunk.
        grad_logits = torch.empty(len(targets), w.shape[0], dtype=h.dtype, device=h.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # fused, on the CPU: kernels.softmax_xent turns each chunk's logits into their gradient
        # in place, in one (c, V) buffer of h's dtype (a trained head's rows of grad_logits)
        in_place = (fused and not softcap and (want_h or want_w) and h.device.type == "cpu"
                    and kernels.has_vectorized_loss(h.dtype))
        buffer = None if want_w or not in_place else torch.empty(min(chunk, len(targets)), w.shape[0], dtype=h.dtype)
        for i in range(0, len(targets), chunk):
            part = slice(i, i + chunk)
            grad = grad_logits[part] if want_w else buffer[: len(targets[part])] if in_place else None
            rows = _chunk_in_place(h[part], w, targets[part], grad) if in_place else None
            if rows is not None:
                loss = rows.sum()
            else:
                loss, grad = (compiled_chunk() if fused else _chunk)(h[part], w, targets[part], softcap, want_h or want_w)
                if want_w:
                    grad = grad_logits[part].copy_(grad)
            total += loss
            if want_h:
                torch.mm(grad, w, out=grad_h[part])  # (c, V) @ (V, d)
        # The head's gradient waits for backward, where the incoming scale is known: scaling h
        # (n, d) there costs n·d, scaling the (V, d) product would cost V·d (V ≫ n on a vocabulary).
        ctx.save_for_backward(grad_h, grad_logits, h if want_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_logits, h = ctx.saved_tensors
        grad_w = None
        if grad_logits is not None:  # (V, n) @ (n, d)
            grad_w = torch.mm(grad_logits.t(), h * grad_total.to(h.dtype)).to(ctx.weight_dtype)
        return (grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None,
                grad_w, None, None, None, None, None)


def hidden_states(model, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """(B, k+T, d) final hidden states for `input_ids` (B, T), through every hook on `model`
    (prompt tuning puts k virtual positions in front; k = 0 otherwise). `inputs`: more
    arguments of the model's forward (an attention mask, a KV cache and use_cache=True)."""
    captured = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.base_model.register_forward_hook(grab)
    # An empty index list: the head runs on no position. (logits_to_keep=1 slices a
    # non-contiguous (B, 1, d) view, which F.linear turns into a bmm over B copies of W.)
    none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    try:
        model(input_ids=input_ids, logits_to_keep=none, **({"use_cache": False} | inputs))
    finally:
        handle.remove()
    return captured[-1]


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = 256, fused: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (as transformers).
    `fused`: run the per-chunk softmax through torch.compile."""
    total, count = causal_lm_loss_sum(model, input_ids, labels, chunk, fused)
    return total / count.clamp_min(1)


def causal_lm_loss_sum(model, input_ids, labels, chunk: int = 256, fused: bool = False):
    """(summed loss, number of target positions): what data-parallel processes add up."""
    h = hidden_states(model, input_ids)
    k = h.shape[1] - input_ids.shape[1]
    if k > 0:  # the last virtual position predicts the first real token (as transformers and peft)
        h, targets = h[:, k - 1 : -1], labels.reshape(-1)
    else:  # position t predicts token t+1
        h, targets = h[:, :-1], labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    h = h.reshape(-1, h.shape[-1])[keep]
    targets = targets[keep]
    device = h.device.type
    if torch.is_autocast_enabled(device):
        # The head runs in the autocast dtype, as F.linear would under autocast. (A trainable
        # final norm keeps an fp32 weight, so h may arrive in fp32.)
        h = h.to(torch.get_autocast_dtype(device))
    head = model.get_output_embeddings()
    weight = head_weight(head)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if weight is None:  # an added module on the head that is not a weight: run the layer itself
        logits = head(h).float()  # (n, V)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="sum"), keep.sum()
    # (the named range lets bench/profile.py tell the output layer's time from the blocks')
    with torch.autocast(device, enabled=False), torch.profiler.record_function("peftlab.loss"):  # dtypes chosen here
        total = LinearCrossEntropy.apply(h, weight, targets, softcap, chunk, fused, torch.is_grad_enabled())
    return total, keep.sum()


def head_weight(head):
    """The output layer's effective weight (V, d): the plain weight, or what the added modules
    on it make of it (`Added.head_weight`: trained token rows, a trained copy). The chunked
    loss multiplies by this weight without calling the layer, so its hooks would be skipped.
    None when an active added module has no such weight, or rows are routed: the loss then
    runs the layer."""
    from .methods.attach import active, attached

    weight = head.weight
    for _, _, slot in attached(head):
        if slot.rows is not None:
            return None
        for child in active(slot):
            weight = child.head_weight(head, weight)
            if weight is None:
                return None
    return weight


class LossModule(nn.Module):
    """The model and its loss as one module, which is what DDP and FSDP wrap.

    forward(ids (B, T), labels (B, T)) -> (summed loss, number of target positions)."""

    def __init__(self, model, chunked: bool = True, fused: bool = False):
        super().__init__()
        self.model, self.chunked, self.fused = model, chunked, fused

    def forward(self, ids, labels):
        if self.chunked:
            return causal_lm_loss_sum(self.model, ids, labels, fused=self.fused)
        count = (labels[:, 1:] != IGNORE).sum()
        return self.model(input_ids=ids, labels=labels).loss * count, count


def batch_loss(model, ids, labels, chunked: bool = True, fused: bool = False) -> torch.Tensor:
    """Mean next-token loss of one batch, chunked (loss.py) or through transformers' own head."""
    total, count = LossModule(model, chunked, fused)(ids, labels)
    return total / count.clamp_min(1)


@torch.no_grad()
def held_out_loss(model, blocks, device, dtype, batch_size: int, chunked: bool = True, fused: bool = False,
                  forward=None) -> float:
    """Mean token loss over all held-out blocks (each process takes its share of every batch)."""
    forward = forward or LossModule(model, chunked, fused)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(blocks.held_ids), batch_size):
        ids = torch.tensor_split(blocks.held_ids[i : i + batch_size], distributed.world_size())[distributed.rank()]
        labels = torch.tensor_split(blocks.held_labels[i : i + batch_size], distributed.world_size())[distributed.rank()]
        weight = 1.0
        if len(ids) == 0:  # fewer rows than processes: every process must still run (FSDP gathers)
            ids, labels, weight = blocks.held_ids[i : i + 1], blocks.held_labels[i : i + 1], 0.0
        with runtime.autocast(device, dtype):
            loss, n = forward(ids.to(device), labels.to(device))
        total += float(loss) * weight
        count += int(n) * weight
    total, count = distributed.all_sum([total, count], device)
    model.train(was_training)
    return total / max(1.0, count)
