"""Where one training step's time goes: a torch.profiler trace of peftlab's own loop, bucketed.

    python -m peftlab.bench.profile --case full --dtype bf16 --mode compile

Runs the bench's config through `run.fit` (the loop users run), profiles `--steps` steps after
`--warmup` (compiling happens in the warm-up), and sums each operator's self time into:

    gemm         matrix products of the linear layers (mm, addmm, int8 _int_mm, oneDNN linear)
    attention    the attention kernels (flash forward/backward; under compile, the batched
                 products bmm of the fused backward)
    loss         everything the chunked output layer and cross-entropy run, its GEMMs included
    optimizer    the optimizer step (its own loops included: kernels.py) and gradient clipping
    elementwise  everything else that computes: compiled (fused) kernels, eager pointwise ops,
                 casts and copies, norms, rotary, residual adds
    overhead     time in Python, dispatch and the autograd engine outside any operator

Milliseconds per step; `wall` is the measured step time, so the buckets show its share.
"""

import argparse
import json
import sys
import time

import torch

GEMM = ("aten::mm", "aten::addmm", "aten::_int_mm", "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm",
        "mkldnn::_mkl_linear", "aten::linear")
TOP = 6
BUCKETS = ("gemm", "attention", "loss", "optimizer", "elementwise", "overhead")


def bucket(event) -> str:
    """The bucket of one profiler event's self time (by its name and its enclosing ranges)."""
    name, scopes = event.name, []
    parent = event.cpu_parent
    while parent is not None:
        scopes.append(parent.name)
        parent = parent.cpu_parent
    if any(s.startswith("Optimizer.step") or s == "peftlab.clip" for s in [name, *scopes]) or "fused_adam" in name:
        return "optimizer"
    if name == "peftlab.loss" or any(s == "peftlab.loss" or "LinearCrossEntropy" in s for s in scopes):
        return "loss"
    if "attention" in name.lower() or name == "aten::bmm" or any("CausalAttention" in s for s in scopes):
        return "attention"
    if name in GEMM:
        return "gemm"
    if name.startswith(("aten::", "mkldnn::", "quantized::", "inductor::", "cpp_fused", "graph_", "## Call")) or "kernel" in name:
        return "elementwise"
    return "overhead"


def profile(config: str, precision: str, mode: str, steps: int = 3, warmup: int = 3, batch_size: int = 4,
            seq_len: int = 256, model: str = "smollm2-135m", data: str = "moby-dick") -> dict:
    from .. import run
    from ..config import TrainConfig
    from .configs import CONFIGS

    torch.manual_seed(0)
    spec, _ = CONFIGS[config]
    cfg = TrainConfig(steps=warmup + steps, batch_size=batch_size, seq_len=seq_len, lr=1e-4, warmup=0, seed=0,
                      eval_every=-1, dtype=precision, device="cpu", compile=mode != "eager",
                      base_precision="int8" if mode == "int8" else "float",
                      master_weights="bf16-compensated" if mode == "compensated" else "fp32")
    r = run.prepare(run.load(model, data, cfg, show=False), spec)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    walls = []

    def on_step(step, record, opt):
        if step == warmup:
            prof.__enter__()
        elif step > warmup:
            walls.append(record["step_time"])
        if step == warmup + steps:
            prof.__exit__(None, None, None)

    start = time.perf_counter()
    run.fit(r, show=False, on_step=on_step)
    totals, ops = dict.fromkeys(BUCKETS, 0.0), {}
    for e in prof.events():
        where = bucket(e)
        totals[where] += e.self_cpu_time_total / 1e3 / steps  # µs -> ms per step
        ops[(where, e.name)] = ops.get((where, e.name), 0.0) + e.self_cpu_time_total / 1e3 / steps
    wall = 1e3 * sum(walls) / len(walls)
    # the trace's own cost inflates every bucket alike: scale them to the measured step
    scale = wall / max(1e-9, sum(totals.values()))
    return {"config": config, "precision": precision, "mode": mode, "wall_ms": wall,
            "ms": {k: v * scale for k, v in totals.items()}, "seconds": time.perf_counter() - start,
            "top": {b: sorted(((n, v * scale) for (w, n), v in ops.items() if w == b), key=lambda x: -x[1])[:TOP] for b in BUCKETS}}


def table(results: list[dict]) -> str:
    head = "| config | setting | step ms | " + " | ".join(BUCKETS) + " |"
    lines = [head, "|" + "---|" * (3 + len(BUCKETS))]
    for r in results:
        cells = " | ".join(f"{r['ms'][b]:,.0f} ({100 * r['ms'][b] / r['wall_ms']:.0f}%)" for b in BUCKETS)
        lines.append(f"| {r['config']} | {r['precision']} {r['mode']} | {r['wall_ms']:,.0f} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", default=None)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--mode", action="append", default=None, help="eager | compile | int8 | compensated (repeatable)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--top", action="store_true", help="also list each bucket's largest operators")
    a = ap.parse_args(argv)
    results = []
    for case in a.case or ["lora-r8-qv", "freeze-attention", "full"]:
        for mode in a.mode or ["compile"]:
            results.append(profile(case, a.dtype, mode, a.steps, a.warmup))
            print(table(results[-1:]).splitlines()[-1], flush=True)
            if a.top:
                for b, found in results[-1]["top"].items():
                    print(f"    {b}: " + "; ".join(f"{n[:60]} {v:.0f}" for n, v in found), flush=True)
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
