"""Progress bars (rich) for stages and the layers inside them.

One ``Progress`` object is created by the caller (the CLI) and handed down in the ``Context``; no
module keeps global display state. With ``enabled=False`` (tests, non-interactive use) ``track``
just iterates."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


class ProgressBars:
    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self._progress: Progress | None = None

    @contextmanager
    def session(self) -> Iterator["ProgressBars"]:
        if not self.enabled:
            yield self
            return
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console, transient=True)
        with self._progress:
            yield self
        self._progress = None

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if self._progress is None:
            yield from items
            return
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        task = self._progress.add_task(description, total=total)
        try:
            for item in items:
                yield item
                self._progress.advance(task)
        finally:
            self._progress.remove_task(task)
