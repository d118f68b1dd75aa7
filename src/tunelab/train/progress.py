"""The training progress bar (rich): step, loss, learning rate, examples/s, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, done: int, enabled: bool, console: Console):
        self.console = console
        self.progress = None
        if enabled:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f} · lr {task.fields[lr]:.2e} · {task.fields[rate]:.1f} ex/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
            self.task = self.progress.add_task("train", total=total, completed=done, loss=float("nan"),
                                               lr=0.0, rate=0.0)
            self.progress.start()

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step, loss=loss, lr=lr, rate=rate)

    def note(self, message: str) -> None:
        self.console.print(message)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
