"""Terminal output: one rich console (stderr, so stdout stays clean for results) and progress bars."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
LOG_EVERY_SECONDS = 30.0  # where output is a file (a job's log), one progress line at most this often


class _Progress(Progress):
    """rich's Progress, which on a terminal redraws one bar and into a file (a cluster job's log, `make ... >
    log`) writes it only when it stops: there it also writes a plain line now and then, so a long step shows
    that it moves."""

    def __init__(self, *columns: Any, log_every: float = LOG_EVERY_SECONDS, **options: Any) -> None:
        super().__init__(*columns, **options)
        self._log_every = log_every
        self._logged: dict[TaskID, float] = {}

    def add_task(self, description: str, *args: Any, **fields: Any) -> TaskID:
        task_id = super().add_task(description, *args, **fields)
        self._logged[task_id] = time.monotonic()
        return task_id

    def update(self, task_id: TaskID, *args: Any, **fields: Any) -> None:
        super().update(task_id, *args, **fields)
        self._log_line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_line(task_id)

    def _log_line(self, task_id: TaskID) -> None:
        if self.disable or self.console.is_terminal:
            return
        now = time.monotonic()
        if now - self._logged.get(task_id, now) < self._log_every:
            return
        self._logged[task_id] = now
        task = self._tasks[task_id]
        total = f"/{task.total:.0f}" if task.total is not None else ""
        info = task.fields.get("info", "")
        seconds = int(task.elapsed or 0)
        elapsed = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        line = " ".join(f"{task.description} {task.completed:.0f}{total} {info}".split())
        self.console.print(f"{line}, {elapsed} elapsed", highlight=False, markup=False, soft_wrap=True)


def progress_bar(disable: bool = False, log_every: float = LOG_EVERY_SECONDS) -> Progress:
    """A bar with count, elapsed and remaining time, and a free-text field for live numbers (loss)."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=disable,
        log_every=log_every,
    )
