"""Shared by the study scripts: run a comparison, keep its small outputs in studies/<name>/."""

import shutil
import sys
from pathlib import Path

from peftlab.train import TrainConfig
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
