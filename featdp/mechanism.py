"""The release: the only place in featdp where noise touches a private statistic.

Methods never draw noise themselves. They hand each statistic to a releaser (anything implementing
`ReleaserInterface`) with its L2 sensitivity Δ and noise multiplier σ, and get the noisy statistic back.
`Releaser` is the real one; the audit's `Recorder`/`Replay` are the stand-ins.

What `Releaser.release` does, and why its (ε, δ) is the accountant's for the code as it runs:
1. Grid. γ is a power of two with γ·√m ≤ Δ/256 (m: the release's independent coordinates: the upper
   triangle of a symmetric matrix) and σΔ/γ ≥ 2²⁸. The statistic x is rounded to the nearest multiple of
   γ, exactly (x/γ is exact, `rint` to int64). Rounding moves neighbours apart by at most γ/2 + γ/2 per
   coordinate, so the rounded statistic has sensitivity Δ' = Δ + γ√m (the report's `rounding_share` is
   γ√m/Δ'), and the noise is scaled to Δ': std σΔ'.
2. Noise. An integer Z from the rounded Gaussian of scale s = σΔ'/γ (`integer_gaussian`): the law of
   round(s·N). The output is (round(x/γ) + Z)·γ, added in int64. Since round(y + sN) = y + round(sN)
   for an integer y, this is post-processing of the continuous Gaussian mechanism with sensitivity Δ'
   and multiplier σ — the very mechanism the accountant analyses, with no float output that depends on
   x's low bits (the outputs are the grid, whatever x is: Mironov 2012's attack has nothing to read).
3. Sampler. Its probabilities are within a factor 1 ± η (η = 1e-14) of the rounded Gaussian on ±10 s,
   and the target's mass beyond is ≈ 1.5e-23 per coordinate; `sampling_slack` adds what that costs
   (over all coordinates of a fit) to the reported ε and δ. No tail is cut at 5σ as a float32 inverse-CDF
   sampler does.
4. Keys. Every release (and every class of a stack) has its own 256-bit key derived from the run's root
   key (`randomness`), whose bits are the OS's (or SHA-256 of a user seed).
Poisson masks are exact Bernoulli(q) draws from their own keys.

Limitation: statistics are computed in floating point (float32 products, float64 sums); their rounding
error is assumed far below Δ and is not part of Δ'.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

from featdp import integer_gaussian
from featdp.randomness import RootKey, bernoulli, make_key

__all__ = ["Release", "Releaser", "ReleaserInterface", "RootKey", "make_key", "upper_triangle_norm"]

SAMPLER = "rounded Gaussian on a 2^k grid (exact integer arithmetic, AES-256-CTR bits)"
ROUNDING_SHARE_BOUND = 1 / 256  # γ·√m ≤ Δ/256
_INT_LIMIT = 2**62
_CHUNK = 1 << 20  # coordinates per key: chunks are independent, so they can be drawn on several threads
_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Release:
    """One released statistic, as the privacy report lists it."""

    name: str
    shape: tuple[int, ...]
    sensitivity: float  # declared L2 Δ (for symmetric matrices: of the upper triangle incl. the diagonal)
    noise_multiplier: float  # σ: the noise std is σ·Δ' (Δ' = Δ + rounding)
    symmetric: bool = False  # noise on the upper triangle, mirrored
    sampling_probability: float = 1.0  # Poisson sampling rate q of the examples summed, 1 = full data
    step: int | None = None
    coordinates: int = 0  # independent noisy coordinates m
    grid: float = 0.0  # γ; 0 when no noise is added

    @property
    def rounded_sensitivity(self) -> float:
        """Δ' = Δ + γ√m: the sensitivity of the statistic after rounding to the grid."""
        return self.sensitivity + self.grid * math.sqrt(self.coordinates)

    @property
    def rounding_share(self) -> float:
        return 0.0 if self.grid == 0 else self.grid * math.sqrt(self.coordinates) / self.rounded_sensitivity

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.rounded_sensitivity

    @property
    def grid_scale(self) -> float:
        """s = σΔ'/γ: the noise std in grid units."""
        return self.noise_std / self.grid if self.grid else 0.0

    def to_json_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        out.update(noise_std=self.noise_std, rounded_sensitivity=self.rounded_sensitivity,
                   rounding_share=self.rounding_share)
        return out


def choose_grid(sensitivity: float, noise_multiplier: float, coordinates: int) -> float:
    """γ = the largest power of two with γ√m ≤ Δ/256 and σΔ/γ ≥ 2²⁸ (module docstring, step 1)."""
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"a release's sensitivity must be a finite number > 0, got {sensitivity!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"a release's noise multiplier must be a finite number > 0, got {noise_multiplier!r}")
    bound = min(ROUNDING_SHARE_BOUND * sensitivity / math.sqrt(max(coordinates, 1)),
                noise_multiplier * sensitivity / integer_gaussian.MIN_SCALE)
    return 2.0 ** math.floor(math.log2(bound))


@runtime_checkable
class ReleaserInterface(Protocol):
    """What a method may do with private statistics: release them (with noise, recorded) and draw
    Poisson samples. `Releaser` implements it; so do the audit's `Recorder` and `Replay`."""

    @property
    def releases(self) -> list[Release]: ...

    def release(self, name: str, value: np.ndarray, *, sensitivity: float, noise_multiplier: float,
                symmetric: bool = False, sampling_probability: float = 1.0,
                step: int | None = None) -> np.ndarray: ...

    def release_stack(self, name: str, values: Iterable[np.ndarray], shape: tuple[int, ...], *,
                      sensitivity: float, noise_multiplier: float, symmetric: bool = False,
                      step: int | None = None) -> Iterator[np.ndarray]: ...

    def poisson_mask(self, step: int, block: int, rows: int, probability: float) -> np.ndarray: ...


def upper_triangle_norm(matrix: np.ndarray) -> float:
    """L2 norm of the upper triangle including the diagonal: the norm a symmetric release's Δ bounds."""
    return float(np.linalg.norm(matrix[np.triu_indices(matrix.shape[-1])]))


def independent_coordinates(shape: tuple[int, ...], symmetric: bool) -> int:
    if symmetric:
        d = shape[-1]
        return math.prod(shape[:-2]) * d * (d + 1) // 2
    return math.prod(shape)


class Releaser:
    """Adds fresh grid noise to each statistic released during one fit, and records the release."""

    def __init__(self, key: RootKey):
        self._noise_root = key.child("noise")
        self._sampling_root = key.child("sampling")
        self.releases: list[Release] = []

    def _next_key(self) -> RootKey:
        # One child per release, in order: release i of the run gets its own independent key.
        return self._noise_root.child(len(self.releases))

    def _record(self, name, shape, sensitivity, noise_multiplier, symmetric, sampling_probability, step):
        coordinates = independent_coordinates(tuple(shape), symmetric)
        grid = choose_grid(sensitivity, noise_multiplier, coordinates) if noise_multiplier > 0 else 0.0
        record = Release(
            name, tuple(shape), float(sensitivity), float(noise_multiplier), symmetric,
            float(sampling_probability), step, coordinates, grid,
        )
        key = self._next_key()
        self.releases.append(record)
        return record, key

    def release(
        self,
        name: str,
        value: np.ndarray,
        *,
        sensitivity: float,
        noise_multiplier: float,
        symmetric: bool = False,
        sampling_probability: float = 1.0,
        step: int | None = None,
    ) -> np.ndarray:
        """`value` rounded to the grid plus rounded-Gaussian noise of std σΔ' on every independent entry."""
        value = np.asarray(value, dtype=np.float64)
        record, key = self._record(
            name, value.shape, sensitivity, noise_multiplier, symmetric, sampling_probability, step
        )
        return self._noisy(key, value, record)

    def release_stack(
        self,
        name: str,
        values: Iterable[np.ndarray],
        shape: tuple[int, ...],
        *,
        sensitivity: float,
        noise_multiplier: float,
        symmetric: bool = False,
        step: int | None = None,
    ) -> Iterator[np.ndarray]:
        """One release of a stack (K, ...) whose L2 sensitivity Δ covers all K items jointly.

        Items are produced and noised one at a time, so K large matrices never sit in memory together;
        item c gets the key child(c) of the release's key, i.e. independent noise per class.
        """
        record, key = self._record(name, shape, sensitivity, noise_multiplier, symmetric, 1.0, step)
        for index, value in enumerate(values):
            if index >= shape[0]:
                raise ValueError(f"release {name!r} declared {shape[0]} items but got more")
            yield self._noisy(key.child(index), np.asarray(value, dtype=np.float64), record)

    def poisson_mask(self, step: int, block: int, rows: int, probability: float) -> np.ndarray:
        """Which rows of a block a Poisson-sampled step uses: each independently with `probability`, exactly."""
        return bernoulli(self._sampling_root.child(step, block).stream(), probability, rows)

    def _noisy(self, key: RootKey, value: np.ndarray, record: Release) -> np.ndarray:
        if record.grid == 0:
            return value.copy()
        flat = _independent(value, record.symmetric)
        if not np.all(np.isfinite(flat)):
            raise FloatingPointError(f"release {record.name!r}: the statistic is not finite")
        scaled = flat / record.grid  # exact: γ is a power of two
        limit = _INT_LIMIT - 16 * record.grid_scale
        if not np.all(np.abs(scaled) < limit):
            # The statistic's own magnitude is not named: it is the private, noise-free value.
            raise FloatingPointError(
                f"release {record.name!r}: a statistic does not fit the grid {record.grid:g} in 62 bits"
            )
        noisy = np.rint(scaled).astype(np.int64)
        noisy += self._noise(key, noisy.shape, record)
        return _assemble(noisy.astype(np.float64) * record.grid, value.shape, record.symmetric)

    @staticmethod
    def _noise(key: RootKey, shape: tuple[int, ...], record: Release) -> np.ndarray:
        """Integer noise in grid units, one independent draw per independent entry: `shape` is the
        statistic's own, or (..., d(d+1)/2) for the upper triangles of a symmetric one."""
        return integer_noise(key, math.prod(shape), record.grid_scale).reshape(shape)


def integer_noise(key: RootKey, count: int, scale: float) -> np.ndarray:
    """`count` rounded-Gaussian integers of scale `scale`; chunk i of 2^20 draws from key.child(i)."""
    integer_gaussian.block_table(scale)  # build (and cache) the table once, before the threads need it
    chunks = [(start, min(count, start + _CHUNK)) for start in range(0, count, _CHUNK)]
    out = np.empty(count, np.int64)

    def draw(index):
        start, stop = chunks[index]
        out[start:stop] = integer_gaussian.sample(key.child(index).stream(), scale, stop - start)

    if len(chunks) <= 1 or _THREADS == 1:
        for index in range(len(chunks)):
            draw(index)
    else:
        with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(draw, range(len(chunks))))
    return out


def _independent(value: np.ndarray, symmetric: bool) -> np.ndarray:
    """The independent entries of a statistic: itself, or its upper triangle(s) (..., d(d+1)/2) if symmetric."""
    if not symmetric:
        return value
    rows, cols = np.triu_indices(value.shape[-1])
    return value[..., rows, cols]


def _assemble(flat: np.ndarray, shape: tuple[int, ...], symmetric: bool) -> np.ndarray:
    if not symmetric:
        return flat.reshape(shape)
    d = shape[-1]
    rows, cols = np.triu_indices(d)
    out = np.empty(shape, np.float64)
    upper = flat.reshape(shape[:-2] + (rows.size,))
    out[..., rows, cols] = upper
    out[..., cols, rows] = upper
    return out


def sampling_slack(releases: Iterable[Release], epsilon: float, delta: float) -> tuple[float, float]:
    """(ε, δ) of a fit's releases as sampled, given the accountant's (ε, δ) for the ideal mechanism."""
    noisy = [r for r in releases if r.grid > 0]
    coordinates = sum(r.coordinates for r in noisy)
    if not coordinates:
        return epsilon, delta
    tail = max(integer_gaussian.block_table(r.grid_scale).tail_mass for r in noisy)
    return integer_gaussian.sampling_slack(coordinates, epsilon, delta, tail_mass=tail)
