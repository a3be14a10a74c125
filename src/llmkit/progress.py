"""Progress bars for long jobs: count, rate and ETA on every one (rich)."""

from __future__ import annotations

import os
import sys
import time

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
    """A rich Progress with description, bar, count, rate and ETA; when stderr is not a terminal, a plain line every
    LLMKIT_PROGRESS_SECONDS (30) instead; `disable=True`: nothing (another process speaks).

    `with progress("docs") as p: task = p.add_task("tokenize", total=n); p.advance(task)`.
    """
    if disable is None and not sys.stderr.isatty():  # a log, CI, a pipe: a line at intervals instead of a bar
        return LineProgress(unit, _seconds(os.environ.get("LLMKIT_PROGRESS_SECONDS", "30")))
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


class LineProgress(Progress):
    """Progress where no bar can be drawn (a log file, CI, a pipe): one plain line per task every `every` seconds
    (and when it completes), with count, rate and ETA, so a long step is never silent."""

    def __init__(self, unit: str, every: float):
        super().__init__(console=console, disable=True)
        self.unit, self.every = unit, every
        self.said: dict = {}

    def add_task(self, description: str, *args, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        self.said[task_id] = time.monotonic()
        return task_id

    def update(self, task_id, *args, **kwargs) -> None:
        super().update(task_id, *args, **kwargs)
        self._say(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def _say(self, task_id) -> None:
        task, now = self._tasks[task_id], time.monotonic()
        done = task.total is not None and task.completed >= task.total
        last = self.said.get(task_id, now)
        if last is None or (not done and now - last < self.every):  # None: its completion was said
            return
        self.said[task_id] = None if done else now  # a finished task says so once
        total = f"/{task.total:,.0f}" if task.total is not None else ""
        speed = task.finished_speed or task.speed
        rate = f", {speed:,.1f} {self.unit}/s" if speed else ""
        eta = f", eta {task.time_remaining:.0f}s" if task.time_remaining is not None and not done else ""
        console.print(f"{task.description}: {task.completed:,.0f}{total} {self.unit}{rate}{eta}", markup=False, highlight=False)


def _seconds(value: str) -> float:
    """LLMKIT_PROGRESS_SECONDS as a number (30 when it is not one: a typo must not stop a run)."""
    try:
        return max(0.0, float(value))
    except ValueError:
        return 30.0
