"""A scikit-learn estimator over the library API, for numpy arrays."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from featdp.training import fit_arrays


class ClassesFromPrivateLabelsWarning(UserWarning):
    """`classes` was not given, so the class set was read from the private labels."""


class DPLinearClassifier(ClassifierMixin, BaseEstimator):
    """``DPLinearClassifier(method="dp-fc", epsilon=1.0, delta=1e-6, classes=[...]).fit(X, y).predict(X)``.

    `classes` is the public label set (any values, encoded as 0..K−1 in the given order). Without it the
    classes are read from `y` with `np.unique` — which releases the private label set unaccounted (a
    class present in only one example reveals that example), so a warning says so and the report records
    it. Labels outside `classes` are an error. `hyperparameters` are the method's own (`featdp methods`).
    Fitted attributes: `coef_` (K, d), `center_` (d,) or None, `classes_`, `privacy_report_` (as written by
    `featdp fit`). With ``hyperparameters={"center": f}`` the rows are centred on a released mean `center_`
    (featdp/centering.py) and the scores are not linear in X: use `decision_function`, not `coef_` alone.
    """

    def __init__(self, method="dp-fc", epsilon=1.0, delta=None, seed=None, accountant="pld",
                 hyperparameters=None, classes=None):
        self.method = method
        self.epsilon = epsilon
        self.delta = delta
        self.seed = seed
        self.accountant = accountant
        self.hyperparameters = hyperparameters
        self.classes = classes

    def fit(self, X, y):
        from featdp.report import privacy_report

        y = np.asarray(y)
        if self.classes is None:
            warnings.warn(
                "classes= was not given: the class set is read from the private labels, which the privacy "
                "guarantee does not cover; pass the public label set as classes=",
                ClassesFromPrivateLabelsWarning, stacklevel=2,
            )
            self.classes_, encoded = np.unique(y, return_inverse=True)
        else:
            self.classes_ = np.asarray(self.classes)
            if len(np.unique(self.classes_)) != len(self.classes_) or len(self.classes_) < 2:
                raise ValueError(f"classes must hold at least two distinct labels, got {list(self.classes_)!r}")
            position = {label: index for index, label in enumerate(self.classes_.tolist())}
            unknown = [label for label in np.unique(y).tolist() if label not in position]
            if unknown:
                raise ValueError(f"label {unknown[0]!r} is not one of classes={list(self.classes_)!r}")
            encoded = np.array([position[label] for label in y.tolist()], dtype=np.int64)
        result = fit_arrays(
            X, encoded, self.method, num_classes=len(self.classes_), epsilon=self.epsilon, delta=self.delta,
            seed=self.seed, accountant=self.accountant, hyperparameters=self.hyperparameters,
        )
        self.result_ = result
        self.coef_ = result.weights.T
        self.center_ = result.center
        self.n_features_in_ = result.weights.shape[0]
        self.privacy_report_ = privacy_report(result)
        if self.classes is None and result.method.private:
            self.privacy_report_["public"]["classes"] = (
                "NOT covered: read from the private labels (np.unique); pass classes= to make it public"
            )
        return self

    def decision_function(self, X):
        check_is_fitted(self, "result_")
        return self.result_.decision_function(X)

    def predict(self, X):
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]
