"""Contract tests over the registry: every private method (and its sampling options) must pass them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event as events

from conftest import PRIVATE_VARIANTS, run_recorded, variant_id
from featdp import accounting
from featdp.methods import get_method, method_names, registry
from featdp.training import fit

N = 300
variants = pytest.mark.parametrize("variant", PRIVATE_VARIANTS, ids=variant_id)


def test_registry_has_the_methods_the_design_names():
    assert {"dp-ls", "dp-newton", "dp-fc", "dp-sgd", "ridge", "logreg"} <= set(registry())
    assert set(method_names(private=False)) == {"ridge", "logreg"}


@variants
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_event_is_accepted_and_epsilon_falls_as_noise_rises(variant, accountant):
    name, hp = variant
    method = get_method(name, **hp)
    eps = [accounting.epsilon(method.dp_event(s, N), 1e-5, accountant) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert all(a > b for a, b in zip(eps, eps[1:])), eps


@variants
@pytest.mark.parametrize("target", [0.3, 1.0, 8.0])
def test_calibration_reaches_the_target_from_below(variant, target):
    name, hp = variant
    method = get_method(name, **hp)
    calibration = accounting.calibrate(lambda s: method.dp_event(s, N), target, 1e-5)
    assert target - 0.05 <= calibration.epsilon <= target + 1e-3
    # The reported ε is what an independent accountant computes for the reported event.
    assert accounting.epsilon(calibration.event, 1e-5) == pytest.approx(calibration.epsilon, rel=1e-9)


@variants
def test_same_seed_same_head_different_seed_different_head(variant, blobs):
    name, hp = variant
    first = fit(blobs, name, epsilon=1.0, delta=1e-5, seed=7, hyperparameters=hp)
    again = fit(blobs, name, epsilon=1.0, delta=1e-5, seed=7, hyperparameters=hp)
    other = fit(blobs, name, epsilon=1.0, delta=1e-5, seed=8, hyperparameters=hp)
    np.testing.assert_array_equal(first.weights, again.weights)
    assert not np.allclose(first.weights, other.weights)
    assert first.seeded


@variants
def test_unseeded_runs_draw_noise_from_the_os(variant, blobs):
    name, hp = variant
    a = fit(blobs, name, epsilon=1.0, delta=1e-5, hyperparameters=hp)
    b = fit(blobs, name, epsilon=1.0, delta=1e-5, hyperparameters=hp)
    assert not a.seeded and not np.allclose(a.weights, b.weights)


@variants
def test_head_is_finite_and_shaped(variant, blobs):
    name, hp = variant
    result = fit(blobs, name, epsilon=0.5, delta=1e-5, seed=0, hyperparameters=hp)
    assert result.weights.shape == (blobs.feature_dim, blobs.num_classes)
    assert np.all(np.isfinite(result.weights))
    assert result.predict(blobs.features).shape == (blobs.num_examples,)


@variants
def test_what_fit_releases_is_what_the_event_accounts(variant, blobs):
    """Rebuild the event from the releases actually made: a release counted once too few, or a noise
    multiplier that differs from the accounted one, changes ε."""
    name, hp = variant
    method = get_method(name, **hp)
    scale = 3.0
    _, releaser = run_recorded(name, hp, blobs, scale)
    assert releaser.releases, "a private method must release something"
    for accountant in ("pld", "rdp"):
        claimed = accounting.epsilon(method.dp_event(scale, blobs.num_examples), 1e-5, accountant)
        ledger = accounting.epsilon(accounting.ledger_event(releaser.releases), 1e-5, accountant)
        assert ledger == pytest.approx(claimed, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", method_names(private=False))
def test_non_private_references_say_so(name, blobs):
    result = fit(blobs, name)
    assert result.calibration is None and not result.releases
    assert result.accuracy(blobs) > 0.9
    assert isinstance(get_method(name).dp_event(1.0, N), events.NonPrivateDpEvent)
