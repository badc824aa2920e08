"""Inference latency of one forward pass: base, unmerged LoRA, merged LoRA (bf16 compute where
the machine has it natively, else fp32)."""

import statistics
import time

import torch

from .. import models, runtime
from ..merge import merge
from ..methods import prepare


@torch.no_grad()
def _forward_s(model, ids, dtype) -> float:
    start = time.perf_counter()
    with runtime.autocast(ids.device, dtype):
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def inference_latency(model_name: str, seq_len: int, repeats: int = 10, dtype: torch.dtype | None = None) -> dict:
    """Three copies of the model (base, unmerged LoRA, merged LoRA), timed in turn, `repeats` rounds
    after two warm-up rounds, so drift in the machine's speed hits all three alike."""
    dtype = dtype or runtime.check_dtype("auto", torch.device("cpu"))
    ids = None
    variants = {}
    for kind in ("base", "unmerged", "merged"):
        model = models.load(model_name).model.eval().requires_grad_(False)  # inference: every weight frozen
        if kind != "base":
            prepare(model, "lora:r=8,alpha=16,targets=q_proj+v_proj")
            gen = torch.Generator().manual_seed(0)
            for p in model.parameters():
                if p.requires_grad:  # a trained-looking adapter, not B = 0
                    p.data.normal_(0, 0.01, generator=gen)
            if kind == "merged":
                merge(model)
        runtime.store_frozen(model, dtype)
        variants[kind] = model
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in variants}
    for rnd in range(repeats + 2):
        for kind, model in variants.items():
            t = _forward_s(model, ids, dtype)
            if rnd >= 2:
                times[kind].append(t)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"precision": str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32"), "base_ms": ms["base"], "unmerged_ms": ms["unmerged"], "merged_ms": ms["merged"]}
