"""Cost curves (`peftlab bench --curves`): how tokens/s and peak memory grow with sequence
length and model size, peftlab at its best against peft at its best, for one LoRA config at
batch 1. Both sides are compiled; from CHECKPOINT_FROM tokens on, both recompute activations
in backward (peftlab `--grad-checkpoint`, peft `gradient_checkpointing_enable()`), as a user
training long sequences would.
"""

import json
from pathlib import Path

from ..files import write_bytes, write_text
from . import _run

SEQ_LENS = (256, 1024, 2048, 4096)
MODELS = ("smollm2-135m", "gemma3-270m")
CHECKPOINT_FROM = 2048
BUDGET_MB = 8000  # "the longest sequence that trains within 8 GB"


def run_curves(models=MODELS, seq_lens=SEQ_LENS, data: str = "moby-dick", config: str = "lora-r8-qv",
               precision: str = "fp32", steps: int = 2, warmup: int = 1, checkpoint_from: int = CHECKPOINT_FROM,
               log=print) -> dict:
    points = []
    reference = "bf16-model+compile" if precision == "bf16" else "fp32+compile"
    for model in models:
        for seq in seq_lens:
            for impl, mode in (("peftlab", "compile"), ("peft", reference)):
                job = {"model": model, "data": data, "config": config, "precision": precision, "impl": impl, "mode": mode,
                       "steps": steps, "warmup": warmup, "batch_size": 1, "seq_len": seq, "round": 0,
                       "grad_checkpoint": seq >= checkpoint_from}
                log(f"curve · {model} · seq {seq} · {impl} ({mode})")
                points.append(_run(job))
    return {"setup": {"config": config, "precision": precision, "data": data, "steps": steps, "warmup": warmup,
                      "batch_size": 1, "checkpoint_from": checkpoint_from}, "points": points}


def table(result: dict) -> list[dict]:
    rows = {}
    for p in result["points"]:
        row = rows.setdefault((p["model"], p["seq_len"]), {"model": p["model"], "seq_len": p["seq_len"]})
        row[p["impl"]] = {"tok_s": p["tokens_per_s"], "peak_mb": p["peak_rss_bytes"] / 1e6}
    return list(rows.values())


def longest_within(rows: list, model: str, impl: str, budget_mb: float = BUDGET_MB) -> int | None:
    fits = [r["seq_len"] for r in rows if r["model"] == model and impl in r and r[impl]["peak_mb"] <= budget_mb]
    return max(fits) if fits else None


def markdown(result: dict, figure: str | None = None) -> str:
    s = result["setup"]
    rows = table(result)
    lines = ["# Cost curves: peftlab vs HF peft", "",
             f"`{s['config']}`, batch 1, {s['precision']}, {s['warmup']} warm-up + {s['steps']} timed steps; both sides "
             f"compiled; gradient checkpointing on both sides from {s['checkpoint_from']} tokens.", "",
             "| model | seq len | peftlab tok/s | peft tok/s | speed ratio | peftlab peak MB | peft peak MB | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["peftlab"], r["peft"]
        lines.append(f"| {r['model']} | {r['seq_len']:,} | {a['tok_s']:,.0f} | {b['tok_s']:,.0f} | **{a['tok_s'] / b['tok_s']:.2f}×** "
                     f"| {a['peak_mb']:,.0f} | {b['peak_mb']:,.0f} | **{a['peak_mb'] / b['peak_mb']:.2f}×** |")
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        ours, theirs = longest_within(rows, model, "peftlab"), longest_within(rows, model, "peft")
        lines.append(f"- {model}: longest measured sequence within {BUDGET_MB / 1000:.0f} GB peak: peftlab {ours or 'none'}, "
                     f"peft {theirs or 'none'}.")
    if figure:
        lines += ["", f"![cost curves]({figure})"]
    return "\n".join(lines) + "\n"


def plot(result: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table(result)
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    colors = {"peftlab": "#1f77b4", "peft": "#d62728"}
    for model, style in zip(dict.fromkeys(r["model"] for r in rows), ("-", "--", ":")):
        mine = [r for r in rows if r["model"] == model]
        xs = [r["seq_len"] for r in mine]
        for impl in ("peftlab", "peft"):
            speed.plot(xs, [r[impl]["tok_s"] for r in mine], style, marker="o", color=colors[impl], label=f"{impl} · {model}")
            memory.plot(xs, [r[impl]["peak_mb"] for r in mine], style, marker="o", color=colors[impl], label=f"{impl} · {model}")
    for ax, label in ((speed, "tokens/s"), (memory, "peak MB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    memory.axhline(BUDGET_MB, color="#7f7f7f", lw=0.8)
    speed.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_curves(result: dict, path: Path) -> None:
    path = Path(path)
    figure = path.with_suffix(".png")
    write_bytes(figure, plot(result))
    write_text(path, markdown(result, figure.name))
    write_text(path.with_suffix(".json"), json.dumps(result, indent=1))
