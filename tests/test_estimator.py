"""The scikit-learn estimator and the Python API."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

import featdp
from featdp.estimator import ClassesFromPrivateLabelsWarning
from conftest import make_blobs


def test_estimator_fits_predicts_and_reports():
    x, y = make_blobs(n=600, d=10, k=3, spread=0.3)
    labels = np.array(["cat", "dog", "emu"])[y]
    model = featdp.DPLinearClassifier(method="dp-ls", epsilon=4.0, delta=1e-6, seed=0,
                                      classes=["cat", "dog", "emu"]).fit(x, labels)
    assert set(model.predict(x)) <= set(labels)
    assert model.score(x, labels) > 0.8
    assert model.coef_.shape == (3, 10)
    assert model.privacy_report_["epsilon"] <= 4.0
    assert clone(model).get_params()["method"] == "dp-ls"
    assert model.center_ is None


def test_a_centred_estimator_exposes_its_mean_and_predicts_through_it():
    x, y = make_blobs(n=600, d=10, k=3, spread=0.3)
    model = featdp.DPLinearClassifier(method="dp-ls", epsilon=4.0, delta=1e-6, seed=0, classes=[0, 1, 2],
                                      hyperparameters={"center": 0.05}).fit(x + 5, y)
    assert model.center_.shape == (10,) and model.privacy_report_["center"]["share"] == 0.05
    assert model.score(x + 5, y) > 0.8


def test_estimator_passes_hyperparameters_and_rejects_bad_input():
    x, y = make_blobs(n=100, d=4, k=2)
    model = featdp.DPLinearClassifier(method="dp-sgd", epsilon=1.0, hyperparameters={"steps": 2}, classes=[0, 1])
    assert model.fit(x, y).result_.method.steps == 2
    x_bad = x.copy()
    x_bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        featdp.DPLinearClassifier(epsilon=1.0, classes=[0, 1]).fit(x_bad, y)
    with pytest.raises(ValueError, match="epsilon"):
        featdp.DPLinearClassifier(epsilon=-1.0, classes=[0, 1]).fit(x, y)
    with pytest.raises(ValueError, match="label 1 is not one of"):
        featdp.DPLinearClassifier(epsilon=1.0, classes=[0, 2]).fit(x, y)


def test_classes_read_from_private_labels_are_flagged():
    x, y = make_blobs(n=100, d=4, k=2)
    with pytest.warns(ClassesFromPrivateLabelsWarning):
        model = featdp.DPLinearClassifier(method="dp-ls", epsilon=1.0).fit(x, y)
    assert model.privacy_report_["public"]["classes"].startswith("NOT covered")
    public = featdp.DPLinearClassifier(method="dp-ls", epsilon=1.0, classes=[1, 0]).fit(x, y)
    assert public.privacy_report_["public"]["classes"].startswith("public")
    # The given order is the encoding: class 1 is column 0 of the head.
    assert list(public.classes_) == [1, 0]


def test_default_delta_is_below_one_over_n():
    for n in (10, 1797, 60_000, 1_281_167):
        assert featdp.default_delta(n) < 1 / n
