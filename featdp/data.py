"""Training data as a stream of row blocks, with the per-example preprocessing that bounds sensitivity.

A method sees a `TrainingData`: n, d, K and `blocks()` yielding (x, y) with every row already clipped (or
rescaled) to norm ≤ C. Clipping is per row and data-independent, so it costs no privacy.

Views (augmentation multiplicity): a source may hold V ≥ 1 rows per example (`views_per_example`), in
consecutive groups of V (example-major, as a feature file's split stores them: `featdp.featurefile`). Its
`num_examples` counts rows (n·V); `example_count` is n. Every sum a method releases is then a sum over
examples of the *average* over each example's views (`TrainingData.backend` divides the backends' row sums
by V), so one example still moves a statistic by at most its sensitivity; Poisson sampling and every mask
keep or drop an example's views together. A one-view source is exactly the plain case. The rows come
either from arrays in memory or streamed from a feature file; `maybe_in_memory` loads a file's split when
it fits a memory budget, so multi-pass methods do not re-read the disk. A `RowSubset` (a hold-out part, a
selection's fit part) is a mask over another source, never a copy of its rows.

Memory: rows held in memory are never copied whole nor changed. Loading a file's split holds the result
alone; a pass over rows in memory holds one piece of preprocessed rows (`PIECE_BYTES`) beside them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import numpy as np

if TYPE_CHECKING:
    from featdp.cache import StatisticsCache

DEFAULT_BLOCK_ROWS = 32768
IN_MEMORY_BUDGET_BYTES = 1 << 30  # float32 features up to 1 GiB are kept in memory


class DataError(ValueError):
    """Training data that no method can use (NaN, wrong shapes, labels out of range, empty)."""


class RowSource(Protocol):
    num_examples: int  # rows: examples × views_per_example (an optional attribute, 1 when absent)
    feature_dim: int
    num_classes: int

    def blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def views_per_example(source) -> int:
    """V: rows per example of `source` (1 unless it says otherwise)."""
    return int(getattr(source, "views_per_example", 1))


def example_count(source) -> int:
    """n, the number of examples of `source`: its rows over its views. This, not the row count, is what
    neighbouring datasets differ in by one."""
    views = views_per_example(source)
    if source.num_examples % views:
        raise DataError(f"{source.num_examples} rows are not whole examples of {views} views each")
    return source.num_examples // views


def aligned_block_rows(block_rows: int, views: int) -> int:
    """`block_rows` rounded down to whole examples (at least one): a block never splits an example's views,
    so a Poisson mask drawn per block over its examples covers each example once."""
    return max(views, block_rows - block_rows % views)


def check_whole_examples(labels: np.ndarray, views: int, what: str, first_row: int = 0) -> None:
    """DataError unless `labels` are whole examples of `views` rows that share one label."""
    if views == 1:
        return
    if len(labels) % views:
        raise DataError(f"{what}: {len(labels)} rows are not whole examples of {views} views each")
    groups = labels.reshape(-1, views)
    differs = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
    if differs.size:
        row = first_row + int(differs[0]) * views
        raise DataError(f"{what}: the {views} views at rows [{row}, {row + views}) do not share one label")


@dataclasses.dataclass
class ArraySource:
    """Validated arrays in memory (features float32 (rows, d), labels int64 (rows,)); arrays that already
    have those dtypes are used as they are, not copied.

    Views: features of shape (n, V, d) with labels (n,) are V views per example (flattened example-major,
    labels repeated); or pass rows already flattened with `views_per_example=V`."""

    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    views_per_example: int = 1

    def __post_init__(self):
        features = np.asarray(self.features)
        if features.ndim == 3:
            if self.views_per_example not in (1, features.shape[1]):
                raise DataError(f"features of shape {features.shape} hold {features.shape[1]} views per "
                                f"example, but views_per_example={self.views_per_example}")
            self.views_per_example = features.shape[1]
            labels = np.asarray(self.labels)
            if labels.shape != (features.shape[0],):
                raise DataError(f"features of shape {features.shape} need one label per example "
                                f"({features.shape[0]},), got shape {labels.shape}")
            features = features.reshape(-1, features.shape[2])
            self.labels = np.repeat(labels, self.views_per_example)
        if isinstance(self.views_per_example, bool) or int(self.views_per_example) != self.views_per_example \
                or self.views_per_example < 1:
            raise DataError(f"views_per_example must be an integer ≥ 1, got {self.views_per_example!r}")
        self.views_per_example = int(self.views_per_example)
        self.features, self.labels = validate_arrays(features, self.labels, self.num_classes)
        check_whole_examples(self.labels, self.views_per_example, "the training arrays")

    @property
    def num_examples(self) -> int:
        return self.features.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.features.shape[1]

    def blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS):
        for start in range(0, self.num_examples, block_rows):
            yield self.features[start : start + block_rows], self.labels[start : start + block_rows]


@dataclasses.dataclass(eq=False)
class RowSubset:
    """The rows of `parent` where `mask` is True, in order. Nothing is copied up front: each block is
    gathered from the parent's block as it is read, and is numbered as that block (it may hold fewer rows,
    or none). A subset of a subset becomes one mask over the root source."""

    parent: RowSource
    mask: np.ndarray

    def __post_init__(self):
        mask = np.asarray(self.mask)
        if mask.dtype != np.bool_ or mask.shape != (self.parent.num_examples,):
            raise DataError(
                f"a row subset needs a boolean mask of shape ({self.parent.num_examples},), got {mask.dtype} "
                f"{mask.shape}"
            )
        if isinstance(self.parent, RowSubset):
            outer = self.parent.mask.copy()
            outer[outer] = mask
            self.parent, mask = self.parent.parent, outer
        views = views_per_example(self.parent)
        if views > 1 and (len(mask) % views or (mask.reshape(-1, views) != mask[::views, None]).any()):
            # A subset that split an example's views would put one example on both sides of a hold-out.
            raise DataError(f"a row subset must keep or drop all {views} views of each example together")
        self.mask = mask.copy()
        self.mask.flags.writeable = False

    @property
    def views_per_example(self) -> int:
        return views_per_example(self.parent)

    @functools.cached_property
    def num_examples(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def feature_dim(self) -> int:
        return self.parent.feature_dim

    @property
    def num_classes(self) -> int:
        return self.parent.num_classes

    @functools.cached_property
    def mask_digest(self) -> bytes:
        """BLAKE2b of the mask: which rows of the parent, for keys (`featdp.cache`)."""
        packed = np.packbits(self.mask).tobytes() + str(len(self.mask)).encode()
        return hashlib.blake2b(packed, digest_size=16).digest()

    def masked_blocks(
        self, block_rows: int = DEFAULT_BLOCK_ROWS
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(the parent's block x, y, which of its rows belong to the subset)."""
        start = 0
        for x, y in self.parent.blocks(block_rows):
            yield x, y, self.mask[start : start + len(y)]
            start += len(y)
        if start != len(self.mask):
            raise DataError(f"the parent yielded {start} rows, but declares {len(self.mask)}")

    def blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS):
        for x, y, within in self.masked_blocks(block_rows):
            yield x[within], y[within]


def validate_arrays(features, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(features as float32, labels as int64), checked; neither is copied when it has that dtype."""
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
    # A finite float64 sum proves every entry finite (finite float32 values cannot overflow it) without the
    # boolean copy of the features a row-wise scan allocates; the scan runs only when something is bad.
    if not np.isfinite(np.sum(features, dtype=np.float64)):
        bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise DataError(f"features contain NaN or Inf (first bad row: {bad_rows[0]}, {bad_rows.size} rows)")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        row = int(np.argmax((labels < 0) | (labels >= num_classes)))
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

    def row_scales(self, x: np.ndarray) -> np.ndarray:
        """The float32 scale s_i of each row: the map is x_i ↦ s_i·x_i. Each s_i depends on row i alone."""
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
        return scale.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x * self.row_scales(x)[:, None]


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
    # Exact pre-noise values of these rows shared with other fits on them (`featdp.cache`); None: this
    # fit computes its own.
    cache: StatisticsCache | None = dataclasses.field(default=None, repr=False, compare=False)
    # Values kept for this object's lifetime only (device-resident rows, per-row scales of one fit).
    device_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        # Whole examples per block; a distributed fit aligns the block size it numbers blocks by the same way.
        self.block_rows = aligned_block_rows(self.block_rows, self.views)

    @property
    def views(self) -> int:
        """V, the rows per example (consecutive)."""
        return views_per_example(self.source)

    @property
    def backend(self):
        """Where the sums run; with V > 1 views, each example's rows count as their average."""
        from featdp.backend import ViewAveraging, resolve

        backend = resolve(self.device)
        return backend if self.views == 1 else ViewAveraging(backend, self.views)

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

    def shared(self, key, compute: Callable[[], Any]) -> Any:
        """`compute()`, an exact pre-noise value of the rows identified by `key`, computed once: across fits
        through `cache` when there is one, for this object's lifetime otherwise."""
        if self.cache is not None:
            return self.cache.statistic(self.source, key, compute)
        if key not in self.device_cache:
            self.device_cache[key] = compute()
        return self.device_cache[key]

    @property
    def piece_rows(self) -> int:
        """Rows per yielded block. A source block (`block_rows` rows, the unit `select` numbers) is handed
        out in pieces of at most `PIECE_BYTES`, so that a pass holds little beside the rows however wide
        they are (a 32768-row block of d = 3969 floats is half of Fashion-MNIST's train split)."""
        return max(1, min(self.block_rows, PIECE_BYTES // (4 * max(self.feature_dim, 1))))

    @property
    def pass_length(self) -> int:
        """How many blocks `blocks()` yields over every row (no `select`)."""
        rows = self.piece_rows
        return int(sum(-(-count // rows) for count in _rows_per_block(self.source, self.block_rows)))

    def blocks(
        self, select: Callable[[int, int], np.ndarray] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Preprocessed blocks of at most `piece_rows` rows; `select(block_index, rows)` (a boolean mask over
        a source block's rows) keeps only some rows, applied before preprocessing so that sampled-out rows
        cost no work.

        Every block of a pass is written into the same buffer, so a pass holds one block beside the rows:
        use each block before asking for the next (copy it to keep it)."""
        for x, y, _ in self._blocks(select, with_norms=False):
            yield x, y

    def blocks_with_norms(
        self, select: Callable[[int, int], np.ndarray] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Like `blocks` (the same buffer), with each row's L2 norm (float32). Per-example clipping needs
        them at every step; with a cache they are computed once (a full pass over d floats per row each step
        otherwise: a fifth of a full-batch gradient step at d = 3969)."""
        return self._blocks(select, with_norms=True)

    def _blocks(self, select, with_norms: bool):
        # With a cache, each row's scale and preprocessed norm come from it: a block is then preprocessed by
        # one multiply. They are the values the block computes for itself (each depends on its row alone),
        # so a cached pass yields the uncached pass's bits.
        cached = self._row_scales() if self.cache is not None else None
        for x, y, scale, norms, buffer in self._pieces(select, cached):
            if scale is None:
                scale = self.preprocessing.row_scales(x)
            x = buffer.scaled(x, scale)
            if with_norms and norms is None:
                norms = row_norms(x)
            yield x, y, (norms if with_norms else None)

    def _pieces(self, select, cached):
        """(raw rows, labels, their cached scales and norms or None, the pass's buffer) per piece."""
        buffer = _PieceBuffer(self.piece_rows)
        start = 0
        for index, (x, y, within) in enumerate(_masked_blocks(self.source, self.block_rows)):
            rows = len(y) if within is None else int(np.count_nonzero(within))
            chosen = select(index, rows) if select is not None else None
            # The positions in x of the rows this pass uses, in order (None: all of them).
            if chosen is None:
                keep = None if within is None else np.flatnonzero(within)
            else:
                keep = np.flatnonzero(chosen) if within is None else np.flatnonzero(within)[chosen]
            scales = norms = None
            if cached is not None:
                scales, norms = cached[0][start : start + rows], cached[1][start : start + rows]
                if chosen is not None:
                    scales, norms = scales[chosen], norms[chosen]
            start += rows
            x = np.asarray(x, dtype=np.float32)
            if keep is not None:
                y = y[keep]
            for first in range(0, len(y), buffer.rows):
                part = slice(first, first + buffer.rows)
                yield (buffer.rows_of(x, part if keep is None else keep[part]), y[part],
                       None if scales is None else scales[part], None if norms is None else norms[part], buffer)

    def _row_scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(s, ‖s·x‖) for every row of the source, from `cache`."""

        def compute():
            scales, norms = [np.zeros(0, np.float32)], [np.zeros(0, np.float32)]
            for x, _, _, _, buffer in self._pieces(None, None):
                scale = self.preprocessing.row_scales(x)
                scales.append(scale)
                norms.append(row_norms(buffer.scaled(x, scale)))
            return np.concatenate(scales), np.concatenate(norms)

        return self.cache.statistic(self.source, ("row scales", self.preprocessing), compute)


PIECE_BYTES = 32 << 20  # float32 rows a pass hands out at once (`TrainingData.piece_rows`)


class _PieceBuffer:
    """One float32 array of `rows` rows reused by every piece of a pass: rows held by a source are never
    written, and a pass allocates one piece, not one per piece."""

    def __init__(self, rows: int):
        self.rows = rows
        self._array: np.ndarray | None = None

    def _take(self, rows: int, dim: int) -> np.ndarray:
        if self._array is None or len(self._array) < rows or self._array.shape[1] != dim:
            self._array = np.empty((rows, dim), np.float32)  # grows to at most one piece
        return self._array[:rows]

    def rows_of(self, x: np.ndarray, which: slice | np.ndarray) -> np.ndarray:
        """x[which]: a view for a slice, gathered into the buffer for positions."""
        if isinstance(which, slice):
            return x[which]
        # mode="clip": the positions are valid, and "raise" would gather into a temporary first.
        return np.take(x, which, axis=0, out=self._take(len(which), x.shape[1]), mode="clip")

    def scaled(self, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """s_i·x_i per row, in the buffer (`x` may be the buffer itself: the product is elementwise)."""
        in_buffer = self._array is not None and np.shares_memory(x, self._array)
        return np.multiply(x, scale[:, None], out=x if in_buffer else self._take(len(x), x.shape[1]))


def _masked_blocks(
    source: RowSource, block_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(x, y, which rows belong to `source`; None: all) per block: a subset is gathered once, by the consumer."""
    if isinstance(source, RowSubset):
        return source.masked_blocks(block_rows)
    return ((x, y, None) for x, y in source.blocks(block_rows))


def _rows_per_block(source: RowSource, block_rows: int) -> list[int]:
    """How many of `source`'s rows each of its blocks holds."""
    if isinstance(source, RowSubset):
        n = len(source.mask)
        return [int(np.count_nonzero(source.mask[s : s + block_rows])) for s in range(0, n, block_rows)]
    n = source.num_examples
    return [min(block_rows, n - s) for s in range(0, n, block_rows)]


def row_norms(x: np.ndarray) -> np.ndarray:
    """‖x_i‖ per row."""
    # einsum: np.linalg.norm(x, axis=1) materializes x² (a copy of the block) first.
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def holds_rows_in_memory(source: RowSource) -> bool:
    """Whether `source`'s rows are arrays in memory (an ArraySource, or a RowSubset of one)."""
    if isinstance(source, RowSubset):
        source = source.parent
    return isinstance(source, ArraySource)


def maybe_in_memory(source: RowSource, budget_bytes: int = IN_MEMORY_BUDGET_BYTES) -> RowSource:
    """`source` held in memory when its float32 features fit `budget_bytes`, else `source` itself; rows
    already in memory are used where they are.

    Loading holds the result plus at most one row block: a feature file's split is read straight into the
    result (`featdp.featurefile.Split.read`), any other source is copied into it block by block."""
    if holds_rows_in_memory(source):
        return source
    if source.num_examples * source.feature_dim * 4 > budget_bytes:
        return source
    from featdp.featurefile import Split

    views = views_per_example(source)
    if isinstance(source, Split):
        features, labels = source.read()
        return ArraySource(features, labels, source.num_classes, views)
    features = np.empty((source.num_examples, source.feature_dim), np.float32)
    labels = np.empty((source.num_examples,), np.int64)
    start = 0
    for x, y in source.blocks():
        features[start : start + len(y)] = x
        labels[start : start + len(y)] = y
        start += len(y)
    if start != source.num_examples:
        raise DataError(f"the split yielded {start} rows, but declares {source.num_examples}")
    return ArraySource(features, labels, source.num_classes, views)
