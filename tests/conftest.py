"""Shared fixtures: small datasets, method variants, and fits whose releases are recorded."""

from __future__ import annotations

import numpy as np
import pytest

from featdp import mechanism
from featdp.audit.recording import Recorder, Replay
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


def training_data(source, method, public_count=None) -> TrainingData:
    """Test data is public, so its own n may serve as the public count unless a test fixes another."""
    public_count = source.num_examples if public_count is None else public_count
    return TrainingData(source, method.preprocessing(), block_rows=64, public_num_examples=public_count)


def run_recorded(name, hp, source, noise_scale, seed=0, replay=None, public_count=None):
    """(head, recorder): a fit of `name` whose releases are recorded (`clean`, `released`, `releases`).

    With `replay` (the `released` list of an earlier run), the releases return that run's outputs instead
    of fresh ones (masks still drawn from `seed`), so a second run on a neighbouring dataset follows the
    same public trajectory W_t.
    """
    method = get_method(name, **hp)
    real = mechanism.Releaser(mechanism.make_key(seed))
    releaser = Replay(replay, masks=real) if replay is not None else Recorder(real)
    weights = method.fit(training_data(source, method, public_count), noise_scale, releaser)
    if replay is not None:
        releaser.released = list(replay)
    return weights, releaser


def write_feature_file(path, n=240, d=8, k=3, test=40):
    """A small float16 feature file with a train and a test split (blobs), for the CLI and job tests."""
    from featdp.featurefile import write_features

    x, y = make_blobs(n=n, d=d, k=k)
    return write_features(path, {"train": (x[: n - test], y[: n - test]), "test": (x[n - test :], y[n - test :])},
                          num_classes=k, dtype="float16")


def invoke(*args):
    """Runs the `featdp` CLI in-process, arguments as strings."""
    from typer.testing import CliRunner

    from featdp_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


__all__ = ["ArraySource", "Preprocessing", "invoke", "make_blobs", "run_recorded", "write_feature_file"]


def assert_close(actual, expected, rtol=1e-5):
    """max |actual − expected| ≤ rtol × the larger array's max |entry| (a scale-relative tolerance; the
    default is the parity tests' RTOL for clean statistics)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(actual).max(), np.abs(expected).max(), 1e-30)
    error = np.abs(actual - expected).max()
    assert error <= rtol * scale, f"max |difference| {error:.3g} > {rtol:g} × scale {scale:.3g}"
