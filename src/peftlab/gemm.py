"""The linear layers' matrix products in compiled CPU training, split by rows where torch
leaves a core idle.

torch's CPU GEMM (oneDNN's brgemm matmul) chooses its own split of the work between threads,
and for some shapes it uses one thread however many there are. With torch 2.13 on a 2-core
Xeon with AMX, at the 1,024 rows of a 4 × 256 batch, SmolLM2's 1536 → 576 products (the down
projection forward; the gate and up projections' input gradient) and its 576 → 576 ones ran on
one thread: the second thread's CPU time read 0 (at 512 or 2,048 rows both threads work). As
two calls of 512 rows, each on both threads, the 1536 → 576 product ran 1.69× faster (median
of 24 paired alternations; 304–326 GFLOP/s whole) and bit for bit the same; a LoRA training
step ran 1.01–1.47× faster (median 1.15×) in seven alternating pairs of runs, with the same
losses to the last bit. (576 → 576 split gained or lost about 10% by turns: too small a
product to matter.)

So `plan` looks, for each linear shape of the blocks at the run's rows, forward (x·Wᵀ) and
for the input gradient (dy·W), at how many threads torch keeps busy (their CPU time, from
/proc): where it is one, and two row halves keep two busy and give the same bits, the halves
are used. Thread use is oneDNN's choice for a shape, not a speed, so the answer does not move
with the machine's load (five fresh processes on a busy host: the same plan); and since a
split is taken only where it gives the same bits, no choice can change a result. `use` gives those layers
`RowSplitLinear`'s forward, whose products go through `rows_mm`: a custom op that inductor
calls as it calls mm, so compiled graphs keep it. The weight gradient dyᵀ·x stays one torch
product (its shapes keep both threads busy).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .gemm_probe import split_mm

MIN_ROWS = 512  # fewer rows: halves of under 256 rows, too small to gain
PROBE = Path(__file__).with_name("gemm_probe.py")  # run as a script: it needs torch only, not peftlab
PROBE_TIMEOUT_S = 60  # it takes ~3 s; a probe that hangs splits nothing


@torch.library.custom_op("peftlab::rows_mm", mutates_args=())
def rows_mm(a: torch.Tensor, b: torch.Tensor, parts: int, back_parts: int) -> torch.Tensor:
    """a (M, K) · b (K, N) as `parts` products of consecutive rows of a, each written into its
    rows of the result; `back_parts`: the same for the input gradient's dy (M, N) · bᵀ (N, K)."""
    return split_mm(a, b, parts)


@rows_mm.register_fake
def _(a, b, parts, back_parts):
    return a.new_empty(a.shape[0], b.shape[1])


def _setup(ctx, inputs, output):
    a, b, _, back_parts = inputs
    ctx.back_parts = back_parts
    # a is kept only when b trains (its gradient needs it): a frozen layer keeps no activation
    ctx.save_for_backward(a if b.requires_grad else None, b)


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    da = rows_mm(grad, b.t(), ctx.back_parts, 1) if ctx.needs_input_grad[0] else None
    db = (grad.t() @ a).t() if ctx.needs_input_grad[1] else None  # (K, N), as dyᵀ·x is laid out for W
    return da, db, None, None


rows_mm.register_autograd(_backward, setup_context=_setup)


class RowSplitLinear(nn.Linear):
    """nn.Linear without bias whose products run through `rows_mm`, split as `parts` says for
    its rows: parts[rows] = (forward, input gradient) parts. Other row counts run as nn.Linear."""

    parts: dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        fwd, back = self.parts.get(rows, (1, 1))
        if fwd == back == 1:
            return super().forward(x)
        w = self.weight
        if torch.is_autocast_enabled(x.device.type):  # autocast does not know the custom op: cast as it would
            dt = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dt), w.to(dt)
        return rows_mm(x.reshape(rows, x.shape[-1]), w.t(), fwd, back).view(*x.shape[:-1], w.shape[0])


def plan(layers: list, rows: int, dtype: torch.dtype) -> dict:
    """(in, out) -> (forward parts, input-gradient parts) for each shape among `layers`
    (nn.Linear) at `rows` rows in `dtype`: gemm_probe.py's answer, from a process of its own
    whose idle threads sleep (~3 s). Nothing to gain (one thread, few rows) or a failed probe: {}."""
    threads = torch.get_num_threads()
    shapes = sorted({(m.in_features, m.out_features) for m in layers})
    if rows < MIN_ROWS or threads < 2 or not shapes:
        return {}
    job = {"rows": rows, "dtype": str(dtype).removeprefix("torch."), "threads": threads, "shapes": shapes}
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
    try:  # -I: the script's folder (this package) is not put on the probe's import path
        proc = subprocess.run([sys.executable, "-I", str(PROBE), json.dumps(job)], capture_output=True, text=True,
                              env=env, timeout=PROBE_TIMEOUT_S)
        found = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else []
        return {(int(k), int(n)): (int(fwd), int(back)) for k, n, fwd, back in found}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, TypeError):
        return {}


def use(blocks: list, rows: int, dtype: torch.dtype):
    """Give the plain bias-free nn.Linear layers inside `blocks` (on the CPU) whose products gain from
    splitting at `rows` rows the RowSplitLinear forward; returns the function that undoes it."""
    layers = [m for block in blocks for m in block.modules()  # with a bias, torch adds it inside the GEMM
              if type(m) is nn.Linear and m.bias is None and m.weight.device.type == "cpu"]
    shapes = plan(layers, rows, dtype)
    changed = []
    for layer in layers:
        n, k = layer.weight.shape
        if shapes.get((k, n), (1, 1)) != (1, 1):
            layer.__class__ = RowSplitLinear
            layer.parts = {rows: shapes[(k, n)]}
            changed.append(layer)

    def undo():
        for layer in changed:
            layer.__class__ = nn.Linear
            del layer.parts

    return undo

