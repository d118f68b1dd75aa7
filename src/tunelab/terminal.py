"""The consoles tunelab prints through.

On a terminal rich wraps to its width; into a pipe or a log file a line is never wrapped (rich's default there
is 80 columns, which splits numbers and paths mid-line) and tables get a fixed 120 columns. Emoji codes are
never replaced (`data/tweets:train:` stays as written); user text interpolated into a markup string goes
through `plain` so that brackets in it print as written.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.markup import escape

PIPE_WIDTH = 120


def make_console(stderr: bool = False, file: TextIO | None = None) -> Console:
    stream = file or (sys.stderr if stderr else sys.stdout)
    tty = stream.isatty()
    return Console(file=file, stderr=stderr, width=None if tty else PIPE_WIDTH, soft_wrap=not tty, emoji=False)


def plain(value: object) -> str:
    """`value` as text that rich markup leaves alone."""
    return escape(str(value))


def print_warnings(warnings: list[str], console: Console) -> None:
    """One `warning: ...` line each, never wrapped (a line a user can grep for); brackets in label names print
    as written."""
    for warning in warnings:
        console.print(f"[bold yellow]warning:[/] {plain(warning)}", soft_wrap=True, highlight=False)
