"""Centring the training rows on a released mean (the `center` hyperparameter every method has).

Pretrained features share a large common direction: on Fashion-MNIST, 38% of a combined row's squared
norm is the mean of all rows. A method whose rows are rescaled to norm C spends that part of C, and of
every sensitivity, on a direction that tells no class from another. With ``center = f > 0`` a fit therefore

1. releases the sum of the preprocessed train rows u_i = P(x_i) (‖u_i‖ ≤ C; an example of V views counts
   as their average): Σ u_i + N(0, σ_c²C²·I), sensitivity C under add-or-remove (`release_mean`);
2. divides it by the released count ñ: μ̃ (post-processing);
3. trains the method on z_i = P(u_i − μ̃) (`centred_source`), the same per-row map P again, so every row
   still has norm ≤ C. μ̃ is fixed before the method reads a row, so z_i depends on example i alone, and
   adding or removing one example adds or removes one row: every sensitivity of the method is unchanged
   (adaptive composition covers that μ̃ came from the same data).

The head predicts argmax_c (Wᵀ P(P(x) − μ̃))_c: head.npz carries μ̃ as `center`.

Budget. σ_c = σ₁/√f, where σ₁ is the multiplier of one Gaussian mechanism spending the method's whole
(ε, δ) (`center_noise_multiplier`). The mean's Gaussian is composed with the method's own event in one
calibration (`with_mean`): for a full-batch method both are Gaussians, so the mean takes exactly the share
f of the precision Σσ⁻² and the method's noise grows by 1/√(1 − f); for a subsampled method it takes about
that share. The ε reported covers both. A non-private reference centres on the exact mean.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting import dp_event as events

from featdp import accounting
from featdp.data import (
    DEFAULT_BLOCK_ROWS, ArraySource, Preprocessing, RowSource, RowSubset, TrainingData, holds_rows_in_memory,
    views_per_example,
)
from featdp.mechanism import ReleaserInterface

__all__ = ["MAX_SHARE", "MIN_SHARE", "RELEASE_NAME", "CentredRows", "center_noise_multiplier", "centre_rows",
           "centred_source", "check_share", "head_rows", "release_mean", "with_mean"]

MAX_SHARE = 0.5  # of the budget: beyond it the mean would cost more than the head it serves
# Below it the mean's noise is so large that the release carries nothing, and its magnitude could outgrow
# the release's integer grid.
MIN_SHARE = 1e-3
RELEASE_NAME = "train_mean_sum"


def check_share(share: float) -> None:
    """ValueError unless share = 0 or `MIN_SHARE` ≤ share ≤ `MAX_SHARE`."""
    if isinstance(share, bool) or not (share == 0 or MIN_SHARE <= share <= MAX_SHARE):
        raise ValueError(f"center must be 0 (off) or lie in [{MIN_SHARE:g}, {MAX_SHARE:g}] (the share of the "
                         f"budget spent on the train mean), got {share!r}")


def center_noise_multiplier(share: float, epsilon: float, delta: float, accountant: str = "pld") -> float:
    """σ_c = σ₁/√share, σ₁ the multiplier at which one Gaussian mechanism is (ε, δ)-DP under `accountant`
    (the fit's). Public: it depends on the method's budget and the share only."""
    check_share(share)
    if share == 0:
        raise ValueError("center=0 releases no mean")
    single = accounting.calibrate(lambda s: events.GaussianDpEvent(s), epsilon, delta, accountant).noise_scale
    return single / math.sqrt(share)


def with_mean(event: events.DpEvent, sigma: float | None) -> events.DpEvent:
    """The method's `event` composed with the mean's Gaussian (multiplier `sigma`); `event` when None."""
    if sigma is None:
        return event
    return events.ComposedDpEvent([events.GaussianDpEvent(sigma), event])


def release_mean(data: TrainingData, releaser: ReleaserInterface, noise_multiplier: float | None,
                 public_size: float) -> np.ndarray:
    """μ̃ = (Σ_examples ū_i + noise)/ñ, float32 (d,): ū_i the average of example i's preprocessed rows, the
    noise N(0, (σ·C)²) per coordinate released through `releaser` (Δ = C). `noise_multiplier` None: the
    exact mean, for a non-private reference (`public_size` is then the true n)."""
    total = np.zeros(data.feature_dim, np.float64)
    for x, _ in data.blocks():
        total += x.sum(axis=0, dtype=np.float64)
    total /= data.views  # each example counts as the average of its views: its part has norm ≤ C
    if noise_multiplier is not None:
        total = releaser.release(RELEASE_NAME, total, sensitivity=data.clip_norm, noise_multiplier=noise_multiplier)
    return (np.asarray(total, np.float64) / max(public_size, 1.0)).astype(np.float32)


def head_rows(preprocessing: Preprocessing, features: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """The rows a head multiplies: P(x), or P(P(x) − μ̃) when it was trained on rows centred on μ̃ (`mean`)."""
    rows = preprocessing(np.asarray(features, np.float32))
    return rows if mean is None else preprocessing(rows - mean)


def centre(preprocessing: Preprocessing, x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """P(x) − μ̃ for a block of raw rows: what the method's own preprocessing P is then applied to."""
    return preprocessing(x) - mean


class CentredRows:
    """The rows of `source` mapped to P(x) − μ̃ block by block (the method's TrainingData applies P to them);
    for sources too large to hold centred in memory."""

    def __init__(self, source: RowSource, preprocessing: Preprocessing, mean: np.ndarray):
        self.source, self.preprocessing, self.mean = source, preprocessing, mean
        self.num_examples, self.feature_dim = source.num_examples, source.feature_dim
        self.num_classes = source.num_classes
        self.views_per_example = views_per_example(source)

    def blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS):
        for x, y in self.source.blocks(block_rows):
            yield centre(self.preprocessing, np.asarray(x, np.float32), self.mean), y


def centre_rows(source: RowSource, preprocessing: Preprocessing, releaser: ReleaserInterface,
                noise_multiplier: float | None, public_size: float, **training) -> tuple[RowSource, np.ndarray]:
    """(`source` centred on μ̃, μ̃): releases the mean of `source`'s preprocessed rows (`release_mean`; the
    TrainingData of that one pass takes `training`'s options, e.g. block_rows or a cache of the raw rows)
    and centres `source` on it (`centred_source`). The centred rows belong to one fit: share no cache."""
    data = TrainingData(source, preprocessing, public_num_examples=public_size, **training)
    mean = release_mean(data, releaser, noise_multiplier, public_size)
    return centred_source(source, preprocessing, mean), mean


def centred_source(source: RowSource, preprocessing: Preprocessing, mean: np.ndarray) -> RowSource:
    """`source`'s rows as P(x) − μ̃: one centred copy in memory when `source` is in memory and the copy fits
    the memory available, else computed block by block on every pass. A subset stays a subset, of its
    parent centred whole, so its blocks (and the Poisson masks drawn per block) are numbered as before."""
    from featdp.featurefile import AllocationError, check_allocation

    if isinstance(source, RowSubset):
        return RowSubset(centred_source(source.parent, preprocessing, mean), source.mask)
    if not (holds_rows_in_memory(source) and isinstance(source, ArraySource)):
        return CentredRows(source, preprocessing, mean)
    try:
        check_allocation(source.features.nbytes, "the centred train rows")
    except AllocationError:
        return CentredRows(source, preprocessing, mean)
    out = np.empty_like(source.features)
    step = max(1, (32 << 20) // (4 * max(source.feature_dim, 1)))
    for start in range(0, source.num_examples, step):
        out[start : start + step] = centre(preprocessing, source.features[start : start + step], mean)
    return ArraySource(out, source.labels, source.num_classes, source.views_per_example)
