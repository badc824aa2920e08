"""Study 6: do compensated bf16 master weights learn what fp32 masters learn, at what cost?

Full fine-tuning of SmolLM2-135M on Moby-Dick in bf16 for 200 steps, compiled, from the same
start on the same batches, twice: fp32 master weights (torch's fused AdamW) and compensated
bf16 (`--master-weights bf16-compensated`: bf16 weights, Kahan compensation, stochastically
rounded bf16 moments, one fused pass per tensor). (What dropping the compensation costs, pure
bf16 weights, is the bench's peft `bf16-model` row.) Held-out loss curves overlaid, the loss
of each at every evaluation, median tokens/s, the process's peak memory, and the bytes each
trained weight costs (weight, gradient and optimizer state, counted from the tensors).

    python studies/compensated_bf16.py     # ~20 min on two cores; writes studies/compensated_bf16/
"""

import json
import sys
import time
from pathlib import Path

import torch

from peftlab import memory, run
from common import plot_eval_curves, rewrite_summary_if_asked
from peftlab.files import write_text
from peftlab.methods import trainable_parameters
from peftlab.config import TrainConfig

HERE = Path(__file__).resolve().parent
OUT = HERE / "compensated_bf16"
STEPS, EVERY = 200, 25


def bytes_per_weight(model, opt) -> float:
    """(weight + gradient + optimizer state) bytes over the number of trained weights."""
    params = list(trainable_parameters(model).values())
    n = sum(p.numel() for p in params)
    held = sum(p.numel() * p.element_size() * 2 for p in params)  # the weight and its gradient (same dtype)
    for p in params:
        held += sum(t.numel() * t.element_size() for t in opt.state.get(p, {}).values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
    return held / n


def one(master: str) -> dict:
    cfg = TrainConfig(steps=STEPS, batch_size=4, seq_len=128, lr=1e-4, warmup=0, dtype="bf16", eval_every=EVERY, seed=0,
                      compile=True, master_weights=master)
    r = run.prepare(run.load("smollm2-135m", "moby-dick", cfg, show=False), "full")
    seen = {}

    def on_step(step, record, opt):
        if step == 1:
            seen["bytes"] = bytes_per_weight(r.model, opt)

    start = time.perf_counter()
    records = run.fit(r, show=sys.stdout.isatty(), on_step=on_step)
    return {"master_weights": master, "curve": [(x["step"], x["eval_loss"]) for x in records if "eval_loss" in x],
            "seconds": time.perf_counter() - start, "bytes_per_weight": seen["bytes"],
            "peak_mb": memory.peak_memory(torch.device("cpu")) / 1e6,
            "tokens_per_s": sorted(x["tokens_per_s"] for x in records if "tokens_per_s" in x)[STEPS // 2]}


def plot(results: list, path: Path) -> None:
    plot_eval_curves([(f"{res['master_weights']} master weights", res["curve"]) for res in results], "SmolLM2-135M, full, bf16: fp32 vs compensated bf16 masters", path)


def summary(results: list) -> str:
    ref, comp = results
    lines = ["# Compensated bf16 master weights vs fp32 masters", "",
             f"SmolLM2-135M, full fine-tuning, Moby-Dick, {STEPS} steps of 4 × 128 tokens, lr 1e-4 (cosine), bf16 compute, "
             "compiled, seed 0: both runs start from the same weights and see the same batches. Each run is one process; "
             "peak memory is its resident high-water mark.", "",
             "| master weights | held-out loss (start → end) | bytes per trained weight (weight + grad + state) "
             "| median tokens/s | peak MB |", "|---|---|---|---|---|"]
    for res in results:
        lines.append(f"| {res['master_weights']} | {res['curve'][0][1]:.4f} → {res['curve'][-1][1]:.4f} | "
                     f"{res['bytes_per_weight']:.1f} | {res['tokens_per_s']:,.0f} | {res['peak_mb']:,.0f} |")
    gaps = [(s, (c - f) / f) for (s, f), (_, c) in zip(ref["curve"], comp["curve"])]
    lines += ["", "Held-out loss, compensated relative to fp32 masters, at each evaluation: "
              + ", ".join(f"step {s}: {100 * g:+.2f}%" for s, g in gaps) + ".",
              f"At the end: **{100 * gaps[-1][1]:+.2f}%**.", "",
              "![held-out loss](eval_loss.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    rewrite_summary_if_asked(OUT, summary)
    if sys.argv[1:] and sys.argv[1] in ("fp32", "bf16-compensated"):  # one run, in its own process (its own peak)
        print(json.dumps(one(sys.argv[1])))
        sys.exit(0)
    import subprocess

    results = [json.loads(subprocess.run([sys.executable, __file__, m], check=True, capture_output=True,
                                         text=True).stdout.strip().splitlines()[-1]) for m in ("fp32", "bf16-compensated")]
    OUT.mkdir(exist_ok=True)
    plot(results, OUT / "eval_loss.png")
    write_text(OUT / "results.json", json.dumps(results, indent=1))
    write_text(OUT / "summary.md", summary(results))
    print((OUT / "summary.md").read_text())
