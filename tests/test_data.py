"""Rows in memory: loading a split for a fit, validating arrays, row subsets, and what a pass holds.

Memory is measured with tracemalloc, which sees every numpy allocation (HDF5's own conversion buffer, a
fixed 1 MiB, is outside it): deterministic, and independent of what else the process holds.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from conftest import make_blobs
from featdp.cache import StatisticsCache
from featdp.data import (
    ArraySource, DataError, Preprocessing, RowSubset, TrainingData, holds_rows_in_memory, maybe_in_memory,
)
from featdp.featurefile import FeatureFile, write_features
from featdp.training import fit

MiB = 1 << 20


def _traced_peak(function):
    """(function(), the peak bytes numpy and Python allocated while it ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_loading_a_split_for_a_fit_holds_the_float32_rows_and_little_else(tmp_path, dtype):
    # 40,000 rows: one 32768-row block is most of the split, so a block-sized copy beside the result (or a
    # float16 block and its float32 conversion) would show.
    n, d = 40_000, 128
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, d), dtype=np.float32), rng.integers(0, 10, size=n)
    path = write_features(tmp_path / "f.h5", {"train": (x, y)}, num_classes=10, dtype=dtype)
    with FeatureFile(path) as features:
        held, peak = _traced_peak(lambda: maybe_in_memory(features.split("train")))
    assert isinstance(held, ArraySource)
    assert peak <= 1.3 * n * d * 4 + MiB
    np.testing.assert_array_equal(held.features, x.astype(dtype).astype(np.float32))
    np.testing.assert_array_equal(held.labels, y)


def test_valid_arrays_are_used_as_they_are():
    x, y = make_blobs(n=20_000, d=64)
    source, peak = _traced_peak(lambda: ArraySource(x, y.astype(np.int64), 4))
    assert source.features is x and peak < MiB  # no copy, and no n×d boolean scan for NaN
    bad = x.copy()
    bad[7, 3] = np.nan
    bad[9, 0] = np.inf
    with pytest.raises(DataError, match=r"first bad row: 7, 2 rows"):
        ArraySource(bad, y, 4)
    with pytest.raises(DataError, match=r"label 4 at row 2 is outside \[0, 4\)"):
        ArraySource(x[:3], np.array([0, 1, 4]), 4)


def test_a_subset_is_a_mask_over_its_parent():
    x, y = make_blobs(n=300, d=5)
    parent = ArraySource(x, y, 4)
    outer = RowSubset(parent, np.arange(300) % 3 != 0)
    inner = RowSubset(outer, np.arange(200) % 2 == 0)
    assert inner.parent is parent  # flattened: one mask over the root source
    expected = np.flatnonzero(np.arange(300) % 3 != 0)[::2]
    assert inner.num_examples == len(expected) and holds_rows_in_memory(inner)
    got = [(a, b) for a, b in inner.blocks(64)]
    assert len(got) == 5  # one block per parent block, numbered as the parent's
    np.testing.assert_array_equal(np.vstack([a for a, _ in got]), x[expected])
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), y[expected])
    assert maybe_in_memory(inner) is inner  # rows already in memory are used where they are
    with pytest.raises(DataError, match="boolean mask of shape"):
        RowSubset(parent, np.ones(299, dtype=bool))


def test_preprocessed_blocks_of_a_subset_are_those_of_its_rows():
    x, y = make_blobs(n=300, d=5)
    mask = np.arange(300) % 4 != 1
    subset = RowSubset(ArraySource(x, y, 4), mask)
    for cache in (None, StatisticsCache()):
        data = TrainingData(subset, Preprocessing(clip_norm=2.0), block_rows=64, cache=cache)
        for _ in range(2):  # the second pass reads the cached scales
            # Each block is copied before the next is asked for: a pass writes every block into one buffer.
            blocks = [(x.copy(), y, norms) for x, y, norms in
                      data.blocks_with_norms(lambda block, rows: np.arange(rows) % 2 == 0)]
            expected = []
            for block in range(5):
                rows = x[block * 64 : (block + 1) * 64][mask[block * 64 : (block + 1) * 64]]
                expected.append(rows[::2])
            for (got, labels, norms), want in zip(blocks, expected):
                np.testing.assert_array_equal(got, Preprocessing(clip_norm=2.0)(want))
                np.testing.assert_array_equal(norms, np.sqrt(np.einsum("ij,ij->i", got, got)))


def test_a_fit_on_held_rows_or_a_subset_copies_at_most_a_block():
    # 80,000 × 64 float32 rows (20.5 MB): a 32768-row preprocessed block is 40% of them; a copy of the rows
    # or of the 90% subset beside it would be far more.
    x, y = make_blobs(n=80_000, d=64, k=10, seed=2)
    x.flags.writeable = False
    source = ArraySource(x, y, 10)
    subset = RowSubset(source, np.arange(80_000) % 10 != 0)
    block = 32768 * 64 * 4
    for rows, cache in ((source, None), (subset, None), (subset, StatisticsCache())):
        _, peak = _traced_peak(lambda: fit(rows, "ridge", device="cpu", cache=cache))
        assert peak <= 1.2 * block + 4 * MiB, (rows, cache)


def test_wide_blocks_are_handed_out_in_pieces_and_sampled_per_source_block(monkeypatch):
    import featdp.data

    monkeypatch.setattr(featdp.data, "PIECE_BYTES", 4 * 5 * 10)  # 10 rows of d = 5 floats per piece
    x, y = make_blobs(n=300, d=5)
    subset = RowSubset(ArraySource(x, y, 4), np.arange(300) % 3 != 0)
    data = TrainingData(subset, Preprocessing(), block_rows=64)
    pieces = [(a.copy(), b) for a, b in data.blocks()]
    assert data.piece_rows == 10 and max(len(b) for _, b in pieces) == 10 and len(pieces) == data.pass_length
    np.testing.assert_array_equal(np.vstack([a for a, _ in pieces]), Preprocessing()(x[subset.mask]))
    asked = []

    def select(block, rows):
        asked.append((block, rows))
        return np.arange(rows) % 2 == 0

    kept = np.concatenate([b for _, b in data.blocks(select)])
    assert asked == [(b, int(np.count_nonzero(subset.mask[64 * b : 64 * (b + 1)]))) for b in range(5)]
    np.testing.assert_array_equal(kept, np.concatenate([y[64 * b : 64 * (b + 1)][subset.mask[64 * b : 64 * (b + 1)]][::2]
                                                        for b in range(5)]))
