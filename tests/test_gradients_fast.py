"""The in-memory gradient path (`featdp.host_gradients`) against a plain reference written here.

The reference materializes every per-example gradient x̃_i (p_i − e_{y_i})ᵀ in float64, clips it by its
Frobenius norm and sums over the rows the same Poisson masks keep. The fast path folds preprocessing
into per-row scales, never materializes a per-example gradient, and computes in float32 per chunk
(float64 across chunks), so the two agree to RTOL = 1e-5 of the sum's scale (max |entry|): float32
rounding of d-long dot products, nothing more. Whole fits with the noise off follow the reference's
steps to HEAD_RTOL = 1e-4 of the head's scale (rounding compounds over the steps).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, make_blobs
from featdp import host_gradients, mechanism
from featdp.cache import StatisticsCache
from featdp.data import ArraySource, Preprocessing, RowSubset, TrainingData
from featdp.methods import get_method
from featdp.methods import _gradients as gradients

RTOL = 1e-5
HEAD_RTOL = 1e-4
N, D, K, BLOCK = 700, 10, 5, 64  # 11 blocks, the last one ragged


def reference_sum(features, labels, preprocessing, weights, clip, keep=None):
    """Σ_{i kept} clip_C(x̃_i (softmax(Wᵀx̃_i) − e_{y_i})ᵀ), one explicit d×K gradient per row, float64."""
    x = preprocessing(features).astype(np.float64)
    keep = np.ones(len(labels), bool) if keep is None else keep
    total = np.zeros(weights.shape)
    for row, label in zip(x[keep], labels[keep]):
        logits = row @ weights
        residual = np.exp(logits - logits.max())
        residual /= residual.sum()
        residual[label] -= 1
        gradient = np.outer(row, residual)
        total += gradient * min(1.0, clip / max(np.linalg.norm(gradient), 1e-30))
    return total


def poisson_keep(releaser, step, q, n=N, block_rows=BLOCK):
    return np.concatenate([releaser.poisson_mask(step, block, min(block_rows, n - start), q)
                           for block, start in enumerate(range(0, n, block_rows))])


class StreamedSource:
    """The same rows, but not an `ArraySource`: the backend takes the block-by-block path."""

    def __init__(self, source):
        self.inner = source
        self.num_examples, self.feature_dim, self.num_classes = (
            source.num_examples, source.feature_dim, source.num_classes)

    def blocks(self, block_rows):
        return self.inner.blocks(block_rows)


@pytest.fixture(scope="module")
def source():
    x, y = make_blobs(n=N, d=D, k=K, seed=3)
    x[5] = 0  # an all-zero row: scale 0 under 'unit', and it must add nothing
    x[7] *= 1e-3  # a short row: 'clip' leaves it as it is
    return ArraySource(3 * x, y, K)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows: a sampled step spans many chunks and every one of the SLABS slabs."""
    monkeypatch.setattr(host_gradients, "CHUNK_BYTES", 7 * 4 * D)


def data_on(source, normalize="unit", clip_norm=1.5, cache=None):
    return TrainingData(source, Preprocessing(clip_norm, normalize), block_rows=BLOCK, public_num_examples=N,
                        device="cpu", cache=cache)


@pytest.mark.parametrize("normalize", ["unit", "clip"])
def test_row_state_is_the_preprocessing(source, normalize):
    data = data_on(source, normalize)
    scale, norms = host_gradients.row_state(data)
    expected = data.preprocessing(source.features)
    np.testing.assert_array_equal(scale[:, None] * source.features, expected)
    np.testing.assert_allclose(norms, np.linalg.norm(expected.astype(np.float64), axis=1), rtol=1e-6)


@pytest.mark.parametrize("normalize", ["unit", "clip"])
@pytest.mark.parametrize("clip", [0.05, 100.0], ids=["clip-binds", "clip-idle"])
@pytest.mark.parametrize("q", [None, 0.3], ids=["full", "poisson"])
def test_clipped_sum_matches_the_reference(source, small_chunks, normalize, clip, q):
    data = data_on(source, normalize)
    weights = np.random.default_rng(0).normal(size=(D, K))
    releaser = mechanism.Releaser(mechanism.make_key(4))
    select = None if q is None else (lambda block, rows: releaser.poisson_mask(1, block, rows, q))
    keep = None if q is None else poisson_keep(releaser, 1, q)
    expected = reference_sum(source.features, source.labels, data.preprocessing, weights, clip, keep)
    assert_close(data.backend.clipped_gradient_sum(data, weights, clip, select), expected)


def test_the_sum_does_not_depend_on_the_thread_count(source, small_chunks, monkeypatch):
    data = data_on(source)
    weights = np.random.default_rng(1).normal(size=(D, K))
    releaser = mechanism.Releaser(mechanism.make_key(2))
    sums = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(host_gradients, "_threads", lambda: threads)
        sums.append(host_gradients.clipped_gradient_sum(
            data, weights, 0.2, lambda block, rows: releaser.poisson_mask(0, block, rows, 0.4)))
    np.testing.assert_array_equal(sums[0], sums[1])
    np.testing.assert_array_equal(sums[0], sums[2])


def test_masks_are_asked_for_as_the_block_pass_asks(source, small_chunks):
    """Same (block, rows) calls in the same order as the streamed path, and the same sum."""
    weights = np.random.default_rng(2).normal(size=(D, K))
    calls, totals = {}, {}
    for name, rows in (("memory", source), ("streamed", StreamedSource(source))):
        releaser = mechanism.Releaser(mechanism.make_key(6))
        log = calls.setdefault(name, [])

        def select(block, count):
            log.append((block, count))
            return releaser.poisson_mask(3, block, count, 0.25) & (block != 2)  # one block with none kept

        data = data_on(rows)
        assert host_gradients.holds_rows(data) == (name == "memory")
        totals[name] = data.backend.clipped_gradient_sum(data, weights, 0.3, select)
    assert calls["memory"] == calls["streamed"] == [(b, min(BLOCK, N - BLOCK * b)) for b in range(-(-N // BLOCK))]
    assert_close(totals["memory"], totals["streamed"])


def test_a_row_subset_sums_its_own_rows(source, small_chunks):
    """A `RowSubset` of rows in memory (a hold-out split, a selection's fit part) takes the path here; its
    masks are asked per block of the parent as the block pass asks, and it sums the same rows."""
    mask = np.random.default_rng(8).random(N) < 0.6
    weights = np.random.default_rng(3).normal(size=(D, K))
    calls, totals = {}, {}
    for name, parent in (("memory", source), ("streamed", StreamedSource(source))):
        releaser = mechanism.Releaser(mechanism.make_key(7))
        log = calls.setdefault(name, [])

        def select(block, count):
            log.append((block, count))
            return releaser.poisson_mask(0, block, count, 0.5)

        data = data_on(RowSubset(parent, mask))
        assert host_gradients.holds_rows(data) == (name == "memory")
        totals[name] = data.backend.clipped_gradient_sum(data, weights, 0.3, select)
    assert calls["memory"] == calls["streamed"]
    assert [count for _, count in calls["memory"]] == [int(mask[b : b + BLOCK].sum()) for b in range(0, N, BLOCK)]
    assert_close(totals["memory"], totals["streamed"])
    keep = np.zeros(N, bool)
    replay = mechanism.Releaser(mechanism.make_key(7))
    keep[np.flatnonzero(mask)] = np.concatenate([replay.poisson_mask(0, block, count, 0.5)
                                                 for block, count in calls["memory"]])
    expected = reference_sum(source.features, source.labels, Preprocessing(1.5), weights, 0.3, keep)
    assert_close(totals["memory"], expected)


def test_a_cache_changes_no_bit(source):
    """Per-row scales kept by a `StatisticsCache` (shared across fits) give the sum computed without one."""
    weights = np.random.default_rng(4).normal(size=(D, K))
    cache = StatisticsCache()

    def step_sum(cache):
        data = data_on(source, cache=cache)
        releaser = mechanism.Releaser(mechanism.make_key(1))
        return data.backend.clipped_gradient_sum(
            data, weights, 0.2, lambda block, rows: releaser.poisson_mask(0, block, rows, 0.3))

    alone, first, reused = step_sum(None), step_sum(cache), step_sum(cache)  # reused: the cache's scales
    assert cache.nbytes > 0
    np.testing.assert_array_equal(first, alone)
    np.testing.assert_array_equal(reused, alone)


def test_an_empty_sample_sums_to_zero(source):
    data = data_on(source)
    total = host_gradients.clipped_gradient_sum(data, np.zeros((D, K)), 0.1, lambda block, rows: np.zeros(rows, bool))
    assert total.shape == (D, K) and not total.any()


def test_dp_sgd_without_noise_follows_the_reference_steps(source, small_chunks):
    """The Tramèr–Boneh recipe's shape (Poisson steps, momentum, C_g below the gradients) with the noise
    off, against SGD with momentum written out on the reference sum, the same masks and the same q·ñ."""
    hp = {"steps": 4, "batch_size": 120, "grad_clip": 0.1, "lr": 4.0, "momentum": 0.9, "clip_norm": 2.0}
    method = get_method("dp-sgd", **hp)
    data = TrainingData(source, method.preprocessing(), block_rows=BLOCK, public_num_examples=N, device="cpu")
    weights = method.fit(data, 0.0, mechanism.Releaser(mechanism.make_key(9)))

    q, _ = gradients.expected_batch_size(N, hp["batch_size"])
    masks = mechanism.Releaser(mechanism.make_key(9))
    expected, trace = np.zeros((D, K)), np.zeros((D, K))
    for step in range(hp["steps"]):
        keep = poisson_keep(masks, step, q)
        gradient = reference_sum(source.features, source.labels, method.preprocessing(), expected,
                                 hp["grad_clip"], keep) / (q * N)
        trace = gradient + hp["momentum"] * trace
        expected = expected - hp["lr"] * trace
    assert np.abs(expected).max() > 0.1  # the steps moved the head
    assert_close(weights, expected, HEAD_RTOL)
