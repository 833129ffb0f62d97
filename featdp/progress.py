"""Progress of long library work, reported without knowing who (if anyone) watches.

Library code calls `report(task, done, total)` inside its loops, or wraps an iterable in `track`; a caller
that wants to show progress runs the work inside `reporting(callback)`, and `callback` receives an
`Update` for every call. With no reporter installed a call costs one context-variable lookup.

Why a context-local reporter rather than a callback argument: the loops worth watching sit several calls
deep — a method's gradient steps inside `training.fit`, inside a bench or an audit — behind the method
contract `fit(data, noise_scale, releaser)` that every method, audit and test implements. Threading a
callback through every layer would change that contract for the sake of a display. A `ContextVar` reaches
them unchanged, and belongs to the thread (or asyncio task) that set it: concurrent jobs do not see each
other's reporter, and threads a job starts itself (the backend's prefetcher) report nothing.

A task is named by its `task` string. It ends when an update has `done >= total`; an update with
`total=None` names a phase whose length is unknown. Updates never carry private data beyond what the
caller chose to put in them: callers must not report counts the privacy guarantee does not cover (the
number of runs of a private selection, say) where they could be logged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Update:
    """One step of one task: `done` of `total` units (None: unknown), with an optional short detail."""

    task: str
    done: int = 0
    total: int | None = None
    detail: str = ""

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total


Reporter = Callable[[Update], None]

_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("featdp_progress", default=None)


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Sends every `report` made inside the block (in this context) to `reporter`; None silences them."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def report(task: str, done: int = 0, total: int | None = None, detail: str = "") -> None:
    """Tells the current reporter, if any, that `done` of `total` units of `task` are done."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(Update(task, int(done), None if total is None else int(total), detail))


def track(items: Iterable[T], task: str, total: int | None = None) -> Iterator[T]:
    """Yields `items`, reporting each one done after the caller has handled it (the first report, 0 of
    `total`, comes before the first item). When the items run out, or the caller stops early (an
    exception, a `break`), the task ends, whatever `total` said: no bar is left behind."""
    report(task, 0, total)
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            report(task, done, total)
    finally:
        if total is None or done < total:
            report(task, done, done)
