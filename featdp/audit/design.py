"""What an audit fits: public data in which the canaries' directions are unused, and the claimed noise.

The worst case for a linear head is a canary the rest of the data cannot mask: the other examples live
on the first coordinates, each canary is C·e_f on a coordinate f of its own, with a chosen label. Then
every statistic a method releases splits into the other examples' part and the canaries' parts on
disjoint entries, and with the other examples replaced by zero rows (which add nothing to any sum) a fit
computes the canaries' contributions alone. The data is fixed and public: an auditor, like the
adversary of differential privacy, knows everything but whether a canary was included.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from featdp import accounting
from featdp.data import ArraySource, TrainingData
from featdp.methods import Method


@dataclasses.dataclass(frozen=True)
class AuditData:
    """n other examples on the first `base_dim` coordinates (K Gaussian classes), plus canary coordinates.

    The feature dimension (base_dim + number of canaries) must differ from K, so that the axes of a
    release can be told apart by their lengths.
    """

    num_examples: int = 100
    base_dim: int = 7
    num_classes: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.num_examples < 1 or self.base_dim < 1 or self.num_classes < 2:
            raise ValueError(f"audit data needs n >= 1, d >= 1 and K >= 2, got {self}")

    def others(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """The other examples, padded with zeros to `dim` coordinates: (n, dim) features and labels."""
        rng = np.random.default_rng(self.seed)
        means = rng.normal(size=(self.num_classes, self.base_dim))
        labels = rng.integers(0, self.num_classes, size=self.num_examples)
        features = np.zeros((self.num_examples, dim), np.float32)
        features[:, : self.base_dim] = means[labels] + 0.6 * rng.normal(size=(self.num_examples, self.base_dim))
        return features, labels

    def canaries(self, count: int, clip_norm: float) -> tuple[np.ndarray, np.ndarray]:
        """`count` canaries C·e_f, f = base_dim + i, labels i mod K: (count, base_dim + count), (count,)."""
        if self.base_dim + count == self.num_classes:
            raise ValueError(f"the feature dimension ({self.base_dim} + {count}) must differ from K = "
                             f"{self.num_classes}, so that a release's class axis can be told apart")
        features = np.zeros((count, self.base_dim + count), np.float32)
        features[np.arange(count), self.base_dim + np.arange(count)] = clip_norm
        return features, np.arange(count) % self.num_classes

    def training_data(self, method: Method, canaries: np.ndarray, include: np.ndarray) -> TrainingData:
        """The other examples followed by the canaries `include` selects (a boolean mask)."""
        canary_x, canary_y = self.canaries(len(canaries), method.clip_norm)
        x, y = self.others(canary_x.shape[1])
        return _data(method, np.concatenate([x, canary_x[include]]), np.concatenate([y, canary_y[include]]),
                     self.num_classes, self.num_examples)

    def canaries_alone(self, method: Method, count: int, num_examples: int) -> TrainingData:
        """All `count` canaries after zero rows, `num_examples` rows in all: fitted on the transcript of a
        real fit with the same n, it computes what the canaries contribute to each release."""
        if num_examples < count:
            raise ValueError(f"{count} canaries need at least as many examples, got {num_examples}")
        canary_x, canary_y = self.canaries(count, method.clip_norm)
        zeros = np.zeros((num_examples - count, canary_x.shape[1]), np.float32)
        labels = np.arange(num_examples - count) % self.num_classes
        return _data(method, np.concatenate([zeros, canary_x]), np.concatenate([labels, canary_y]),
                     self.num_classes, self.num_examples)


def _data(method: Method, features, labels, num_classes, public_count: int) -> TrainingData:
    # Every world of one audit computes with the same public count, as a real fit uses its released ñ
    # whether or not the canary is in: the audit examines the method's releases given that count.
    return TrainingData(ArraySource(features, labels, num_classes), method.preprocessing(),
                        public_num_examples=public_count)


def at_budget(method: Method, epsilon: float, data: AuditData, canaries: int) -> Method:
    """The method as a fit at the audited budget runs it (`Method.for_budget`: hyperparameters that follow
    the budget are chosen from the public n, ε and d, here the audit data's), less a centring the budget
    chose (dp-sgd recipe=auto): the audit examines the method's own releases, and the released mean is a
    Gaussian mechanism of its own (featdp/centering.py). A centring asked for is refused
    (`claimed_noise_scale`)."""
    resolved = method.for_budget(data.num_examples, epsilon, data.base_dim + canaries)
    if resolved.center and not method.center:
        resolved = dataclasses.replace(resolved, center=0.0)
    return resolved


def claimed_noise_scale(method: Method, epsilon: float, delta: float, num_examples: int,
                        accountant: str = "pld") -> float:
    """The noise scale `featdp fit` would use for `method` at the claimed (ε, δ) on n examples."""
    if not method.private:
        raise accounting.PrivacyParameterError(
            f"method {method.name!r} is a non-private reference: there is no guarantee to audit"
        )
    if method.center:
        raise accounting.PrivacyParameterError(
            f"center={method.center:g}: the audit examines a method's own releases, not a released mean; "
            "audit with center=0"
        )
    calibration = accounting.calibrate(lambda s: method.dp_event(s, num_examples), epsilon, delta, accountant)
    return calibration.noise_scale
