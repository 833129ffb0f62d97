"""DP-LS: least squares by sufficient-statistics perturbation."""

from __future__ import annotations

import dataclasses
import math

from dp_accounting import dp_event as events

from featdp import linalg, stats
from featdp.methods.base import Method, positive, register


@register
@dataclasses.dataclass(frozen=True)
class DPLeastSquares(Method):
    """W = (PSD(Ã) + λI)⁻¹ B̃ from one streaming pass.

    Releases (neighbours: add or remove one example; ‖x‖ ≤ C after preprocessing):
    * gram        A = Σ x xᵀ        Δ = C² (upper triangle)   σ_A = s / √gram_share
    * class_sums  B = Σ x e_yᵀ      Δ = C                     σ_B = s / √(1 − gram_share)
    The pair is one Gaussian mechanism with σ_eff = (σ_A⁻² + σ_B⁻²)^(-1/2) = s: the noise scale s is
    exactly the effective multiplier, and gram_share is the share of the precision budget spent on A.

    Defaults (data-independent): gram_share = 0.5 — A's error enters the solve through a regularized
    inverse and B's error directly, and equal shares were within noise of the best split on the
    synthetic and digits checks; lam = √d·σ_A·C², the scale of the noise eigenvalues that survive the
    PSD projection, plus a floor of 1e-4·ñ·C²/d (ñ the released count) so the noise-free limit is well posed.
    """

    name = "dp-ls"
    gram_share: float = 0.5
    lam: float | None = None
    lam_scale: float = 1.0  # multiplies the default λ; ignored when lam is set
    descriptions = {
        "gram_share": "share of the precision budget spent on Σxxᵀ (the rest on Σx e_yᵀ), in (0, 1)",
        "lam": "ridge λ added to the noisy Σxxᵀ; None: from its noise level",
        "lam_scale": "multiplies the default λ; ignored when lam is set",
    }

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.gram_share < 1:
            raise ValueError(f"gram_share must lie in (0, 1), got {self.gram_share}")
        positive("lam", self.lam)
        positive("lam_scale", self.lam_scale)

    def noise_multipliers(self, noise_scale: float) -> tuple[float, float]:
        return noise_scale / math.sqrt(self.gram_share), noise_scale / math.sqrt(1 - self.gram_share)

    def dp_event(self, noise_scale, num_examples):
        sigma_a, sigma_b = self.noise_multipliers(noise_scale)
        return events.ComposedDpEvent([events.GaussianDpEvent(sigma_a), events.GaussianDpEvent(sigma_b)])

    @classmethod
    def tuning_grid(cls, num_examples):
        # λ trades noise against bias; the default sits at the noise eigenvalue scale.
        return ({}, {"lam_scale": 0.1}, {"lam_scale": 0.3}, {"lam_scale": 3.0})

    def ridge(self, noise_scale: float, dim: int, num_examples: int) -> float:
        if self.lam is not None:
            return self.lam
        sigma_a, _ = self.noise_multipliers(noise_scale)
        c2 = self.clip_norm**2
        return self.lam_scale * (linalg.noise_spectral_scale(dim, sigma_a * c2) + 1e-4 * num_examples * c2 / dim)

    def fit(self, data, noise_scale, releaser):
        sigma_a, sigma_b = self.noise_multipliers(noise_scale)
        gram, cross = stats.second_moments(data)
        c = data.clip_norm
        gram = releaser.release("gram", gram, sensitivity=c**2, noise_multiplier=sigma_a, symmetric=True)
        cross = releaser.release("class_sums", cross, sensitivity=c, noise_multiplier=sigma_b)
        lam = self.ridge(noise_scale, data.feature_dim, data.public_size)
        return linalg.psd_ridge_solve(gram, lam, cross, data.cache)
