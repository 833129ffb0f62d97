"""An offline feature file from scikit-learn's digits (8×8 pixels as 64-d features), for the demo job."""

from __future__ import annotations

import os

import numpy as np

from featdp.featurefile import write_features


def write_digits_features(path: str | os.PathLike, *, test_fraction: float = 0.25, overwrite: bool = True):
    import pathlib

    from sklearn.datasets import load_digits

    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))  # a fixed, public split
    x = digits.data[order].astype(np.float32)
    y = digits.target[order].astype(np.int32)
    cut = int(round(len(y) * (1 - test_fraction)))
    return write_features(
        path,
        {"train": (x[:cut], y[:cut]), "test": (x[cut:], y[cut:])},
        num_classes=10,
        class_names=[str(c) for c in range(10)],
        dataset="sklearn:digits",
        backbone="identity (8x8 pixels)",
        image_size=8,
        overwrite=overwrite,
    )
