"""A progress bar for long work: step, loss, tokens/s, ETA (rich; silent when show=False)."""

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Context manager; `update(record)` advances one step and shows its loss and speed."""

    def __init__(self, total: int, show: bool = True, label: str = "train", done: int = 0):
        self.bar = None
        if show:
            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task(label, total=total, completed=done, loss="…", tps="…")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def update(self, record: dict) -> None:
        if self.bar:
            self.bar.update(self.task, advance=1, loss=f"{record['loss']:.3f}", tps=f"{record['tokens_per_s']:,.0f}")

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()
