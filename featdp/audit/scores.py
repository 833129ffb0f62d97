"""How much a transcript says about each canary: the attacks an audit scores canaries with.

`release_scores` is the strongest attack on the releases themselves. Every release is a statistic plus
Gaussian noise of declared std τ = σΔ, and the other examples leave the canaries' entries untouched, so
for a release r in which canary i would add Δᵢ (computed along the fit's own public trajectory) the
log-likelihood ratio of "i included" against "i left out" is

    ℓᵢ = (⟨r, Δᵢ⟩ − ‖Δᵢ‖²/2) / τ²,    and with Poisson rate q < 1:  log(1 − q + q·e^ℓᵢ),

summed over the releases of the fit (Neyman–Pearson: no test of the claimed mechanism is more powerful).
`head_margins` is the black-box attack: the canary's logit margin under the released head.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from featdp.audit.recording import independent_entries
from featdp.mechanism import Release


@dataclasses.dataclass(frozen=True)
class ReleaseScores:
    scores: np.ndarray  # (canaries,): Σ over releases of each canary's log-likelihood ratio
    sensitivity_ratio: float  # max over releases and canaries of ‖contribution‖ / declared Δ


def release_scores(
    records: list[Release],
    released: list[np.ndarray],
    contributions: list[np.ndarray],
    *,
    dim: int,
    base_dim: int,
    count: int,
) -> ReleaseScores:
    """Scores for `count` canaries on coordinates base_dim, …, dim − 1 (see the module docstring)."""
    scores = np.zeros(count)
    ratio = 0.0
    for record, out, delta in zip(records, released, contributions, strict=True):
        owner = _owners(delta.shape, dim, base_dim, count)
        if np.any(delta[owner < 0]):
            raise ValueError(f"release {record.name!r}: the canaries moved entries no single canary owns")
        owner = independent_entries(record, owner).ravel()
        out = independent_entries(record, out).ravel()
        delta = independent_entries(record, delta).ravel()
        keep = owner >= 0
        inner = np.bincount(owner[keep], weights=(out * delta)[keep], minlength=count)
        norm2 = np.bincount(owner[keep], weights=(delta * delta)[keep], minlength=count)
        ratio = max(ratio, float(np.sqrt(norm2.max(initial=0.0))) / record.sensitivity)
        llr = (inner - norm2 / 2) / record.noise_std**2
        q = record.sampling_probability
        if q < 1:
            llr = np.logaddexp(np.log1p(-q), np.log(q) + llr)
        scores += llr
    return ReleaseScores(scores, ratio)


def _owners(shape: tuple[int, ...], dim: int, base_dim: int, count: int) -> np.ndarray:
    """For each entry of a release, the canary whose coordinate indexes it on a feature axis (an axis of
    length `dim`), or −1: none, or two different canaries (an entry such as (f_i, f_k) of a Gram matrix)."""
    owner = np.full(shape, -1)
    conflict = np.zeros(shape, bool)
    for axis, size in enumerate(shape):
        if size != dim:
            continue
        index = np.arange(size) - base_dim
        index = np.where(index >= 0, index, -1).reshape([size if a == axis else 1 for a in range(len(shape))])
        index = np.broadcast_to(index, shape)
        conflict |= (owner >= 0) & (index >= 0) & (owner != index)
        owner = np.where(owner >= 0, owner, index)
    owner[conflict] = -1
    if count == 1 and not np.any(owner >= 0):  # a statistic without a feature axis: all of it is the canary's
        owner[...] = 0
    return owner


def head_margins(weights: np.ndarray, clip_norm: float, base_dim: int, labels: np.ndarray) -> np.ndarray:
    """Each canary C·e_f's logit for its own label minus the mean of its other logits."""
    logits = clip_norm * np.asarray(weights)[base_dim : base_dim + len(labels)]
    own = logits[np.arange(len(labels)), labels]
    others = (logits.sum(axis=1) - own) / (logits.shape[1] - 1)
    return own - others
