"""Progress of long work: rich bars on a terminal, timed log lines anywhere else.

One ``ProgressBars`` object is created by the caller (the CLI) and handed down in the ``Context``; no
module keeps global display state. On a terminal ``track`` draws a bar per loop (stages, layers,
steps). When stderr is not a terminal (nohup, CI, a scheduler's log file) bars would draw nothing, so
``track`` logs one line instead, at most every ``interval`` seconds (30 by default,
``COMPRESS_PROGRESS_SECONDS`` to change it): every loop in progress from the outermost in (the item
it is on), the innermost with the items it has finished, then that loop's elapsed time and ETA, e.g.
``progress: stages 2/3 > gptq units 5/33 (2m10s elapsed, ETA 10m50s)``.
With ``enabled=False`` (``--quiet``, tests) ``track`` just iterates.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import CompressError

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_INTERVAL = 30.0


def default_interval() -> float:
    """``COMPRESS_PROGRESS_SECONDS``, or 30."""
    setting = os.environ.get("COMPRESS_PROGRESS_SECONDS", "")
    if not setting:
        return DEFAULT_INTERVAL
    try:
        value = float(setting)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise CompressError(f"COMPRESS_PROGRESS_SECONDS={setting!r}: expected a number of seconds, e.g. 30")
    return value


def human_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class _Loop:
    description: str
    total: int | None
    started: float
    done: int = 0

    def position(self, working: bool) -> str:
        """``description i/n``: the item being worked on (``working``), else the items done."""
        count = self.done + 1 if working else self.done
        return f"{self.description} {count}/{self.total}" if self.total else f"{self.description} {count}"


class ProgressBars:
    def __init__(self, console: Console | None = None, enabled: bool = True, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.log_lines = enabled and not self.console.is_terminal
        self.interval = default_interval() if interval is None else interval
        self.clock = clock
        self._progress: Progress | None = None
        self._loops: list[_Loop] = []
        self._last_line = clock()

    @contextmanager
    def session(self) -> Iterator["ProgressBars"]:
        if not self.enabled:
            self._last_line = self.clock()
            yield self
            return
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console, transient=True)
        with self._progress:
            yield self
        self._progress = None

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        if self.log_lines:
            yield from self._logged(items, description, total)
            return
        if self._progress is None:
            yield from items
            return
        task = self._progress.add_task(description, total=total)
        try:
            for item in items:
                yield item
                self._progress.advance(task)
        finally:
            self._progress.remove_task(task)

    def _logged(self, items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
        loop = _Loop(description, total, self.clock())
        self._loops.append(loop)
        try:
            for item in items:
                yield item
                loop.done += 1
                self._maybe_log(loop)
        finally:
            self._loops.remove(loop)

    def _maybe_log(self, loop: _Loop) -> None:
        now = self.clock()
        if now - self._last_line < self.interval:
            return
        self._last_line = now
        elapsed = now - loop.started
        eta = ""
        if loop.total and loop.done < loop.total:
            eta = f", ETA {human_seconds(elapsed / loop.done * (loop.total - loop.done))}"
        path = " > ".join(other.position(working=other is not loop) for other in self._loops)
        log.info("progress: %s (%s elapsed%s)", path, human_seconds(elapsed), eta)
