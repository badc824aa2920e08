"""The optimizer: AdamW over the trainable parameters, with their master copies in fp32
(default) or kept in bf16 with compensated updates (`--master-weights bf16-compensated`).

fp32 masters: 4 bytes per trained weight, 4 for its gradient, 8 for the two moments, and the
bf16 copy autocast makes for every product (2). In a bf16 run in one process without gradient
accumulation, a trained Linear weight is instead stored in bf16 (2) with its gradient (2), and
the optimizer holds its fp32 master (4) and moments (8): MasterAdamW, the same numbers without
the casts. bf16-compensated: the trained weight itself
is bf16 (2, no casts), its gradient bf16 (2), the moments bf16 (2 + 2) and a bf16 compensation
buffer (2) holds what rounding the weight to bf16 dropped — 10 bytes instead of 18, and close
to fp32 masters in what it learns, unlike plain bf16 weights (8 bytes), where an update smaller
than half a bf16 step (lr · ~1 against |w| · 2⁻⁹) is rounded away and lost:

    y = Δ + c;   w' = bf16(w + y);   c' = bf16(y − (w' − w))      Kahan summation
    m, v        = bf16_stochastic(β m + (1−β) g)                  unbiased: E[round(x)] = x

The moments are rounded stochastically: v's per-step change ((1−β₂) v ≈ 10⁻³ v) is below
bf16's resolution, so round-to-nearest would freeze it; random rounding keeps it right on
average.

The whole update of one tensor is one pass (kernels.py: a loop built with the system's C++
compiler; `_update` below is the same step in torch ops, bit-identical, used where there is no
compiler): it reads g, w, m, v, c (bf16) and writes w, m, v, c, with every fp32 value in
registers — no tensor-sized temporaries. Its random bits come from a counter-based generator:
a hash of (seed, step, element index), where each tensor's seed is drawn once from torch's
generator. Nothing is drawn per step, the bits do not depend on how the pass is split across
threads, and a checkpoint (which saves the seed and step with the moments) resumes
bit-identically.

The compensation starts as what rounding the fp32 weights to bf16 dropped (`rounding_residual`),
so a run starts from exactly the weights an fp32-master run starts from.
"""

import math

import torch
from torch.optim.adam import adam as fused_adam_step

MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # a 32-bit mixing constant (odd, < 2³¹ so products of 32-bit values fit in int64)


def adamw(groups, lr: float, weight_decay: float, master_weights: str = "fp32", start=None) -> torch.optim.Optimizer:
    """AdamW for `groups` (tensors or param-group dicts).

    fp32: torch's fused kernel, one pass over each tensor instead of a dozen foreach passes,
    ~4.5× faster on the CPU for a full fine-tune of SmolLM2 and no model-sized temporaries;
    `start` {bf16 parameter: its fp32 weight} makes the optimizer hold those fp32 masters
    (MasterAdamW). bf16-compensated: `start` {parameter: bf16 tensor} holds the compensation
    buffers' first values (`rounding_residual`), so the run starts from the exact fp32 weights."""
    if master_weights == "bf16-compensated":
        return CompensatedAdamW(groups, lr=lr, weight_decay=weight_decay, residuals=start)
    if start:
        return MasterAdamW(groups, lr=lr, weight_decay=weight_decay, masters=start)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)


def master_candidates(model: torch.nn.Module) -> list[str]:
    """Trained weights whose fp32 master the optimizer can hold while the model keeps a bf16
    copy, with nothing computed differently: weights of `nn.Linear` layers only (autocast
    multiplies them in bf16 anyway, so their gradient arrives bf16-rounded), each held by no
    other module (a tied embedding is read in fp32) and not the output layer (the chunked loss
    reads it itself)."""
    holders: dict[int, list] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(module)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(head.weight)} if head is not None else set()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float32 and id(p) not in skip
            and all(isinstance(m, torch.nn.Linear) and m.weight is p for m in holders[id(p)])]


def clip_gradients(opt: torch.optim.Optimizer, params: list, max_norm: float) -> torch.Tensor:
    """Clip the gradients' total norm to `max_norm` (as torch's clip_grad_norm_); returns the norm
    before clipping. The compensated and master-holding optimizers take the factor into their
    own pass over each gradient, which saves a read and a write of every gradient (and, for a
    bf16 one, its rounding)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = total_norm(grads)
    if isinstance(opt, (CompensatedAdamW, MasterAdamW)):
        whole = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the norm over every shard
        opt.grad_scale = float(torch.clamp(max_norm / (whole + 1e-6), max=1.0)) if math.isfinite(max_norm) else 1.0
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def total_norm(grads: list) -> torch.Tensor:
    """The 2-norm of all `grads` together, as torch.nn.utils.get_total_norm: by the built kernel
    where every tensor qualifies (CPU, bf16 or fp32, contiguous; summed in float64), else by torch
    (GPUs, FSDP's sharded tensors). As torch's fp32 sum, a sum of squares past the fp32 range
    makes the norm infinite: the loop refuses such a step rather than clip it to size."""
    from . import kernels

    squares = kernels.sum_squares(grads) if grads else None
    if squares is None:
        return torch.nn.utils.get_total_norm(grads)
    return torch.tensor(math.inf if squares > torch.finfo(torch.float32).max else math.sqrt(squares))  # NaN stays NaN


def rounding_residual(p: torch.Tensor) -> torch.Tensor:
    """What storing fp32 `p` in bf16 drops, as bf16: p − bf16(p) (exact in fp32; its bf16 copy
    keeps 8 of the 16 dropped bits, a relative error of 2⁻¹⁷ in p)."""
    return (p.detach().float() - p.detach().to(torch.bfloat16).float()).to(torch.bfloat16)


def mix32(x):
    """A 32-bit integer hash (two multiply-xorshift rounds) of x in [0, 2³²): int64 tensors or ints."""
    x = (((x >> 16) ^ x) * _MUL) & MASK32
    x = (((x >> 16) ^ x) * _MUL) & MASK32
    return (x >> 16) ^ x


def stream_key(seed: int, step: int) -> int:
    """The counter offset of one tensor's random bits at one step (both ints)."""
    return mix32((mix32(seed & MASK32) + (step & MASK32)) & MASK32)


def random_bits(n: int, key, device=None) -> torch.Tensor:
    """32 random bits (int64 in [0, 2³²)) for elements 0..n-1 of the stream `key`."""
    return mix32((torch.arange(n, dtype=torch.int64, device=device) + key) & MASK32)


def round_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding away from zero with probability equal to the dropped fraction: add
    16 random low bits (`bits`, int in [0, 2¹⁶)) to the fp32 pattern, then cut them (bf16 is
    fp32's upper half)."""
    pattern = x.contiguous().view(torch.int32)
    return ((pattern + bits.to(torch.int32)) & -65536).view(torch.float32).to(torch.bfloat16)


def _update(w, g, m, v, c, key, step_size, inv_sqrt_bc2, decay, b1, b2, eps, gscale):
    """One compensated AdamW step of one flattened bf16 tensor, in place.

    w, g, m, v, c: (n,) bf16 — weight, gradient, moments, compensation. key: int64 0-d (the
    tensor's stream this step); the other scalars are fp32 0-d tensors: step_size = lr / (1 − β₁ᵗ),
    inv_sqrt_bc2 = 1 / √(1 − β₂ᵗ), decay = lr · wd, gscale = the gradient clipping factor."""
    g32, w32 = g.float() * gscale, w.float()
    m32 = m.float() * b1 + g32 * (1 - b1)
    v32 = v.float() * b2 + g32 * g32 * (1 - b2)
    # √ through float64: torch's fp32 sqrt is not correctly rounded on every CPU (AVX2: about one
    # value in five is an ulp off), the kernel's is. The root of an fp32 value lies at least
    # ~2⁻⁵⁰ (relative) from an fp32 rounding midpoint, so a float64 root a few ulps off still
    # rounds to the correctly rounded fp32 root.
    root = v32.double().sqrt_().float()
    y = c.float() - decay * w32 - step_size * m32 / (root * inv_sqrt_bc2 + eps)
    new = (w32 + y).to(torch.bfloat16)
    bits = random_bits(w.shape[0], key, w.device)
    m.copy_(round_stochastic(m32, bits & 0xFFFF))
    v.copy_(round_stochastic(v32, bits >> 16))
    c.copy_((y - (new.float() - w32)).to(torch.bfloat16))
    w.copy_(new)


def update(w, g, m, v, c, key: int, scalars: list) -> None:
    """One tensor's step: the built kernel (kernels.py), or `_update` in torch ops where it is
    not available (no C++ compiler: same numbers, with fp32 temporaries)."""
    from . import kernels

    if not kernels.compensated_adamw(w, g, m, v, c, key, *scalars):
        _update(w, g, m, v, c, torch.tensor(key, dtype=torch.int64), *(torch.tensor(x, dtype=torch.float32) for x in scalars))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP-sharded tensor (the update is elementwise), else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW on bf16 parameters: Kahan-compensated weights, stochastically rounded moments.
    State per parameter: step (fp32 0-d), seed (int64 0-d), exp_avg, exp_avg_sq, compensation
    (bf16, the parameter's shape)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, residuals=None, kernel=update):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.kernel = kernel  # update(w, g, m, v, c, key, scalars) for one flattened tensor
        # {parameter: bf16 rounding residual}: each becomes its parameter's compensation at its
        # first step (parameters a schedule unfreezes later add theirs here)
        self.residuals = dict(residuals or {})
        self.grad_scale = 1.0  # gradient clipping's factor for the next step (clip_gradients), applied in the pass

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16 or p.grad.dtype != torch.bfloat16:
                    raise TypeError(f"compensated AdamW trains bf16 weights with bf16 gradients, got {p.dtype} / {p.grad.dtype}")
                state = self.state[p]
                residual = self.residuals.pop(p, None)  # (a resumed run's state already holds its compensation)
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["seed"] = torch.randint(0, 1 << 62, (), dtype=torch.int64)  # from torch's generator, once
                    for name in ("exp_avg", "exp_avg_sq"):
                        state[name] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                    state["compensation"] = residual if residual is not None else torch.zeros_like(state["exp_avg"])
                state["step"] += 1
                t = int(state["step"])
                scalars = [group["lr"] / (1 - b1 ** t), (1 - b2 ** t) ** -0.5, group["lr"] * group["weight_decay"], b1, b2,
                           group["eps"], self.grad_scale]
                flat = [_local(x).view(-1) for x in (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], state["compensation"])]
                self.kernel(*flat, stream_key(int(state["seed"]), t), scalars)
        self.grad_scale = 1.0
        return None


class MasterAdamW(torch.optim.Optimizer):
    """AdamW where some parameters are bf16 copies of fp32 masters the optimizer holds (mixed
    precision as autocast computes it, without autocast's casts).

    Under bf16 autocast an fp32 weight is cast to bf16 for every product and its gradient comes
    back bf16-rounded, then widened into an fp32 `.grad`. Holding the weight in bf16 and its
    fp32 master here computes the same numbers — the forward reads bf16(master) either way, the
    update is torch's fused AdamW on the master with the same fp32 gradient — without the
    casts in the forward, with half-size gradients, and with the clipping factor taken into the
    update (`grad_scale`) instead of a pass over every gradient. What it adds per step: widening
    each gradient (in batches) and writing the bf16 weight back, two torch copies (measured on
    SmolLM2 freeze-attention: elementwise work −110 to −150 ms a step, the optimizer +55 to
    +75 ms). State per parameter: step, exp_avg, exp_avg_sq as torch's AdamW, and `master`
    (fp32) for the bf16 ones; `release_masters` puts the masters back at the end."""

    BATCH = 1 << 22  # weights per fused call: bounds the widened gradients (16 MB) and the calls (~30 for SmolLM2)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, masters=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for p, master in (masters or {}).items():  # in the state from the start: a checkpoint replaces it whole
            self.state[p]["master"] = master
        self.grad_scale = 1.0  # gradient clipping's factor for the next step (clip_gradients)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            batch, size = [], 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                batch.append(p)
                size += p.numel()
                if size >= self.BATCH:
                    self._update(group, batch)
                    batch, size = [], 0
            if batch:
                self._update(group, batch)
        self.grad_scale = 1.0
        return None

    def _update(self, group, params):
        states = [self.state[p] for p in params]
        targets = [s.get("master", p) for p, s in zip(params, states)]
        for state, target in zip(states, targets):
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                for name in ("exp_avg", "exp_avg_sq"):
                    state[name] = torch.zeros_like(target, memory_format=torch.preserve_format)
        # fp32 gradients: a bf16 one widened (a temporary), an fp32 one itself
        grads = [p.grad.to(t.dtype) for p, t in zip(params, targets)]
        if self.grad_scale != 1.0:
            torch._foreach_mul_(grads, self.grad_scale)  # in place, as clipping does: .grad is about to be dropped
        b1, b2 = group["betas"]
        fused_adam_step(targets, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                        [s["step"] for s in states], fused=True, decoupled_weight_decay=True, amsgrad=False,
                        beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                        maximize=False)
        held = [(p, t) for p, t in zip(params, targets) if t is not p]
        if held:  # round to nearest: what autocast's cast of the master gives
            torch._foreach_copy_([p for p, _ in held], [t for _, t in held])


def release_masters(opt) -> None:
    """Give every bf16 parameter its fp32 master back as its weight (the end of training: what
    is saved, merged or measured next is the fp32 weights, as without held masters)."""
    if opt is None:
        return
    for p, state in opt.state.items():
        if "master" in state:
            p.data = state.pop("master")


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup, then cosine decay to 10% of the peak, for optimizer step `step` (1-based)
    of `steps`; `warmup` is a step count (≥ 1) or a fraction of the run."""
    warm = int(warmup if warmup >= 1 else round(warmup * steps))
    if step <= warm:
        return step / max(1, warm)
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
