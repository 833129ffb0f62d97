"""Fits diffprivlib's LogisticRegression inside its own environment; run by featdp.bench.peers.

Usage: python -I _diffprivlib_worker.py ARRAYS.npz SETTINGS.json

ARRAYS.npz holds train_x, train_y, test_x, test_y; SETTINGS.json holds the keyword arguments of
`diffprivlib.models.LogisticRegression`. Prints one JSON object on the last line of stdout: test accuracy,
the wall time of `fit` alone, and the library versions. It imports only the standard library, numpy and
diffprivlib, because it runs in an environment where featdp is not installed (diffprivlib 0.6.6 needs
scikit-learn <= 1.7.2).
"""

import json
import sys
import time
import warnings
from importlib import metadata

import numpy as np
from diffprivlib.models import LogisticRegression


def main(arrays_path: str, settings_path: str) -> None:
    with open(settings_path) as f:
        settings = json.load(f)
    with np.load(arrays_path) as arrays:
        train_x, train_y = arrays["train_x"], arrays["train_y"]
        test_x, test_y = arrays["test_x"], arrays["test_y"]
    model = LogisticRegression(**settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        model.fit(train_x, train_y)
        seconds = time.perf_counter() - start
    accuracy = float(np.mean(model.predict(test_x) == test_y))
    result = {
        "accuracy": accuracy,
        "seconds": seconds,
        # Non-convergence of the perturbed objective, data-norm or bounds warnings: the caller reports them.
        "warnings": sorted(
            {f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, DeprecationWarning)}
        ),
        "versions": {name: metadata.version(name) for name in ("diffprivlib", "scikit-learn", "numpy", "scipy")},
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
