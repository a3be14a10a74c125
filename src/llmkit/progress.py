"""Progress bars for long jobs: count, rate and ETA on every one (rich)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Not a terminal (a log, CI): a wide fixed width so tables are not cut.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def print_table(table) -> None:
    """A rich table on stdout: as wide as the terminal (rich wraps the cells to fit), 200 columns into a file or pipe."""
    Console(width=None if sys.stdout.isatty() else 200).print(table)


class RateColumn(ProgressColumn):
    """Units per second, from rich's own speed estimate."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed:,.1f} {self.unit}/s")


def progress(unit: str = "items", *, disable: bool | None = None) -> Progress:
    """A rich Progress with description, bar, count, rate and ETA; off when stderr is not a terminal.

    `with progress("docs") as p: task = p.add_task("tokenize", total=n); p.advance(task)`.
    """
    if disable is None:
        disable = not sys.stderr.isatty()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )
