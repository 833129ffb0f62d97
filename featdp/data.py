"""Training data as a stream of row blocks, with the per-example preprocessing that bounds sensitivity.

A method sees a `TrainingData`: n, d, K and `blocks()` yielding (x, y) with every row already clipped (or
rescaled) to norm ≤ C. Clipping is per example and data-independent, so it costs no privacy. The rows come
either from arrays in memory or streamed from a feature file; `maybe_in_memory` loads a file's split when
it fits a memory budget, so multi-pass methods do not re-read the disk.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import numpy as np

DEFAULT_BLOCK_ROWS = 32768
IN_MEMORY_BUDGET_BYTES = 1 << 30  # float32 features up to 1 GiB are kept in memory


class DataError(ValueError):
    """Training data that no method can use (NaN, wrong shapes, labels out of range, empty)."""


class RowSource(Protocol):
    num_examples: int
    feature_dim: int
    num_classes: int

    def blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


@dataclasses.dataclass
class ArraySource:
    """Validated arrays in memory (features float32 (n, d), labels int64 (n,))."""

    features: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self):
        self.features, self.labels = validate_arrays(self.features, self.labels, self.num_classes)

    @property
    def num_examples(self) -> int:
        return self.features.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.features.shape[1]

    def blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS):
        for start in range(0, self.num_examples, block_rows):
            yield self.features[start : start + block_rows], self.labels[start : start + block_rows]


class FrozenArraySource(ArraySource):
    """Arrays in memory that cannot change (read-only copies), so exact statistics of them are computed
    once and reused across fits: a benchmark fits the same rows hundreds of times. The memo holds only
    pre-noise statistics of the data; every fit still draws its own fresh noise."""

    def __post_init__(self):
        super().__post_init__()
        self.features, self.labels = self.features.copy(), self.labels.copy()
        self.features.flags.writeable = self.labels.flags.writeable = False
        self.memo: dict = {}


def validate_arrays(features, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise DataError(f"features must be a 2-D array (n, d), got shape {features.shape}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise DataError(
            f"labels must be a 1-D array with one label per feature row ({features.shape[0]}), "
            f"got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
            raise DataError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    features = features.astype(np.float32, copy=False)
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad_rows.size:
        raise DataError(f"features contain NaN or Inf (first bad row: {bad_rows[0]}, {bad_rows.size} rows)")
    out_of_range = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if out_of_range.size:
        row = out_of_range[0]
        raise DataError(f"label {labels[row]} at row {row} is outside [0, {num_classes})")
    return features, labels.astype(np.int64, copy=False)


_NORM_MARGIN = 1e-4


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Per-example feature map x ↦ x·min(1, C/‖x‖) ('clip') or x·C/‖x‖ ('unit'), so ‖x‖ ≤ C always.

    (Both aim at C·(1 − 10⁻⁴) so that float32 rounding cannot push a row past C.)

    'unit' is the default: pretrained features vary in scale, and rescaling every vector to norm C
    (as the DP-FC paper does) makes the clip norm, and hence every sensitivity, meaningful without
    looking at the data.
    """

    clip_norm: float = 1.0
    normalize: str = "unit"

    def __post_init__(self):
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.normalize not in ("unit", "clip"):
            raise ValueError(f"normalize must be 'unit' or 'clip', got {self.normalize!r}")

    @property
    def target(self) -> float:
        """C·(1 − 10⁻⁴): the norm rows are scaled to (the JAX backend applies the same map on the device)."""
        return self.clip_norm * (1 - _NORM_MARGIN)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        # Runs on every block of every pass, so it stays in float32. Float32 norms and products are off
        # by up to ~d·2⁻²⁴ relatively; aiming at C·(1 − 1e-4) keeps every row's true norm below C, which
        # every sensitivity relies on.
        target = self.target
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        if self.normalize == "unit":
            # An all-zero row stays zero: it has no direction to rescale.
            scale = np.where(norms > 0, target / np.maximum(norms, 1e-30), 0.0)
        else:
            scale = np.where(norms > target, target / np.maximum(norms, 1e-30), 1.0)
        return x * scale.astype(np.float32)[:, None]


@dataclasses.dataclass
class TrainingData:
    """What a method trains on: preprocessed row blocks of one source, and the backend that computes the
    sums over them (`featdp.backend`: numpy on the host, or JAX on an accelerator)."""

    source: RowSource
    preprocessing: Preprocessing
    block_rows: int = DEFAULT_BLOCK_ROWS
    # The n a method may compute with. Under add-or-remove neighbours the true n is private, so `fit`
    # sets this to the released noisy count; tests and audits on public data pass a fixed public value.
    public_num_examples: float | None = None
    # Where the heavy passes run: a name in featdp.backend.DEVICES or a backend object. Methods use
    # `data.backend`'s primitives (second moments, clipped gradient sums, Newton statistics).
    device: Any = "auto"
    # Device-resident copies of the rows (JAX backend), kept for this object's lifetime.
    device_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def backend(self):
        from featdp.backend import resolve

        return resolve(self.device)

    @property
    def num_examples(self) -> int:
        """The true number of rows: for iterating over them only, never for computing a release."""
        return self.source.num_examples

    @property
    def public_size(self) -> float:
        """The public stand-in for n (the released count in a real fit)."""
        if self.public_num_examples is None:
            raise ValueError("this TrainingData has no public example count: a private method needs one")
        return float(self.public_num_examples)

    @property
    def feature_dim(self) -> int:
        return self.source.feature_dim

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def clip_norm(self) -> float:
        return self.preprocessing.clip_norm

    def blocks(
        self, select: Callable[[int, int], np.ndarray] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Preprocessed blocks; `select(block_index, rows)` (a boolean mask) keeps only some rows,
        applied before preprocessing so that sampled-out rows cost no work."""
        for x, y, _ in self._blocks(select, with_norms=False):
            yield x, y

    def blocks_with_norms(
        self, select: Callable[[int, int], np.ndarray] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Like `blocks`, with each row's L2 norm (float32). Per-example clipping needs them at every
        step; for frozen rows they are computed once (a full pass over d floats per row each step
        otherwise: a fifth of a full-batch gradient step at d = 3969)."""
        return self._blocks(select, with_norms=True)

    def _blocks(self, select, with_norms: bool):
        memo = getattr(self.source, "memo", None)
        if memo is not None:
            # Frozen rows: preprocess once; multi-step methods then only gather their sampled rows.
            key = ("preprocessed", self.preprocessing)
            if key not in memo:
                memo[key] = self.preprocessing(self.source.features)
                memo[key].flags.writeable = False
            features = memo[key]
            norms = None
            if with_norms:
                norms_key = ("row_norms", self.preprocessing)
                if norms_key not in memo:
                    memo[norms_key] = row_norms(features)
                    memo[norms_key].flags.writeable = False
                norms = memo[norms_key]
            for index, start in enumerate(range(0, self.num_examples, self.block_rows)):
                rows = slice(start, start + self.block_rows)
                x, y = features[rows], self.source.labels[rows]
                block_norms = norms[rows] if with_norms else None
                if select is not None:
                    keep = select(index, len(y))
                    x, y = x[keep], y[keep]
                    block_norms = block_norms[keep] if with_norms else None
                yield x, y, block_norms
            return
        for index, (x, y) in enumerate(self.source.blocks(self.block_rows)):
            if select is not None:
                keep = select(index, len(y))
                x, y = x[keep], y[keep]
            x = self.preprocessing(x)
            yield x, y, (row_norms(x) if with_norms else None)


def row_norms(x: np.ndarray) -> np.ndarray:
    """‖x_i‖ per row."""
    # einsum: np.linalg.norm(x, axis=1) materializes x² (a copy of the block) first.
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def maybe_in_memory(source: RowSource, budget_bytes: int = IN_MEMORY_BUDGET_BYTES) -> RowSource:
    """`source` loaded into memory when its float32 features fit `budget_bytes`, else `source` itself."""
    if isinstance(source, ArraySource):
        return source
    if source.num_examples * source.feature_dim * 4 > budget_bytes:
        return source
    # Filled block by block into arrays of the final size: no list of blocks plus a concatenated copy.
    features = np.empty((source.num_examples, source.feature_dim), np.float32)
    labels = np.empty((source.num_examples,), np.int64)
    start = 0
    for x, y in source.blocks():
        features[start : start + len(y)] = x
        labels[start : start + len(y)] = y
        start += len(y)
    if start != source.num_examples:
        raise DataError(f"the split yielded {start} rows, but declares {source.num_examples}")
    return ArraySource(features, labels, source.num_classes)
