"""An explicit cache of exact, pre-noise values shared by fits on the same rows.

A benchmark or a hyperparameter selection fits the same rows many times; the exact statistics of those rows
(Gram matrices and class sums, per-row scales and norms) and the decompositions of identical released
matrices need computing only once. A caller that wants that creates a `StatisticsCache` and passes it
(`featdp.training.fit(..., cache=cache)`, `featdp.selection.select(..., cache=cache)`); without one, the
default, every fit computes its own.

The cache holds only values computed from the rows alone, before any noise, and decompositions of matrices
exactly as given. Every fit still draws its own fresh noise: a fit with a cache equals the same seeded fit
without one bit for bit, and fits with different seeds differ.

Keys. A statistic is keyed by its source and by what else it depends on (the caller's key: preprocessing,
backend, block size). A source is keyed by identity, and held by the cache so that its identity is never
reused; a `RowSubset` by its parent and a digest of its mask, so that equal subsets of one source share
entries. The rows of a source must therefore not change while a cache holds values of them: the bench holds
its splits in read-only arrays, and a selection's own cache lives only while it runs. A decomposition is keyed by the matrix's shape, dtype and a
BLAKE2b digest of its bytes, so two different matrices (two noise draws) never share an entry.

Cached arrays are read-only: they are shared by every later fit. The host arrays held are bounded by
`max_bytes`, least recently used out first.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any, Callable, Hashable, TypeVar

import numpy as np

from featdp.data import RowSource, RowSubset

__all__ = ["DEFAULT_MAX_BYTES", "StatisticsCache"]

DEFAULT_MAX_BYTES = 1 << 30

T = TypeVar("T")


@dataclasses.dataclass
class _Store:
    """What a cache and its views share."""

    max_bytes: int
    entries: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    nbytes: int = 0
    sources: dict = dataclasses.field(default_factory=dict)  # id -> source: held, so ids are never reused
    device: dict = dataclasses.field(default_factory=dict)


class StatisticsCache:
    """Exact pre-noise statistics of sources, and matrix decompositions, shared across fits (module docstring).

    `statistics` / `decompositions` False: that kind is computed on every call and never kept (a dry run
    whose throwaway zero rows need no statistics kept, say)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, statistics: bool = True, decompositions: bool = True):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._store = _Store(int(max_bytes))
        self._keep_statistics = statistics
        self._keep_decompositions = decompositions

    def statistics_only(self) -> StatisticsCache:
        """A view sharing this cache's statistics that neither keeps nor looks up decompositions: for fits
        whose released matrices never recur (each run of a selection draws its own noise)."""
        view = object.__new__(StatisticsCache)
        view._store, view._keep_statistics, view._keep_decompositions = self._store, self._keep_statistics, False
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of the host arrays held."""
        return self._store.nbytes

    @property
    def max_bytes(self) -> int:
        return self._store.max_bytes

    def statistic(self, source: RowSource, key: Hashable, compute: Callable[[], T]) -> T:
        """`compute()`, an exact pre-noise value of `source`'s rows identified by `key`, computed once."""
        if not self._keep_statistics:
            return _read_only(compute())
        return self._lookup(("statistic", self._source_key(source), key), compute)

    def decomposition(self, name: str, matrix: np.ndarray, compute: Callable[[np.ndarray], T]) -> T:
        """`compute(matrix)` (the decomposition `name`), computed once per matrix, bit for bit."""
        matrix = np.ascontiguousarray(matrix)
        if not self._keep_decompositions:
            return _read_only(compute(matrix))
        digest = hashlib.blake2b(matrix, digest_size=32).digest()
        return self._lookup(("decomposition", name, matrix.shape, matrix.dtype.str, digest), lambda: compute(matrix))

    def drop_decompositions(self) -> None:
        """Forgets every decomposition (statistics stay): for a caller that knows no later fit meets them."""
        for key in [k for k in self._store.entries if k[0] == "decomposition"]:
            self._store.nbytes -= self._store.entries.pop(key)[1]

    def device_rows(self, source: RowSource) -> dict:
        """A dict for what an accelerator keeps of `source`'s rows (the JAX backend's device-resident blocks).
        Device memory, which the backend bounds itself: not counted in `max_bytes`."""
        return self._store.device.setdefault(self._source_key(source), {})

    def _lookup(self, key: tuple, compute: Callable[[], Any]) -> Any:
        store = self._store
        if key in store.entries:
            store.entries.move_to_end(key)
            return store.entries[key][0]
        value = _read_only(compute())
        size = _nbytes(value)
        if size <= store.max_bytes:
            store.entries[key] = (value, size)
            store.nbytes += size
            while store.nbytes > store.max_bytes:
                store.nbytes -= store.entries.popitem(last=False)[1][1]
        return value

    def _source_key(self, source: RowSource) -> tuple:
        if isinstance(source, RowSubset):
            return ("subset", self._source_key(source.parent), source.mask_digest)
        self._store.sources.setdefault(id(source), source)
        return ("source", id(source))


def _read_only(value):
    """`value` with every array in it made read-only (shared by later fits: nobody may change it)."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, (tuple, list)):
        for item in value:
            _read_only(item)
    return value


def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(item) for item in value)
    return 0
