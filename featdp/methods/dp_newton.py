"""DP-Newton: one-vs-rest logistic regression with privatized gradients and per-class Hessians."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from dp_accounting import dp_event as events

from featdp import linalg, progress, stats
from featdp.methods.base import Method, positive, register


@register
@dataclasses.dataclass(frozen=True)
class DPNewton(Method):
    """W₀ = 0; per step w_c ← w_c − lr·(PSD(H̃_c) + λI)⁻¹ g̃_c for every class c.

    Releases per step (neighbours: add or remove one example; ‖x‖ ≤ C). One example moves all K
    one-vs-rest losses at once, hence the √K:
    * gradient  G = Σ x (s(z) − e_y)ᵀ, every entry of s − e_y in (−1, 1)       Δ = C√K     σ_G
    * hessians  (H_c = Σ s_c(1 − s_c) x xᵀ)_{c<K}, weights ≤ 1/4, noise drawn independently per class
      (upper triangles)                                                       Δ = √K·C²/4  σ_H
    σ_G = s·√(steps/(1 − hessian_share)), σ_H = s·√(steps/hessian_share): the 2·steps releases compose
    to one Gaussian with σ_eff = s.

    Defaults (data-independent): steps = 1 (at W₀ = 0 all H_c = A/4, so the first step is DP least
    squares up to a class-independent term; each further step costs K d×d Hessians and splits the
    budget again); hessian_share = 0.5; lr = 1 (a Newton step); lam as in DP-LS from the Hessian noise.
    """

    name = "dp-newton"
    steps: int = 1
    lr: float = 1.0
    hessian_share: float = 0.5
    lam: float | None = None
    lam_scale: float = 1.0  # multiplies the default λ; ignored when lam is set
    descriptions = {
        "steps": "Newton steps from W = 0, each releasing a gradient and K d×d Hessians",
        "lr": "step size (1: a full Newton step)",
        "hessian_share": "share of the precision budget spent on the Hessians, in (0, 1)",
        "lam": "ridge λ added to each noisy Hessian; None: from its noise level",
        "lam_scale": "multiplies the default λ; ignored when lam is set",
    }

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "lr", "lam", "lam_scale"):
            positive(name, getattr(self, name))
        if not 0 < self.hessian_share < 1:
            raise ValueError(f"hessian_share must lie in (0, 1), got {self.hessian_share}")

    @classmethod
    def tuning_grid(cls, num_examples):
        # Nothing beyond the defaults: every candidate would cost K d×d eigendecompositions per ε (at
        # d = 3969, K = 10 about 40 s a fit here), which alone would exceed the bench's time budget.
        return ({},)

    def working_memory_bytes(self, dim: int, num_classes: int) -> int:
        """Beyond W = 0 the K Hessians are accumulated together (K·d² float64)."""
        stack = num_classes if self.steps > 1 else 0
        return 8 * ((4 + stack) * dim * dim + 6 * dim * num_classes)

    def noise_multipliers(self, noise_scale: float) -> tuple[float, float]:
        """(σ_G, σ_H) per step."""
        return (
            noise_scale * math.sqrt(self.steps / (1 - self.hessian_share)),
            noise_scale * math.sqrt(self.steps / self.hessian_share),
        )

    def dp_event(self, noise_scale, num_examples):
        sigma_g, sigma_h = self.noise_multipliers(noise_scale)
        pair = events.ComposedDpEvent([events.GaussianDpEvent(sigma_g), events.GaussianDpEvent(sigma_h)])
        return events.SelfComposedDpEvent(pair, self.steps)

    def fit(self, data, noise_scale, releaser):
        sigma_g, sigma_h = self.noise_multipliers(noise_scale)
        d, k, c = data.feature_dim, data.num_classes, data.clip_norm
        hessian_sensitivity = math.sqrt(k) * c**2 / 4
        lam = self.lam
        if lam is None:
            lam = self.lam_scale * (
                linalg.noise_spectral_scale(d, sigma_h * hessian_sensitivity) + 1e-4 * data.public_size * c**2 / (4 * d)
            )
        weights = np.zeros((d, k))
        for step in range(self.steps):
            gradient, hessians = self._gradient_and_hessians(data, weights)
            gradient = releaser.release(
                "gradient", gradient, sensitivity=c * math.sqrt(k), noise_multiplier=sigma_g, step=step
            )
            noisy_hessians = releaser.release_stack(
                "hessians", hessians, (k, d, d), sensitivity=hessian_sensitivity,
                noise_multiplier=sigma_h, symmetric=True, step=step,
            )
            update = np.empty_like(weights)
            for cls, hessian in enumerate(progress.track(noisy_hessians, "dp-newton class solves", k)):
                update[:, cls] = linalg.psd_ridge_solve(hessian, lam, gradient[:, cls])
            weights = weights - self.lr * update
        return weights

    @staticmethod
    def _gradient_and_hessians(data, weights):
        """G and a lazy sequence of the K Hessians (clean; from `data.backend`). At W = 0 every H_c = A/4:
        one Gram pass serves all."""
        k = weights.shape[1]
        if not weights.any():
            # s = 1/2 everywhere: G = Σ x (1/2 − e_y)ᵀ = ½·(B·1)·1ᵀ − B, since B's rows sum to Σ x.
            gram, cross = stats.second_moments(data)
            gradient = 0.5 * cross.sum(axis=1, keepdims=True) - cross
            return gradient, (gram / 4 for _ in range(k))
        gradient, hessians = data.backend.newton_statistics(data, weights)
        return gradient, iter(hessians)
