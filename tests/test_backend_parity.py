"""The JAX backend, forced onto the CPU ("cpu-jax"), against the numpy path.

Tolerances (the numerical contract in featdp/backend.py): both paths compute each row block in float32 and
differ only in float32 rounding inside a block (summation order, XLA vs BLAS kernels) and in how blocks are
summed (float64 on the host vs compensated float32 on the device). So
* clean statistics agree to RTOL = 1e-5 of the statistic's scale (max |entry| of either);
* heads agree to HEAD_RTOL = 1e-4 of the head's scale: a head is a solve against a ridge-regularized
  matrix, which may amplify the statistics' differences by its condition number.
Noise is off (noise_scale 0: the releaser returns the clean statistic) or, for whole fits, the same seed on
both paths: noise is drawn on the host from the same keys, and Poisson masks are the same draws.

FEATDP_TEST_JAX_DEVICE=gpu (or tpu) runs the same comparisons against an accelerator.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import assert_close, PRIVATE_VARIANTS, make_blobs, variant_id
from featdp import backend, mechanism, stats
from featdp.audit.recording import Recorder
from featdp.cache import StatisticsCache
from featdp.data import ArraySource, Preprocessing, TrainingData
from featdp.methods import get_method
from featdp.training import fit

RTOL = 1e-5
HEAD_RTOL = 1e-4
N, D, K, BLOCK = 700, 10, 5, 64  # 11 blocks, the last one ragged

JAX = backend.resolve(os.environ.get("FEATDP_TEST_JAX_DEVICE", "cpu-jax"))
STREAMED = backend.JaxBackend(JAX.device, resident_bytes=0)  # no device-resident copy: every pass streams


@pytest.fixture(scope="module")
def source():
    x, y = make_blobs(n=N, d=D, k=K, seed=3)
    x[5] = 0  # an all-zero row stays zero under either preprocessing
    return ArraySource(3 * x, y, K)


def data_on(source, device, normalize="unit", public=N):
    return TrainingData(source, Preprocessing(1.5, normalize), block_rows=BLOCK, public_num_examples=public,
                        device=device)


@pytest.mark.parametrize("jax_backend", [JAX, STREAMED], ids=["resident", "streamed"])
@pytest.mark.parametrize("normalize", ["unit", "clip"])
def test_primitives_match_the_numpy_path(source, jax_backend, normalize):
    reference, candidate = data_on(source, "cpu", normalize), data_on(source, jax_backend, normalize)
    for want, got in zip(stats.second_moments(reference), stats.second_moments(candidate)):
        assert_close(got, want)
    weights = np.random.default_rng(0).normal(size=(D, K))
    for clip in (0.05, 10.0):  # clipping binds on almost every row / on none
        assert_close(candidate.backend.clipped_gradient_sum(candidate, weights, clip),
                     reference.backend.clipped_gradient_sum(reference, weights, clip))
    releaser = mechanism.Releaser(mechanism.make_key(11))

    def select(block, rows):
        return releaser.poisson_mask(2, block, rows, 0.1)

    assert_close(candidate.backend.clipped_gradient_sum(candidate, weights, 0.2, select),
                 reference.backend.clipped_gradient_sum(reference, weights, 0.2, select))
    for want, got in zip(reference.backend.newton_statistics(reference, weights),
                         candidate.backend.newton_statistics(candidate, weights)):
        assert_close(got, want)


def test_poisson_steps_sum_exactly_the_sampled_rows(source):
    """One sampled step summed on the device equals the numpy sum over the rows the mask kept, and the
    mask is asked for the same (step, block, rows) on both paths."""
    weights = np.random.default_rng(1).normal(size=(D, K))
    calls = {}
    for name, device in (("numpy", "cpu"), ("jax", JAX), ("streamed", STREAMED)):
        releaser = mechanism.Releaser(mechanism.make_key(5))
        log = calls.setdefault(name, [])

        def select(block, rows):
            log.append((block, rows))
            mask = releaser.poisson_mask(0, block, rows, 0.3)
            return mask & (block != 1)  # a block with no sampled row is skipped on every path

        data = data_on(source, device)
        total = data.backend.clipped_gradient_sum(data, weights, 0.5, select)
        if name == "numpy":
            reference = total
        else:
            assert_close(total, reference)
    assert calls["jax"] == calls["numpy"] == calls["streamed"] == [
        (b, min(BLOCK, N - BLOCK * b)) for b in range(-(-N // BLOCK))]


@pytest.mark.parametrize("rows, dim, block_rows, rtol", [
    (30_000, 6, 16, 1e-7),  # many small blocks: compensated sums as accurate as float64 accumulation
    (256, 128, 128, 1e-5),  # true float32 products: TF32 inputs would be off by ~1e-4, bf16 by ~1e-3
])
def test_sums_meet_the_float32_contract(rows, dim, block_rows, rtol):
    """Against float64 sums of the same preprocessed rows. Plain float32 accumulation of the 1875 small
    blocks would be off by ~1e-6."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(rows, dim)) + 3).astype(np.float32)
    y = rng.integers(0, 3, rows)
    data = TrainingData(ArraySource(x, y, 3), Preprocessing(), block_rows=block_rows, device=JAX)
    gram, cross = data.backend.second_moments(data)
    x = Preprocessing()(x).astype(np.float64)
    assert_close(gram, x.T @ x, rtol)
    assert_close(cross, x.T @ np.eye(3)[y], rtol)


@pytest.mark.parametrize("variant", PRIVATE_VARIANTS, ids=variant_id)
def test_every_private_method_noise_off(source, variant):
    """Noise off: every clean statistic a method releases, and its head, agree across the backends."""
    name, hp = variant
    method = get_method(name, **hp)
    runs = []
    for device in ("cpu", JAX):
        recorder = Recorder(mechanism.Releaser(mechanism.make_key(0)))
        data = TrainingData(source, method.preprocessing(), block_rows=BLOCK, public_num_examples=N,
                            device=device)
        runs.append((method.fit(data, 0.0, recorder), recorder))
    (head_np, rec_np), (head_jax, rec_jax) = runs
    assert [r.name for r in rec_jax.releases] == [r.name for r in rec_np.releases]
    for got, want in zip(rec_jax.clean, rec_np.clean):
        assert_close(got, want)
    assert_close(head_jax, head_np, HEAD_RTOL)


@pytest.mark.parametrize("variant", PRIVATE_VARIANTS, ids=variant_id)
def test_same_seed_same_head_on_either_backend(variant):
    name, hp = variant
    x, y = make_blobs()
    heads = [fit(ArraySource(x, y, 4), name, epsilon=1.0, delta=1e-5, seed=7, hyperparameters=hp,
                 device=device).weights for device in ("cpu", JAX)]
    assert_close(heads[1], heads[0], HEAD_RTOL)


def test_cached_rows_stay_on_the_device_across_passes_and_fits():
    x, y = make_blobs(n=400, d=8, k=3)
    source = ArraySource(x, y, 3)
    reads = []
    original = source.blocks
    source.blocks = lambda block_rows: (reads.append(block_rows), original(block_rows))[1]
    cache = StatisticsCache(statistics=False)  # only the device-resident rows may spare the second read
    for _ in range(2):
        data = TrainingData(source, Preprocessing(), block_rows=BLOCK, public_num_examples=400, device=JAX,
                            cache=cache)
        stats.second_moments(data)
        data.backend.clipped_gradient_sum(data, np.zeros((8, 3)), 1.0)
    assert len(reads) == 1  # one upload serves both passes of both fits


def test_device_names():
    assert isinstance(backend.resolve("cpu"), backend.NumpyBackend)
    assert isinstance(backend.resolve("cpu-jax"), backend.JaxBackend)
    with pytest.raises(ValueError, match="device must be one of"):
        backend.resolve("cuda")
    import jax

    if jax.default_backend() == "cpu":
        assert isinstance(backend.resolve("auto"), backend.NumpyBackend)
        with pytest.raises(ValueError, match="sees no gpu"):
            backend.resolve("gpu")
    with pytest.raises(ValueError, match="device must be one of"):
        fit(ArraySource(*make_blobs(n=50), 4), "dp-ls", epsilon=1.0, delta=1e-5, seed=0, device="cuda")
