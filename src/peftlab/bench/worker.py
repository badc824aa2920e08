"""One benchmark measurement in its own process (so peak memory is its own).

    python -m peftlab.bench.worker '{"impl": "peftlab", "config": "lora-r8-qv", "precision": "bf16", "mode": "compile", ...}'

Prints one JSON line: median step time, tokens/s, peak memory, and the ceiling: its inputs, and
the GEMM rate measured in this process right after the timed steps.
"""

import json
import statistics
import sys

import torch

from .. import memory, run
from ..config import TrainConfig
from . import ceiling, reference
from .configs import CONFIGS


def measure(job: dict) -> dict:
    torch.manual_seed(0)
    spec, setup = CONFIGS[job["config"]]
    steps = job["warmup"] + job["steps"]
    ours = job["impl"] == "peftlab"
    cfg = TrainConfig(steps=steps, batch_size=job["batch_size"], seq_len=job["seq_len"], lr=1e-4, warmup=0, seed=0,
                      eval_every=-1, dtype=job["precision"], device="cpu", compile=ours and job["mode"] != "eager",
                      base_precision="int8" if ours and job["mode"] == "int8" else "float",
                      master_weights="bf16-compensated" if ours and job["mode"] == "compensated" else "fp32",
                      grad_checkpoint=job.get("grad_checkpoint", False))
    r = run.load(job["model"], job["data"], cfg, show=False)
    loaded = r.loaded
    shapes = ceiling.linear_shapes(loaded.model)  # the base model's products, before any adapter joins
    if ours:
        model = run.prepare(r, spec).model
        times = [rec["step_time"] for rec in run.fit(r, show=False) if "step_time" in rec]
    else:
        model = reference.build(loaded.model, setup, job["mode"], job.get("grad_checkpoint", False))
        runner = torch.compile(model) if reference.compiled(job["mode"]) else model
        times = reference.train_steps(runner, r.blocks.batches(job["batch_size"], cfg.seed), steps, job["mode"], cfg)
    times = times[job["warmup"]:]
    tokens = job["batch_size"] * job["seq_len"]
    step = statistics.median(times)
    peak = memory.peak_memory(torch.device("cpu"))  # training's peak, before the evaluation below
    # the ceiling in this process's own minute (after the peak is read: its tensors are not training's)
    gemm = ceiling.gemm_flops_per_s(shapes, tokens, ceiling.DTYPES[job["precision"]])
    return {
        "step_time_s": step, "tokens_per_s": tokens / step, "peak_rss_bytes": peak, "gemm_flops_per_s": gemm,
        "eval_loss": held_out(model, r.blocks, job["precision"] == "bf16"),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_matmul": ceiling.trainable_matmul_params(model),
        "flops_per_token": ceiling.flops_per_token(loaded.model, ceiling.trainable_matmul_params(model), job["seq_len"]),
    }


@torch.no_grad()
def held_out(model, blocks, bf16: bool, rows: int = 8) -> float:
    """Mean token loss on the first held-out rows after the timed steps, computed the same way
    for both sides, so a setting that is fast because it is imprecise shows it."""
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return float(model(input_ids=blocks.held_ids[:rows], labels=blocks.held_labels[:rows]).loss)


def main() -> int:
    job = json.loads(sys.argv[1])
    print(json.dumps(job | measure(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
