"""`peftlab bench`: peftlab against HF peft + transformers, same model, batches and config.

Each (configuration, implementation, setting) runs in its own process, alternating peftlab
and the reference over `repeats` rounds. The reference may pick fp32, bf16 autocast or a bf16
model, each also under `torch.compile`; peftlab may pick eager, compiled, compiled over an int8
frozen base, or compiled with compensated bf16 master weights. Settings are ranked at equal
quality: only those whose held-out loss after the same steps is within 0.5% of the reference's
full-precision setting count, so a setting that is fast because it drops updates does not win.
The table shows medians, ratios peftlab / peft (best eligible vs best eligible, best at any
loss, and eager vs eager), each figure's share of the machine's measured ceiling, and every
setting's held-out loss.
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
from .configs import CONFIGS

_PLAIN = {"fp32": ["fp32"], "bf16": ["autocast", "bf16-model"]}
MODES = {p: m + [x + "+compile" for x in m] for p, m in _PLAIN.items()}  # the reference's settings per precision
OURS = ["eager", "compile", "int8", "compensated"]  # peftlab's: as is, --compile, + --base-precision int8, + bf16 masters
WHOLE_MATRIX = ("full", "freeze-attention")  # configs that train whole weight matrices


def ours(config: str, precision: str = "fp32") -> list[str]:
    """peftlab's settings for a config: int8 only where something frozen is a linear layer,
    compensated bf16 master weights only for whole-matrix training in bf16."""
    modes = OURS[:2]
    if config != "full":
        modes = modes + ["int8"]
    if config in WHOLE_MATRIX and precision == "bf16":
        modes = modes + ["compensated"]
    return modes


def eager(mode: str) -> bool:
    """An uncompiled setting (peftlab's `eager`, or one of the reference's plain ones)."""
    return mode == "eager" or any(mode in m for m in _PLAIN.values())


def _run(job: dict) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "peftlab.bench.worker", json.dumps(job)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed for {job}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_ceiling(model_name: str, rows: int, precisions=("fp32", "bf16")) -> dict:
    from .. import models
    from .ceiling import DTYPES, gemm_flops_per_s, linear_shapes

    shapes = linear_shapes(models.load(model_name).model)
    return {p: gemm_flops_per_s(shapes, rows, DTYPES[p]) for p in precisions}


def run_bench(model: str = "smollm2-135m", data: str = "moby-dick", configs=None, precisions=("fp32", "bf16"),
              steps: int = 5, warmup: int = 2, repeats: int = 2, batch_size: int = 4, seq_len: int = 256, log=print) -> dict:
    configs = list(configs or CONFIGS)
    base = {"model": model, "data": data, "steps": steps, "warmup": warmup, "batch_size": batch_size, "seq_len": seq_len}
    runs = []
    for rnd in range(repeats):
        for name in configs:
            for precision in precisions:
                jobs = [{"impl": "peftlab", "mode": m} for m in ours(name, precision)] + [{"impl": "peft", "mode": m} for m in MODES[precision]]
                if rnd % 2:
                    jobs.reverse()  # alternate who goes first
                for j in jobs:
                    job = base | j | {"config": name, "precision": precision, "round": rnd}
                    log(f"round {rnd + 1}/{repeats} · {name} · {precision} · {j['impl']} ({j['mode']})")
                    runs.append(_run(job))
    ceil = machine_ceiling(model, batch_size * seq_len, precisions)
    return {"setup": base, "runs": runs, "gemm_flops_per_s": ceil, "machine": machine(), "rows": summarize(runs, ceil)}


def machine() -> dict:
    from ..runtime import hardware, versions

    return hardware(torch.device("cpu")) | versions() | {"system": platform.system(), "cpu_features": cpu_features()}


def cpu_features() -> str:
    """The instruction sets that decide what bf16 and int8 cost here (AVX2 only: both emulated)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return ""
    names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "avx512_vnni": "AVX-512 VNNI",
             "amx_bf16": "AMX"}
    return ", ".join(v for k, v in names.items() if k in flags)


REFERENCE = {"fp32": "fp32", "bf16": "autocast"}  # per precision: the reference's setting that loses no update
TOLERANCE = 0.005  # a setting is eligible when its held-out loss is within 0.5% of the reference setting's


def eligible(loss: float, reference: float) -> bool:
    """Equal quality: within TOLERANCE of the full-precision reference (either way: a setting that
    lands far lower is computing something else, not being more careful)."""
    return abs(loss - reference) <= TOLERANCE * reference


def summarize(runs: list, ceil: dict) -> list[dict]:
    """Medians over rounds; per precision, each side's fastest eligible setting (its held-out loss
    within TOLERANCE of the reference's fp32-weight setting), its fastest setting whatever the
    loss, and its fastest eager one."""
    groups = {}
    for r in runs:
        # the run's ceiling: measured in its own process after its steps (older runs: the bench's one)
        limit = r.get("gemm_flops_per_s") or ceil[r["precision"]]
        r = r | {"ceiling_tok_s": limit / r["flops_per_token"], "pct_ceiling": 100 * r["tokens_per_s"] * r["flops_per_token"] / limit}
        groups.setdefault((r["config"], r["precision"], r["impl"], r["mode"]), []).append(r)
    keys = ("tokens_per_s", "peak_rss_bytes", "flops_per_token", "eval_loss", "ceiling_tok_s", "pct_ceiling")
    rows = []
    for name in dict.fromkeys(r["config"] for r in runs):
        for precision in dict.fromkeys(r["precision"] for r in runs):
            def settings(impl):
                found = {mode: rs for (c, p, i, mode), rs in groups.items() if (c, p, i) == (name, precision, impl)}
                return {mode: {k: statistics.median(x[k] for x in rs) for k in keys} for mode, rs in found.items()}

            mine, theirs = settings("peftlab"), settings("peft")
            if not mine or not theirs:
                continue
            ref = theirs.get(REFERENCE[precision], min(theirs.values(), key=lambda v: v["eval_loss"]))["eval_loss"]
            for table in (mine, theirs):
                for v in table.values():
                    v["eligible"] = eligible(v["eval_loss"], ref)
                    v["loss_vs_reference"] = v["eval_loss"] / ref - 1

            def fastest(table, keep=lambda mode, v: True):
                found = {m: v for m, v in table.items() if keep(m, v)}
                return max(found, key=lambda m: found[m]["tokens_per_s"]) if found else None

            ok = lambda m, v: v["eligible"]  # noqa: E731
            our_mode, best_mode = fastest(mine, ok), fastest(theirs, ok)
            our_any, best_any = fastest(mine), fastest(theirs)
            our_eager, their_eager = fastest(mine, lambda m, v: eager(m)), fastest(theirs, lambda m, v: eager(m))
            row = {"config": name, "precision": precision, "reference_loss": ref, "settings": {"peftlab": mine, "peft": theirs},
                   "peftlab_mode": our_mode, "peft_mode": best_mode, "peftlab_any_mode": our_any, "peft_any_mode": best_any,
                   "any_speed_ratio": mine[our_any]["tokens_per_s"] / theirs[best_any]["tokens_per_s"],
                   "eager_speed_ratio": mine[our_eager]["tokens_per_s"] / theirs[their_eager]["tokens_per_s"]
                   if our_eager and their_eager else None}
            if our_mode and best_mode:
                ours_, best = mine[our_mode], theirs[best_mode]
                rounds = [{r.get("round", 0): r["tokens_per_s"] for r in groups[(name, precision, impl, mode)]}
                          for impl, mode in (("peftlab", our_mode), ("peft", best_mode))]
                row |= {
                    "peftlab_tok_s": ours_["tokens_per_s"], "peft_tok_s": best["tokens_per_s"],
                    "speed_ratio": ours_["tokens_per_s"] / best["tokens_per_s"],
                    # the same two settings' ratio within each round: how far one round can be trusted
                    "round_speed_ratios": [rounds[0][k] / rounds[1][k] for k in sorted(rounds[0].keys() & rounds[1].keys())],
                    "peftlab_peak_mb": ours_["peak_rss_bytes"] / 1e6, "peft_peak_mb": best["peak_rss_bytes"] / 1e6,
                    "memory_ratio": ours_["peak_rss_bytes"] / best["peak_rss_bytes"],
                    "peftlab_eval_loss": ours_["eval_loss"], "peft_eval_loss": best["eval_loss"],
                    # each side's share of the ceiling measured in its own runs' minutes (medians over rounds)
                    "ceiling_tok_s": ours_["ceiling_tok_s"], "peftlab_pct_ceiling": ours_["pct_ceiling"],
                    "peft_pct_ceiling": best["pct_ceiling"],
                }
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    s, m, c = result["setup"], result["machine"], result["gemm_flops_per_s"]
    features = m.get("cpu_features")
    lines = [
        "# Benchmark: peftlab vs HF peft + transformers", "",
        f"Model `{s['model']}`, data `{s['data']}`, batch {s['batch_size']} × seq {s['seq_len']}, "
        f"{s['warmup']} warm-up + {s['steps']} timed steps, medians over alternating rounds; each run in its own process.",
        f"Machine: {m.get('cpu')}" + (f" ({features})" if features else "") + f", {m.get('cores')} cores, "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, peft {m.get('peft')}. "
        "Measured GEMM ceiling on the model's shapes after the runs: " + ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in c.items())
        + "; each run's *% ceiling* is against the ceiling measured in its own process right after its timed steps "
        "(medians over rounds): a shared host's speed moves within minutes.", "",
        f"**Ranked at equal quality**: a setting is eligible when its held-out loss after the same {s['warmup'] + s['steps']} "
        f"steps is within {100 * TOLERANCE:g}% of the reference's full-precision setting (peft "
        + " / ".join(f"`{v}` for {k}" for k, v in REFERENCE.items()) + ", fp32 weights: no update lost); "
        "each side is shown at its fastest eligible setting. *Fastest at any loss* ranks every setting, eligible or not; "
        "*eager ratio*: both sides uncompiled. Ratios are peftlab / peft; with several rounds, the speed ratio's "
        "range over the rounds (the same two settings within one round) follows it.", "",
        "| config | precision | peftlab tok/s (setting) | peft tok/s (setting) | speed ratio | peftlab peak MB | peft peak MB "
        "| memory ratio | held-out loss peftlab / peft / reference | peftlab % ceiling | peft % ceiling "
        "| fastest at any loss: peftlab / peft (ratio) | eager ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mine, theirs = r["settings"]["peftlab"], r["settings"]["peft"]
        anyway = (f"{mine[r['peftlab_any_mode']]['tokens_per_s']:,.0f} ({r['peftlab_any_mode']}) / "
                  f"{theirs[r['peft_any_mode']]['tokens_per_s']:,.0f} ({r['peft_any_mode']}) ({r['any_speed_ratio']:.2f}×)")
        if "speed_ratio" not in r:
            lines.append(f"| {r['config']} | {r['precision']} | {r['peftlab_mode'] or 'no eligible setting'} | "
                         f"{r['peft_mode'] or 'no eligible setting'} | – | – | – | – | – | – | – | {anyway} | "
                         f"{_ratio(r['eager_speed_ratio'])} |")
            continue
        per_round = r.get("round_speed_ratios") or []
        spread = f" (rounds {min(per_round):.2f}–{max(per_round):.2f}×)" if len(per_round) > 1 else ""
        lines.append(f"| {r['config']} | {r['precision']} | {r['peftlab_tok_s']:,.0f} ({r['peftlab_mode']}) | "
                     f"{r['peft_tok_s']:,.0f} ({r['peft_mode']}) | **{r['speed_ratio']:.2f}×**{spread} | "
                     f"{r['peftlab_peak_mb']:,.0f} | {r['peft_peak_mb']:,.0f} | **{r['memory_ratio']:.2f}×** | "
                     f"{r['peftlab_eval_loss']:.4f} / {r['peft_eval_loss']:.4f} / {r['reference_loss']:.4f} | "
                     f"{r['peftlab_pct_ceiling']:.0f}% | {r['peft_pct_ceiling']:.0f}% | {anyway} | {_ratio(r['eager_speed_ratio'])} |")
    lines += ["", "Every setting (peftlab: eager, `--compile`, `--compile --base-precision int8`, `--compile --master-weights "
              "bf16-compensated`; peft: fp32, bf16 autocast over an fp32 model, or the model loaded in bf16, each also "
              "under `torch.compile`), fastest first:", "",
              "| config | precision | setting | tok/s | % ceiling | peak MB | held-out loss | vs reference | eligible |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        every = [(side, mode, v) for side in ("peftlab", "peft") for mode, v in r["settings"][side].items()]
        for side, mode, v in sorted(every, key=lambda x: -x[2]["tokens_per_s"]):
            lines.append(f"| {r['config']} | {r['precision']} | {side} {mode} | {v['tokens_per_s']:,.0f} | "
                         f"{v['pct_ceiling']:.0f}% | {v['peak_rss_bytes'] / 1e6:,.0f} | {v['eval_loss']:.4f} | {100 * v['loss_vs_reference']:+.2f}% | "
                         f"{'yes' if v['eligible'] else '**no**'} |")
    if result.get("inference"):
        i = result["inference"]
        lines += ["", f"Inference (one forward of 1 × {s['seq_len']}, {i['precision']}): base {i['base_ms']:.1f} ms, "
                  f"unmerged LoRA {i['unmerged_ms']:.1f} ms (**{i['unmerged_ms'] / i['base_ms']:.2f}×**), "
                  f"merged {i['merged_ms']:.1f} ms (**{i['merged_ms'] / i['base_ms']:.2f}×**)."]
    return "\n".join(lines) + "\n"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def write_results(result: dict, path: Path) -> None:
    write_text(Path(path), markdown(result))
    write_text(Path(path).with_suffix(".json"), json.dumps(result, indent=1))
