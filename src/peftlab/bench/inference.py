"""Inference latency of one forward pass: base, unmerged LoRA, merged LoRA (bf16 compute)."""

import statistics
import time

import torch

from .. import models, runtime
from ..merge import merge
from ..methods import prepare


@torch.no_grad()
def _forward_ms(model, ids, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        with runtime.autocast(ids.device, torch.bfloat16):
            model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def inference_latency(model_name: str, seq_len: int, repeats: int = 10) -> dict:
    loaded = models.load(model_name)
    model = loaded.model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    runtime.store_frozen(model, torch.bfloat16)
    base = _forward_ms(model, ids, repeats)
    prepare(model, "lora:r=8,alpha=16,targets=q_proj+v_proj")
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.01)
    runtime.store_frozen(model, torch.bfloat16)
    unmerged = _forward_ms(model, ids, repeats)
    merge(model)
    merged = _forward_ms(model, ids, repeats)
    return {"precision": "bf16", "base_ms": base, "unmerged_ms": unmerged, "merged_ms": merged}
