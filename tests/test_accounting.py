"""The shared accountant: exact Gaussian path vs PLD vs RDP, calibration, and the design's figures."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import dp_event as events

from featdp import accounting


def three_gaussians(sigma):
    return events.ComposedDpEvent([events.GaussianDpEvent(sigma)] * 3)


@pytest.mark.parametrize("sigmas", [[1.0], [0.7, 2.0, 5.0], [3.0] * 20])
@pytest.mark.parametrize("delta", [1e-5, 8e-7])
def test_exact_gaussian_path_agrees_with_pld_within_one_percent(sigmas, delta):
    event = events.ComposedDpEvent([events.GaussianDpEvent(s) for s in sigmas])
    exact = accounting.epsilon(event, delta, "pld")
    pld = accounting.make_accountant("pld").compose(event).get_epsilon(delta)
    assert accounting.describe_accountant(event, "pld").startswith("pld-exact")
    assert exact == pytest.approx(pld, rel=0.01)
    assert exact <= pld + 1e-9  # PLD with discretization is pessimistic, never below the exact value


def test_rdp_is_never_tighter_than_the_exact_bound():
    for sigma in (0.8, 3.0, 30.0):
        event = three_gaussians(sigma)
        assert accounting.epsilon(event, 1e-6, "rdp") >= accounting.epsilon(event, 1e-6, "pld")


@pytest.mark.parametrize("epsilon, expected_sigma", [(0.1, 63.8), (1.0, 7.40), (8.0, 1.14)])
def test_design_figures_for_three_releases(epsilon, expected_sigma):
    calibration = accounting.calibrate(three_gaussians, epsilon, 8e-7)
    assert calibration.noise_scale == pytest.approx(expected_sigma, rel=0.01)


def test_subsampled_recipe_matches_tramer_boneh_accounting():
    def recipe(sigma):
        return events.SelfComposedDpEvent(
            events.PoissonSampledDpEvent(8192 / 60000, events.GaussianDpEvent(sigma)), 293
        )

    assert accounting.epsilon(recipe(4.05), 1e-5, "pld") == pytest.approx(2.43, abs=0.02)
    assert accounting.epsilon(recipe(4.05), 1e-5, "rdp") == pytest.approx(2.65, abs=0.02)
    assert accounting.describe_accountant(recipe(1.0), "pld").startswith("pld (dp-accounting")


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibrate_is_tight_and_never_above_target(accountant):
    for target in (0.05, 0.5, 2.0, 10.0):
        calibration = accounting.calibrate(three_gaussians, target, 1e-6, accountant)
        assert target - 0.01 * target <= calibration.epsilon <= target
        assert accounting.epsilon(three_gaussians(calibration.noise_scale * 0.99), 1e-6, accountant) > target * 0.999


def subsampled_steps(sigma):
    return events.SelfComposedDpEvent(events.PoissonSampledDpEvent(0.1, events.GaussianDpEvent(sigma)), 40)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("target", [0.3, 8.0])
def test_calibrating_subsampled_steps_brackets_the_scale_with_the_real_accountant(accountant, target):
    """The search locates the scale with a cheaper accountant (a coarser PLD grid at ε = 8, RDP's integer
    orders); the scale returned must still meet the target under the accountant `epsilon` uses, 0.1%
    less noise must not, and the ε reported must be that accountant's."""
    calibration = accounting.calibrate(subsampled_steps, target, 1e-5, accountant)
    reached = accounting.epsilon(subsampled_steps(calibration.noise_scale), 1e-5, accountant)
    assert calibration.epsilon == reached <= target
    assert accounting.epsilon(subsampled_steps(calibration.noise_scale / 1.001), 1e-5, accountant) > target


# dp-accounting's closed-form Gaussian ε takes log1p(−1) = −inf on its way at very large σ, as intended.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log1p:RuntimeWarning")
def test_calibration_reports_targets_no_scale_can_meet():
    with pytest.raises(accounting.PrivacyParameterError, match="pure noise"):
        accounting.calibrate(subsampled_steps, 1e-9, 1e-12, "rdp")


@pytest.mark.parametrize(
    "epsilon, delta, accountant, fragment",
    [
        (0, 1e-5, "pld", "epsilon"),
        (-1, 1e-5, "pld", "epsilon"),
        (math.inf, 1e-5, "pld", "epsilon"),
        (math.nan, 1e-5, "pld", "epsilon"),
        (1, 0, "pld", "delta"),
        (1, 1, "pld", "delta"),
        (1, 1e-5, "zcdp", "accountant"),
    ],
)
def test_bad_privacy_parameters_name_the_value(epsilon, delta, accountant, fragment):
    with pytest.raises(accounting.PrivacyParameterError, match=fragment):
        accounting.calibrate(three_gaussians, epsilon, delta, accountant)


def test_exact_accountant_is_a_dp_accounting_accountant():
    accountant = accounting.ExactGaussianAccountant()
    assert isinstance(accountant, dp_accounting.PrivacyAccountant)
    assert not accountant.supports(events.PoissonSampledDpEvent(0.1, events.GaussianDpEvent(1.0)))
    accountant.compose(events.SelfComposedDpEvent(events.GaussianDpEvent(2.0), 4))
    assert accountant.effective_sigma == pytest.approx(1.0)
