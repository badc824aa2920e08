"""Experiment trackers (`--report-to`, Hugging Face's word for it): each step's numbers also
go to TensorBoard. `metrics.jsonl` stays the source of truth; a tracker only mirrors it.

    train:    DIR/tensorboard/
    compare:  DIR/tensorboard/<strategy>/     (tensorboard --logdir DIR/tensorboard: all side by side)
"""

import json
from pathlib import Path

from .errors import UserError

KINDS = ("none", "tensorboard")
# metrics.jsonl key -> (tag, scale)
SCALARS = {"loss": ("train/loss", 1), "eval_loss": ("eval/loss", 1), "lr": ("train/learning_rate", 1),
           "grad_norm": ("train/grad_norm", 1), "tokens_per_s": ("perf/tokens_per_s", 1),
           "peak_mem": ("perf/peak_memory_mb", 1e-6), "step_time": ("perf/step_seconds", 1)}


def check(kind: str) -> None:
    """Refuse an unknown tracker, or a missing package, before anything trains."""
    if kind not in KINDS:
        raise UserError(f"--report-to must be one of {', '.join(KINDS)}, got '{kind}'")
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install 'peftlab[tracking]'") from None


class Tracker:
    """`log(record)` after every step; `close()` at the end. A no-op for kind 'none'."""

    def __init__(self, kind: str, folder: Path):
        check(kind)
        self.writer = None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, record: dict) -> None:
        if self.writer is None:
            return
        for key, (tag, scale) in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key] * scale, record["step"])
        for key, value in record.items():  # task accuracy: task/<name>[/acc_norm], as named in metrics.jsonl
            if key.startswith("task/") and value is not None:
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def replay(kind: str, metrics: Path, folder: Path) -> None:
    """Write a finished run's metrics.jsonl to a tracker (a comparison reusing a strategy)."""
    tracker = Tracker(kind, folder)
    try:
        for line in Path(metrics).read_text().splitlines():
            if line.strip():
                tracker.log(json.loads(line))
    finally:
        tracker.close()
