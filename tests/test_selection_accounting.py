"""The selection's accounting of mixed grids: the per-order maximum of the candidates' RDP curves
(`WorstOfDpEvent`), dp-accounting's private Papernot–Steinke map pinned against its public path, and the
choice between the domination and equal-standalone-privacy noise plans."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting import dp_event as events

from conftest import make_blobs
from featdp import accounting, selection
from featdp.data import ArraySource
from featdp.methods import get_method

DELTA = 1e-5
PUBLIC = 500.0


@pytest.mark.parametrize("sigma, mean, shape", [(0.8, 3.0, 1.0), (3.0, 10.0, 1.0), (7.5, 4.0, 0.0), (2.0, 5.0, 2.5)])
def test_the_private_map_of_the_theorem_matches_dp_accountings_public_path(sigma, mean, shape):
    # `selection_epsilon` calls dp-accounting's private `_compute_rdp_repeat_and_select` on the per-order
    # maximum: with one Gaussian inside it must give exactly what RepeatAndSelectDpEvent gives publicly.
    public = accounting.epsilon(events.RepeatAndSelectDpEvent(events.GaussianDpEvent(sigma), mean, shape), DELTA, "rdp")
    worst = selection.WorstOfDpEvent([events.GaussianDpEvent(sigma), events.GaussianDpEvent(2 * sigma)])
    ours = selection.selection_epsilon(events.RepeatAndSelectDpEvent(worst, mean, shape), DELTA)
    assert ours == pytest.approx(public, rel=1e-12)


def test_the_run_curve_is_the_per_order_maximum_of_its_components():
    sampled = get_method("dp-sgd", steps=20, batch_size=50).dp_event(3.0, PUBLIC)
    gaussian = events.GaussianDpEvent(4.0)
    orders, worst = selection.run_rdp(selection.WorstOfDpEvent([sampled, gaussian]))
    _, a = selection.rdp_upper_curve(sampled)
    _, b = selection.rdp_upper_curve(gaussian)
    assert np.array_equal(worst, np.maximum(a, b))
    assert np.any(a > b) and np.any(b > a)  # neither dominates the other: the case the new rule is for


def test_on_a_gaussian_only_grid_equal_privacy_gives_the_domination_accounting():
    candidates = selection.build_candidates(["dp-fc", "dp-ls"], None, PUBLIC)
    distribution = selection.RunsDistribution(4.0)
    dominated = selection.domination_plan(candidates, distribution, 1.0, DELTA, PUBLIC)
    equal = selection.equal_privacy_plan(candidates, distribution, 1.0, DELTA, PUBLIC,
                                         start=dominated.run_noise_multiplier)
    # Both calibrate σ_run to 0.1%: within that, the same σ_run, the same scales and the same ε.
    assert equal.run_noise_multiplier == pytest.approx(dominated.run_noise_multiplier, rel=2e-3)
    assert np.allclose(np.asarray(equal.scales) / equal.run_noise_multiplier,
                       np.asarray(dominated.scales) / dominated.run_noise_multiplier, rtol=2e-4)
    sigma = dominated.run_noise_multiplier
    rebuilt = selection.WorstOfDpEvent(
        [m.dp_event(s, PUBLIC) for m, s in zip(candidates, selection.equal_privacy_scales(candidates, sigma, DELTA, PUBLIC))]
        + [events.GaussianDpEvent(sigma)])
    assert selection.selection_epsilon(distribution.dp_event(rebuilt), DELTA) == pytest.approx(dominated.epsilon, rel=1e-9)
    assert selection.plan_noise(candidates, distribution, 1.0, DELTA, PUBLIC)[1] is None


def test_a_sampled_candidate_gets_less_noise_than_under_domination_at_epsilon_1():
    candidates = [get_method("dp-fc"), get_method("dp-sgd", steps=40, batch_size=60)]
    distribution = selection.RunsDistribution(3.0)
    plan, other = selection.plan_noise(candidates, distribution, 0.9, DELTA, PUBLIC)
    assert plan.rule == "equal standalone privacy" and other.rule == "domination"
    assert plan.scales[1] < 0.9 * other.scales[1]
    for chosen in (plan, other):  # both are sound and within the budget, recomputed from their events
        assert selection.selection_epsilon(chosen.event, DELTA) == chosen.epsilon <= 0.9
    # Each candidate alone is (to 0.1%) as private as the score.
    score = accounting.epsilon(events.GaussianDpEvent(plan.run_noise_multiplier), DELTA, "rdp")
    sampled = accounting.epsilon(candidates[1].dp_event(plan.scales[1], PUBLIC), DELTA, "rdp")
    assert sampled <= score and accounting.epsilon(
        candidates[1].dp_event(plan.scales[1] / 1.003, PUBLIC), DELTA, "rdp") > score


def test_a_mixed_selection_reports_the_accountants_epsilon_within_the_target():
    x, y = make_blobs(n=600, d=8, k=3)
    grid = {"steps": ["1", "20"], "batch_size": ["none", "60"]}
    tuned = selection.select(ArraySource(x, y, 3), ["dp-sgd"], epsilon=1.0, delta=DELTA, mean_runs=3, grid=grid,
                             seed=0)
    privacy = tuned.privacy
    assert tuned.plan.rule == "equal standalone privacy"
    assert isinstance(tuned.event.event, selection.WorstOfDpEvent)
    assert privacy.selection_epsilon == selection.selection_epsilon(tuned.event, privacy.selection_delta)
    assert privacy.epsilon <= 1.0 and privacy.delta <= DELTA
    # The event accounted holds exactly the noise the runs used.
    runs_events = tuned.event.event.components
    for run in tuned.runs:
        index = tuned.candidates.index(run.method)
        assert run.noise_scale == tuned.plan.scales[index]
        assert runs_events[index] == run.method.dp_event(run.noise_scale, tuned.public_fit_size)
    assert runs_events[-1] == events.GaussianDpEvent(tuned.noise_multiplier)
    report = selection.selection_report(tuned)
    assert report["dp_event"]["event"]["type"] == "WorstOfDpEvent"
    assert [c["noise_scale"] for c in report["selection"]["candidates"]] == list(tuned.plan.scales)
    assert "as private as the score" in report["selection"]["run_accounting"]
