"""Study 4: does an int8 frozen base cost quality?

LoRA r=8 (q, v) on Moby-Dick for 200 steps, twice from the same start on the same batches:
the frozen base in the run's float dtype (`--dtype auto`: bf16 where the CPU computes it
natively, else fp32), and in int8 (`--base-precision int8`: int8 weights, per-token int8
activations and gradients in the base's GEMMs). Held-out loss curves overlaid, the final
held-out loss of each, and forgetting: the held-out loss on Alice before and after.

    python studies/int8_base.py            # ~25 min on two cores; writes studies/int8_base/
"""

import json
import sys
import time
from pathlib import Path

import torch

from peftlab import data, run, runtime
from common import plot_eval_curves, rewrite_summary_if_asked
from peftlab.files import write_text
from peftlab.config import TrainConfig
from peftlab.loss import held_out_loss

HERE = Path(__file__).resolve().parent
OUT = HERE / "int8_base"
STEPS, EVERY = 200, 25


def one(precision: str) -> dict:
    cfg = TrainConfig(steps=STEPS, batch_size=4, seq_len=128, lr=1e-3, dtype="auto", eval_every=EVERY, seed=0,
                      base_precision=precision)
    r = run.load("smollm2-135m", "moby-dick", cfg, show=False)
    alice = data.load_blocks(r.loaded, "alice", cfg.seq_len)
    device, dtype = torch.device("cpu"), runtime.check_dtype(cfg.dtype)
    alice_before = held_out_loss(r.model, alice, device, dtype, cfg.batch_size)
    run.prepare(r, "lora:r=8,alpha=16,targets=q_proj+v_proj")
    start = time.perf_counter()
    records = run.fit(r, show=sys.stdout.isatty())
    seconds = time.perf_counter() - start
    alice_after = held_out_loss(r.model, alice, device, dtype, cfg.batch_size)
    from peftlab.int8 import native_int8

    return {"precision": precision, "dtype": str(dtype).removeprefix("torch."), "native_int8": native_int8(device),
            "curve": [(x["step"], x["eval_loss"]) for x in records if "eval_loss" in x],
            "train_loss": [(x["step"], x["loss"]) for x in records if "loss" in x],
            "alice_before": alice_before, "alice_after": alice_after, "seconds": seconds,
            "tokens_per_s": sorted(x["tokens_per_s"] for x in records if "tokens_per_s" in x)[STEPS // 2]}


def plot(results: list, path: Path) -> None:
    plot_eval_curves([(f"{res['precision']} base ({res['dtype']} compute)", res["curve"]) for res in results], "LoRA r=8 q,v on SmolLM2-135M: float vs int8 frozen base", path)


def summary(results: list) -> str:
    flt, q = results
    rel = (q["curve"][-1][1] - flt["curve"][-1][1]) / flt["curve"][-1][1]
    lines = ["# int8 frozen base vs float base", "",
             f"SmolLM2-135M, LoRA r=8 α=16 on q_proj, v_proj, Moby-Dick, {STEPS} steps of 4 × 128 tokens, lr 1e-3, "
             "seed 0: both runs start from the same weights and see the same batches.", "",
             "| base | compute | held-out loss (start → end) | Alice loss before → after (forgetting) | median tokens/s |",
             "|---|---|---|---|---|"]
    for res in results:
        lines.append(f"| {res['precision']} | {res['dtype']} | {res['curve'][0][1]:.4f} → {res['curve'][-1][1]:.4f} | "
                     f"{res['alice_before']:.4f} → {res['alice_after']:.4f} | {res['tokens_per_s']:,.0f} |")
    start = (q["curve"][0][1] - flt["curve"][0][1]) / flt["curve"][0][1]
    lines += ["", f"Final held-out loss, int8 relative to float: **{100 * rel:+.2f}%** (at step 0, before any training, "
              f"the int8 base alone costs {100 * start:+.2f}%). Alice's 'before' is the float base in both rows; 'after' is "
              "each run's own model.", "",
              "About the tokens/s: " + ("this CPU has int8 dot products, so the int8 GEMMs ran in "
              "`torch._int_mm`." if q.get("native_int8") else "this CPU has no AVX-512 VNNI / AMX, so the int8 products "
              "ran as fp32 GEMMs on the integer values (the same numbers), plus the quantization passes."), "",
              "![held-out loss](eval_loss.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    rewrite_summary_if_asked(OUT, summary)
    results = [one("float"), one("int8")]
    OUT.mkdir(exist_ok=True)
    plot(results, OUT / "eval_loss.png")
    write_text(OUT / "results.json", json.dumps(results, indent=1))
    write_text(OUT / "summary.md", summary(results))
    print((OUT / "summary.md").read_text())
