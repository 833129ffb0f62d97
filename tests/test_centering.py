"""Centring on a released mean (`center`, featdp/centering.py): what is released and accounted, that the
method sees the centred rows, and that the head applies the same map to new features."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event as events

from conftest import invoke, make_blobs, write_feature_file
from featdp import accounting, centering
from featdp.data import ArraySource, Preprocessing, TrainingData
from featdp.featurefile import FeatureFile
from featdp.methods import HyperparameterError, get_method
from featdp.selection import SelectionError, select
from featdp.training import fit


def offset_blobs(n=400, d=12, k=4, seed=0, offset=4.0):
    """Blobs far from the origin: after rescaling to unit norm, most of every row is the common direction."""
    x, y = make_blobs(n=n, d=d, k=k, seed=seed)
    return ArraySource((x + offset).astype(np.float32), y, k)


class ExactReleaser:
    """Releases every value unchanged (no noise), recording what it was given: the pre-noise statistics."""

    def __init__(self):
        self.releases, self.values = [], {}

    def release(self, name, value, **options):
        self.values[name] = np.asarray(value, np.float64)
        return np.asarray(value, np.float64)

    def release_stack(self, name, values, shape, **options):
        return (np.asarray(value, np.float64) for value in values)

    def poisson_mask(self, step, block, rows, probability):
        return np.ones(rows, dtype=bool)


@pytest.mark.parametrize("share", [-0.1, 0.6, math.nan, True])
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
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["hyperparameters"]["center"] == 0.05 and report["epsilon"] <= 1.0
    assert report["center"]["release"] == centering.RELEASE_NAME
    assert report["center"]["noise_multiplier"] > 0
    assert centering.RELEASE_NAME in [r["name"] for r in report["releases"]]
    plain = tmp_path / "plain"
    assert invoke("fit", features, "--method", "dp-fc", "--eps", "1", "--out", plain).exit_code == 0
    assert np.load(plain / "head.npz")["center"].shape == (0,)
    assert "center" not in json.loads((plain / "privacy_report.json").read_text())


def test_a_bad_share_on_the_command_line_is_one_error_line(tmp_path):
    features = write_feature_file(tmp_path / "features.h5")
    out = tmp_path / "head"
    result = invoke("fit", features, "--method", "dp-fc", "--eps", "1", "--set", "center=0.9", "--out", out)
    assert result.exit_code == 2 and "error:" in result.output and "center must lie in" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_tune_refuses_centred_candidates_before_releasing_anything():
    with pytest.raises(SelectionError, match="center=0.05"):
        select(offset_blobs(), "dp-fc", epsilon=1.0, delta=1e-5, grid={"center": ["0.05"]}, seed=0)
