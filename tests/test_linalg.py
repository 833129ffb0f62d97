"""Solves with a decomposition cache are exact, and two different matrices never share an entry."""

import numpy as np
import pytest

from featdp import linalg
from featdp.cache import StatisticsCache


def _symmetric(seed, dim=6):
    a = np.random.default_rng(seed).standard_normal((dim, dim))
    return a + a.T


@pytest.fixture
def eigh_calls(monkeypatch):
    calls = []
    real = linalg._eigh

    def counting(matrix):
        calls.append(matrix.copy())
        return real(matrix)

    monkeypatch.setattr(linalg, "_eigh", counting)
    return calls


def test_a_repeated_matrix_is_decomposed_once_and_solves_identically(eigh_calls):
    matrix, rhs = _symmetric(0), np.arange(6.0)
    uncached = linalg.psd_ridge_solve(matrix, 0.5, rhs)
    cache = StatisticsCache()
    first = linalg.psd_ridge_solve(matrix.copy(), 0.5, rhs, cache)
    second = linalg.psd_ridge_solve(matrix.copy(), 2.0, rhs, cache)  # another λ: same decomposition
    assert len(eigh_calls) == 2  # one without the cache, one with it
    np.testing.assert_array_equal(first, uncached)
    np.testing.assert_array_equal(second, linalg.psd_ridge_solve(matrix, 2.0, rhs))


def test_different_matrices_never_share_an_entry(eigh_calls):
    a, rhs = _symmetric(1), np.ones(6)
    b = a.copy()
    b[2, 3] = b[3, 2] = np.nextafter(b[2, 3], np.inf)  # one ulp apart: another noise draw
    cache = StatisticsCache()
    linalg.psd_ridge_solve(a, 1.0, rhs, cache)
    got = linalg.psd_ridge_solve(b, 1.0, rhs, cache)
    assert len(eigh_calls) == 2
    np.testing.assert_array_equal(got, linalg.psd_ridge_solve(b, 1.0, rhs))


def test_nothing_is_kept_without_a_cache_over_its_budget_or_once_dropped(eigh_calls):
    matrix = _symmetric(2)
    for cache in (None, None, StatisticsCache(max_bytes=0), StatisticsCache(max_bytes=0)):
        linalg.psd_ridge_solve(matrix, 1.0, np.ones(6), cache)
    assert len(eigh_calls) == 4
    cache = StatisticsCache()
    linalg.psd_ridge_solve(matrix, 1.0, np.ones(6), cache)
    assert cache.nbytes == 6 * 8 + 36 * 8  # eigenvalues and eigenvectors, float64
    cache.drop_decompositions()
    assert cache.nbytes == 0
    linalg.psd_ridge_solve(matrix, 1.0, np.ones(6), cache)
    assert len(eigh_calls) == 6


def test_a_statistics_only_view_keeps_no_decomposition(eigh_calls):
    cache = StatisticsCache()
    view = cache.statistics_only()
    for _ in range(2):
        linalg.psd_ridge_solve(_symmetric(4), 1.0, np.ones(6), view)
    assert len(eigh_calls) == 2 and cache.nbytes == 0


def test_cached_decompositions_are_read_only():
    values, vectors = StatisticsCache().decomposition("eigh", _symmetric(3), linalg._eigh)
    with pytest.raises(ValueError):
        vectors[0, 0] = 1.0
    with pytest.raises(ValueError):
        values[0] = 1.0
