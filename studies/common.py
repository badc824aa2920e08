"""Shared by the study scripts: run a comparison, keep its small outputs in studies/<name>/."""

import shutil
import sys
from pathlib import Path

from peftlab.config import TrainConfig
from peftlab.workbench import compare

HERE = Path(__file__).resolve().parent


def run_study(name: str, data: str, strategies: list, steps: int, model: str = "smollm2-135m", samples: int = 5,
              task: list | None = None, forget: str | None = "auto", **config) -> dict:
    """Run the comparison under runs/studies/<name> (adapters stay there) and copy
    results.json, summary.md and report.html into studies/<name>/."""
    work = HERE.parent / "runs" / "studies" / name
    cfg = TrainConfig(steps=steps, **({"batch_size": 4, "seq_len": 128, "lr": 1e-4, "dtype": "bf16",
                                       "eval_every": max(1, steps // 6)} | config))
    summary = compare(model, data, strategies, work, cfg, samples=samples, gen_tokens=48, show=sys.stdout.isatty(),
                      tasks=task, forget=forget)
    keep = HERE / name
    keep.mkdir(parents=True, exist_ok=True)
    for f in ("results.json", "summary.md", "report.html"):
        shutil.copy(work / f, keep / f)
    print((keep / "summary.md").read_text())
    return summary


def plot_eval_curves(curves: list, title: str, path: Path) -> None:
    """Held-out loss against step for two or more runs: curves = [(label, [(step, loss), ...]), ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    for (label, curve), color in zip(curves, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")):
        xs, ys = zip(*curve)
        ax.plot(xs, ys, marker="o", color=color, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (Moby-Dick)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rewrite_summary_if_asked(out: Path, summary) -> None:
    """`python studies/X.py --summary`: rewrite summary.md from the kept results.json, and exit."""
    if sys.argv[1:] == ["--summary"]:
        import json

        from peftlab.files import write_text

        write_text(out / "summary.md", summary(json.loads((out / "results.json").read_text())))
        sys.exit(0)
