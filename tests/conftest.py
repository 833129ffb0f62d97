"""Shared fixtures: small datasets, method variants and a releaser that records what was released."""

from __future__ import annotations

import numpy as np
import pytest

from featdp import mechanism
from featdp.data import ArraySource, Preprocessing, TrainingData
from featdp.methods import get_method, method_names

# Every private method at its defaults, plus the options that change what is released. The contract and
# noise tests run over this list, so a new registered method is covered without editing them.
PRIVATE_VARIANTS = [(name, {}) for name in method_names(private=True)] + [
    ("dp-sgd", {"steps": 3, "momentum": 0.5}),
    ("dp-sgd", {"steps": 3, "batch_size": 50}),
    ("dp-fc", {"steps": 3, "batch_size": 50}),
    ("dp-newton", {"steps": 2}),
]
FULL_BATCH_VARIANTS = [v for v in PRIVATE_VARIANTS if "batch_size" not in v[1]]


def variant_id(variant) -> str:
    name, hp = variant
    return name + "".join(f"-{k}={v}" for k, v in sorted(hp.items()))


def make_blobs(n=300, d=12, k=4, seed=0, spread=0.6):
    """Linearly separable-ish Gaussian classes with a fixed generator: test data, not private data."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d))
    labels = rng.integers(0, k, size=n)
    features = means[labels] + spread * rng.normal(size=(n, d))
    return features.astype(np.float32), labels


@pytest.fixture
def blobs():
    x, y = make_blobs()
    return ArraySource(x, y, 4)


def training_data(source, method) -> TrainingData:
    return TrainingData(source, method.preprocessing(), block_rows=64)


class RecordingReleaser(mechanism.Releaser):
    """A Releaser that also keeps (clean value, released value) for every release.

    With `replay` (the `released` list of an earlier run), it returns that run's outputs instead of fresh
    ones, so a second run on a neighbouring dataset follows the same public trajectory (same W_t).
    """

    def __init__(self, key, replay=None):
        super().__init__(key)
        self.clean: list[np.ndarray] = []
        self.released: list[np.ndarray] = []
        self._replay = replay

    def _output(self, clean, noisy):
        index = len(self.released)
        self.clean.append(np.asarray(clean, np.float64))
        out = self._replay[index] if self._replay is not None else noisy
        self.released.append(out)
        return out

    def release(self, name, value, **kwargs):
        return self._output(value, super().release(name, value, **kwargs))

    def release_stack(self, name, values, shape, **kwargs):
        values = [np.asarray(v, np.float64) for v in values]
        noisy = list(super().release_stack(name, iter(values), shape, **kwargs))
        stacked = self._output(np.stack(values), np.stack(noisy))
        return iter(stacked)


def run_recorded(name, hp, source, noise_scale, seed=0, replay=None):
    method = get_method(name, **hp)
    releaser = RecordingReleaser(mechanism.make_key(seed)[0], replay=replay)
    weights = method.fit(training_data(source, method), noise_scale, releaser)
    return weights, releaser


__all__ = ["ArraySource", "Preprocessing", "make_blobs", "run_recorded"]
