"""The statistics cache: exact (a fit with it equals the fit without it, bit for bit), never a source of noise
(fits with different seeds still differ), keyed by what each value depends on, read-only and bounded."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_blobs
from featdp import backend, stats
from featdp.cache import StatisticsCache
from featdp.data import ArraySource, Preprocessing, RowSubset, TrainingData
from featdp.mechanism import Releaser, make_key
from featdp.methods import get_method
from featdp.training import fit

K = 4
# Multi-pass and sampled methods included: they read cached per-row scales and norms at every step.
VARIANTS = [
    ("dp-ls", {}),
    ("dp-fc", {"steps": 3}),
    ("dp-fc", {"steps": 3, "batch_size": 60}),
    ("dp-sgd", {"steps": 3, "batch_size": 60}),
    ("dp-newton", {"steps": 1}),
    ("ridge", {}),
]


def _source(subset: bool, writeable: bool = False):
    x, y = make_blobs(n=700, d=10, k=K, seed=5)
    x.flags.writeable = writeable
    source = ArraySource(x, y, K)
    if subset:  # every third row held out, as a hold-out part is: a mask over the rows, not a copy
        source = RowSubset(source, np.arange(700) % 3 != 0)
    return source


def _fit(source, name, hp, seed, cache):
    """A method's fit on 64-row blocks (11 of them: Poisson masks and per-block sums cross blocks)."""
    method = get_method(name, **hp)
    data = TrainingData(source, method.preprocessing(), block_rows=64, public_num_examples=source.num_examples,
                        cache=cache)
    return method.fit(data, 1.0 if method.private else 0.0, Releaser(make_key(seed)))


@pytest.mark.parametrize("subset", [False, True], ids=["rows", "subset"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0] + "".join(f"-{k}={w}" for k, w in v[1].items()))
def test_a_cached_fit_equals_the_uncached_fit_and_draws_its_own_noise(variant, subset):
    name, hp = variant
    source = _source(subset)
    cache = StatisticsCache()
    _fit(source, name, hp, 0, cache)  # fills the cache
    assert cache.nbytes > 0
    cached = _fit(source, name, hp, 1, cache)
    np.testing.assert_array_equal(cached, _fit(source, name, hp, 1, None))
    if get_method(name).private:
        # The cache holds pre-noise statistics only: another seed is another noise draw.
        assert not np.array_equal(_fit(source, name, hp, 2, cache), cached)


def test_whole_fits_with_a_cache_are_bitwise_the_fits_without():
    source = _source(subset=False)
    cache = StatisticsCache()
    for seed in (0, 1):
        with_cache = fit(source, "dp-fc", epsilon=1.0, delta=1e-5, seed=seed, cache=cache)
        without = fit(source, "dp-fc", epsilon=1.0, delta=1e-5, seed=seed)
        np.testing.assert_array_equal(with_cache.weights, without.weights)
        assert with_cache.releases == without.releases and with_cache.count == without.count
    assert not np.array_equal(fit(source, "dp-fc", epsilon=1.0, delta=1e-5, seed=3, cache=cache).weights,
                              with_cache.weights)


def test_a_statistic_depends_on_the_preprocessing_the_rows_and_the_block_size(monkeypatch):
    passes = []
    real = backend.NumpyBackend.second_moments
    monkeypatch.setattr(backend.NumpyBackend, "second_moments", lambda self, data: passes.append(1) or real(self, data))
    parent = _source(subset=False)
    cache = StatisticsCache()

    def gram(source, preprocessing=Preprocessing(), block_rows=64):
        data = TrainingData(source, preprocessing, block_rows=block_rows, device="cpu", cache=cache)
        return stats.second_moments(data)[0]

    first = gram(RowSubset(parent, np.arange(700) % 2 == 0))
    assert gram(RowSubset(parent, np.arange(700) % 2 == 0)) is first  # an equal mask: the same rows
    assert len(passes) == 1
    larger = gram(RowSubset(parent, np.arange(700) % 2 == 0), Preprocessing(clip_norm=2.0))
    other_rows = gram(RowSubset(parent, np.arange(700) % 2 == 1))
    gram(RowSubset(parent, np.arange(700) % 2 == 0), block_rows=32)  # float32 sums per block: another value
    assert len(passes) == 4
    for value in (larger, other_rows):
        assert not np.array_equal(value, first)
    np.testing.assert_array_equal(larger, stats.second_moments(TrainingData(
        RowSubset(parent, np.arange(700) % 2 == 0), Preprocessing(clip_norm=2.0), block_rows=64))[0])


def test_cached_values_are_read_only_and_the_rows_are_never_written():
    source = _source(subset=True, writeable=True)
    before = source.parent.features.copy()
    cache = StatisticsCache()
    for name, hp in VARIANTS:
        _fit(source, name, hp, 0, cache)
    np.testing.assert_array_equal(source.parent.features, before)
    gram, cross = stats.second_moments(TrainingData(source, Preprocessing(), block_rows=64, cache=cache))
    for array in (gram, cross):
        with pytest.raises(ValueError):
            array[0, 0] = 1.0


def test_the_cache_keeps_at_most_its_bound_least_recently_used_out_first():
    rows = [ArraySource(np.full((3, 5), i + 1, np.float32), np.zeros(3, np.int64), 2) for i in range(4)]
    entry = 5 * 5 * 8 + 5 * 2 * 8  # a Gram matrix and its class sums, float64
    cache = StatisticsCache(max_bytes=2 * entry)
    computed = []

    def moments(source):
        key = ("second moments", "test")
        return cache.statistic(source, key, lambda: computed.append(source) or (np.zeros((5, 5)), np.zeros((5, 2))))

    for source in rows[:3]:
        moments(source)
    assert cache.nbytes == 2 * entry  # the first was evicted
    moments(rows[1])  # a hit, which makes rows[2] the least recently used
    moments(rows[3])
    moments(rows[1])
    assert computed == rows[:3] + [rows[3]]
    moments(rows[2])
    assert computed[-1] is rows[2] and cache.nbytes <= cache.max_bytes


def test_statistics_need_not_be_kept():
    source = _source(subset=False)
    cache = StatisticsCache(statistics=False)
    data = TrainingData(source, Preprocessing(), cache=cache)
    assert stats.second_moments(data)[0] is not stats.second_moments(data)[0]
    assert cache.nbytes == 0
