"""One benchmark measurement in its own process (so peak memory is its own).

    python -m peftlab.bench.worker '{"impl": "peftlab", "config": "lora-r8-qv", "precision": "bf16", "mode": "compile", ...}'

Prints one JSON line: median step time, tokens/s, peak memory, and the ceiling inputs.
"""

import json
import statistics
import sys

import torch

from .. import run, runtime
from ..train import TrainConfig
from . import ceiling, reference
from .configs import CONFIGS


def measure(job: dict) -> dict:
    torch.manual_seed(0)
    spec, setup = CONFIGS[job["config"]]
    steps = job["warmup"] + job["steps"]
    cfg = TrainConfig(steps=steps, batch_size=job["batch_size"], seq_len=job["seq_len"], lr=1e-4, warmup=0, seed=0,
                      eval_every=-1, dtype=job["precision"], device="cpu", compile=job["mode"] == "compile")
    r = run.load(job["model"], job["data"], cfg, show=False)
    loaded = r.loaded
    if job["impl"] == "peftlab":
        model = run.prepare(r, spec).model
        times = [rec["step_time"] for rec in run.fit(r, show=False) if "step_time" in rec]
    else:
        model = reference.build(loaded.model, setup, job["mode"])
        times = reference.train_steps(model, r.blocks.batches(job["batch_size"], 0), steps, job["mode"])
    times = times[job["warmup"]:]
    tokens = job["batch_size"] * job["seq_len"]
    step = statistics.median(times)
    return {
        "step_time_s": step, "tokens_per_s": tokens / step, "peak_rss_bytes": runtime.peak_memory(torch.device("cpu")),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_matmul": ceiling.trainable_matmul_params(model),
        "flops_per_token": ceiling.flops_per_token(loaded.model, ceiling.trainable_matmul_params(model), job["seq_len"]),
    }


def main() -> int:
    job = json.loads(sys.argv[1])
    print(json.dumps(job | measure(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
