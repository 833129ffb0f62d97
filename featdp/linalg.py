"""Solves against privatized symmetric matrices."""

from __future__ import annotations

import numpy as np
import scipy.linalg


def psd_ridge_solve(matrix: np.ndarray, lam: float, rhs: np.ndarray) -> np.ndarray:
    """(PSD(M) + λI)⁻¹ rhs, where PSD sets M's negative eigenvalues to 0 (DESIGN §3).

    Noise makes a released Gram matrix indefinite; projecting first keeps the system positive definite
    for any λ > 0, and one eigendecomposition gives both the projection and the solve.
    """
    return psd_ridge_inverse(matrix, lam)(rhs)


def noise_spectral_scale(dim: int, entry_std: float) -> float:
    """√d·τ: half the spectral norm (≈ 2√d·τ) of symmetric d×d noise with entry std τ.

    Used as a data-independent default ridge term: it is the size of the noise eigenvalues that
    survive the PSD projection.
    """
    return float(np.sqrt(dim) * entry_std)


def psd_ridge_inverse(matrix: np.ndarray, lam: float):
    """A function rhs ↦ (PSD(M) + λI)⁻¹ rhs, decomposing M once for many solves."""
    if not lam > 0:
        raise ValueError(f"the ridge term must be > 0, got {lam}")
    eigenvalues, vectors = scipy.linalg.eigh(matrix, check_finite=False)
    inverse = 1.0 / (np.maximum(eigenvalues, 0.0) + lam)

    def solve(rhs: np.ndarray) -> np.ndarray:
        projected = vectors.T @ rhs
        return vectors @ (inverse.reshape((-1,) + (1,) * (projected.ndim - 1)) * projected)

    return solve
