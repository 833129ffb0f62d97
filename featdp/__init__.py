"""featdp: differentially private linear heads on frozen pretrained features.

Library API (the CLI `featdp` is a thin layer over it):
* `fit(source, method, epsilon=..., delta=..., seed=...)` / `fit_arrays(X, y, ...)` -> FitResult
* `fit_feature_file(path, method, epsilon=..., out_dir=...)`: the `featdp fit` job
* `DPLinearClassifier`: a scikit-learn estimator
* `methods.registry()`: every method by name; `backbones.registry`: every backbone
"""

import importlib

__version__ = "0.1.0"

# Imported on first use, so that stage one (extraction) does not load stage two's dependencies.
_LAZY = {
    "FitResult": "featdp.training",
    "default_delta": "featdp.accounting",
    "fit": "featdp.training",
    "fit_arrays": "featdp.training",
    "fit_feature_file": "featdp.jobs",
    "DPLinearClassifier": "featdp.estimator",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featdp' has no attribute {name!r}")


__all__ = sorted(_LAZY)
