"""Privatized gradient sums for the gradient-based methods (DP-SGD, DP-FC)."""

from __future__ import annotations

import numpy as np

from featdp.data import TrainingData
from featdp.mechanism import ReleaserInterface


def expected_batch_size(num_examples: float, batch_size: int | None) -> tuple[float, float]:
    """(q, q·n): Poisson rate and expected batch size; batch_size None means the full batch (q = 1).
    `num_examples` is the public count (the released ñ in a fit), so q is public too."""
    if batch_size is None or batch_size >= num_examples:
        return 1.0, float(num_examples)
    return batch_size / num_examples, float(batch_size)


def private_mean_gradient(
    data: TrainingData,
    weights: np.ndarray,
    releaser: ReleaserInterface,
    *,
    step: int,
    grad_clip: float,
    noise_multiplier: float,
    sampling_probability: float,
) -> np.ndarray:
    """(Σ_{i∈S} clip(∇ℓ_i(W)) + N(0, (σ·C_g)²)) / (q·ñ), S Poisson-sampled with rate q (all rows if q = 1).

    Adding or removing one example changes the sum by one clipped gradient: Δ = C_g. Dividing by the
    public q·ñ (ñ the released count), not by |S| or the true n, keeps the mean estimate post-processing.
    """
    select = None
    if sampling_probability < 1:
        def select(block: int, rows: int) -> np.ndarray:
            return releaser.poisson_mask(step, block, rows, sampling_probability)

    # The clean sum comes back to the host (from whichever backend computed it) and is noised here only.
    total = data.backend.clipped_gradient_sum(data, np.asarray(weights), grad_clip, select)
    noisy = releaser.release(
        "gradient_sum", total, sensitivity=grad_clip, noise_multiplier=noise_multiplier,
        sampling_probability=sampling_probability, step=step,
    )
    return noisy / (sampling_probability * data.public_size)
