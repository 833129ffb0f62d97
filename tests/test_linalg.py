"""The decomposition cache is exact and never lets two different matrices share an entry."""

import numpy as np
import pytest

from featdp import linalg


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
    with linalg.reusing_decompositions():
        first = linalg.psd_ridge_solve(matrix.copy(), 0.5, rhs)
        second = linalg.psd_ridge_solve(matrix.copy(), 2.0, rhs)  # another λ: same decomposition
    assert len(eigh_calls) == 2  # one outside the block, one inside
    np.testing.assert_array_equal(first, uncached)
    np.testing.assert_allclose(second, linalg.psd_ridge_solve(matrix, 2.0, rhs))


def test_different_matrices_never_share_an_entry(eigh_calls):
    a, rhs = _symmetric(1), np.ones(6)
    b = a.copy()
    b[2, 3] = b[3, 2] = np.nextafter(b[2, 3], np.inf)  # one ulp apart: another noise draw
    with linalg.reusing_decompositions():
        linalg.psd_ridge_solve(a, 1.0, rhs)
        got = linalg.psd_ridge_solve(b, 1.0, rhs)
    assert len(eigh_calls) == 2
    np.testing.assert_array_equal(got, linalg.psd_ridge_solve(b, 1.0, rhs))


def test_nothing_is_kept_outside_the_block_or_over_the_budget(eigh_calls):
    matrix = _symmetric(2)
    linalg.psd_ridge_solve(matrix, 1.0, np.ones(6))
    linalg.psd_ridge_solve(matrix, 1.0, np.ones(6))
    assert len(eigh_calls) == 2
    with linalg.reusing_decompositions(max_bytes=0):
        linalg.psd_ridge_solve(matrix, 1.0, np.ones(6))
        linalg.psd_ridge_solve(matrix, 1.0, np.ones(6))
    assert len(eigh_calls) == 4
    assert linalg._cache is None


def test_cached_decompositions_are_read_only():
    with linalg.reusing_decompositions():
        values, vectors = linalg._cached_eigh(_symmetric(3))
        with pytest.raises(ValueError):
            vectors[0, 0] = 1.0
