"""Non-private reference: exact ridge least squares on one-hot targets."""

from __future__ import annotations

import dataclasses

import numpy as np
from dp_accounting import dp_event as events

from featdp import stats
from featdp.methods.base import Method, positive, register


@register
@dataclasses.dataclass(frozen=True)
class Ridge(Method):
    """W = (A + λI)⁻¹ B with A = Σ x xᵀ, B = Σ x e_yᵀ. NOT private: releases the exact solution.

    Default lam = 1e-4·n·C²/d, the same floor DP-LS uses, so the two differ only by the noise.
    """

    name = "ridge"
    private = False
    lam: float | None = None
    descriptions = {"lam": "ridge λ; None: 1e-4·n·C²/d, the floor DP-LS uses"}

    def __post_init__(self):
        super().__post_init__()
        positive("lam", self.lam)

    def dp_event(self, noise_scale, num_examples):
        return events.NonPrivateDpEvent()

    def fit(self, data, noise_scale, releaser):
        gram, cross = stats.second_moments(data)
        # Per example, as the Gram matrix counts an example of V views (the average of their x xᵀ).
        examples = data.num_examples / data.views
        lam = self.lam if self.lam is not None else 1e-4 * examples * data.clip_norm**2 / data.feature_dim
        return np.linalg.solve(gram + lam * np.eye(len(gram)), cross)
