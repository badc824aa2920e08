"""Task accuracy in the report: the summary's columns, the curves, a bar chart with 95% Wilson
intervals, and McNemar's paired test between every two strategies scored on the same items."""

from ..tasks.stats import mcnemar, wilson


def task_names(res: list) -> list[str]:
    names = []
    for r in res:
        names += [n for n in (r.get("tasks") or {}) if n not in names]
    return names


def columns(r: dict, names: list) -> dict:
    """Summary-table cells: accuracy before → after, per task."""
    out = {}
    for name in names:
        t = (r.get("tasks") or {}).get(name) or {}
        out[f"{name} acc"] = f"{t['before']:.3f} → {t['after']:.3f}" if "after" in t else "—"
        if "acc_norm_after" in t:
            out[f"{name} acc_norm"] = f"{t['acc_norm_before']:.3f} → {t['acc_norm_after']:.3f}"
    return out


def paired(res: list) -> list[dict]:
    """One row per task and pair of strategies that scored the same items."""
    rows = []
    for name in task_names(res):
        scored = [(r["label"], r["tasks"][name]) for r in res if "correct" in ((r.get("tasks") or {}).get(name) or {})]
        for i, (la, ta) in enumerate(scored):
            for lb, tb in scored[i + 1:]:
                if ta.get("source") != tb.get("source") or len(ta["correct"]) != len(tb["correct"]):
                    continue
                m = mcnemar(ta["correct"], tb["correct"])
                rows.append({"task": name, "A": la, "B": lb, "items": m["n"], "acc A": f"{ta['after']:.3f}",
                             "acc B": f"{tb['after']:.3f}", "A − B": f"{m['difference']:+.3f}",
                             "only A right": m["only_a"], "only B right": m["only_b"],
                             "McNemar p (exact)": f"{m['p_value']:.3g}"})
    return rows


def html_section(res: list, html_table) -> str:
    rows = paired(res)
    if not rows:
        return ""
    return ('<h2 id="paired">Task accuracy, paired</h2><p class="meta">The same items scored for two strategies: '
            "the difference in accuracy and McNemar's exact test on the items only one of them got right.</p>"
            + html_table(rows, "paired-table"))


def figure(res: list, color: dict, plt):
    """Accuracy against step (one panel per task) and final accuracy with 95% Wilson intervals;
    None when no entry scored a task. Returns (figure, hover boxes)."""
    names = task_names(res)
    if not names:
        return None
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 7), layout="constrained", squeeze=False)
    hover = []
    for k, name in enumerate(names):
        top, bottom = axes[0][k], axes[1][k]
        series, labels, accs, errs = [], [], [], [[], []]
        for r in res:
            t = (r.get("tasks") or {}).get(name)
            if not t or not t.get("curve"):
                continue
            xs, ys = zip(*t["curve"])
            top.plot(xs, ys, "o-", color=color[r["label"]], label=r["label"], lw=1.2, ms=3)
            series.append((r["label"], xs, ys))
            if "correct" in t:
                right, n = sum(t["correct"]), len(t["correct"])
                low, high = wilson(right, n)
                labels.append(r["label"])
                accs.append(right / n)
                errs[0].append(right / n - low)
                errs[1].append(high - right / n)
        top.set(title=f"{name}: accuracy during training", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
        top.legend(fontsize=8)
        hover.append((top, series))
        bottom.bar(range(len(labels)), accs, yerr=errs, capsize=4, color=[color[x] for x in labels])
        bottom.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30, ha="right")
        bottom.set(title=f"{name}: final accuracy, 95% Wilson interval", ylabel="accuracy", ylim=(0, 1))
    return fig, hover
