"""featdp: differentially private linear heads on frozen pretrained features.

Library API (the CLI `featdp` is a thin layer over it):
* `fit(source, method, epsilon=..., delta=..., seed=...)` / `fit_arrays(X, y, ...)` -> FitResult
* `fit_feature_file(path, method, epsilon=..., out_dir=...)`: the `featdp fit` job
* `DPLinearClassifier`: a scikit-learn estimator
* `methods.registry()`: every method by name
"""

__version__ = "0.1.0"

from featdp.training import FitResult, default_delta, fit, fit_arrays  # noqa: E402
from featdp.jobs import fit_feature_file  # noqa: E402
from featdp.estimator import DPLinearClassifier  # noqa: E402

__all__ = ["DPLinearClassifier", "FitResult", "default_delta", "fit", "fit_arrays", "fit_feature_file"]
