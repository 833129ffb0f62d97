"""Centring on a released mean (`center`, featdp/centering.py): what is released and accounted, that the
method sees the centred rows, and that the head applies the same map to new features."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event as events

from conftest import invoke, make_blobs, write_feature_file
from featdp import accounting, centering, selection
from featdp.data import ArraySource, Preprocessing, RowSubset, TrainingData
from featdp.featurefile import FeatureFile, write_features
from featdp.methods import HyperparameterError, get_method
from featdp.report import read_outputs
from featdp.selection import select
from featdp.training import fit


def offset_blobs(n=400, d=12, k=4, seed=0, offset=4.0):
    """Blobs far from the origin: after rescaling to unit norm, most of every row is the common direction."""
    x, y = make_blobs(n=n, d=d, k=k, seed=seed)
    return ArraySource((x + offset).astype(np.float32), y, k)


class ExactReleaser:
    """Releases every value unchanged (no noise), recording what it was given: the pre-noise statistics;
    except the example count, released 7 too high, so that a use of the true n instead of ñ shows."""

    def __init__(self):
        self.releases, self.values = [], {}

    def release(self, name, value, **options):
        self.values[name] = np.asarray(value, np.float64)
        return np.asarray(value, np.float64) + (7.0 if name == "num_examples" else 0.0)

    def release_stack(self, name, values, shape, **options):
        return (np.asarray(value, np.float64) for value in values)

    def poisson_mask(self, step, block, rows, probability):
        return np.ones(rows, dtype=bool)


@pytest.mark.parametrize("share", [-0.1, 0.6, 1e-5, math.nan, True])
def test_a_share_outside_0_to_one_half_is_refused(share):
    with pytest.raises(HyperparameterError, match="center must"):
        get_method("dp-fc").create(center=share)


@pytest.mark.parametrize("name, hp", [("dp-fc", {}), ("dp-ls", {}), ("dp-sgd", {"steps": 3}),
                                      ("dp-sgd", {"steps": 3, "batch_size": 50}), ("dp-newton", {})])
def test_the_mean_is_released_at_sensitivity_c_and_accounted_with_the_method(name, hp):
    data = offset_blobs()
    result = fit(data, name, epsilon=1.0, delta=1e-5, seed=3, hyperparameters={**hp, "center": 0.05})
    mean = [r for r in result.releases if r.name == centering.RELEASE_NAME]
    assert len(mean) == 1 and mean[0].sensitivity == result.method.clip_norm
    assert mean[0].noise_multiplier == result.center_noise_multiplier
    # σ_c = σ₁/√f, σ₁ the one Gaussian spending the method's whole budget.
    method_epsilon = (1.0 - result.count.epsilon) * (1 - 1e-4)
    method_delta = (1e-5 - result.count.delta) * (1 - 1e-4)
    single = accounting.calibrate(lambda s: events.GaussianDpEvent(s), method_epsilon, method_delta).noise_scale
    assert result.center_noise_multiplier == pytest.approx(single / math.sqrt(0.05))
    # The calibrated event is the mean's Gaussian composed with the method's, and ε covers both.
    event = result.calibration.event
    assert isinstance(event, events.ComposedDpEvent) and event.events[0] == events.GaussianDpEvent(
        result.center_noise_multiplier)
    assert result.privacy.epsilon <= 1.0 and result.calibration.epsilon <= method_epsilon
    head_releases = [r for r in result.releases if r.name not in ("num_examples",)]
    ledger = accounting.epsilon(accounting.ledger_event(head_releases), method_delta)
    assert ledger == pytest.approx(result.calibration.epsilon, rel=1e-6)


def test_a_full_batch_method_pays_for_the_mean_with_the_share_of_its_precision():
    """Both releases are Gaussians on the full data: the method's noise grows by exactly 1/√(1 − f)."""
    data = offset_blobs()
    plain = fit(data, "dp-fc", epsilon=1.0, delta=1e-5, seed=3)
    for share in (0.02, 0.2):
        centred = fit(data, "dp-fc", epsilon=1.0, delta=1e-5, seed=3, hyperparameters={"center": share})
        ratio = centred.calibration.noise_scale / plain.calibration.noise_scale
        assert ratio == pytest.approx(1 / math.sqrt(1 - share), rel=2e-3)


def test_the_method_trains_on_the_centred_rows_and_the_head_applies_the_same_map():
    """With the mean released exactly (no noise), a centred fit equals the method run on P(P(x) − μ), μ the
    sum of the preprocessed rows over the released count, and its head predicts from raw features through
    the same map."""
    data = offset_blobs()
    releaser = ExactReleaser()
    result = fit(data, "dp-ls", epsilon=1.0, delta=1e-5, releaser=releaser, hyperparameters={"center": 0.05})
    preprocess = Preprocessing()
    mean = (preprocess(data.features).astype(np.float64).sum(0) / result.count.value).astype(np.float32)
    np.testing.assert_allclose(result.center, mean, rtol=1e-6, atol=1e-7)
    centred = ArraySource(preprocess(data.features) - result.center, data.labels, data.num_classes)
    # The same method at the same noise scale and public count, on rows centred by hand.
    again = result.method.fit(TrainingData(centred, preprocess, public_num_examples=result.count.value),
                              result.calibration.noise_scale, ExactReleaser())
    np.testing.assert_allclose(result.weights, again, rtol=1e-5, atol=1e-6)
    expected = preprocess(preprocess(data.features) - result.center) @ result.weights
    np.testing.assert_allclose(result.decision_function(data.features), expected, rtol=1e-6, atol=1e-6)


def test_an_example_of_several_views_adds_the_average_of_its_views_to_the_sum():
    x, y = make_blobs(n=100, d=6, k=3)
    views = np.stack([x + 3, x - 1, 2 * x], axis=1).astype(np.float32)  # (n, 3, d)
    data = ArraySource(views, y, 3)
    releaser = ExactReleaser()
    fit(data, "dp-ls", epsilon=1.0, delta=1e-5, releaser=releaser, hyperparameters={"center": 0.05})
    rows = Preprocessing()(views.reshape(-1, 6)).reshape(100, 3, 6)
    np.testing.assert_allclose(releaser.values[centering.RELEASE_NAME], rows.mean(axis=1).sum(axis=0), rtol=1e-5)


def test_centring_helps_where_rows_share_a_large_common_direction():
    rows = offset_blobs(n=2400, offset=8.0)
    train = ArraySource(rows.features[:2000], rows.labels[:2000], 4)
    test = ArraySource(rows.features[2000:], rows.labels[2000:], 4)
    plain = [fit(train, "dp-ls", epsilon=0.3, delta=1e-5, seed=s).accuracy(test) for s in range(3)]
    centred = [fit(train, "dp-ls", epsilon=0.3, delta=1e-5, seed=s, hyperparameters={"center": 0.05}).accuracy(test)
               for s in range(3)]
    assert np.median(centred) > np.median(plain) + 0.1, (plain, centred)


def test_a_streamed_train_split_is_centred_like_one_in_memory(tmp_path):
    path = write_feature_file(tmp_path / "f.h5", n=300)
    with FeatureFile(path) as features:
        train = features.split("train")
        kwargs = dict(epsilon=1.0, delta=1e-5, seed=5, hyperparameters={"center": 0.1})
        held = fit(train, "dp-ls", **kwargs)
        streamed = fit(train, "dp-ls", memory_budget_bytes=0, **kwargs)
    np.testing.assert_array_equal(held.center, streamed.center)
    np.testing.assert_allclose(held.weights, streamed.weights, rtol=1e-6, atol=1e-7)


def test_a_non_private_reference_centres_on_the_exact_mean():
    data = offset_blobs()
    result = fit(data, "ridge", hyperparameters={"center": 0.05})
    preprocess = Preprocessing()
    np.testing.assert_allclose(result.center, preprocess(data.features).mean(0), rtol=1e-5, atol=1e-6)
    assert result.releases == [] and result.center_noise_multiplier is None


def test_fit_writes_the_mean_into_the_head_and_describes_it_in_the_report(tmp_path):
    features = write_feature_file(tmp_path / "features.h5")
    out = tmp_path / "head"
    result = invoke("fit", features, "--method", "dp-fc", "--eps", "1", "--seed", "2", "--set", "center=0.05",
                    "--out", out)
    assert result.exit_code == 0, result.output
    head = np.load(out / "head.npz")
    assert head["center"].shape == head["weights"].shape[:1]
    # Read back, the head predicts the test split as the fit scored it.
    outputs = read_outputs(out)
    with FeatureFile(features) as file:
        x, y = file.split("test").read()
    accuracy = float(np.mean(outputs.predict(x) == y))
    assert outputs.center is not None and accuracy == pytest.approx(outputs.report["test_accuracy"])
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["hyperparameters"]["center"] == 0.05 and report["epsilon"] <= 1.0
    assert report["center"]["release"] == centering.RELEASE_NAME
    assert report["center"]["noise_multiplier"] > 0
    assert centering.RELEASE_NAME in [r["name"] for r in report["releases"]]
    plain = tmp_path / "plain"
    assert invoke("fit", features, "--method", "dp-fc", "--eps", "1", "--out", plain).exit_code == 0
    assert np.load(plain / "head.npz")["center"].shape == (0,) and read_outputs(plain).center is None
    assert "center" not in json.loads((plain / "privacy_report.json").read_text())


def test_a_bad_share_on_the_command_line_is_one_error_line(tmp_path):
    features = write_feature_file(tmp_path / "features.h5")
    out = tmp_path / "head"
    result = invoke("fit", features, "--method", "dp-fc", "--eps", "1", "--set", "center=0.9", "--out", out)
    assert result.exit_code == 2 and "error:" in result.output and "center must" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_tune_centres_a_centred_candidates_runs_and_reports_the_winners_mean():
    """Each run of a centred candidate releases its own mean of the fit part at σ_run/√f through its
    releaser; the winner's μ̃ is the head's `center`, its release is among the released ones, and the
    report describes it."""
    data = offset_blobs(n=600, d=8, k=3)
    result = select(data, "dp-ls", epsilon=2.0, delta=1e-5, grid={"center": ["0", "0.05"]}, mean_runs=3, seed=1)
    assert result.privacy.epsilon <= 2.0
    assert result.privacy.selection_epsilon == selection.selection_epsilon(result.plan.event,
                                                                           result.privacy.selection_delta)
    assert result.method.center == 0.05  # this seed's winner centred
    sigma = result.noise_multiplier
    assert result.center.shape == (8,) and result.center.dtype == np.float32
    assert result.center_noise_multiplier == pytest.approx(sigma / math.sqrt(0.05), rel=1e-12)
    mean = [r for r in result.releases if r.name == centering.RELEASE_NAME]
    assert len(mean) == 1 and mean[0].noise_multiplier == result.center_noise_multiplier
    assert mean[0].sensitivity == result.method.clip_norm
    # The head predicts through the map its rows were trained on.
    preprocess = result.method.preprocessing()
    expected = preprocess(preprocess(data.features) - result.center) @ result.weights
    np.testing.assert_allclose(result.decision_function(data.features), expected, rtol=1e-6, atol=1e-6)
    report = selection.selection_report(result)
    assert report["center"]["release"] == centering.RELEASE_NAME and report["center"]["share"] == 0.05
    assert report["center"]["noise_multiplier"] == result.center_noise_multiplier
    assert centering.RELEASE_NAME in [r["name"] for r in report["releases"]]
    # A full-batch centred candidate's head keeps the share 1 − f of the run's precision.
    plain, centred = result.plan.scales
    assert centred / plain == pytest.approx(1 / math.sqrt(1 - 0.05), rel=3e-4)


def test_tune_writes_the_winners_mean_into_the_head(tmp_path):
    features = write_feature_file(tmp_path / "features.h5")
    out = tmp_path / "head"
    result = invoke("tune", features, "--method", "dp-fc", "--grid", "center=0.1", "--eps", "2", "--mean-runs", "2",
                    "--seed", "3", "--out", out)
    assert result.exit_code == 0, result.output
    head = np.load(out / "head.npz")
    assert head["center"].shape == head["weights"].shape[:1]
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["center"]["release"] == centering.RELEASE_NAME and report["epsilon"] <= 2.0
    assert centering.RELEASE_NAME in [r["name"] for r in report["releases"]]


def test_a_run_centres_the_fit_part_on_its_own_mean_and_scores_through_the_same_map():
    """With exact releases: μ̃ is the fit part's preprocessed sum over its public size (the validation
    part is not read), the head is the method on the centred fit part, and the score uses P(P(x) − μ̃)."""
    data = offset_blobs(n=300, d=8, k=3)
    fit_part, validation = selection.split_parts(data)
    method = get_method("dp-ls", center=0.05)
    public = 250.0
    weights, mean = selection._fit_run(method, fit_part, 1.0, ExactReleaser(), public, 7.0)
    preprocess = method.preprocessing()
    rows = preprocess(data.features[fit_part.mask])
    np.testing.assert_allclose(mean, rows.astype(np.float64).sum(0) / public, rtol=1e-5, atol=1e-7)
    centred = ArraySource(rows - mean, data.labels[fit_part.mask], 3)
    again = method.fit(TrainingData(centred, preprocess, public_num_examples=public), 1.0, ExactReleaser())
    np.testing.assert_allclose(weights, again, rtol=1e-5, atol=1e-6)
    held_out = preprocess(preprocess(data.features[validation.mask]) - mean) @ weights.astype(np.float32)
    expected = np.sum(np.argmax(held_out, axis=1) == data.labels[validation.mask])
    assert selection._correct(method, weights, validation, mean) == expected


def test_a_streamed_fit_part_is_centred_like_one_in_memory(tmp_path):
    path = write_feature_file(tmp_path / "f.h5", n=300)
    with FeatureFile(path) as features:
        train = features.split("train")
        kwargs = dict(epsilon=2.0, delta=1e-5, grid={"center": ["0.1"]}, mean_runs=2, seed=4)
        held = select(train, "dp-ls", **kwargs)
        streamed = select(train, "dp-ls", memory_budget_bytes=0, **kwargs)
    np.testing.assert_allclose(held.center, streamed.center, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(held.weights, streamed.weights, rtol=1e-5, atol=1e-6)
    assert held.best.noisy_correct == pytest.approx(streamed.best.noisy_correct, abs=1e-9)


def test_a_streamed_fit_part_draws_the_poisson_masks_of_one_in_memory(tmp_path):
    """More rows than one block: a Poisson-sampled run must number the fit part's blocks as the parent's,
    whether the centred rows are a copy in memory or centred as they are read."""
    x, y = make_blobs(n=33_500, d=4, k=3)
    path = write_features(tmp_path / "big.h5", {"train": (x + 3, y)}, num_classes=3)
    grid = {"center": ["0.05"], "batch_size": ["3000"], "steps": ["2"]}
    with FeatureFile(path) as features:
        train = features.split("train")
        kwargs = dict(epsilon=2.0, delta=1e-6, grid=grid, mean_runs=1, seed=2)
        held = select(train, "dp-sgd", **kwargs)
        streamed = select(train, "dp-sgd", memory_budget_bytes=0, **kwargs)
    np.testing.assert_allclose(held.center, streamed.center, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(held.weights, streamed.weights, rtol=0, atol=1e-5 * np.abs(held.weights).max())


@pytest.mark.parametrize("name", ["dp-fc", "dp-ls"])
def test_a_full_batch_centred_candidates_run_is_dominated_with_the_share_1_minus_f_of_the_precision(name):
    sigma, public, share = 3.0, 500.0, 0.2
    plain, centred = get_method(name), get_method(name, center=share)
    s_plain = selection.dominating_noise_scale(plain, sigma, public)
    s_centred = selection.dominating_noise_scale(centred, sigma, public)
    composed = centering.with_mean(centred.dp_event(s_centred, public), sigma / math.sqrt(share))
    assert selection.is_dominated(composed, sigma)
    assert not selection.is_dominated(
        centering.with_mean(centred.dp_event(s_centred / 1.001, public), sigma / math.sqrt(share)), sigma)
    assert s_centred / s_plain == pytest.approx(1 / math.sqrt(1 - share), rel=3e-4)
    # The equal-standalone-privacy rule gives the same (exactly the Gaussian's σ_eff for full-batch heads).
    scales = selection.equal_privacy_scales([plain, centred], sigma, 1e-5, public)
    assert scales[1] / scales[0] == pytest.approx(1 / math.sqrt(1 - share), rel=1e-12)


def test_a_sampled_centred_candidates_event_in_the_plan_includes_its_mean():
    public, share = 500.0, 0.1
    candidates = [get_method("dp-fc"), get_method("dp-sgd", steps=10, batch_size=60, center=share)]
    distribution = selection.RunsDistribution(3.0)
    plan = selection.equal_privacy_plan(candidates, distribution, 1.0, 1e-5, public)
    sigma = plan.run_noise_multiplier
    assert plan.event.event.components[1] == centering.with_mean(
        candidates[1].dp_event(plan.scales[1], public), sigma / math.sqrt(share))
    assert selection.selection_epsilon(plan.event, 1e-5) == plan.epsilon <= 1.0
    # The centred candidate alone is (to 0.1%) as private as the score, its mean included.
    score = accounting.epsilon(events.GaussianDpEvent(sigma), 1e-5, "rdp")
    run_event = lambda s: centering.with_mean(candidates[1].dp_event(s, public), sigma / math.sqrt(share))  # noqa: E731
    assert accounting.epsilon(run_event(plan.scales[1]), 1e-5, "rdp") <= score
    assert accounting.epsilon(run_event(plan.scales[1] / 1.003), 1e-5, "rdp") > score


@pytest.mark.parametrize("name, hp", [("dp-fc", {}), ("dp-ls", {}), ("dp-sgd", {"steps": 2, "batch_size": 50})])
def test_a_centred_candidates_dry_run_counts_the_means_coordinates(name, hp):
    d, k, public = 12, 4, 300.0
    plain = selection.release_coordinates(get_method(name, **hp), d, k, public)
    centred = selection.release_coordinates(get_method(name, **hp, center=0.05), d, k, public)
    assert centred == plain + d


def test_the_audit_refuses_a_centred_method_with_one_error_line():
    result = invoke("audit", "--method", "dp-fc", "--eps", "1", "--trials", "50", "--set", "center=0.02")
    assert result.exit_code == 2 and result.output.startswith("error: center=0.02")
    assert "Traceback" not in result.output


def test_rows_in_memory_are_centred_block_by_block_when_a_copy_would_not_fit(monkeypatch):
    from featdp import featurefile

    data = offset_blobs()
    mean = np.full(data.feature_dim, 0.2, np.float32)
    copied = centering.centred_source(data, Preprocessing(), mean)
    monkeypatch.setattr(featurefile, "available_memory", lambda: data.features.nbytes - 1)
    streamed = centering.centred_source(data, Preprocessing(), mean)
    assert isinstance(copied, ArraySource) and isinstance(streamed, centering.CentredRows)
    rows = np.concatenate([x for x, _ in streamed.blocks(64)])
    np.testing.assert_array_equal(rows, copied.features)


def test_a_subset_is_centred_as_a_subset_of_its_centred_parent():
    """So that its blocks, and the Poisson masks drawn per block, are numbered as the uncentred subset's."""
    data = offset_blobs()
    mask = np.arange(data.num_examples) % 3 != 0
    mean = np.full(data.feature_dim, 0.2, np.float32)
    centred = centering.centred_source(RowSubset(data, mask), Preprocessing(), mean)
    assert isinstance(centred, RowSubset) and np.array_equal(centred.mask, mask)
    rows = np.concatenate([x for x, _ in centred.blocks(64)])
    np.testing.assert_array_equal(rows, centering.centre(Preprocessing(), data.features[mask], mean))
