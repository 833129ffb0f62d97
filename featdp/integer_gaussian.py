"""Integer noise for the grid release: the Gaussian rounded to the nearest integer, sampled without floats
deciding anything that a float could get wrong by more than a proven factor.

Target. For scale s, the rounded Gaussian R_s has P(k) = Φ((k + ½)/s) − Φ((k − ½)/s) on ℤ: the law of
round(s·N), N ~ N(0, 1). Adding it to a statistic already on the integer grid is post-processing of the
continuous Gaussian mechanism (round(x + sN) = x + round(sN) for integer x), so it has exactly the
continuous Gaussian's (ε, δ) — that is why `mechanism` rounds statistics to a grid first.

Sampler (vectorised; every uniform comes from a `randomness.BitStream`):
1. Blocks. ℤ ∩ [−J·L, J·L) is cut into 2J blocks of L = 2^l consecutive integers, L ≈ s/16..s/32, J·L ≥
   TRUNCATION·s. Block masses are Φ differences computed with mpmath at 60 digits, and turned into
   128-bit cumulative counts; a block is chosen by a 128-bit uniform (the low word is drawn only in the
   rare event that the high word alone cannot decide). Relative error of a block's probability:
   2⁻¹²⁷ / (its mass) ≤ `table.eta_table` (asserted ≤ 5e-15; the outermost blocks hold ≈ 1e-24).
2. Inside a block, a uniform offset (exact: L is a power of two) is accepted with probability
   a(k) = exp(−(k² − c²)/(2s²)) ≥ e^(−0.65), c the block's element nearest 0; on rejection only the offset
   is redrawn (the block is kept), so P(k | block) ∝ a(k). A 53-bit uniform u accepts iff u < a(k)·2⁵³;
   a per-block lower bound of a (rounded down) decides most draws without computing exp.
   Relative error of a(k) against P(k)/P(c): the rounded Gaussian's own shape factor
   (|log g(k)/g(c)| ≤ 5/s², ≤ 2e-17 at s ≥ 2²⁸), float64 exponent and exp (≤ 8 ulp together), and the
   53-bit comparison (2⁻⁵³/a ≤ 2⁻⁵²): ≤ 2e-15, entering P(k) at most three times.
So on its support (|k| ≤ J·L, ≥ 10 s) the sampler's probabilities are within a factor 1 ± η of the
target, η = `ETA` = 1e-14, and outside it the target has mass `table.tail_mass` ≤ 2·Φ(−10) ≈ 1.5e-23.
`sampling_slack` turns both into the (ε, δ) added to what the accountant reports.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math

import mpmath
import numpy as np

from featdp.randomness import BitStream

TRUNCATION = 10.0  # support ±10 s: the target's mass beyond is ≈ 1.5e-23 per coordinate
MIN_SCALE = 2.0**28  # `mechanism` picks grids with s ≥ this; the shape factor's error is then negligible
ETA = 1e-14  # documented bound on |P_sampler(k) / P_target(k) − 1| on the support, for s ≥ MIN_SCALE
_BLOCKS_PER_SIGMA = 16
_PRECISION_DIGITS = 60
_MASK64 = 2**64 - 1
_SQUEEZE_SAFETY = 1 - 2.0**-40  # the squeeze threshold is rounded down, below every a(k) of its block
_GUIDE_BITS = 16  # a 2^16-entry guide maps a uniform's top bits to its block


@dataclasses.dataclass(frozen=True)
class BlockTable:
    scale: float
    block_bits: int  # L = 2^block_bits
    half_blocks: int  # J
    cumulative: tuple[int, ...]  # 2J + 1 counts, 0 … 2^128
    high: np.ndarray  # cumulative[:-1] >> 64, uint64
    low: np.ndarray  # cumulative[:-1] & (2^64 − 1), uint64
    squeeze: np.ndarray  # per block: floor(2^53 · min_k a(k)), uint64
    guide: np.ndarray  # per value of a uniform's top 16 bits: the block of its interval's start, int32
    guide_unsure: np.ndarray  # ... and whether that interval holds a block boundary
    nearest: np.ndarray  # per block: |c|, the block's smallest |k|, int64
    tail_mass: float  # mass of the target outside the support
    eta_table: float  # max relative error of a block probability

    @property
    def block_size(self) -> int:
        return 1 << self.block_bits

    @property
    def support(self) -> int:
        """Samples lie in [−support, support)."""
        return self.half_blocks * self.block_size


@functools.lru_cache(maxsize=128)
def block_table(scale: float) -> BlockTable:
    """The block table for scale s (cached: every step of a run shares its s)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the noise scale in grid units must be a finite number > 0, got {scale!r}")
    bits = max(0, math.floor(math.log2(scale / _BLOCKS_PER_SIGMA)))
    size = 1 << bits
    half = math.ceil(TRUNCATION * scale / size)
    with mpmath.workdps(_PRECISION_DIGITS):
        s = mpmath.mpf(scale)
        # Lower tails everywhere (Φ(−x) for x > 0) keep the upper-tail blocks' relative precision.
        def below(k):  # P(round(sN) < k) = Φ((k − ½)/s)
            return mpmath.ncdf((k - mpmath.mpf(0.5)) / s)

        edges = [below(j * size) for j in range(-half, half + 1)]
        total = edges[-1] - edges[0]
        tail = edges[0] + (1 - edges[-1])
        cumulative = [int(mpmath.nint((e - edges[0]) / total * mpmath.mpf(2) ** 128)) for e in edges]
        masses = [edges[i + 1] - edges[i] for i in range(2 * half)]
        smallest = min(masses) / total
    cumulative[0], cumulative[-1] = 0, 2**128
    if any(b <= a for a, b in zip(cumulative, cumulative[1:])):
        raise AssertionError(f"block table for s={scale} has an empty block")
    eta_table = float(2.0**-127 / smallest)
    nearest = np.array([j * size if j >= 0 else -(j + 1) * size + 1 for j in range(-half, half)], np.int64)
    far = (size - 1) * (2 * nearest.astype(np.float64) + size - 1) / (2 * scale * scale)
    squeeze = np.floor(np.exp(-far) * _SQUEEZE_SAFETY * 2.0**53).astype(np.uint64)
    starts = [g << (128 - _GUIDE_BITS) for g in range(1 << _GUIDE_BITS)]
    first = np.array([bisect.bisect_right(cumulative, u) - 1 for u in starts], np.int32)
    last = np.array([bisect.bisect_right(cumulative, u + (1 << (128 - _GUIDE_BITS)) - 1) - 1 for u in starts],
                    np.int32)
    return BlockTable(
        guide=first, guide_unsure=first != last,
        scale=float(scale), block_bits=bits, half_blocks=half, cumulative=tuple(cumulative),
        high=np.array([c >> 64 for c in cumulative[:-1]], np.uint64),
        low=np.array([c & _MASK64 for c in cumulative[:-1]], np.uint64),
        squeeze=squeeze, nearest=nearest, tail_mass=float(tail), eta_table=eta_table,
    )


def sample(stream: BitStream, scale: float, size: int) -> np.ndarray:
    """`size` independent draws of the rounded Gaussian with scale `scale`, as int64."""
    table = block_table(float(scale))
    block = _choose_blocks(stream, table, size)
    base = (block.astype(np.int64) - table.half_blocks) * table.block_size  # each block's first integer
    offset, accept = _propose(stream, table, block)
    out = base + offset
    pending = np.flatnonzero(~accept)
    while pending.size:  # rejected: redraw the offset inside the same block
        offset, accept = _propose(stream, table, block[pending])
        out[pending] = base[pending] + offset
        pending = pending[~accept]
    return out


def _choose_blocks(stream: BitStream, table: BlockTable, size: int) -> np.ndarray:
    """Block indices (int32) for a 128-bit uniform each; the top 16 bits decide almost every draw."""
    high = stream.words(size)
    top = (high >> np.uint64(64 - _GUIDE_BITS)).astype(np.intp)
    block = table.guide[top]
    unsure = np.flatnonzero(table.guide_unsure[top])
    if unsure.size:
        high = high[unsure]
        found = np.searchsorted(table.high, high, side="right") - 1
        # Only if the high word equals a boundary's high word with a non-zero low word is the block open.
        open_ = np.flatnonzero((table.high[found] == high) & (table.low[found] != 0))
        if open_.size:
            low = stream.words(open_.size)
            for i, lo in zip(open_, low):
                found[i] = bisect.bisect_right(table.cumulative, (int(high[i]) << 64) | int(lo)) - 1
        block[unsure] = found
    return block


def _propose(stream: BitStream, table: BlockTable, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offset in the block, accepted?) for each block. One word gives the offset (its top bits) and the
    first r = 64 − block_bits bits of the acceptance uniform U; U < squeeze decides most draws, and the
    rest compare U with a(k) exactly, drawing U's next 53 bits."""
    words = stream.words(block.size)
    r = 64 - table.block_bits
    offset = (words >> np.uint64(r)).astype(np.int64) if table.block_bits else np.zeros(block.size, np.int64)
    prefix = words & np.uint64((1 << r) - 1) if r < 64 else words
    accept = prefix < (table.squeeze[block] >> np.uint64(53 - min(r, 53))) << np.uint64(max(r - 53, 0))
    hard = np.flatnonzero(~accept)
    if hard.size:
        accept[hard] = _exact_accept(stream, table, block[hard], offset[hard], prefix[hard], r)
    return offset, accept


def _exact_accept(stream, table, block, offset, prefix, r) -> np.ndarray:
    """U < a(k), U = (prefix + V)·2^−r with V a fresh 53-bit uniform fraction."""
    k = (block.astype(np.int64) - table.half_blocks) * table.block_size + offset
    nearest = table.nearest[block]
    magnitude = np.abs(k)
    # k² − c² = (|k| − |c|)(|k| + |c|): both factors are exact integers below 2^53.
    exponent = (magnitude - nearest).astype(np.float64) * (magnitude + nearest).astype(np.float64)
    scaled = np.exp(-exponent / (2.0 * table.scale * table.scale)) * 2.0**r
    # scaled − prefix is exact when it lies in (0, 1): both are multiples of scaled's ulp.
    room = scaled - prefix.astype(np.float64)
    fraction = (stream.words(block.size) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return fraction < room


def pmf(scale: float, k: np.ndarray) -> np.ndarray:
    """The target's P(k) in float64 (for tests and audits)."""
    from scipy.special import ndtr

    k = np.asarray(k, np.float64)
    upper, lower = (k + 0.5) / scale, (k - 0.5) / scale
    # Differences of the tail on k's own side keep precision away from 0.
    return np.where(k >= 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))


def sampling_slack(coordinates: int, epsilon: float, delta: float, eta: float = ETA,
                   tail_mass: float = 2 * 7.7e-24) -> tuple[float, float]:
    """(ε', δ') of the sampled mechanism, given that the ideal one is (ε, δ)-DP over `coordinates` draws.

    With Q the sampler and P the target, pointwise Q ≤ (1 + η)^M P and P ≤ (1 − η)^−M Q on the support,
    and P puts at most M·t outside it. For any event E:
    Q_D(E) ≤ (1+η)^M (e^ε P_D'(E) + δ) ≤ (1+η)^M (e^ε ((1−η)^−M Q_D'(E) + M t) + δ), so
    ε' = ε + M·log((1+η)/(1−η)),  δ' = (1+η)^M (δ + e^ε M t).
    """
    m = float(coordinates)
    epsilon_slack = m * (math.log1p(eta) - math.log1p(-eta))
    tail = m * tail_mass
    if tail > 0 and epsilon + math.log(tail) >= 0:
        # e^ε·M·t ≥ 1: the bound says nothing (and e^ε overflows a float past ε ≈ 709).
        return epsilon + epsilon_slack, 1.0
    outside = math.exp(epsilon) * tail if tail > 0 else 0.0
    delta_out = math.exp(m * math.log1p(eta)) * (delta + outside)
    return epsilon + epsilon_slack, min(1.0, delta_out)
