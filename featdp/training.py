"""Fit a head: calibrate the method's noise to (ε, δ), run it with fresh OS randomness, keep the ledger."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np

from featdp import accounting
from featdp.data import ArraySource, DataError, RowSource, TrainingData, maybe_in_memory
from featdp.mechanism import Release, Releaser, make_key
from featdp.methods import Method, get_method


class DeltaWarning(UserWarning):
    """δ ≥ 1/n: the guarantee allows leaking one whole example with probability δ."""


def default_delta(num_examples: int) -> float:
    """A power of ten at or below 0.1/n: comfortably below 1/n, and readable in a report."""
    return 10.0 ** math.floor(math.log10(0.1 / max(num_examples, 1)))


@dataclasses.dataclass
class FitResult:
    method: Method
    weights: np.ndarray  # (d, K); predict argmax_c (Wᵀ preprocess(x))_c
    num_examples: int
    releases: list[Release]
    calibration: accounting.Calibration | None  # None for non-private methods
    seeded: bool
    fit_seconds: float

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        return self.method.preprocessing()(np.asarray(features, np.float32)) @ self.weights

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.decision_function(features), axis=1)

    def accuracy(self, source: RowSource) -> float:
        correct = 0
        for x, y in source.blocks():
            correct += int(np.sum(self.predict(x) == y))
        return correct / max(source.num_examples, 1)


def fit(
    train: RowSource,
    method: str | Method = "dp-fc",
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    seed: int | None = None,
    accountant: str = "pld",
    hyperparameters: dict | None = None,
) -> FitResult:
    """Trains `method` on `train` with (ε, δ)-DP; noise comes from the OS unless `seed` is given."""
    if isinstance(method, str):
        method = get_method(method, **(hyperparameters or {}))
    elif hyperparameters:
        method = dataclasses.replace(method, **hyperparameters)
    n = train.num_examples
    if n == 0:
        raise DataError("the training split is empty: there is nothing to fit")
    calibration = None
    if method.private:
        if epsilon is None:
            raise accounting.PrivacyParameterError(f"method {method.name!r} is private: epsilon is required")
        delta = default_delta(n) if delta is None else delta
        accounting.check_privacy_parameters(epsilon, delta, accountant)
        if delta >= 1 / n:
            warnings.warn(
                f"delta={delta:g} is not below 1/n = {1 / n:g}: such a guarantee permits revealing a whole "
                "training example with probability delta; use a smaller delta",
                DeltaWarning,
                stacklevel=2,
            )
        calibration = accounting.calibrate(
            lambda scale: method.dp_event(scale, n), epsilon, delta, accountant
        )
    key, seeded = make_key(seed)
    releaser = Releaser(key)
    data = TrainingData(maybe_in_memory(train), method.preprocessing())
    start = time.perf_counter()
    weights = method.fit(data, calibration.noise_scale if calibration else 0.0, releaser)
    elapsed = time.perf_counter() - start
    if not np.all(np.isfinite(weights)):
        raise FloatingPointError(f"method {method.name!r} produced a non-finite head")
    return FitResult(method, np.asarray(weights, np.float32), n, releaser.releases, calibration, seeded, elapsed)


def fit_arrays(features, labels, method="dp-fc", *, num_classes=None, **kwargs) -> FitResult:
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return fit(ArraySource(features, labels, num_classes), method, **kwargs)
