"""The audit: every registered method stays below its claim, and deliberately broken mechanisms are caught.

The broken mechanisms live here and only here. Claims are audited at (ε, δ) = (1.5, 0.05) with 1000 fits:
a point of the (ε, δ) curve where 1000 trials can see a Gaussian mechanism with 2× too little noise
(measured: honest methods 0.3–0.8, σ/2 ≈ 2.0–2.6, σ/4 ≈ 3.4–3.8).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import PRIVATE_VARIANTS, variant_id
from featdp import mechanism, stats
from featdp.audit import AuditData, canary_audit, ledger_event, one_run_audit, white_box_audit
from featdp.mechanism import Releaser
from featdp.methods import get_method, method_names
from featdp.methods.dp_sgd import DPSGD
from featdp_cli.main import app

EPS, DELTA, TRIALS = 1.5, 0.05, 1000


# ---- deliberately broken mechanisms ---------------------------------------------------------------------

class QuarterNoise(Releaser):
    """Draws noise with std σΔ/4 while every release still declares σΔ."""

    @staticmethod
    def _noise(key, shape, record):
        return Releaser._noise(key, shape, record) // 4


class SharedAcrossClasses(Releaser):
    """One noise draw for all classes: a (d, K) release repeats one column of noise, and every item of a
    per-class stack gets the same key."""

    @staticmethod
    def _noise(key, shape, record):
        if len(shape) == 2 and not record.symmetric:
            return np.broadcast_to(Releaser._noise(key, shape[:1] + (1,), record), shape)
        return Releaser._noise(key, shape, record)

    def release_stack(self, name, values, shape, *, sensitivity, noise_multiplier, symmetric=False, step=None):
        record, key = self._record(name, shape, sensitivity, noise_multiplier, symmetric, 1.0, step)
        for value in values:
            yield self._noisy(key, np.asarray(value, np.float64), record)


class TruncatedTails(Releaser):
    """Noise cut at ±3σ, as a sampler with too few bits cuts it (at a point this sample size can see)."""

    @staticmethod
    def _noise(key, shape, record):
        limit = int(3 * record.grid_scale)
        return np.clip(Releaser._noise(key, shape, record), -limit, limit)


class OneKeyForAllReleases(Releaser):
    """Every release of a fit draws from the same key: noise repeats across steps."""

    def _next_key(self):
        return self._noise_root


class HalvedSensitivity(Releaser):
    """Declares (and noises for) half the sensitivity the statistic really has."""

    def release(self, name, value, *, sensitivity, **kwargs):
        return super().release(name, value, sensitivity=sensitivity / 2, **kwargs)


@dataclasses.dataclass(frozen=True)
class CompositionCountedOnce(DPSGD):
    """DP-SGD whose event counts its `steps` releases as one."""

    def dp_event(self, noise_scale, num_examples):
        return super().dp_event(noise_scale, num_examples).event


@dataclasses.dataclass(frozen=True)
class HeadPeeksAtData(DPSGD):
    """DP-SGD whose head also uses the class sums directly, outside the releaser."""

    def fit(self, data, noise_scale, releaser):
        _, class_sums = stats.second_moments(data)
        return super().fit(data, noise_scale, releaser) + 1e-3 * class_sums


# ---- the canary audit -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", method_names(private=True))
def test_every_registered_method_stays_below_its_claim(name):
    result = canary_audit(get_method(name), EPS, DELTA, trials=TRIALS, seed=1)
    assert result.empirical_epsilon <= EPS, result
    assert result.passed and result.post_processing
    assert result.sensitivity_ratio <= 1 + 1e-5
    # The audit sees the canary at all: the two score samples differ (a vacuous audit would give 0).
    assert result.empirical_epsilon > 0.1, result.empirical_epsilon
    assert len(result.in_scores) == len(result.out_scores) == TRIALS // 2


@pytest.mark.parametrize("name", ["dp-ls", "dp-sgd"])
def test_quarter_noise_is_caught(name):
    result = canary_audit(get_method(name), EPS, DELTA, trials=TRIALS, seed=2, releaser=QuarterNoise)
    assert result.empirical_epsilon > EPS and not result.passed, result.empirical_epsilon


def test_composition_counted_once_is_caught_by_the_black_box_score():
    # Four full-batch steps accounted as one: each step gets the noise meant for the whole run, so the
    # run has σ_eff / 2. The head's logit margin alone reveals it. (grad_clip < C clips the canary's
    # gradient to exactly Δ; with C it has norm C·√((K−1)/K).)
    broken = CompositionCountedOnce(steps=4, grad_clip=0.5)
    result = canary_audit(broken, EPS, DELTA, trials=TRIALS, seed=3, score="head")
    assert result.empirical_epsilon > EPS and not result.passed, result.empirical_epsilon


def test_understated_sensitivity_and_data_outside_the_releases_are_caught():
    understated = canary_audit(get_method("dp-sgd"), EPS, DELTA, trials=20, seed=4, releaser=HalvedSensitivity)
    assert understated.sensitivity_ratio > 1.5 and not understated.passed
    peeking = canary_audit(HeadPeeksAtData(), EPS, DELTA, trials=20, seed=4)
    assert peeking.post_processing is False and not peeking.passed


def test_scores_are_reproducible_with_a_seed_and_fresh_without():
    method = get_method("dp-ls")
    a, b = (canary_audit(method, EPS, DELTA, trials=6, seed=9) for _ in range(2))
    np.testing.assert_array_equal(a.in_scores, b.in_scores)
    c = canary_audit(method, EPS, DELTA, trials=6)
    assert not np.allclose(a.in_scores, c.in_scores)
    # Every trial drew fresh noise: no two scores coincide.
    assert len(np.unique(np.concatenate([a.in_scores, a.out_scores]))) == 6


# ---- the one-run audit ----------------------------------------------------------------------------------

def test_one_run_audit_bounds_an_honest_method_and_catches_quarter_noise():
    # One fit, 1000 canaries. The one-run bound pays 2·M·δ, so its claims need δ ≪ 1/M.
    method = get_method("dp-sgd", grad_clip=0.5)
    honest = one_run_audit(method, 2.0, 1e-5, canaries=1000, seed=5)
    assert honest.passed and 0 < honest.empirical_epsilon <= 2.0
    assert len(honest.in_scores) + len(honest.out_scores) == 1000
    broken = one_run_audit(method, 2.0, 1e-5, canaries=1000, seed=5, releaser=QuarterNoise)
    assert broken.empirical_epsilon > 2.0 and not broken.passed, broken.empirical_epsilon


# ---- the white-box audit --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", PRIVATE_VARIANTS, ids=variant_id)
def test_white_box_passes_for_every_method_and_option(variant):
    name, hp = variant
    result = white_box_audit(get_method(name, **hp), 1.0, 1e-5, trials=60, seed=6)
    assert result.passed, result.failures()
    kinds = {check.kind for check in result.checks}
    assert {"scale", "classes", "fits", "ledger"} <= kinds
    assert ("steps" in kinds) == (hp.get("steps", 1) > 1 or name == "dp-fc")


def _failed(result) -> set[str]:
    return {check.kind for check in result.failures()}


@pytest.mark.parametrize("name", method_names(private=True))
def test_white_box_catches_quarter_noise_and_noise_shared_by_classes(name):
    method = get_method(name)
    assert "scale" in _failed(white_box_audit(method, 1.0, 1e-5, trials=30, seed=7, releaser=QuarterNoise))
    # Shared draws also shrink the effective sample of the Kolmogorov–Smirnov test; the classes check is
    # the one that must see them.
    shared = white_box_audit(method, 1.0, 1e-5, trials=30, seed=7, releaser=SharedAcrossClasses)
    assert "classes" in _failed(shared), shared.failures()


def test_white_box_catches_a_sampler_with_cut_tails():
    method = get_method("dp-ls")
    assert "tails" in _failed(white_box_audit(method, 1.0, 1e-5, trials=200, seed=7, releaser=TruncatedTails))
    honest = white_box_audit(method, 1.0, 1e-5, trials=200, seed=7)
    assert honest.passed and {c.kind for c in honest.checks} >= {"tails"}


def test_white_box_catches_noise_reused_across_steps_and_fits():
    method = get_method("dp-sgd", steps=3)
    assert "steps" in _failed(white_box_audit(method, 1.0, 1e-5, trials=30, seed=8, releaser=OneKeyForAllReleases))
    same_key = white_box_audit(method, 1.0, 1e-5, trials=30, seed=8, releaser=lambda key: Releaser(mechanism.make_key(0)))
    assert "fits" in _failed(same_key)


def test_white_box_ledger_catches_a_composition_counted_once():
    result = white_box_audit(CompositionCountedOnce(steps=4), EPS, DELTA, trials=10, seed=8)
    assert _failed(result) == {"ledger"}
    honest = white_box_audit(get_method("dp-sgd", steps=4), EPS, DELTA, trials=10, seed=8)
    assert honest.passed


def test_ledger_event_groups_identical_releases():
    releaser = Releaser(mechanism.make_key(0))
    for step in range(3):
        releaser.release("g", np.zeros(2), sensitivity=1.0, noise_multiplier=2.0, sampling_probability=0.1, step=step)
    releaser.release("f", np.zeros(2), sensitivity=1.0, noise_multiplier=5.0)
    event = ledger_event(releaser.releases)
    assert [type(e).__name__ for e in event.events] == ["SelfComposedDpEvent", "GaussianDpEvent"]
    assert event.events[0].count == 3 and event.events[0].event.sampling_probability == 0.1


def test_audit_data_keeps_the_canary_direction_unused():
    data = AuditData()
    x, _ = data.others(data.base_dim + 3)
    assert not np.any(x[:, data.base_dim :]) and np.all(np.linalg.norm(x, axis=1) > 0)
    canaries, labels = data.canaries(3, 2.0)
    np.testing.assert_array_equal(canaries[:, data.base_dim :], 2.0 * np.eye(3))
    assert list(labels) == [0, 1, 2]


# ---- the command ----------------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["audit", *map(str, args)])


def test_cli_prints_the_bound_next_to_the_claim_and_exits_0():
    result = invoke("--method", "dp-sgd", "--eps", 1, "--trials", 100, "--seed", 0)
    assert result.exit_code == 0, result.output
    assert "empirical lower bound" in result.output and "epsilon 1 at delta 1e-05" in result.output
    result = invoke("--method", "dp-ls", "--eps", 1, "--trials", 20, "--seed", 0, "--mode", "white-box")
    assert result.exit_code == 0 and "ledger" in result.output, result.output


def test_cli_exits_1_when_the_bound_exceeds_the_claim(monkeypatch):
    original = mechanism.Releaser._noise
    monkeypatch.setattr(mechanism.Releaser, "_noise", staticmethod(lambda *args: original(*args) // 4))
    result = invoke("--method", "dp-sgd", "--set", "grad_clip=0.5", "--eps", 2, "--trials", 1000, "--seed", 5,
                    "--mode", "one-run")
    assert result.exit_code == 1, result.output
    assert "VIOLATION" in result.output


@pytest.mark.parametrize("args, message", [
    (("--method", "dp-ls", "--eps", 0), "epsilon must be"),
    (("--method", "dp-ls", "--eps", -1), "epsilon must be"),
    (("--method", "dp-ls", "--eps", 1, "--delta", 1.5), "delta must"),
    (("--method", "dp-ls", "--eps", 1, "--trials", 1), "trials must"),
    (("--method", "nope", "--eps", 1), "unknown method"),
    (("--method", "ridge", "--eps", 1), "non-private"),
    (("--method", "dp-ls", "--eps", 1, "--mode", "grey-box"), "--mode"),
    (("--method", "dp-ls", "--eps", 1, "--score", "vibes"), "'vibes' is not one of 'releases', 'head'"),
    (("--method", "dp-ls", "--eps", 1, "--set", "lam=-1"), "lam"),
    (("--method", "dp-ls", "--eps", 1, "--confidence", 1.2), "confidence"),
])
def test_cli_bad_input_exits_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
