"""Exact (non-private) statistics of preprocessed training data, accumulated in one streaming pass.

Everything here is a sum over examples, accumulated block by block (float32 within a block, float64 or
compensated float32 across blocks: `featdp.backend` computes the passes, on the host or a device), so
memory is O(d² + dK) whatever n is. Privatization happens elsewhere (`featdp.mechanism`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from featdp.data import TrainingData, row_norms as compute_row_norms


def class_sums(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Σ_i x_i e_{y_i}ᵀ for one block, (d, K): a sparse one-hot product costs O(nd), not O(ndK)."""
    one_hot_t = scipy.sparse.csr_matrix(
        (np.ones(len(y), dtype=x.dtype), (y, np.arange(len(y)))), shape=(num_classes, len(y))
    )
    return np.asarray((one_hot_t @ x).T, dtype=np.float64)


def one_hot(y: np.ndarray, num_classes: int, dtype=np.float32) -> np.ndarray:
    out = np.zeros((len(y), num_classes), dtype=dtype)
    out[np.arange(len(y)), y] = 1
    return out


def second_moments(data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) = (Σ x_i x_iᵀ, Σ x_i e_{y_i}ᵀ) in one pass of `data.backend` (float32 per block, float64 or
    compensated sums across blocks: `featdp.backend`); with `data.cache`, computed once per rows,
    preprocessing, backend and block size, and then read-only (shared by later fits)."""
    backend = data.backend
    if data.cache is None:
        return backend.second_moments(data)
    key = ("second moments", data.preprocessing, backend.name, data.block_rows)
    return data.cache.statistic(data.source, key, lambda: backend.second_moments(data))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def clipped_softmax_gradient_sum(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray, clip: float, row_norms: np.ndarray | None = None
) -> np.ndarray:
    """Σ_i clip_C(x_i (p_i − e_{y_i})ᵀ) over the block's rows; `row_norms` = ‖x_i‖ if known.

    The per-example gradient is an outer product, so its Frobenius norm is ‖x_i‖·‖p_i − e_{y_i}‖ and
    clipping is a per-row scale on the residual: no d×K per-example gradient is ever materialized.
    """
    residual = softmax(x @ weights.astype(np.float32))
    residual[np.arange(len(y)), y] -= 1
    if row_norms is None:
        row_norms = compute_row_norms(x)
    norms = row_norms * np.sqrt(np.einsum("ij,ij->i", residual, residual))
    residual *= np.minimum(1.0, clip / np.maximum(norms, 1e-30))[:, None]
    return np.asarray(x.T @ residual, dtype=np.float64)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))
