"""How `featdp` shows long work: transient rich bars on a terminal; off a terminal (a log, a pipe, CI),
plain lines, at most one per `interval` seconds plus the last line of every outermost task, so that a
run of hours leaves a readable log instead of thousands of lines."""

from __future__ import annotations

import os
import time
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from featdp import progress
from featdp.progress import Update

LOG_INTERVAL_SECONDS = 15.0  # between lines off a terminal; FEATDP_PROGRESS_SECONDS sets another


def log_interval() -> float:
    """FEATDP_PROGRESS_SECONDS if it is a number ≥ 0 (0: a line at every update), else the default."""
    try:
        seconds = float(os.environ.get("FEATDP_PROGRESS_SECONDS", LOG_INTERVAL_SECONDS))
    except ValueError:
        return LOG_INTERVAL_SECONDS
    return seconds if seconds >= 0 else LOG_INTERVAL_SECONDS


class ProgressDisplay:
    """Shows `featdp.progress` updates of the work run inside it (a context manager; also callable with an
    `Update` directly, as `extract` does with its split progress).

    On a terminal: one transient bar per running task, removed when it ends. Off a terminal: a line naming
    every running task when `interval` has passed since the last line. Both print the last line of a task
    that was the outermost one running when it ended (a bench's rows, an extraction's split), unless
    `last_lines` is off (`fit`, whose summary follows). With `lines` off only the transient bars are shown,
    and nothing off a terminal: `tune` keeps its number of runs out of logs.
    """

    def __init__(self, console: Console, *, lines: bool = True, last_lines: bool = True,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self._console = console
        self._lines = lines
        self._last_lines = last_lines
        self._interval = log_interval() if interval is None else interval
        self._clock = clock
        self._active: dict[str, Update] = {}  # running tasks, outermost (first started) first
        self._bar = None
        self._bar_tasks: dict[str, int] = {}
        self._reporting = None

    def __enter__(self) -> "ProgressDisplay":
        self._started = self._last_line = self._clock()
        if self._console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                 console=self._console, transient=True)
            self._bar.__enter__()
        self._reporting = progress.reporting(self if self._bar is not None or self._lines else None)
        self._reporting.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._reporting.__exit__(*exc_info)
        if self._bar is not None:
            self._bar.__exit__(*exc_info)

    def __call__(self, update: Update) -> None:
        if self._bar is None and not self._lines:
            return
        outermost = next(iter(self._active), update.task) == update.task
        if update.finished:
            self._active.pop(update.task, None)
        else:
            self._active[update.task] = update
        if self._bar is not None:
            self._show_bar(update)
        if update.finished:
            if outermost and self._last_lines:
                self._print([update])
        elif self._bar is None and self._clock() - self._last_line >= self._interval:
            self._print(list(self._active.values()))

    def _show_bar(self, update: Update) -> None:
        task = self._bar_tasks.get(update.task)
        if update.finished:
            if task is not None:
                self._bar.remove_task(task)
                del self._bar_tasks[update.task]
            return
        # Task names and details may quote user data (a split's name): shown as text, never as markup.
        if task is None:
            self._bar_tasks[update.task] = self._bar.add_task(escape(update.task), total=update.total,
                                                              completed=update.done, detail=escape(update.detail))
        else:
            self._bar.update(task, total=update.total, completed=update.done, detail=escape(update.detail))

    def _print(self, updates: list[Update]) -> None:
        if not self._lines:
            return
        self._last_line = self._clock()
        minutes, seconds = divmod(int(self._last_line - self._started), 60)
        hours, minutes = divmod(minutes, 60)
        elapsed = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
        text = " · ".join(_describe(u) for u in updates)
        self._console.print(Text(f"[{elapsed}] {text}"), highlight=False, soft_wrap=True)


def _describe(update: Update) -> str:
    count = f" {update.done}/{update.total}" if update.total is not None else ""
    return f"{update.task}{count}" + (f" ({update.detail})" if update.detail else "")
