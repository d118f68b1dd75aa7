"""Training progress: a rich bar (step, loss, learning rate, examples/s or tokens/s, ETA) on a terminal; plain
lines at every 10% of the run when the output is a pipe or a log file."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, done: int, enabled: bool, console: Console, unit: str = "ex/s"):
        self.console, self.total, self.start_step, self.unit = console, total, done, unit
        self.t0 = time.perf_counter()
        self.every = max(1, total // 10)
        self.progress = None
        if enabled:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f} · lr {task.fields[lr]:.2e} · {task.fields[rate]:.1f} " + unit),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
            self.task = self.progress.add_task("train", total=total, completed=done, loss=float("nan"),
                                               lr=0.0, rate=0.0)
            self.progress.start()

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step, loss=loss, lr=lr, rate=rate)
        elif step % self.every == 0 and step < self.total:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(1, step - self.start_step) * (self.total - step)
            self.console.print(f"step {step}/{self.total} · loss {loss:.4f} · lr {lr:.2e} · {rate:.1f} {self.unit} · "
                               f"ETA {eta:.0f} s", highlight=False)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
