"""results.json -> summary.md (one table) and report.html (one self-contained file, plots
embedded as PNG data, no network)."""

import base64
import html
import io
import math
import re
from pathlib import Path

from ..files import write_text

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def _mb(x):
    return f"{x / 1e6:,.1f}" if x is not None else "—"


def _final(curve):
    return curve[-1][1] if curve else float("nan")


def rows(summary: dict) -> list[dict]:
    """One flat row of headline numbers per strategy (shared by summary.md and the HTML)."""
    out = []
    for r in summary["strategies"]:
        st, fg = r["style"], r["forgetting"]
        tps = sorted(r["tokens_per_s"])
        out.append({
            "strategy": r["label"],
            "trainable": f"{r['trainable']:,}",
            "trainable %": f"{100 * r['trainable'] / r['total']:.2f}",
            "step s (median)": f"{r['step_time_median_s']:.3f}",
            "tokens/s (median)": f"{tps[len(tps) // 2]:,.0f}",
            "peak MB": _mb(r["peak_memory_bytes"]),
            "optimizer MB": _mb(r["optimizer_state_bytes"]),
            "train loss (last)": f"{_final(r['train_loss']):.3f}",
            "held-out loss": f"{r['eval_loss'][0][1]:.3f} → {_final(r['eval_loss']):.3f}",
            "style p": f"{st['before']['mean']:.3f}±{st['before']['std']:.3f} → {st['after']['mean']:.3f}±{st['after']['std']:.3f}",
            "forgetting loss": (f"{fg['before']:.3f} → {fg['after']:.3f}" if fg["before"] is not None else "—"),
            "artifact MB": _mb(r["artifact_bytes"]),
            "tracking % of step": f"{100 * r['weight_change']['tracking_share_of_step_time']:.1f}",
        })
    return out


def markdown_table(table: list[dict]) -> str:
    head = list(table[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(row[h]) for h in head) + " |" for row in table]
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _cell(name: str) -> tuple:
    """(row, column) of a tracked matrix in the drift heatmap: its block and its role."""
    m = re.search(r"\.(?:layers|h)\.(\d+)\.(.*)$", name)
    if not m:
        return "other", re.sub(r"\.default|\.weight$|\.prefix$", "", name).split(".")[-1]
    role = re.sub(r"\.default\.|\.lora\.[^.]+\.", ".", m.group(2))
    role = re.sub(r"\.weight$", "", role).replace("self_attn.", "").replace("attn.attention.", "").replace("attn.", "")
    return int(m.group(1)), role


def figures(summary: dict) -> list[tuple[str, str, str]]:
    """[(id, caption, base64 png)] for every plot of the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    res = summary["strategies"]
    palette = COLORS if len(res) <= len(COLORS) else [plt.cm.tab20(i % 20) for i in range(len(res))]
    color = {r["label"]: palette[i % len(palette)] for i, r in enumerate(res)}
    figs = []

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for r in res:
        a.plot(*zip(*r["train_loss"]), label=r["label"], color=color[r["label"]], lw=1.2)
        b.plot(*zip(*r["eval_loss"]), "o-", label=r["label"], color=color[r["label"]])
    a.set(title="train loss", xlabel="step", ylabel="loss")
    b.set(title="held-out loss", xlabel="step")
    a.legend(fontsize=8)
    figs.append(("fig-loss", "Train and held-out loss, same batches in the same order", _png(fig)))

    fig, ax = plt.subplots(figsize=(12, 3.5))
    for r in res:
        ax.plot(range(1, len(r["step_time_s"]) + 1), r["step_time_s"], label=r["label"], color=color[r["label"]])
    ax.set(title="time per step", xlabel="step", ylabel="seconds")
    ax.legend(fontsize=8)
    figs.append(("fig-time", "Wall time per optimizer step", _png(fig)))

    fig, ax = plt.subplots(figsize=(12, 3.8))
    x = range(len(res))
    ax.bar([i - 0.2 for i in x], [r["peak_memory_bytes"] / 1e6 for r in res], 0.4, label=f"peak ({res[0]['memory_kind']})")
    ax.bar([i + 0.2 for i in x], [r["optimizer_state_bytes"] / 1e6 for r in res], 0.4, label="optimizer state")
    ax.set_xticks(list(x), [r["label"] for r in res], fontsize=8, rotation=30, ha="right")
    ax.set(title="memory (each strategy in its own process)", ylabel="MB")
    ax.legend(fontsize=8)
    figs.append(("fig-memory", "Peak memory and optimizer-state bytes", _png(fig)))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in res:
        pct = 100 * r["trainable"] / r["total"]
        ax.scatter(pct, _final(r["eval_loss"]), s=60, color=color[r["label"]])
        ax.annotate(r["label"], (pct, _final(r["eval_loss"])), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(title="trainable share vs held-out loss (lower left is better)", xlabel="trainable parameters (%)",
           ylabel="final held-out loss")
    figs.append(("fig-pareto", "Trainable % against final held-out loss", _png(fig)))

    n = len(res)
    per_row = min(n, 4)  # heatmaps in rows of four, so each stays readable
    nrows = -(-n // per_row)
    fig, axes = plt.subplots(nrows, per_row, figsize=(4.5 * per_row, 5 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, r in zip(axes.flat, res):
        drift = r["weight_change"]["drift"]
        cells = {}
        for name, value in drift.items():
            cells[_cell(name)] = value
        if not cells:  # e.g. bitfit: only vectors train
            ax.text(0.5, 0.5, "no trained matrices\n(vectors only)", ha="center", va="center")
            ax.set_title(r["label"], fontsize=9)
            ax.set_axis_off()
            continue
        rows_ = sorted({k[0] for k in cells}, key=lambda v: (isinstance(v, str), v))
        cols = sorted({k[1] for k in cells})
        grid = [[cells.get((ro, c), math.nan) for c in cols] for ro in rows_]
        finite = [v for row in grid for v in row if v == v and v > 0]
        scale = LogNorm(min(finite), max(finite)) if finite and max(finite) > 10 * min(finite) else None
        im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=scale)  # log colours when values span decades
        ax.set_yticks(range(len(rows_)), [str(v) for v in rows_], fontsize=6)
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_title(r["label"], fontsize=9)
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("‖W_T − W_0‖_F per block × matrix (adapters: their effective merged delta)")
    figs.append(("fig-drift", "How far each trained matrix moved", _png(fig)))

    fig, ax = plt.subplots(figsize=(12, 3.8))
    for r in res:
        per = r["weight_change"]["step"].values()
        total = [math.sqrt(sum(v[i] ** 2 for v in per if i < len(v))) for i in range(max(map(len, per), default=0))]
        ax.plot(range(1, len(total) + 1), total, label=r["label"], color=color[r["label"]])
    ax.set_yscale("log")
    ax.set(title="‖W_t − W_{t−1}‖_F over all trained matrices", xlabel="step")
    ax.legend(fontsize=8)
    figs.append(("fig-step-change", "Step change of the trained weights", _png(fig)))

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
    for k, label in enumerate(("before", "after")):
        a.bar([i + (k - 0.5) * 0.4 for i in x], [r["style"][label]["mean"] for r in res], 0.4,
              yerr=[r["style"][label]["std"] for r in res], capsize=3, label=label)
        if res[0]["forgetting"]["before"] is not None:
            b.bar([i + (k - 0.5) * 0.4 for i in x], [r["forgetting"][label] for r in res], 0.4, label=label)
    a.set_xticks(list(x), [r["label"] for r in res], fontsize=8, rotation=30, ha="right")
    b.set_xticks(list(x), [r["label"] for r in res], fontsize=8, rotation=30, ha="right")
    a.set(title="style: share of generated tokens in the corpus top-100", ylabel="p (mean ± std)")
    b.set(title=f"forgetting: loss on {res[0]['forgetting']['data'] or '— (no unrelated text)'}", ylabel="loss")
    a.legend(fontsize=8)
    figs.append(("fig-style-forgetting", "Style adoption and forgetting, before and after", _png(fig)))
    return figs


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>peftlab comparison</title><style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1280px;color:#222}}
table{{border-collapse:collapse;font-size:12px;margin:12px 0}} td,th{{border:1px solid #ccc;padding:4px 6px;text-align:right}}
th{{background:#f3f3f3}} td:first-child,th:first-child{{text-align:left}} figure{{margin:18px 0}} img{{max-width:100%}}
.samples td{{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:520px}} .meta{{color:#666}}
</style></head><body data-figures="{nfig}">
<h1>peftlab comparison</h1>
<p class="meta">model <b>{model}</b> · data <b>{data}</b> · unrelated text <b>{forget}</b> · {steps} steps ·
batch {batch} × seq {seq} · dtype {dtype} · identical initial weights: <b>{identical}</b> · {hardware}</p>
{table}
{figures}
<h2 id="samples">Sample generations (greedy), before → after</h2>
<p class="meta">prompt: <code>{prompt}</code></p>
<table class="samples" id="samples-table"><tr><th>strategy</th><th>before</th><th>after</th></tr>{samples}</table>
<script>
window.addEventListener("load", function () {{
  var ok = Array.prototype.filter.call(document.images, function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.setAttribute("data-figures-loaded", String(ok.length));
}});
</script></body></html>
"""


def html_table(table: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in table)
    return f'<table id="summary"><tr>{head}</tr>{body}</table>'


def write_report(summary: dict, out: Path) -> None:
    table = rows(summary)
    cfg = summary["config"]
    head = (f"# peftlab comparison\n\nmodel `{summary['model']}`, data `{summary['data']}`, {cfg['steps']} steps, "
            f"batch {cfg['batch_size']} × seq {cfg['seq_len']}, dtype {cfg['dtype']}; identical initial weights: "
            f"{summary['identical_initial_weights']}.\n\n")
    write_text(Path(out) / "summary.md", head + markdown_table(table))
    figs = figures(summary)
    fig_html = "\n".join(f'<figure id="{i}"><img alt="{html.escape(c)}" src="data:image/png;base64,{b}">'
                         f"<figcaption>{html.escape(c)}</figcaption></figure>" for i, c, b in figs)
    samples = "".join(f"<tr><td>{html.escape(r['label'])}</td><td>{html.escape(r['samples']['before'])}</td>"
                      f"<td>{html.escape(r['samples']['after'])}</td></tr>" for r in summary["strategies"])
    first = summary["strategies"][0]
    hw = first["hardware"]
    page = PAGE.format(nfig=len(figs), model=html.escape(summary["model"]), data=html.escape(summary["data"]),
                       forget=html.escape(str(summary["forget"])), steps=cfg["steps"], batch=cfg["batch_size"],
                       seq=cfg["seq_len"], dtype=cfg["dtype"], identical=summary["identical_initial_weights"],
                       hardware=html.escape(f"{hw.get('cpu')} · {hw.get('cores')} cores"), table=html_table(table),
                       figures=fig_html, prompt=html.escape(first["samples"]["prompt"]), samples=samples)
    write_text(Path(out) / "report.html", page)
