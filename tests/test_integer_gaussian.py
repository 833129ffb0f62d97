"""The rounded-Gaussian sampler and the grid release: the distribution sampled is the one accounted."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.stats

from featdp import integer_gaussian, mechanism
from featdp.integer_gaussian import block_table, pmf, sample
from featdp.randomness import make_key

PRODUCTION_SCALE = 1.37 * 2.0**28


def chi_square_p(draws: np.ndarray, scale: float) -> float:
    ks = np.arange(draws.min(), draws.max() + 1)
    expected = pmf(scale, ks) * draws.size
    observed = np.bincount(draws - ks[0], minlength=ks.size)
    keep = expected > 20
    rest_expected, rest_observed = expected[~keep].sum(), observed[~keep].sum()
    statistic = np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])
    statistic += (rest_observed - rest_expected) ** 2 / max(rest_expected, 1e-9)
    return float(scipy.stats.chi2.sf(statistic, keep.sum()))


@pytest.mark.parametrize("scale", [0.8, 3.0, 40.0, 1000.0])
def test_small_scales_match_the_rounded_gaussian_exactly(scale):
    """Blocks of one integer (small s) test the table; larger s the in-block rejection step."""
    draws = sample(make_key(int(scale * 10)).stream(), scale, 1_000_000)
    assert chi_square_p(draws, scale) > 1e-4


def test_production_scale_has_the_declared_std_and_gaussian_tails():
    draws = sample(make_key(3).stream(), PRODUCTION_SCALE, 20_000_000) / PRODUCTION_SCALE
    assert abs(draws.std() - 1) < 1e-3
    assert scipy.stats.kstest(draws[:200_000], "norm").pvalue > 1e-3
    for threshold in (3.0, 4.0, 4.5, 5.0):
        beyond = int(np.count_nonzero(np.abs(draws) > threshold))
        expected = 2 * scipy.stats.norm.sf(threshold)
        assert scipy.stats.binomtest(beyond, draws.size, expected).pvalue > 1e-4, (threshold, beyond)


@pytest.mark.parametrize("scale", [3.0, PRODUCTION_SCALE])
def test_support_reaches_ten_sigma_and_the_table_carries_the_gaussian_tail_mass(scale):
    """No cut at 5.2σ: the sampler's block table gives each tail beyond 5.5σ and 6σ the Gaussian's mass
    (a float32 inverse-CDF sampler gives it 0), to 128-bit precision."""
    table = block_table(scale)
    assert table.support >= integer_gaussian.TRUNCATION * scale
    assert table.tail_mass < 5e-23 and table.eta_table < 5e-15
    edges = (np.arange(-table.half_blocks, table.half_blocks + 1) * table.block_size - 0.5) / scale
    for threshold in (5.5, 6.0, 8.0):
        first = int(np.searchsorted(edges, threshold))  # blocks wholly beyond threshold·s
        upper = (2**128 - table.cumulative[first]) / 2**128
        with mpmath.workdps(40):
            exact = float(1 - mpmath.ncdf(edges[first])) / (1 - table.tail_mass)
        assert upper == pytest.approx(exact, rel=1e-12) and upper > 0


def test_sampler_slack_is_tiny_and_monotone():
    epsilon, delta = integer_gaussian.sampling_slack(10**8, 1.0, 1e-6)
    assert 1.0 < epsilon < 1.0 + 1e-5 and 1e-6 < delta < 1e-6 * (1 + 1e-5)
    assert integer_gaussian.sampling_slack(10**9, 1.0, 1e-6)[0] > epsilon


def test_grid_release_lands_on_the_grid_with_the_declared_rounding():
    releaser = mechanism.Releaser(make_key(0))
    value = np.random.default_rng(0).normal(size=(50, 7)) * 100
    noisy = releaser.release("b", value, sensitivity=1.0, noise_multiplier=2.0)
    record = releaser.releases[0]
    assert record.grid == 2.0 ** math.floor(math.log2(record.grid))  # a power of two
    assert record.grid * math.sqrt(record.coordinates) <= record.sensitivity / 256
    assert record.grid_scale >= integer_gaussian.MIN_SCALE
    assert record.rounded_sensitivity == pytest.approx(1.0 + record.grid * math.sqrt(350))
    units = noisy / record.grid
    np.testing.assert_array_equal(units, np.rint(units))  # every output is a multiple of γ
    # Any two statistics give outputs on the same grid: no low bit of the input survives.
    other = mechanism.Releaser(make_key(0)).release("b", value + record.grid / 3, sensitivity=1.0,
                                                     noise_multiplier=2.0)
    np.testing.assert_array_equal(other / record.grid, np.rint(other / record.grid))
    assert (noisy - value).std() / record.noise_std == pytest.approx(1, abs=0.1)


def test_grid_release_refuses_a_statistic_too_large_for_62_bits():
    releaser = mechanism.Releaser(make_key(0))
    with pytest.raises(FloatingPointError, match="does not fit"):
        releaser.release("b", np.array([1e30]), sensitivity=1.0, noise_multiplier=1.0)


def test_chunks_of_a_large_release_are_independent_and_reproducible():
    key = make_key(9)
    first = mechanism.integer_noise(key, 3 * 2**20 + 5, PRODUCTION_SCALE)
    np.testing.assert_array_equal(first, mechanism.integer_noise(key, 3 * 2**20 + 5, PRODUCTION_SCALE))
    chunks = first[: 3 * 2**20].reshape(3, -1)
    assert abs(np.corrcoef(chunks)[np.triu_indices(3, 1)]).max() < 0.01


def test_sampling_slack_at_a_huge_epsilon_is_vacuous_not_an_overflow():
    # e^ε overflows a float past ε ≈ 709; the bound is δ' ≤ 1 there, as everywhere e^ε·M·t ≥ 1.
    assert integer_gaussian.sampling_slack(40, 1e4, 1e-6)[1] == 1.0
    assert integer_gaussian.sampling_slack(40, 1.0, 1e-6)[1] < 2e-6


def test_slack_without_coordinates_or_tail_never_overflows():
    from featdp import selection

    assert integer_gaussian.sampling_slack(0, 1e4, 1e-6) == (1e4, 1e-6)
    assert selection._slack(10**6, 800.0, 1e-5, 0.0)[1] == 1.0
    assert selection._slack(10**6, 800.0, 1e-5, 1e-12)[1] == 1.0


def test_a_fit_whose_sampler_slack_exceeds_the_target_delta_is_refused():
    import numpy as np
    import pytest

    from featdp.accounting import PrivacyParameterError
    from featdp.training import fit_arrays

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 40)).astype(np.float32), rng.integers(0, 3, 200)
    with pytest.raises(PrivacyParameterError, match=r"beyond the target delta=1e-05"):
        fit_arrays(x, y, "dp-ls", epsilon=60.0, delta=1e-5, seed=0)
    assert fit_arrays(x, y, "dp-ls", epsilon=8.0, delta=1e-5, seed=0).privacy.delta <= 1e-5
