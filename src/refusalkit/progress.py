"""rich progress bars for long loops, silenced by `show=False` (the CLI's --quiet/--json)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Null:
    def advance(self, n: int = 1) -> None:
        pass


class _Bar:
    def __init__(self, progress: Progress, task: int) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


@contextmanager
def bar(description: str, total: int, show: bool = True) -> Iterator[_Bar | _Null]:
    """A progress bar with count and ETA on stderr; a no-op when `show` is False."""
    if not show or total <= 0:
        yield _Null()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=False,
    )
    with progress:
        yield _Bar(progress, progress.add_task(description, total=total))
