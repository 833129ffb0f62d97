"""Private hyperparameter selection by random stopping (Papernot & Steinke 2022), accounted in Rényi DP.

`select` chooses a method and its hyperparameters on the private training split, and the choice is part
of what the privacy report covers (`featdp.bench.tuning` is the non-private oracle, kept for comparison).

The algorithm, in the order it runs:
1. Count. ñ is released first, exactly as `training.fit` does (`COUNT_SHARE` of ε, and of δ when δ is
   given; the default δ comes from ñ). Everything that needs n uses ñ.
2. Split. An example goes to the validation part iff the first 8 bytes of
   BLAKE2b(key = `SPLIT_KEY`, its float32 features (little-endian bytes) ‖ its int64 label), read as a
   little-endian integer, fall below ⌊0.1·2⁶⁴⌋: about `VALIDATION_FRACTION` of the rows. The rule looks at
   each example alone, so adding or removing one example changes that example's membership and no
   other's (a split by row index would move every later row). The key is public and fixed; the rule
   needs no secret. The parts' public sizes are ñ_fit = 0.9·ñ and ñ_val = 0.1·ñ (functions of ñ).
3. Runs. The number of runs K is drawn from a truncated negative binomial distribution (K ≥ 1) with mean R
   and shape η (`RunsDistribution`); the draw is exact up to 2⁻¹²⁸ (inverse CDF over 128-bit uniforms
   from the run's AES stream, CDF from mpmath at 60 digits). The default is η = 1, the geometric law:
   K ≥ 1, so a head always comes out (Poisson, dp-accounting's shape = ∞, draws K = 0 with probability
   e^−R and then has nothing to output), and at the same mean it costs no more than Poisson where we
   checked (R = 10, δ = 1e-5: ε 4.3 vs 4.9 at σ_run = 2, 1.7 vs 1.9 at σ_run = 5); the logarithmic law
   (η = 0) is cheaper still (3.6 at σ_run = 2) but at R = 10 stops after one or two runs 40% of the time
   (geometric: 19%) and runs past 50 runs 3.3% of the time (geometric: 0.5%).
   Each run draws a candidate uniformly from the grid (another AES stream), fits it on the fit part with
   its own key (root.child("run", i)) and releases its score on the validation part:
   #correct + Gaussian noise (Δ = 1, multiplier σ_run). A centred candidate (`center` = f > 0,
   featdp/centering.py) is a fit with centring on the fit part: its run first releases its own mean of the
   fit part's preprocessed rows (sensitivity C, multiplier σ_run/√f, public size ñ_fit) through the run's
   releaser, trains on the fit part centred on it, and scores its head through the same map
   P(P(x) − μ̃) on the validation part (which the mean never reads).
4. A run's RDP. A neighbour's extra example lies in exactly one part, so a run differs between
   neighbours either in its fit or in its score, never both (parallel composition): its RDP at order α
   is at most max(RDP_fit_j(α), RDP_score(α)) for the candidate j it drew. j is drawn independently of
   the data, and the Rényi divergence of two mixtures with the same weights is at most the largest of
   the components' (joint quasi-convexity), so a run's RDP is at most the per-order maximum over every
   candidate's curve and the score's (`WorstOfDpEvent`; a candidate's curve is `rdp_upper_curve`).
   A centred candidate's fit event is its method's event composed with the mean's Gaussian at σ_run/√f
   (`centering.with_mean`, `_run_event`); both rules below plan its scale on that composed event, so a
   full-batch centred candidate's head keeps the share 1 − f of Gaussian(σ_run)'s precision.
   The noise is planned by two rules, both sound (`plan_noise`), and the one giving the candidates the
   smaller noise scales (geometric mean of the ratios) is used:
   * domination: each candidate's scale is the smallest (to 1e-4) whose RDP is ≤ α/(2σ_run²) at every
     order α, so the maximum is one Gaussian of multiplier σ_run (full-batch methods: scale σ_run, or
     σ_run/√(1 − f) when centred);
   * equal standalone privacy: each candidate's scale is the smallest (to 0.1%) at which it alone is as
     private as the score Gaussian(σ_run) in (ε, δ) (RDP, at the selection's δ). A Poisson-subsampled
     candidate then lies above the Gaussian at high orders and below it at low ones, where domination
     had to give it more noise. With full-batch candidates only, the rules coincide (only domination
     is computed).
5. Accounting. The selection is RepeatAndSelectDpEvent(run, R, η): Papernot–Steinke's Theorem 2 maps
   the run's RDP curve to the selection's, and the RDP curve gives ε at the selection's δ
   (dp-accounting's RDP accountant for a Gaussian run, its map of the theorem on the per-order maximum
   otherwise, `selection_epsilon`). σ_run is calibrated so that the count and the selection (basic
   composition) plus the sampler's slack stay within the target; the ε reported is recomputed from the
   plan's event, whose scales are the ones the runs use.
6. Output. The best run (highest noisy score; ties go to the earlier run, which for i.i.d. runs is a
   uniformly random tie-break) — its head, its candidate and its noisy score — and nothing else.

What is withheld, and why. The Papernot–Steinke bound is for a mechanism that outputs the best run only:
K and the other runs' candidates and scores stay hidden (given K, the best of K runs costs up to K
times one run). So the privacy report states the distribution of K, never K; the losing runs are kept
in `SelectionResult.runs` for the caller, outside the guarantee, and are never written to the report.
For the same reason the sampler's slack (`mechanism.sampling_slack`) is not computed from the noisy
coordinates actually drawn, which grow with K: it is bounded in advance, with the coordinates of every
grid candidate (a dry run that releases zeros, see `release_coordinates`) and a public cap k_max on K
whose tail P(K > k_max) ≤ ρ is added to δ (see `_slack`).

Limitations: the train split is held in memory when it fits `featdp.data.IN_MEMORY_BUDGET_BYTES` (as
`training.fit` holds it; the two parts are masks over it, not copies) and streamed from its file on every
pass otherwise; the geometric K has a long tail
(P(K > 3R) ≈ e⁻³), so the running time varies from run to run; the dry runs decompose one zero d×d matrix
(seconds at d in the thousands); a candidate's RDP at each order is the least value dp-accounting states
at that order or a higher one (`rdp_upper_curve`): near order 1 its series for Poisson-subsampled
Gaussians is imprecise, so those orders borrow from higher ones, which can cost such candidates noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import math
import time
from typing import Any, Callable, Iterable, Sequence

import attr
import mpmath
import numpy as np
from mpmath.ctx_mp import MPContext
from absl import logging as absl_logging
from dp_accounting import dp_event as events
from dp_accounting.rdp import rdp_privacy_accountant

from featdp import accounting, centering, integer_gaussian, mechanism, report as report_lib
from featdp.accounting import PrivacyParameterError, PrivacyTarget
from featdp.cache import StatisticsCache
from featdp.data import (
    DEFAULT_BLOCK_ROWS, IN_MEMORY_BUDGET_BYTES, ArraySource, DataError, RowSource, RowSubset, TrainingData, aligned_block_rows, example_count,
    maybe_in_memory, views_per_example,
)
from featdp.mechanism import Release, Releaser, ReleaserInterface, independent_coordinates, make_key
from featdp.methods import HyperparameterError, Method, get_method, registry
from featdp.randomness import BitStream
from featdp.training import (
    COUNT_DELTA_WHEN_DEFAULT, COUNT_SHARE, SAMPLER_RESERVE, CountRelease, LinearHead, release_count,
)

__all__ = ["NoisePlan", "Run", "RunsDistribution", "SelectionError", "SelectionResult", "WorstOfDpEvent",
           "build_candidates", "dominating_noise_scale", "in_validation", "mean_noise_multiplier", "parse_grid",
           "plan_noise", "release_coordinates", "select", "selection_epsilon", "selection_report"]

ACCOUNTANT = "rdp"  # Papernot–Steinke's bound is in Rényi DP; dp-accounting's PLD has no RepeatAndSelect
DEFAULT_MEAN_RUNS = 10.0
DEFAULT_SHAPE = 1.0  # geometric: K ≥ 1 always (a head comes out), and the cheapest K ≥ 1 law to explain

VALIDATION_FRACTION = 0.1
SPLIT_KEY = b"featdp selection split v1"  # public: the split is a fixed function of each example
_SPLIT_THRESHOLD = int(VALIDATION_FRACTION * 2**64)

DOMINATION_TOLERANCE = 1e-4  # a candidate's noise scale is the smallest dominated one to this relative step
TAIL_SHARE = 1e-4  # ρ = P(K > k_max), as a share of δ after the count (times e^-ε)
MAX_RUN_NOISE = 1e7  # above this, a run's score and head are pure noise: the target is too small

_PRECISION_DIGITS = 60
_UNIFORM_BITS = 128
_MP = MPContext()  # a private mpmath context: K's law at 60 digits without touching mpmath's global precision
_MP.dps = _PRECISION_DIGITS


class SelectionError(ValueError):
    """A bad argument to `select` (or `featdp tune`): the grid, the number of runs, the methods."""


# --------------------------------------------------------------------------------------------------- split


def in_validation(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row: whether the example goes to the validation part (module docstring, step 2)."""
    features = np.ascontiguousarray(np.asarray(features, dtype="<f4"))
    labels = np.asarray(labels).astype("<i8")
    out = np.empty(len(labels), dtype=bool)
    for i in range(len(labels)):
        digest = hashlib.blake2b(features[i].tobytes() + labels[i].tobytes(), digest_size=8, key=SPLIT_KEY).digest()
        out[i] = int.from_bytes(digest, "little") < _SPLIT_THRESHOLD
    return out


def split_parts(source: RowSource) -> tuple[RowSubset, RowSubset]:
    """(fit part, validation part) of `source`, by `in_validation`: masks over its rows, not copies. With
    several views per example, an example's first view decides where all of its views go, so that no
    example is on both sides (parallel composition needs disjoint examples)."""
    views = views_per_example(source)
    masks = [np.repeat(in_validation(x[::views], y[::views]), views)
             for x, y in source.blocks(aligned_block_rows(DEFAULT_BLOCK_ROWS, views))]
    validation = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    return RowSubset(source, ~validation), RowSubset(source, validation)


# ------------------------------------------------------------------------------------------ number of runs


@dataclasses.dataclass(frozen=True)
class RunsDistribution:
    """The law of K: truncated negative binomial on {1, 2, ...} with mean `mean` and shape η = `shape`,

        P(K = k) = C(k + η − 1, k)·(1 − γ)^k / (γ^−η − 1)     (η > 0; η = 1: geometric γ(1 − γ)^(k−1)),
        P(K = k) = (1 − γ)^k / (k·log(1/γ))                   (η = 0: logarithmic),

    with γ ∈ (0, 1] solving E[K] = mean: dp-accounting's `RepeatAndSelectDpEvent(event, mean, shape)`
    for finite shape. (Its shape = ∞, Poisson, allows K = 0 — no run, no head — and is not offered.)
    K is sampled with γ to 60 digits; dp-accounting bisects for γ to 1e-9 and keeps the lower end, which
    only enlarges its bound (its log(1/γ) term).
    """

    mean: float
    shape: float = DEFAULT_SHAPE

    def __post_init__(self):
        mean, shape = self.mean, self.shape
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not (math.isfinite(mean) and mean >= 1):
            raise SelectionError(f"the mean number of runs must be a finite number >= 1, got {mean!r}")
        if isinstance(shape, bool) or not isinstance(shape, (int, float)) or not (math.isfinite(shape) and shape >= 0):
            raise SelectionError(
                f"the shape of the number of runs must be a finite number >= 0 (1: geometric, 0: logarithmic), "
                f"got {shape!r}"
            )
        object.__setattr__(self, "mean", float(mean))
        object.__setattr__(self, "shape", float(shape))

    def describe(self) -> str:
        if self.shape == 1:
            kind = "geometric (truncated negative binomial, shape 1)"
        elif self.shape == 0:
            kind = "logarithmic (truncated negative binomial, shape 0)"
        else:
            kind = f"truncated negative binomial, shape {self.shape:g}"
        return f"{kind} on K >= 1, mean {self.mean:g}, gamma {float(self.gamma):.12g}"

    def dp_event(self, run_event: events.DpEvent) -> events.RepeatAndSelectDpEvent:
        return events.RepeatAndSelectDpEvent(run_event, self.mean, self.shape)

    @functools.cached_property
    def gamma(self) -> mpmath.mpf:
        """γ with E[K] = mean, to 60 digits (bisection: E[K] falls as γ rises)."""
        if self.mean == 1:
            return _MP.mpf(1)
        if self.shape == 1:
            return 1 / _MP.mpf(self.mean)
        target, lo, hi = _MP.mpf(self.mean), _MP.mpf(0), _MP.mpf(1)
        for _ in range(4 * _PRECISION_DIGITS):
            mid = (lo + hi) / 2
            if self._mean_at(mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def _mean_at(self, gamma):
        eta = _MP.mpf(self.shape)
        if eta == 0:
            return (1 - gamma) / (gamma * _MP.log(1 / gamma))
        return eta * (1 - gamma) / (gamma * (1 - gamma**eta))

    def _probabilities(self) -> Iterable[mpmath.mpf]:
        """P(K = 1), P(K = 2), ... at 60 digits."""
        gamma, eta = self.gamma, _MP.mpf(self.shape)
        if gamma == 1:
            yield _MP.mpf(1)
            while True:
                yield _MP.mpf(0)
        if eta == 0:
            p = (1 - gamma) / _MP.log(1 / gamma)
        else:
            p = eta * (1 - gamma) / (gamma**-eta - 1)
        k = 1
        while True:
            yield p
            p = p * (1 - gamma) * (k + eta) / (k + 1)
            k += 1

    @functools.cached_property
    def _thresholds(self) -> list[int]:
        """T_k = ⌈P(K ≤ k)·2¹²⁸⌉ for k = 1, 2, ... up to the first T_k = 2¹²⁸: K = min{k : U < T_k}."""
        scale = 2**_UNIFORM_BITS
        out: list[int] = []
        cdf = _MP.mpf(0)
        for p in self._probabilities():
            cdf += p
            out.append(min(scale, int(_MP.ceil(cdf * scale))))
            if out[-1] >= scale or 1 - cdf < _MP.mpf(2) ** -(_UNIFORM_BITS + 8):
                out[-1] = scale
                return out

    def pmf(self, k: int) -> float:
        return float(next(itertools.islice(self._probabilities(), k - 1, None))) if k >= 1 else 0.0

    def survival(self, k: int) -> float:
        """P(K > k), rounded up to a float."""
        rest = 1 - _MP.fsum(itertools.islice(self._probabilities(), max(k, 0)))
        return float(rest) * (1 + 2.0**-50)

    def cap(self, tail: float) -> int:
        """k_max: the smallest k with P(K > k) ≤ `tail`."""
        cdf, k = _MP.mpf(0), 0
        for p in self._probabilities():
            if 1 - cdf <= tail:
                return k
            cdf += p
            k += 1

    @property
    def sampling_error(self) -> float:
        """A bound on the total variation between the law sampled and the exact law: each threshold is off
        by < 2⁻¹²⁸ (rounding) plus the CDF's 60-digit error, and the mass past the table is < 2⁻¹³⁶."""
        return (len(self._thresholds) + 1) * 2.0 ** -(_UNIFORM_BITS - 2)

    def sample(self, stream: BitStream) -> int:
        """K, by inverse CDF with a 128-bit uniform from `stream`."""
        high, low = (int(w) for w in stream.words(2))
        uniform = (high << 64) | low
        thresholds = self._thresholds
        lo, hi = 0, len(thresholds) - 1  # the first index with uniform < T
        while lo < hi:
            mid = (lo + hi) // 2
            if uniform < thresholds[mid]:
                hi = mid
            else:
                lo = mid + 1
        return lo + 1


def uniform_index(stream: BitStream, size: int) -> int:
    """An exactly uniform integer in [0, size), by rejection on 64-bit words."""
    limit = 2**64 - (2**64 % size)
    while True:
        word = int(stream.words(1)[0])
        if word < limit:
            return word % size


# ---------------------------------------------------------------------------------------------- candidates


def parse_grid(pairs: Sequence[str]) -> dict[str, list[str]]:
    """``KEY=V1,V2`` strings → {key: [values]}; a malformed or empty entry is a `SelectionError`."""
    grid: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SelectionError(f"--grid expects KEY=V1,V2,..., got {pair!r}")
        values = [v.strip() for v in text.split(",")]
        if not text.strip() or any(not v for v in values):
            raise SelectionError(f"--grid {pair!r}: every value in the comma-separated list must be non-empty")
        if key in grid:
            raise SelectionError(f"--grid gives {key!r} twice; list all its values in one --grid {key}=V1,V2")
        grid[key] = values
    return grid


def _method_class(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        raise HyperparameterError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    cls = methods[name]
    if not cls.private:
        raise SelectionError(
            f"method {name!r} is not private: tune selects among private methods only "
            f"({', '.join(sorted(n for n, m in methods.items() if m.private))})"
        )
    return cls


def build_candidates(methods: Sequence[str], grid: dict[str, list[str]] | None, public_fit_size: float) -> list[Method]:
    """The candidates, in a fixed order: for each method, the Cartesian product of `grid` (every key must
    be a hyperparameter of every method), or without a grid its `tuning_grid(ñ_fit)`. Duplicates are
    dropped, so each distinct candidate is drawn with the same probability."""
    if not methods:
        raise SelectionError("give at least one --method to tune")
    out: list[Method] = []
    for name in dict.fromkeys(methods):
        cls = _method_class(name)
        if grid:
            fields = {f.name for f in dataclasses.fields(cls)}
            for key in grid:
                if key not in fields:
                    raise HyperparameterError(
                        f"--grid key {key!r} is not a hyperparameter of method {name!r}; "
                        f"valid: {', '.join(sorted(fields))}"
                    )
            keys = list(grid)
            found = [cls.from_strings(dict(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]
        else:
            found = [get_method(name, **overrides) for overrides in cls.tuning_grid(public_fit_size)]
        for method in found:
            if method not in out:
                out.append(method)
    return out


# -------------------------------------------------------------------------------------------- domination


def rdp_curve(event: events.DpEvent) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP at each order) of `event`, by the accountant that accounts the selection (its default
    orders, ascending)."""
    with _quiet_accountant():
        accountant = accounting.make_accountant(ACCOUNTANT).compose(event)
    return np.asarray(accountant.orders, dtype=np.float64), np.asarray(accountant.rdp, dtype=np.float64)


def rdp_upper_curve(event: events.DpEvent) -> tuple[np.ndarray, np.ndarray]:
    """`rdp_curve` with each order's value replaced by the least value at that order or any higher one.

    Rényi divergence never decreases with the order, so this is still an upper bound, and it repairs
    dp-accounting's fractional orders of Poisson-subsampled Gaussians near 1: there its series loses
    precision (on a 293-step q = 0.14 recipe it states ε(1.1) ≈ 0.32 whatever the noise, above its own
    exact value at order 2) or does not converge (it then gives ∞)."""
    orders, rdp = rdp_curve(event)
    return orders, np.minimum.accumulate(rdp[::-1])[::-1]


@contextlib.contextmanager
def _quiet_accountant():
    """dp-accounting logs a warning per order whose series does not converge; `rdp_upper_curve` copes."""
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(previous)


@functools.lru_cache(maxsize=64)
def gaussian_bound(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(orders, α/(2σ²)): the RDP curve every run must stay under."""
    return rdp_curve(events.GaussianDpEvent(sigma))


def is_dominated(event: events.DpEvent, sigma: float) -> bool:
    """Whether `event`'s RDP (`rdp_upper_curve`) is ≤ that of a Gaussian with multiplier σ at every order
    of the accountant."""
    orders, bound = gaussian_bound(sigma)
    event_orders, rdp = rdp_upper_curve(event)
    return bool(np.array_equal(orders, event_orders) and np.all(rdp <= bound))


def mean_noise_multiplier(method: Method, sigma: float) -> float | None:
    """σ_c = σ_run/√f of a run's released mean when `method` centres (`center` = f > 0), else None."""
    return sigma / math.sqrt(method.center) if method.center else None


def _run_event(method: Method, scale: float, public_size: float, sigma: float) -> events.DpEvent:
    """A run's fit event for `method` at noise scale `scale`, σ_run = `sigma`: the method's event, composed
    with its mean's Gaussian at σ_run/√f when it centres (module docstring, step 4)."""
    return centering.with_mean(method.dp_event(scale, public_size), mean_noise_multiplier(method, sigma))


def dominating_noise_scale(method: Method, sigma: float, public_size: float) -> float:
    """The smallest noise scale s (to `DOMINATION_TOLERANCE`) with the run's fit event (`_run_event`: the
    method's event at s on ñ, with the mean's Gaussian at σ/√f when it centres) dominated by Gaussian(σ) at
    every RDP order. Full-batch methods get s = σ, or σ/√(1 − f) when centred (their event is one Gaussian
    with σ_eff = s, up to float rounding); Poisson-subsampled ones less."""

    def ok(scale: float) -> bool:
        return is_dominated(_run_event(method, scale, public_size, sigma), sigma)

    # The event without sampling has a closed-form σ_eff ∝ s, and sampling never raises RDP: start there
    # (a centred run's mean takes the share f of Gaussian(σ)'s precision σ⁻², the head the rest).
    unsampled = accounting.without_sampling(method.dp_event(1.0, public_size))
    exact = accounting.ExactGaussianAccountant()
    if exact.supports(unsampled):
        hi = sigma / (exact.compose(unsampled).effective_sigma * math.sqrt(1 - method.center))
    else:
        hi = sigma
    while not ok(hi):
        hi *= 2
        if hi > MAX_RUN_NOISE * 1e3:
            raise PrivacyParameterError(
                f"method {method.name!r}: no noise scale keeps its event under Gaussian({sigma:g})"
            )
    lo = hi / 2
    while ok(lo):
        hi, lo = lo, lo / 2
        if lo < 1e-9 * sigma:
            raise PrivacyParameterError(
                f"method {method.name!r} is dominated by Gaussian({sigma:g}) with no noise at all"
            )
    while hi > lo * (1 + DOMINATION_TOLERANCE):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------------------------- the runs' accounting


@attr.s(frozen=True, slots=True, auto_attribs=True)
class WorstOfDpEvent(events.DpEvent):
    """One run whose RDP at every order is at most the largest of its components' (module docstring,
    step 4): a candidate drawn independently of the data (joint quasi-convexity of the Rényi divergence),
    fitted on one part and scored on the other (parallel composition). dp-accounting has no such event;
    `selection_epsilon` accounts it."""

    components: list


def run_rdp(event: events.DpEvent) -> tuple[np.ndarray, np.ndarray]:
    """(orders, an upper bound on `event`'s RDP at each order): `rdp_upper_curve`, or for a
    `WorstOfDpEvent` the per-order maximum of its components' curves."""
    if isinstance(event, WorstOfDpEvent):
        curves = [run_rdp(component) for component in event.components]
        orders = curves[0][0]
        if not all(np.array_equal(orders, other) for other, _ in curves):
            raise ValueError("the components' RDP curves are at different orders")
        return orders, np.max([rdp for _, rdp in curves], axis=0)
    return rdp_upper_curve(event)


def selection_epsilon(event: events.RepeatAndSelectDpEvent, delta: float) -> float:
    """ε at `delta` of random stopping over `event.event`'s runs, in RDP (Papernot–Steinke's Theorem 2).

    A run described by an ordinary DpEvent is accounted by dp-accounting's RdpAccountant, as
    `accounting.epsilon`; a `WorstOfDpEvent` run by dp-accounting's own map of the theorem applied to
    `run_rdp`'s curve: `_compute_rdp_repeat_and_select` is private in dp-accounting 0.6.0, so
    tests/test_selection.py pins it against the public RepeatAndSelectDpEvent path on a Gaussian."""
    if not isinstance(event.event, WorstOfDpEvent):
        return accounting.epsilon(event, delta, ACCOUNTANT)
    orders, rdp = run_rdp(event.event)
    selected = rdp_privacy_accountant._compute_rdp_repeat_and_select(orders, rdp, event.mean, event.shape)
    return float(rdp_privacy_accountant.compute_epsilon(orders, selected, delta)[0])


@dataclasses.dataclass(frozen=True)
class NoisePlan:
    """The noise of every run: the score's multiplier σ_run and each candidate's noise scale, with the
    event that accounts them and its ε at the selection's δ (never above the selection's budget)."""

    rule: str  # "domination" or "equal standalone privacy" (module docstring, step 4)
    run_noise_multiplier: float
    scales: tuple[float, ...]  # per candidate, in the grid's order
    event: events.RepeatAndSelectDpEvent
    epsilon: float


def domination_plan(candidates: Sequence[Method], distribution: RunsDistribution, budget: float, delta: float,
                    public_size: float) -> NoisePlan:
    """Every run under one Gaussian(σ_run) at every order: σ_run calibrated on
    RepeatAndSelect(Gaussian(σ_run)), each candidate's scale the least at which its run's fit event (its
    mean's Gaussian included) is dominated."""
    make_event = lambda s: distribution.dp_event(events.GaussianDpEvent(s))  # noqa: E731
    calibration = accounting.calibrate(make_event, budget, delta, ACCOUNTANT)
    sigma = calibration.noise_scale
    scales = tuple(dominating_noise_scale(m, sigma, public_size) for m in candidates)
    return NoisePlan("domination", sigma, scales, calibration.event, calibration.epsilon)


def _is_full_batch(method: Method, public_size: float) -> bool:
    return accounting.ExactGaussianAccountant().supports(method.dp_event(1.0, public_size))


def equal_privacy_scales(candidates: Sequence[Method], sigma: float, delta: float,
                         public_size: float) -> tuple[float, ...]:
    """Each candidate's least scale (to 0.1%) at which its run's fit event (`_run_event`, its mean's
    Gaussian at σ/√f included) alone is (ε_σ, δ)-DP in RDP, ε_σ being Gaussian(σ)'s: full-batch candidates
    get exactly Gaussian(σ)'s σ_eff, the head taking the share 1 − f of its precision when centred."""
    target = accounting.epsilon(events.GaussianDpEvent(sigma), delta, ACCOUNTANT)
    scales = []
    for method in candidates:
        make = functools.partial(_run_event, method, public_size=public_size, sigma=sigma)
        if _is_full_batch(method, public_size):  # σ_eff is linear in the scale
            exact = accounting.ExactGaussianAccountant().compose(method.dp_event(1.0, public_size))
            scales.append(sigma / (exact.effective_sigma * math.sqrt(1 - method.center)))
        else:
            with _quiet_accountant():
                scales.append(accounting.calibrate(make, target, delta, ACCOUNTANT).noise_scale)
    return tuple(scales)


def equal_privacy_plan(candidates: Sequence[Method], distribution: RunsDistribution, budget: float, delta: float,
                       public_size: float, start: float = 2.0) -> NoisePlan:
    """Every candidate and the score at the same standalone (ε_s, δ) (`equal_privacy_scales`), the run
    accounted as the per-order maximum of their curves (`WorstOfDpEvent`), σ_run calibrated on that.

    ε(σ_run) is only roughly monotone here (each candidate's scale is itself calibrated to 0.1%), so the
    search may stop slightly above the least σ_run; soundness does not depend on it: the plan's ε is the
    accountant's on exactly the returned scales, and `select` checks it against the budget."""

    @functools.lru_cache(maxsize=None)
    def event_at(sigma: float) -> tuple[tuple[float, ...], events.RepeatAndSelectDpEvent]:
        scales = equal_privacy_scales(candidates, sigma, delta, public_size)
        parts = [_run_event(m, s, public_size, sigma) for m, s in zip(candidates, scales)]
        parts.append(events.GaussianDpEvent(sigma))
        return scales, distribution.dp_event(WorstOfDpEvent(parts))

    sigma, epsilon = accounting.calibrate_function(
        lambda s: selection_epsilon(event_at(s)[1], delta), budget, delta, start)
    scales, event = event_at(sigma)
    return NoisePlan("equal standalone privacy", sigma, scales, event, epsilon)


def plan_noise(candidates: Sequence[Method], distribution: RunsDistribution, budget: float, delta: float,
               public_size: float) -> tuple[NoisePlan, NoisePlan | None]:
    """(the plan used, the other one or None): both plans are sound; the one whose candidates' noise
    scales are smaller in geometric mean (each candidate's ratio between the plans; the score's σ_run,
    nearly the same under both, is left out of the comparison) is used, domination
    on a tie. With full-batch candidates only the two coincide (equal ε ⇔ equal σ_eff) and only
    domination is computed."""
    dominated = domination_plan(candidates, distribution, budget, delta, public_size)
    if all(_is_full_batch(m, public_size) for m in candidates):
        return dominated, None
    equal = equal_privacy_plan(candidates, distribution, budget, delta, public_size,
                               start=dominated.run_noise_multiplier)
    log_ratio = np.mean(np.log(np.asarray(equal.scales) / np.asarray(dominated.scales)))
    return (equal, dominated) if log_ratio < 0 else (dominated, equal)


def _describe_plan(plan: NoisePlan) -> str:
    if plan.rule == "domination":
        return "rdp (dp-accounting RdpAccountant, default orders: RepeatAndSelectDpEvent of the dominating Gaussian)"
    return ("rdp (per-order maximum of the candidates' and the score's RDP curves from dp-accounting's "
            "RdpAccountant, default orders, mapped by dp-accounting's Papernot-Steinke Theorem 2)")


# ------------------------------------------------------------------------------------ coordinates and slack


class _ZeroReleaser:
    """Declares releases like a `Releaser` and returns zeros: a dry run that counts a fit's noisy
    coordinates. Which statistics a method releases, and their shapes, depend on public values only."""

    def __init__(self):
        self.coordinates = 0
        self.releases: list[Release] = []

    def release(self, name, value, *, sensitivity, noise_multiplier, symmetric=False, sampling_probability=1.0,
                step=None):
        value = np.asarray(value, dtype=np.float64)
        self.coordinates += independent_coordinates(value.shape, symmetric)
        return np.zeros_like(value)

    def release_stack(self, name, values, shape, *, sensitivity, noise_multiplier, symmetric=False, step=None):
        self.coordinates += independent_coordinates(tuple(shape), symmetric)
        return (np.zeros(np.shape(value), dtype=np.float64) for value in values)

    def poisson_mask(self, step, block, rows, probability):
        return np.ones(rows, dtype=bool)


def release_coordinates(method: Method, feature_dim: int, num_classes: int, public_size: float,
                        cache: StatisticsCache | None = None) -> int:
    """The noisy coordinates one fit of `method` draws on data of this shape (a dry run on one zero row).

    The zero matrices it decomposes are the same for every candidate, so callers pass a batch of dry runs
    one `cache` (keeping decompositions only: each dry run's zero row is a new source)."""
    source = ArraySource(np.zeros((1, feature_dim), np.float32), np.zeros(1, np.int64), num_classes)
    releaser = _ZeroReleaser()
    # The run's own path: a centred candidate's d coordinates of its mean are counted with its head's.
    _fit_run(method, source, 1.0, releaser, public_size, mean_noise_multiplier(method, 1.0), cache)
    return releaser.coordinates


def _fit_run(method: Method, part: RowSource, scale: float, releaser: ReleaserInterface, public_size: float,
             mean_sigma: float | None, cache: StatisticsCache | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(head, μ̃ or None): one run's fit of `method` on `part` at noise scale `scale`, releasing through
    `releaser`. A centred candidate first releases the mean of `part`'s preprocessed rows (multiplier
    `mean_sigma`, public size `public_size`; featdp/centering.py) and trains on `part`'s rows centred on
    it, as `training.fit` does; the centred rows are the run's own, so they share nothing with `cache`."""
    preprocessing = method.preprocessing()
    mean = None
    if method.center:
        (part, mean), cache = centering.centre_rows(part, preprocessing, releaser, mean_sigma, public_size,
                                                    cache=cache), None
    data = TrainingData(part, preprocessing, public_num_examples=public_size, cache=cache)
    return method.fit(data, scale, releaser), mean


def _slack(coordinates: int, epsilon: float, delta: float, tail: float) -> tuple[float, float]:
    """(ε', δ') of the selection as sampled, given (ε, δ) for the ideal mechanism, when outside an event of
    probability ≤ `tail` (K > k_max, or the law of K sampled off) it draws ≤ `coordinates` noisy
    coordinates. Splitting every probability over that event, as in `integer_gaussian.sampling_slack`:
    Q_D(E) ≤ (1+η)^M P_D(E) + ρ, and P_D'(E) ≤ (1−η)^−M Q_D'(E) + M·t + ρ, so
    ε' = ε + M·log((1+η)/(1−η)) and δ' = (1+η)^M (δ + e^ε (M·t + ρ)) + ρ."""
    if tail > 0 and epsilon + math.log(tail) >= 0:  # e^ε·ρ ≥ 1: vacuous (and e^ε overflows past ε ≈ 709)
        return integer_gaussian.sampling_slack(coordinates, epsilon, delta)[0], 1.0
    outside = math.exp(epsilon) * tail if tail > 0 else 0.0
    spent_epsilon, spent_delta = integer_gaussian.sampling_slack(coordinates, epsilon, delta + outside)
    return spent_epsilon, min(1.0, spent_delta + tail)


def _selection_delta(target: PrivacyTarget, count_delta: float, coordinates: int, tail: float) -> float:
    """The largest δ for the selection (to a relative 1e-4) whose `_slack` with the count's δ stays within the
    target, taking e^ε at the target ε (the ideal ε reached is at most that)."""
    def spent(selection_delta):
        return _slack(coordinates, target.epsilon, count_delta + selection_delta, tail)[1]

    selection_delta = (target.delta - count_delta) * (1 - SAMPLER_RESERVE)
    for _ in range(100):
        over = spent(selection_delta) - target.delta
        if over <= 0 or selection_delta <= 0:
            break
        selection_delta -= 1.01 * over + 1e-6 * selection_delta
    return selection_delta


# ---------------------------------------------------------------------------------------------- selection


@dataclasses.dataclass
class Run:
    """One run of the selection. Only the best run is released; the others are outside the guarantee."""

    index: int
    method: Method
    noise_scale: float
    noisy_correct: float  # the released score: #correct on the validation part + noise
    coordinates: int
    seconds: float

    def noisy_accuracy(self, public_validation_size: float) -> float:
        """The noisy score over the public validation size, clipped to [0, 1] (post-processing)."""
        return min(1.0, max(0.0, self.noisy_correct / max(public_validation_size, 1.0)))


@dataclasses.dataclass(frozen=True)
class SelectionPrivacy:
    """What the report states, and how it adds up."""

    epsilon: float  # count + selection + sampler slack
    delta: float
    count_epsilon: float
    count_delta: float
    selection_epsilon: float  # RDP, `selection_epsilon` of the plan's RepeatAndSelect event at selection_delta
    selection_delta: float
    coordinates_bound: int  # M*: noisy coordinates drawn unless K > runs_cap
    runs_cap: int  # k_max
    tail: float  # P(K > k_max) + the sampling error of K's law


@dataclasses.dataclass
class SelectionResult(LinearHead):
    method: Method  # the chosen candidate
    weights: np.ndarray  # its head (d, K)
    best: Run
    runs: list[Run]  # every run, the losers included: NOT covered by the privacy guarantee; never report them
    num_runs: int  # K: likewise withheld
    distribution: RunsDistribution
    candidates: list[Method]
    noise_multiplier: float  # σ_run
    calibration: accounting.Calibration  # of σ_run against the selection's share
    plan: NoisePlan  # every candidate's noise scale and the run event accounted
    alternative_plan: NoisePlan | None  # the plan not used (None: both coincide), for comparison
    count: CountRelease
    privacy: SelectionPrivacy
    target: PrivacyTarget  # with δ resolved
    public_fit_size: float
    public_validation_size: float
    releases: list[Release]  # the count's and the best run's: what the report lists
    seeded: bool
    seconds: float
    num_examples: int  # the true n: for the caller's own use, never written to a report
    views_per_example: int = 1
    center: np.ndarray | None = None  # the best run's μ̃ (d,) when its candidate centred (head.npz), else None
    center_noise_multiplier: float | None = None  # σ_c = σ_run/√f of that mean's release, else None

    @property
    def event(self) -> events.DpEvent:
        return self.calibration.event


def _correct(method: Method, weights: np.ndarray, part: RowSource, center: np.ndarray | None = None) -> float:
    """How many examples of `part` the head predicts right, block by block; an example of V views counts
    as the fraction of its views predicted right, so one example moves the count by at most 1 (the score's
    sensitivity) however many views it has. With the run's mean μ̃ (`center`) the head predicts through
    P(P(x) − μ̃), as `LinearHead.decision_function` does."""
    preprocess, weights = method.preprocessing(), weights.astype(np.float32)
    correct = 0
    for x, y in part.blocks():
        if len(y):
            rows = centering.head_rows(preprocess, x, center)
            correct += int(np.sum(np.argmax(rows @ weights, axis=1) == y))
    return correct / views_per_example(part)


def select(
    train: RowSource,
    methods: Sequence[str] | str = ("dp-fc",),
    *,
    epsilon: float,
    delta: float | None = None,
    mean_runs: float = DEFAULT_MEAN_RUNS,
    shape: float = DEFAULT_SHAPE,
    grid: dict[str, list[str]] | None = None,
    seed: int | None = None,
    accountant: str = ACCOUNTANT,
    on_run: Callable[[int, int], None] | None = None,
    cache: StatisticsCache | None = None,
    memory_budget_bytes: int = IN_MEMORY_BUDGET_BYTES,
) -> SelectionResult:
    """Private selection among `methods` (× `grid`) on `train` with (ε, δ)-DP overall (module docstring).

    `on_run(done, total)` is called before the first run and after each: `total` is K, which the
    guarantee does not cover — show it to the operator, never publish it. `cache`: exact pre-noise
    statistics shared with other fits and selections on `train` (`training.fit`'s `cache`); the runs of
    one selection share theirs in any case. `memory_budget_bytes`: as `training.fit`'s."""
    if isinstance(methods, str):
        methods = (methods,)
    target = PrivacyTarget(epsilon, delta, accountant)
    if target.accountant != ACCOUNTANT:
        raise PrivacyParameterError(
            f"tune accounts with the rdp accountant only (Papernot & Steinke's bound is in Renyi DP), "
            f"got accountant {accountant!r}"
        )
    distribution = RunsDistribution(mean_runs, shape)
    build_candidates(methods, grid, 1000.0)  # every argument error before anything is released
    n = example_count(train)  # examples, not views: what the released count counts
    if n == 0:
        raise DataError("the training split is empty: there is nothing to tune on")
    started = time.perf_counter()
    key = make_key(seed)
    # Held once, where `fit` would hold it (the caller's rows as they are with a cache): the parts are masks.
    source = train if cache is not None else maybe_in_memory(train, memory_budget_bytes)
    fit_part, validation_part = split_parts(source)  # reads (and validates) every row before anything runs
    # The runs share the fit part's exact statistics; their released matrices never recur (each run draws
    # its own noise), so no decomposition is kept.
    runs_cache = (cache if cache is not None else StatisticsCache()).statistics_only()

    # 1. The count, exactly as `training.fit` releases it.
    count_releaser = Releaser(key)
    count_delta = COUNT_SHARE * target.delta if target.delta is not None else COUNT_DELTA_WHEN_DEFAULT
    count = release_count(n, count_releaser, COUNT_SHARE * target.epsilon, count_delta)
    target = target.with_default_delta(count.upper_bound)
    if target.delta <= 2 * count.delta:
        raise PrivacyParameterError(
            f"delta={target.delta:g} is too small to leave room for the released count's {count.delta:g}"
        )
    public_fit_size = (1 - VALIDATION_FRACTION) * count.value
    public_validation_size = VALIDATION_FRACTION * count.value

    # 2. Candidates, and the coordinates each fit draws (public: shapes depend on d, K and the candidate).
    # A candidate whose hyperparameters follow the budget sees the fit part's public size and the target ε.
    candidates = [m.for_budget(public_fit_size, target.epsilon - count.epsilon, train.feature_dim)
                  for m in build_candidates(methods, grid, public_fit_size)]
    dry_runs = StatisticsCache(statistics=False)
    coordinates = [release_coordinates(m, train.feature_dim, train.num_classes, public_fit_size, dry_runs) + 1
                   for m in candidates]  # + 1: the score

    # 3. The budget: the sampler's slack is bounded first (it must not depend on K), the rest calibrates σ_run.
    remaining_epsilon = target.epsilon - count.epsilon
    remaining_delta = target.delta - count.delta
    tail = TAIL_SHARE * remaining_delta * math.exp(-target.epsilon)
    runs_cap = distribution.cap(tail)
    tail = distribution.survival(runs_cap) + distribution.sampling_error
    coordinates_bound = 1 + runs_cap * max(coordinates)
    slack_epsilon = _slack(coordinates_bound, 0.0, 0.0, 0.0)[0]
    selection_budget = remaining_epsilon - slack_epsilon
    too_small = (
        f"epsilon={target.epsilon:g} is too small to tune with {distribution.mean:g} runs on average at "
        f"delta={target.delta:g}"
    )
    if selection_budget <= 0:
        raise PrivacyParameterError(f"{too_small}: the released count and the sampler's slack use all of it")
    selection_delta = _selection_delta(target, count.delta, coordinates_bound, tail)
    if selection_delta <= 0:
        raise PrivacyParameterError(f"delta={target.delta:g} is too small to leave room for the count and the sampler")
    make_event = lambda s: distribution.dp_event(events.GaussianDpEvent(s))  # noqa: E731
    floor = accounting.epsilon(make_event(MAX_RUN_NOISE), selection_delta, ACCOUNTANT)
    if floor >= selection_budget:
        raise PrivacyParameterError(
            f"{too_small}: after the released count {selection_budget:.4g} is left for the selection, and "
            f"random stopping alone costs epsilon {floor:.4g} however much noise each run adds; raise "
            "--eps or lower --mean-runs"
        )
    try:
        plan, alternative = plan_noise(candidates, distribution, selection_budget, selection_delta, public_fit_size)
    except PrivacyParameterError as error:
        raise PrivacyParameterError(f"{too_small}: {error}") from error
    # What runs is what is accounted: recomputed from the plan's event, never taken from the search.
    reached = selection_epsilon(plan.event, selection_delta)
    if not reached <= selection_budget:
        raise AssertionError(f"the selection's epsilon {reached} exceeds its budget {selection_budget}")
    sigma = plan.run_noise_multiplier
    calibration = accounting.Calibration(
        noise_scale=sigma, epsilon=reached, target_epsilon=selection_budget, delta=selection_delta,
        accountant=_describe_plan(plan), event=plan.event,
    )

    # 4. The runs.
    num_runs = distribution.sample(key.child("selection", "number of runs").stream())
    choices = key.child("selection", "candidates").stream()
    runs: list[Run] = []
    best: Run | None = None
    best_weights = best_releases = best_center = None
    if on_run is not None:
        on_run(0, num_runs)
    for index in range(num_runs):
        run_started = time.perf_counter()
        choice = uniform_index(choices, len(candidates))
        method = candidates[choice]
        releaser = Releaser(key.child("run", index))
        # A centred candidate's run releases its own mean of the fit part first (σ_run/√f, planned for).
        weights, mean = _fit_run(method, fit_part, plan.scales[choice], releaser, public_fit_size,
                                 mean_noise_multiplier(method, sigma), runs_cache)
        weights = np.asarray(weights, dtype=np.float64)
        if sum(r.coordinates for r in releaser.releases) + 1 != coordinates[choice]:
            raise RuntimeError(
                f"method {method.name!r} released other shapes than its dry run: its releases depend on the data"
            )
        if not np.all(np.isfinite(weights)):
            weights = np.zeros_like(weights)  # post-processing of its releases: a non-finite head scores as zeros
        correct = _correct(method, weights, validation_part, mean)
        noisy = float(releaser.release("validation_correct", np.array([float(correct)]), sensitivity=1.0,
                                       noise_multiplier=sigma)[0])
        run = Run(index, method, plan.scales[choice], noisy, coordinates[choice], time.perf_counter() - run_started)
        runs.append(run)
        if best is None or run.noisy_correct > best.noisy_correct:
            best, best_weights, best_releases, best_center = run, weights, list(releaser.releases), mean
        if on_run is not None:
            on_run(index + 1, num_runs)

    ideal_epsilon = count.epsilon + calibration.epsilon
    ideal_delta = count.delta + selection_delta
    spent_epsilon, spent_delta = _slack(coordinates_bound, ideal_epsilon, ideal_delta, tail)
    privacy = SelectionPrivacy(
        spent_epsilon, spent_delta, count.epsilon, count.delta, calibration.epsilon, selection_delta,
        coordinates_bound, runs_cap, tail,
    )
    return SelectionResult(
        method=best.method, weights=np.asarray(best_weights, np.float32), best=best, runs=runs, num_runs=num_runs,
        distribution=distribution, candidates=candidates, noise_multiplier=sigma, calibration=calibration,
        plan=plan, alternative_plan=alternative,
        count=count, privacy=privacy, target=target, public_fit_size=public_fit_size,
        public_validation_size=public_validation_size, releases=list(count_releaser.releases) + best_releases,
        seeded=key.seeded, seconds=time.perf_counter() - started, num_examples=n,
        views_per_example=views_per_example(train), center=best_center,
        center_noise_multiplier=mean_noise_multiplier(best.method, sigma),
    )


# ------------------------------------------------------------------------------------------------- report


_RUN_ACCOUNTING = {
    "domination": "every run is dominated in RDP, at every order of the accountant, by GaussianDpEvent({sigma:.6g}): "
                  "its score is that Gaussian (sensitivity 1) and each candidate's noise scale is the smallest whose "
                  "event stays under it; a neighbour's example lies in one part only, so a run pays for its fit "
                  "or its score, not both",
    "equal standalone privacy": "each run's RDP at each order is at most the largest of the candidates' and the "
                                "score's (GaussianDpEvent({sigma:.6g}), sensitivity 1): a neighbour's example lies "
                                "in one part only, so a run pays for its fit or its score, not both, and the "
                                "candidate is drawn independently of the data (a uniform mixture's Renyi divergence "
                                "is at most its components' largest); every candidate's noise scale makes it alone "
                                "as private as the score",
}


def selection_report(result: SelectionResult, **extra) -> dict[str, Any]:
    """The privacy report of a selection: the chosen run and how the whole selection was accounted.

    K and the losing runs are not in it (module docstring: the guarantee covers the best run only)."""
    privacy, count, target, best = result.privacy, result.count, result.target, result.best
    ideal_epsilon = count.epsilon + privacy.selection_epsilon
    ideal_delta = count.delta + privacy.selection_delta
    report = report_lib.head_fields(result.method, result.releases, result.seeded, result.views_per_example)
    report.update({
        "job": "tune",
        "noise_scale": best.noise_scale,
        "validation": {
            "noisy_correct": best.noisy_correct,
            "noisy_accuracy": best.noisy_accuracy(result.public_validation_size),
            "public_size": result.public_validation_size,
            "noise_std": result.noise_multiplier,
        },
        "selection": {
            "algorithm": "random stopping (Papernot & Steinke 2022, 'Hyperparameter tuning with Renyi "
                         "differential privacy'): K runs, K drawn from a public law independent of the data, "
                         "each run fits a uniformly drawn candidate on the fit part and releases its noisy "
                         "number of correct validation predictions; the best run alone is released",
            "mean_runs": result.distribution.mean,
            "shape": result.distribution.shape,
            "distribution": result.distribution.describe(),
            "number_of_runs": "withheld: the guarantee is for the best run alone, with K and the other runs "
                              "hidden",
            "run_noise_multiplier": result.noise_multiplier,
            "run_accounting": _RUN_ACCOUNTING[result.plan.rule].format(sigma=result.noise_multiplier),
            "candidates": [{"method": m.name, "hyperparameters": m.hyperparameters(), "noise_scale": scale}
                           for m, scale in zip(result.candidates, result.plan.scales)],
            "split": {
                "rule": "validation iff the first 8 bytes of BLAKE2b(key=" + repr(SPLIT_KEY.decode()) + ", the "
                        "row's float32 features (little-endian) + its int64 label), little-endian, are < "
                        "floor(0.1 * 2^64): a function of each example alone",
                "validation_fraction": VALIDATION_FRACTION,
                "public_fit_size": result.public_fit_size,
                "public_validation_size": result.public_validation_size,
            },
        },
    })
    report.update(
        target_epsilon=target.epsilon,
        target_delta=target.delta,
        epsilon=privacy.epsilon,
        delta=privacy.delta,
        accountant=result.calibration.accountant,
        dp_event=report_lib.event_to_json(result.event),
        dp_event_repr=repr(result.event),
        count_dp_event=report_lib.event_to_json(events.GaussianDpEvent(count.noise_multiplier)),
        selection_epsilon=privacy.selection_epsilon,
        selection_delta=privacy.selection_delta,
        composition=(
            "basic composition of the released count and the selection, plus the sampler's slack: "
            f"epsilon = {count.epsilon:.6g} (count) + {privacy.selection_epsilon:.6g} (selection, "
            f"{result.calibration.accountant}) + {privacy.epsilon - ideal_epsilon:.3g} (sampler); delta = "
            f"{count.delta:.6g} + {privacy.selection_delta:.6g} + {privacy.delta - ideal_delta:.3g}"
        ),
        num_examples_released=count.value,
        public={
            "num_examples": "private: released as a noisy count (release 'num_examples', sensitivity 1, "
                            f"epsilon {count.epsilon:.4g}, delta {count.delta:.3g}); the parts' sizes used by "
                            "the fits and the scores are 0.9 and 0.1 times the released count",
            "split": "public rule, a function of each example alone (selection.split)",
            "candidates": "public: the grid is fixed before the data are read (defaults: each method's "
                          "tuning_grid at the fit part's public size)",
            "draws": "the number of runs and each run's candidate come from randomness independent of the data",
            "classes": "public: the class set is the dataset's declared label set, not read from the private labels",
            "feature_dim": "public: the backbone's output dimension",
        },
        sampler={
            "name": mechanism.SAMPLER,
            "coordinates_bound": privacy.coordinates_bound,
            "runs_cap": privacy.runs_cap,
            "runs_cap_tail": privacy.tail,
            "epsilon_slack": privacy.epsilon - ideal_epsilon,
            "delta_slack": privacy.delta - ideal_delta,
            "note": "bounded in advance from the coordinates of every candidate and a cap on K whose tail "
                    "probability is added to delta, so that the stated epsilon does not depend on K",
            "randomness": "AES-256-CTR keyed by " + ("SHA-256 of the user's seed" if result.seeded
                                                     else "256 bits from the OS's cryptographic source"),
        },
    )
    if result.center_noise_multiplier is not None:
        report["center"] = {
            "share": result.method.center,
            "release": centering.RELEASE_NAME,
            "noise_multiplier": result.center_noise_multiplier,
            "sensitivity": result.method.clip_norm,
            "what": "the best run's own mean of the fit part: the sum of its preprocessed rows (an example: the "
                    "average of its views) over the fit part's public size; the run's rows were centred on it "
                    "and preprocessed again, and head.npz's `center` holds it. Its Gaussian, at the run's "
                    "score multiplier over sqrt(share), is part of the candidate's fit event in the plan",
        }
    report.update(extra)
    return report
