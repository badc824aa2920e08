"""Which of a model's matrix products torch runs on one thread, and whether two row halves use two.

    OMP_WAIT_POLICY=PASSIVE python gemm_probe.py '{"rows": 1024, "dtype": "bfloat16", "threads": 2, "shapes": [[1536, 576]]}'

prints [[in, out, forward parts, input-gradient parts], ...] (gemm.py's plan). It runs as a
script in a process of its own because thread use is read from each thread's CPU time (Linux
schedstat), and OpenMP's idle threads spin between parallel regions unless told at start-up
to sleep: with the passive policy, a thread that took no part in a product reads 0. Thread use
is oneDNN's choice for the shape and thread count, so the answer does not depend on how busy
the machine is. Needs torch only.
"""

import json
import os
import sys
import time

import torch

MEASURE_S = 0.02  # how long each product runs while its threads' CPU time is read


def split_mm(a: torch.Tensor, b: torch.Tensor, parts: int) -> torch.Tensor:
    """a (M, K) · b (K, N) as `parts` products of consecutive rows of a, each written into its
    rows of the result (gemm.rows_mm's computation)."""
    if parts == 1:
        return torch.mm(a, b)
    out = a.new_empty(a.shape[0], b.shape[1])
    for rows, dest in zip(a.chunk(parts), out.chunk(parts)):
        torch.mm(rows, b, out=dest)
    return out


def best_parts(a: torch.Tensor, b: torch.Tensor) -> int:
    """2 when torch runs a·b on one thread, as two row halves on two or more, and both give
    the same bits; else 1."""
    if not torch.equal(torch.mm(a, b), split_mm(a, b, 2)):  # these first calls also set the kernels up
        return 1
    return 2 if busy_threads(lambda: torch.mm(a, b)) == 1 and busy_threads(lambda: split_mm(a, b, 2)) >= 2 else 1


def busy_threads(f) -> int:
    """How many of this process's threads `f` keeps busy (0: unknown, no /proc): it runs for
    MEASURE_S, and a thread counts with at least a quarter of the busiest one's CPU time."""
    before = _cpu_ns()
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < MEASURE_S:
        f()
        calls += 1
    after = _cpu_ns()
    busy = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
    if not busy or busy[0] <= 0:
        return 0
    return sum(1 for ns in busy if ns >= busy[0] / 4)


def _cpu_ns() -> dict:
    """Thread id -> nanoseconds it has run on a CPU (Linux's schedstat; empty elsewhere)."""
    found = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                found[tid] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return found


@torch.no_grad()
def probe(rows: int, dtype: torch.dtype, shapes: list) -> list:
    """[in, out, forward parts, input-gradient parts] for each (in, out) linear shape at `rows`
    rows: forward x (rows, in) · Wᵀ, input gradient dy (rows, out) · W, W (out, in)."""
    found = []
    for k, n in shapes:
        w = torch.randn(n, k, dtype=dtype)
        found.append([k, n, best_parts(torch.randn(rows, k, dtype=dtype), w.t()),
                      best_parts(torch.randn(rows, n, dtype=dtype), w)])
    return found


def main() -> int:
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    print(json.dumps(probe(job["rows"], getattr(torch, job["dtype"]), job["shapes"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
