"""The report's plots (matplotlib, PNG), each with what the page needs to show values on hover.

Every figure is drawn with a constrained layout at a fixed dpi and saved uncropped, so the
pixel box of each axes is known: line plots carry their series and axes boxes (as fractions
of the image) for the page's small hover script. Entries from plain `train` runs lack the
workbench's extra measurements (style, drift, ...); a figure shows whoever has its data.
"""

import base64
import io
import math
import re

from . import accuracy

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
DPI = 110


def final(curve):
    return curve[-1][1] if curve else float("nan")


def _png(fig, hover=()) -> tuple[str, list]:
    """(base64 PNG, hover boxes). `hover`: [(axes, [(label, xs, ys)])] of line plots."""
    import matplotlib.pyplot as plt

    fig.set_dpi(DPI)
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    boxes = []
    for ax, series in hover:
        bb = ax.get_window_extent()
        boxes.append({"box": [bb.x0 / width, 1 - bb.y1 / height, bb.x1 / width, 1 - bb.y0 / height],
                      "x": list(ax.get_xlim()), "xlog": ax.get_xscale() == "log", "xlabel": ax.get_xlabel(),
                      "title": ax.get_title(),
                      "series": [{"label": lab, "x": list(map(float, xs)), "y": [None if y is None else float(y) for y in ys]}
                                 for lab, xs, ys in series if len(xs)]})
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode(), boxes


def cell(name: str) -> tuple:
    """(row, column) of a tracked matrix in the drift heatmap: its block and its role."""
    m = re.search(r"\.(?:layers|h)\.(\d+)\.(.*)$", name)
    if not m:
        return "other", re.sub(r"\.default|\.weight$|\.prefix$", "", name).split(".")[-1]
    role = re.sub(r"\.default\.|\.lora\.[^.]+\.", ".", m.group(2))
    role = re.sub(r"\.weight$", "", role).replace("self_attn.", "").replace("attn.attention.", "").replace("attn.", "")
    return int(m.group(1)), role


def tokens_per_step(r) -> int:
    c = r.get("config") or {}
    return c.get("batch_size", 0) * c.get("seq_len", 0) * c.get("grad_accum", 1)


def _lines(ax, res, color, key, style="-"):
    series = []
    for r in res:
        curve = [(s, v) for s, v in (r.get(key) or []) if v is not None]
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, style, label=r["label"], color=color[r["label"]], lw=1.2, ms=3)
            series.append((r["label"], xs, ys))
    return series


def figures(summary: dict) -> list[tuple[str, str, str, list]]:
    """[(id, caption, base64 png, hover boxes)] for every plot the data allows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize

    res = summary["strategies"]
    palette = COLORS if len(res) <= len(COLORS) else [plt.cm.tab20(i % 20) for i in range(len(res))]
    color = {r["label"]: palette[i % len(palette)] for i, r in enumerate(res)}
    figs = []

    def add(id_, caption, fig, hover=()):
        figs.append((id_, caption, *_png(fig, hover)))

    scored = accuracy.figure(res, color, plt)
    if scored:
        add("fig-accuracy", "Task accuracy: during training, and at the end with 95% Wilson intervals", scored[0],
            [h for h in scored[1]])

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    ha = _lines(a, res, color, "train_loss")
    hb = _lines(b, res, color, "eval_loss", "o-")
    a.set(title="train loss", xlabel="step", ylabel="loss")
    b.set(title="held-out loss", xlabel="step")
    a.legend(fontsize=8)
    add("fig-loss", "Train and held-out loss, same batches in the same order", fig, [(a, ha), (b, hb)])

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    ha, hb = [], []
    for r in res:
        curve = r.get("train_loss") or []
        if not curve:
            continue
        times = r.get("step_time_s") or []
        clock = [sum(times[: i + 1]) for i in range(len(times))]
        steps, losses = zip(*curve)
        tokens = [s * tokens_per_step(r) for s in steps]
        a.plot(tokens, losses, color=color[r["label"]], lw=1.2, label=r["label"])
        ha.append((r["label"], tokens, losses))
        if len(clock) == len(losses):
            b.plot(clock, losses, color=color[r["label"]], lw=1.2)
            hb.append((r["label"], clock, losses))
    a.set(title="train loss against tokens seen", xlabel="tokens", ylabel="loss")
    b.set(title="train loss against wall-clock time", xlabel="seconds of training steps")
    a.legend(fontsize=8)
    add("fig-loss-cost", "Loss against what it cost: tokens and seconds", fig, [(a, ha), (b, hb)])

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.6), layout="constrained")
    ha = _lines(a, res, color, "lr")
    hb = _lines(b, res, color, "grad_norm")
    a.set(title="learning rate", xlabel="step")
    b.set(title="gradient norm (before clipping)", xlabel="step")
    if hb:
        b.set_yscale("log")
    a.legend(fontsize=8)
    add("fig-lr-grad", "Learning rate and gradient norm per step", fig, [(a, ha), (b, hb)])

    fig, ax = plt.subplots(figsize=(12, 3.5), layout="constrained")
    series = []
    for r in res:
        times = r.get("step_time_s") or []
        ax.plot(range(1, len(times) + 1), times, label=r["label"], color=color[r["label"]])
        series.append((r["label"], range(1, len(times) + 1), times))
    ax.set(title="time per step", xlabel="step", ylabel="seconds")
    ax.legend(fontsize=8)
    add("fig-time", "Wall time per optimizer step", fig, [(ax, series)])

    fig, ax = plt.subplots(figsize=(12, 3.8), layout="constrained")
    x = range(len(res))
    kinds = sorted({r.get("memory_kind") or "peak" for r in res})
    ax.bar([i - 0.2 for i in x], [(r.get("peak_memory_bytes") or 0) / 1e6 for r in res], 0.4, label=f"peak ({', '.join(kinds)})")
    ax.bar([i + 0.2 for i in x], [(r.get("optimizer_state_bytes") or 0) / 1e6 for r in res], 0.4, label="optimizer state")
    ax.set_xticks(list(x), [r["label"] for r in res], fontsize=8, rotation=30, ha="right")
    ax.set(title="memory (each strategy in its own process)", ylabel="MB")
    ax.legend(fontsize=8)
    add("fig-memory", "Peak memory and optimizer-state bytes", fig)

    counted = [r for r in res if r.get("trainable") and r.get("total") and r.get("eval_loss")]
    if counted:
        fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        for r in counted:
            pct = 100 * r["trainable"] / r["total"]
            ax.scatter(pct, final(r["eval_loss"]), s=60, color=color[r["label"]])
            ax.annotate(r["label"], (pct, final(r["eval_loss"])), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(title="trainable share vs held-out loss (lower left is better)", xlabel="trainable parameters (%)",
               ylabel="final held-out loss")
        add("fig-pareto", "Trainable % against final held-out loss", fig)

    tracked = [r for r in res if r.get("weight_change")]
    if tracked:
        add("fig-drift", "How far each trained matrix moved (one colour scale for all)", _drift(tracked, plt, LogNorm, Normalize))
        fig, ax = plt.subplots(figsize=(12, 3.8), layout="constrained")
        series = []
        for r in tracked:
            per = r["weight_change"]["step"].values()
            total = [math.sqrt(sum(v[i] ** 2 for v in per if i < len(v))) for i in range(max(map(len, per), default=0))]
            ax.plot(range(1, len(total) + 1), total, label=r["label"], color=color[r["label"]])
            series.append((r["label"], range(1, len(total) + 1), total))
        ax.set_yscale("log")
        ax.set(title="‖W_t − W_{t−1}‖_F over all trained matrices", xlabel="step")
        ax.legend(fontsize=8)
        add("fig-step-change", "Step change of the trained weights", fig, [(ax, series)])

    styled = [r for r in res if r.get("style")]
    if styled:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
        x = range(len(styled))
        for k, label in enumerate(("before", "after")):
            a.bar([i + (k - 0.5) * 0.4 for i in x], [r["style"][label]["mean"] for r in styled], 0.4,
                  yerr=[r["style"][label]["std"] for r in styled], capsize=3, label=label)
            if styled[0]["forgetting"]["before"] is not None:
                b.bar([i + (k - 0.5) * 0.4 for i in x], [r["forgetting"][label] for r in styled], 0.4, label=label)
        for ax in (a, b):
            ax.set_xticks(list(x), [r["label"] for r in styled], fontsize=8, rotation=30, ha="right")
        a.set(title="style: share of generated tokens in the corpus top-100", ylabel="p (mean ± std)")
        b.set(title=f"forgetting: loss on {styled[0]['forgetting']['data'] or '— (no unrelated text)'}", ylabel="loss")
        a.legend(fontsize=8)
        add("fig-style-forgetting", "Style adoption and forgetting, before and after", fig)
    return figs


def _drift(res, plt, LogNorm, Normalize):
    """‖W_T − W_0‖ heatmaps (block × matrix), in rows of four, on one shared colour scale with
    one colour bar, so strategies can be compared by eye."""
    grids = []
    for r in res:
        cells = {cell(name): value for name, value in r["weight_change"]["drift"].items()}
        if not cells:
            grids.append((r, None, None, None))
            continue
        rows = sorted({k[0] for k in cells}, key=lambda v: (isinstance(v, str), v))
        cols = sorted({k[1] for k in cells})
        grids.append((r, rows, cols, [[cells.get((ro, c), math.nan) for c in cols] for ro in rows]))
    finite = [v for _, _, _, g in grids if g for row in g for v in row if v == v and v > 0]
    lo, hi = (min(finite), max(finite)) if finite else (1e-3, 1.0)
    norm = LogNorm(lo, hi) if hi > 10 * lo else Normalize(0, hi)  # log colours when values span decades
    n = len(res)
    per_row = min(n, 4)
    nrows = -(-n // per_row)
    fig, axes = plt.subplots(nrows, per_row, figsize=(4.6 * per_row, 5.2 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    image = None
    for ax, (r, rows, cols, grid) in zip(axes.flat, grids):
        ax.set_title(r["label"], fontsize=9)
        if grid is None:  # e.g. bitfit: only vectors train
            ax.text(0.5, 0.5, "no trained matrices\n(vectors only)", ha="center", va="center")
            ax.set_axis_off()
            continue
        image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm)
        ax.set_yticks(range(len(rows)), [str(v) for v in rows], fontsize=6)
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("block")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="‖W_T − W_0‖_F")
    fig.suptitle("‖W_T − W_0‖_F per block × matrix (adapters: their effective merged delta)")
    return fig
