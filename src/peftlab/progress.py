"""Progress people can follow: what the run is doing, loss, held-out loss, tokens/s, ETA.

On a terminal: a live bar (rich) whose label names the phase (train, evaluating, ...). Piped
to a file (CI, nohup, a log): a plain line every `every` steps or `seconds`, whichever comes
first, flushed at once, so `tail -f` shows the run as it goes. tokens/s and the ETA are taken
over the last `window` steps, not one step's raw value.
"""

import sys
import time
from collections import deque
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def is_terminal() -> bool:
    return sys.stdout.isatty()


@contextmanager
def phase(text: str, show: bool = True):
    """Say what a long step without steps is doing (loading, saving): a spinner on a terminal,
    one line otherwise."""
    if not show:
        yield
        return
    if is_terminal():
        with Console().status(text + "…"):
            yield
    else:
        print(f"{text}…", flush=True)
        yield


class Progress:
    """Context manager; `update(record)` advances one step; `phase(text)` names what runs now."""

    def __init__(self, total: int, show: bool = True, label: str = "train", done: int = 0,
                 every: int | None = None, seconds: float = 30.0, window: int = 10):
        self.total, self.label, self.done = total, label, done
        self.show, self.terminal = show, show and is_terminal()
        self.every = every or max(1, total // 20)
        self.seconds, self.last_line = seconds, time.monotonic()
        self.recent = deque(maxlen=window)  # (tokens, seconds) of the last steps
        self.loss, self.held = "…", "…"
        self.bar = None
        if self.terminal:
            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("held-out {task.fields[held]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task(label, total=total, completed=done, loss="…", held="…", tps="…")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def tokens_per_s(self) -> float | None:
        seconds = sum(s for _, s in self.recent)
        return sum(t for t, _ in self.recent) / seconds if seconds > 0 else None

    def phase(self, text: str | None, step: int | None = None) -> None:
        """Name what runs now ("evaluating", during `step`); `phase(None)` goes back to the label."""
        if self.bar:
            self.bar.update(self.task, description=text or self.label)
        elif self.show and text:
            print(f"step {step}/{self.total} · {text}…" if step is not None else f"{text}…", flush=True)

    def update(self, record: dict) -> None:
        self.done += 1
        if record.get("step_time"):
            self.recent.append((record["tokens_per_s"] * record["step_time"], record["step_time"]))
        if record.get("loss") is not None:
            self.loss = f"{record['loss']:.3f}"
        if record.get("eval_loss") is not None:
            self.held = f"{record['eval_loss']:.3f}"
        tps = self.tokens_per_s()
        if self.bar:
            self.bar.update(self.task, advance=1, description=self.label, loss=self.loss, held=self.held,
                            tps=f"{tps:,.0f}" if tps else "…")
        elif self.show and (self.done % self.every == 0 or self.done == self.total
                            or time.monotonic() - self.last_line >= self.seconds):
            self.last_line = time.monotonic()
            step_s = sum(s for _, s in self.recent) / max(1, len(self.recent))
            eta = _clock(step_s * (self.total - self.done))
            print(f"step {self.done}/{self.total} · loss {self.loss} · held-out {self.held} · "
                  f"{f'{tps:,.0f}' if tps else '…'} tok/s · ETA {eta}", flush=True)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
