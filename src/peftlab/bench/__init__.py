"""`peftlab bench`: peftlab against HF peft + transformers, same model, batches and config.

Each (configuration, implementation, precision) runs in its own process, alternating peftlab
and the reference over `repeats` rounds; the table shows medians, ratios peftlab / peft, and
every figure as a share of the machine's measured ceiling.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ..files import write_text
from .configs import CONFIGS  # noqa: F401  (re-exported)

MODES = {"fp32": ["fp32"], "bf16": ["autocast", "bf16-model"]}  # the reference's candidate settings per precision
OURS = ["eager", "compile"]  # peftlab's settings: as is, and with --compile


def _run(job: dict) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "peftlab.bench.worker", json.dumps(job)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed for {job}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_ceiling(model_name: str, rows: int) -> dict:
    from .. import models
    from .ceiling import gemm_flops_per_s

    model = models.load(model_name).model
    return {"fp32": gemm_flops_per_s(model, rows, torch.float32), "bf16": gemm_flops_per_s(model, rows, torch.bfloat16)}


def run_bench(model: str = "smollm2-135m", data: str = "moby-dick", configs=None, precisions=("fp32", "bf16"),
              steps: int = 5, warmup: int = 2, repeats: int = 2, batch_size: int = 4, seq_len: int = 256, log=print) -> dict:
    configs = list(configs or CONFIGS)
    base = {"model": model, "data": data, "steps": steps, "warmup": warmup, "batch_size": batch_size, "seq_len": seq_len}
    runs = []
    for rnd in range(repeats):
        for name in configs:
            for precision in precisions:
                jobs = [{"impl": "peftlab", "mode": m} for m in OURS] + [{"impl": "peft", "mode": m} for m in MODES[precision]]
                if rnd % 2:
                    jobs.reverse()  # alternate who goes first
                for j in jobs:
                    job = base | j | {"config": name, "precision": precision, "round": rnd}
                    log(f"round {rnd + 1}/{repeats} · {name} · {precision} · {j['impl']} ({j['mode']})")
                    runs.append(_run(job))
    ceil = machine_ceiling(model, batch_size * seq_len)
    return {"setup": base, "runs": runs, "gemm_flops_per_s": ceil, "machine": machine(), "rows": summarize(runs, ceil)}


def machine() -> dict:
    from ..runtime import hardware, versions

    return hardware(torch.device("cpu")) | versions() | {"system": platform.system()}


def summarize(runs: list, ceil: dict) -> list[dict]:
    """Medians over rounds; for each side, its fastest setting per precision."""
    groups = {}
    for r in runs:
        groups.setdefault((r["config"], r["precision"], r["impl"], r["mode"]), []).append(r)
    rows = []
    for name in dict.fromkeys(r["config"] for r in runs):
        for precision in dict.fromkeys(r["precision"] for r in runs):
            def med(impl, mode, key):
                rs = groups.get((name, precision, impl, mode), [])
                return statistics.median(x[key] for x in rs) if rs else None

            keys = ("tokens_per_s", "peak_rss_bytes", "flops_per_token")
            mine = {m: {k: med("peftlab", m, k) for k in keys} for m in OURS}
            theirs = {m: {k: med("peft", m, k) for k in keys} for m in MODES[precision]}
            our_mode = max(mine, key=lambda m: mine[m]["tokens_per_s"] or 0)
            best_mode = max(theirs, key=lambda m: theirs[m]["tokens_per_s"] or 0)
            ours, best = mine[our_mode], theirs[best_mode]
            limit = ceil[precision] / ours["flops_per_token"]
            rows.append({
                "config": name, "precision": precision, "peftlab_mode": our_mode,
                "all_peftlab_tok_s": {m: v["tokens_per_s"] for m, v in mine.items()},
                "all_peftlab_peak_mb": {m: v["peak_rss_bytes"] / 1e6 for m, v in mine.items()},
                "peftlab_tok_s": ours["tokens_per_s"], "peft_tok_s": best["tokens_per_s"], "peft_mode": best_mode,
                "all_peft_tok_s": {m: v["tokens_per_s"] for m, v in theirs.items()},
                "all_peft_peak_mb": {m: v["peak_rss_bytes"] / 1e6 for m, v in theirs.items()},
                "speed_ratio": ours["tokens_per_s"] / best["tokens_per_s"],
                "peftlab_peak_mb": ours["peak_rss_bytes"] / 1e6, "peft_peak_mb": best["peak_rss_bytes"] / 1e6,
                "memory_ratio": ours["peak_rss_bytes"] / best["peak_rss_bytes"],
                "ceiling_tok_s": limit, "peftlab_pct_ceiling": 100 * ours["tokens_per_s"] / limit,
                "peft_pct_ceiling": 100 * best["tokens_per_s"] / limit,
            })
    return rows


def markdown(result: dict) -> str:
    s, m, c = result["setup"], result["machine"], result["gemm_flops_per_s"]
    lines = [
        "# Benchmark: peftlab vs HF peft + transformers", "",
        f"Model `{s['model']}`, data `{s['data']}`, batch {s['batch_size']} × seq {s['seq_len']}, "
        f"{s['warmup']} warm-up + {s['steps']} timed steps, medians over alternating rounds; each run in its own process.",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, transformers {m.get('transformers')}, "
        f"peft {m.get('peft')}. Measured GEMM ceiling on the model's shapes: fp32 {c['fp32'] / 1e9:,.0f} GFLOP/s, "
        f"bf16 {c['bf16'] / 1e9:,.0f} GFLOP/s.", "",
        "| config | precision | peftlab tok/s (its best setting) | peft tok/s (its best setting) | speed ratio | peftlab peak MB | peft peak MB "
        "| memory ratio | ceiling tok/s | peftlab % ceiling | peft % ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['precision']} | {r['peftlab_tok_s']:,.0f} ({r['peftlab_mode']}) | "
                     f"{r['peft_tok_s']:,.0f} ({r['peft_mode']}) | "
                     f"**{r['speed_ratio']:.2f}×** | {r['peftlab_peak_mb']:,.0f} | {r['peft_peak_mb']:,.0f} | "
                     f"**{r['memory_ratio']:.2f}×** | {r['ceiling_tok_s']:,.0f} | {r['peftlab_pct_ceiling']:.0f}% | "
                     f"{r['peft_pct_ceiling']:.0f}% |")
    lines += ["", "Every setting, tokens/s and peak MB (peftlab: as is, and `--compile`; peft: fp32, bf16 autocast over "
              "an fp32 model, or the model loaded in bf16):", "", "| config | precision | setting | tok/s | peak MB |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        for side in ("peftlab", "peft"):
            for mode, tok in r.get(f"all_{side}_tok_s", {}).items():
                lines.append(f"| {r['config']} | {r['precision']} | {side} {mode} | {tok:,.0f} | {r[f'all_{side}_peak_mb'][mode]:,.0f} |")
    if result.get("inference"):
        i = result["inference"]
        lines += ["", f"Inference (one forward of 1 × {s['seq_len']}, {i['precision']}): base {i['base_ms']:.1f} ms, "
                  f"unmerged LoRA {i['unmerged_ms']:.1f} ms (**{i['unmerged_ms'] / i['base_ms']:.2f}×**), "
                  f"merged {i['merged_ms']:.1f} ms (**{i['merged_ms'] / i['base_ms']:.2f}×**)."]
    return "\n".join(lines) + "\n"


def write_results(result: dict, path: Path) -> None:
    write_text(Path(path), markdown(result))
    write_text(Path(path).with_suffix(".json"), json.dumps(result, indent=1))
