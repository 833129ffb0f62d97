"""A scikit-learn estimator over the library API, for numpy arrays."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from featdp.training import fit_arrays


class DPLinearClassifier(ClassifierMixin, BaseEstimator):
    """``DPLinearClassifier(method="dp-fc", epsilon=1.0, delta=1e-6).fit(X, y).predict(X)``.

    Labels may be any values; they are encoded as 0..K−1 in sorted order (`classes_`). The class set is
    treated as public, like n. `hyperparameters` are the method's own (see `featdp methods`).
    Fitted attributes: `coef_` (K, d), `classes_`, `privacy_report_` (as written by `featdp fit`).
    """

    def __init__(self, method="dp-fc", epsilon=1.0, delta=None, seed=None, accountant="pld",
                 hyperparameters=None):
        self.method = method
        self.epsilon = epsilon
        self.delta = delta
        self.seed = seed
        self.accountant = accountant
        self.hyperparameters = hyperparameters

    def fit(self, X, y):
        from featdp.report import privacy_report

        self.classes_, encoded = np.unique(np.asarray(y), return_inverse=True)
        result = fit_arrays(
            X, encoded, self.method, num_classes=len(self.classes_), epsilon=self.epsilon, delta=self.delta,
            seed=self.seed, accountant=self.accountant, hyperparameters=self.hyperparameters,
        )
        self.result_ = result
        self.coef_ = result.weights.T
        self.n_features_in_ = result.weights.shape[0]
        self.privacy_report_ = privacy_report(result)
        return self

    def decision_function(self, X):
        check_is_fitted(self, "result_")
        return self.result_.decision_function(X)

    def predict(self, X):
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]
