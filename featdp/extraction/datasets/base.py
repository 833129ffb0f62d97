"""What every image dataset offers: random access to (uint8 image, label) by split and index."""

from __future__ import annotations

import dataclasses
import operator
import threading
from typing import Iterable, Protocol

import numpy as np


class DatasetError(ValueError):
    """A dataset that cannot be opened or read; the message names the dataset, split, path or file."""


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    name: str
    num_examples: int


class ImageDataset(Protocol):
    spec: str
    class_names: tuple[str, ...]
    splits: dict[str, int]  # split name -> number of examples

    def example(self, split: str, i: int) -> tuple[np.ndarray, int]:
        """Example `i` of `split`: uint8 (H, W) or (H, W, C), label. Same result on every call and thread."""
        ...

    def description(self) -> dict:
        """JSON-able provenance: spec, where the data was read from, versions."""
        ...

    def fingerprint(self) -> dict:
        """JSON-able, and the same on every call and machine while the source holds the same examples in the
        same order; different once they change. A feature file records it when it is created, and resuming
        onto a source with another fingerprint is refused (its rows would mix old and new examples)."""
        ...


class SourceBase:
    """Split/index checks and pickling shared by the sources.

    Loader workers may be processes: a source pickles without its lock and caches (`_TRANSIENT`) and
    rebuilds them lazily on the other side.
    """

    _TRANSIENT: tuple[str, ...] = ()

    def __init__(self, spec: str, class_names: Iterable[str], splits: Iterable[SplitInfo]):
        self.spec = spec
        self.class_names = tuple(class_names)
        self.splits = {s.name: s.num_examples for s in splits}
        self._lock = threading.Lock()
        self._reset_transient()

    def _reset_transient(self) -> None:
        """Sets the cached state to empty; subclasses fill it on first use (under `self._lock`)."""

    def _check(self, split: str, i) -> int:
        if split not in self.splits:
            raise DatasetError(f"{self.spec}: no split {split!r}; splits: {', '.join(self.splits) or 'none'}")
        try:
            index = operator.index(i)
        except TypeError:
            raise DatasetError(f"{self.spec}: example index must be an integer, got {i!r}") from None
        # No negative indices: a loader that asks for -1 has a bug, not a wish for the last example.
        if not 0 <= index < self.splits[split]:
            raise DatasetError(
                f"{self.spec}: example {index} is outside split {split!r} (0 ≤ i < {self.splits[split]})"
            )
        return index

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("_lock", *self._TRANSIENT):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._reset_transient()

    def __repr__(self) -> str:
        splits = ", ".join(f"{name}={n}" for name, n in self.splits.items())
        return f"<{type(self).__name__} {self.spec} ({splits}; {len(self.class_names)} classes)>"


def squeeze_gray(image: np.ndarray) -> np.ndarray:
    """(H, W, 1) -> (H, W), so gray images have one shape whatever the source."""
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
