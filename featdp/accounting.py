"""The one module that owns dp-accounting.

Methods describe *what* they release as a `DpEvent` built from public hyperparameters and one free noise
scale; this module decides *how* it is accounted and calibrates that scale to a target (ε, δ).

Accountants:
* ``pld`` (default): privacy loss distributions. When an event is a composition of Gaussian mechanisms
  on the full data (every full-batch method), the composition is exactly one Gaussian mechanism with
  σ_eff = (Σ_j σ_j⁻²)^(-1/2) and its (ε, δ) has a closed form (analytic Gaussian mechanism, Balle & Wang
  2018). That exact path is what the PLD accountant approximates from above, so we take it directly.
  Other events (Poisson-subsampled steps) go through dp-accounting's PLD accountant with
  ``value_discretization_interval=1e-3``.
* ``rdp``: Rényi DP, a looser bound, on request (for comparison with papers that use it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable, Iterable

import dp_accounting
from dp_accounting import dp_event as events
from dp_accounting import gaussian_mechanism
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

ACCOUNTANTS = ("pld", "rdp")
NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
PLD_DISCRETIZATION = 1e-3

# Calibration searches the noise scale inside [_MIN_SCALE, _MAX_SCALE]; a target that needs more noise than
# _MAX_SCALE is meaningless (the head would be pure noise) and is reported as an error.
_MIN_SCALE = 1e-3
_MAX_SCALE = 1e7


class PrivacyParameterError(ValueError):
    """An (ε, δ) or accountant argument outside its allowed range."""


class DeltaWarning(UserWarning):
    """δ ≥ 1/n: the guarantee allows leaking one whole example with probability δ."""


def default_delta(num_examples: float) -> float:
    """A power of ten at or below 0.1/n: comfortably below 1/n, and readable in a report."""
    return 10.0 ** math.floor(math.log10(0.1 / max(num_examples, 1)))


@dataclasses.dataclass(frozen=True)
class PrivacyTarget:
    """A validated privacy target: ε > 0, δ ∈ (0, 1) or None (a default chosen later from the released
    count), and the accountant. Every entry point (fit, tune, bench, audit, peers) builds one, so the
    rules and messages live here only."""

    epsilon: float
    delta: float | None = None
    accountant: str = "pld"

    def __post_init__(self):
        epsilon, delta = self.epsilon, self.delta
        if isinstance(epsilon, bool) or not (
            isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0
        ):
            raise PrivacyParameterError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        if delta is not None and (isinstance(delta, bool) or not (isinstance(delta, (int, float)) and 0 < delta < 1)):
            raise PrivacyParameterError(f"delta must lie in the open interval (0, 1), got {delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyParameterError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        object.__setattr__(self, "epsilon", float(epsilon))
        if delta is not None:
            object.__setattr__(self, "delta", float(delta))

    def with_default_delta(self, num_examples: float) -> "PrivacyTarget":
        """δ filled in from `num_examples` (a public value: featdp passes an upper confidence bound of its
        released count) if unset, and a `DeltaWarning` if δ ≥ 1/n."""
        target = self if self.delta is not None else dataclasses.replace(self, delta=default_delta(num_examples))
        if target.delta >= 1 / max(num_examples, 1):
            warnings.warn(
                f"delta={target.delta:g} is not below 1/n = {1 / max(num_examples, 1):g}: such a guarantee "
                "permits revealing a whole training example with probability delta; use a smaller delta",
                DeltaWarning,
                stacklevel=3,
            )
        return target


def check_privacy_parameters(epsilon: float, delta: float, accountant: str = "pld") -> None:
    """Raises `PrivacyParameterError` naming the bad value and the allowed range."""
    if delta is None:
        raise PrivacyParameterError("delta must lie in the open interval (0, 1), got None")
    PrivacyTarget(epsilon, delta, accountant)


def make_accountant(accountant: str = "pld") -> dp_accounting.PrivacyAccountant:
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(
            NEIGHBORING_RELATION, value_discretization_interval=PLD_DISCRETIZATION
        )
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=NEIGHBORING_RELATION)
    raise PrivacyParameterError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


class ExactGaussianAccountant(dp_accounting.PrivacyAccountant):
    """Exact accountant for compositions of full-data Gaussian mechanisms.

    Composing Gaussians with multipliers σ_j is exactly one Gaussian mechanism with
    σ_eff = (Σ_j σ_j⁻²)^(-1/2), whose (ε, δ) curve is known in closed form (Balle & Wang 2018). Any other
    event (subsampling, Laplace, ...) is unsupported, and `make_accountant` then falls back to PLD.
    """

    def __init__(self):
        super().__init__(NEIGHBORING_RELATION)
        self._precision = 0.0  # Σ σ_j⁻²

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, events.NoOpDpEvent):
            return None
        if isinstance(event, events.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, events.ComposedDpEvent):
            for child in event.events:
                error = self._maybe_compose(child, count, False)
                if error is not None:
                    return error
            if do_compose:
                for child in event.events:
                    self._maybe_compose(child, count, True)
            return None
        if isinstance(event, events.GaussianDpEvent):
            if do_compose:
                sigma = float(event.noise_multiplier)
                self._precision = math.inf if sigma == 0 else self._precision + count / sigma**2
            return None
        return self.CompositionErrorDetails(
            invalid_event=event, error_message="only compositions of full-data Gaussian mechanisms"
        )

    @property
    def effective_sigma(self) -> float:
        return math.inf if self._precision == 0 else self._precision**-0.5

    def get_epsilon(self, target_delta: float) -> float:
        return float(gaussian_mechanism.get_epsilon_gaussian(self.effective_sigma, target_delta))


def _accountant_for(event: events.DpEvent, accountant: str) -> dp_accounting.PrivacyAccountant:
    if accountant == "pld" and ExactGaussianAccountant().supports(event):
        return ExactGaussianAccountant()
    return make_accountant(accountant)


def epsilon(event: events.DpEvent, delta: float, accountant: str = "pld") -> float:
    """ε of `event` at `delta` (never an under-estimate)."""
    return float(_accountant_for(event, accountant).compose(event).get_epsilon(delta))


def describe_accountant(event: events.DpEvent, accountant: str) -> str:
    chosen = _accountant_for(event, accountant)
    if isinstance(chosen, ExactGaussianAccountant):
        return "pld-exact (analytic Gaussian mechanism: the event composes full-data Gaussians only)"
    if accountant == "pld":
        return f"pld (dp-accounting PLDAccountant, value_discretization_interval={PLD_DISCRETIZATION})"
    return "rdp (dp-accounting RdpAccountant, default orders)"


@dataclasses.dataclass(frozen=True)
class Calibration:
    noise_scale: float
    epsilon: float  # ε actually reached, never above the target
    target_epsilon: float
    delta: float
    accountant: str  # as described by `describe_accountant`
    event: events.DpEvent


def without_sampling(event: events.DpEvent) -> events.DpEvent:
    """`event` with every Poisson sampling step replaced by its full-data mechanism."""
    if isinstance(event, events.PoissonSampledDpEvent):
        return without_sampling(event.event)
    if isinstance(event, events.SelfComposedDpEvent):
        return events.SelfComposedDpEvent(without_sampling(event.event), event.count)
    if isinstance(event, events.ComposedDpEvent):
        return events.ComposedDpEvent([without_sampling(e) for e in event.events])
    return event


_TOLERANCE = 1e-3  # calibration's relative precision on the noise scale


def _unsampled_upper_end(make_event, target: float, delta: float) -> float | None:
    """A noise scale at which ``make_event`` meets the target for sure, cheaply, or None.

    Subsampling never increases ε, so the scale at which the event *without* sampling meets the target
    (exact, closed form, when that event composes full-data Gaussians) is feasible for the event itself:
    the search's first feasible point, found without evaluating the expensive accountant.
    """
    unsampled = lambda s: without_sampling(make_event(s))  # noqa: E731
    if not ExactGaussianAccountant().supports(unsampled(1.0)):
        return None
    exact = lambda s: ExactGaussianAccountant().compose(unsampled(s)).get_epsilon(delta)  # noqa: E731
    hi = 1.0
    while exact(hi) > target:
        hi *= 2
        if hi > _MAX_SCALE:  # the search reports it
            return hi
    while hi > 2 * _MIN_SCALE and exact(hi / 2) <= target:
        hi /= 2
    # Bisect the exact curve too (evaluations cost microseconds): the closer this end, the fewer
    # evaluations of the real accountant.
    lo = hi / 2
    while hi > lo * (1 + _TOLERANCE):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if exact(mid) <= target else (mid, hi)
    return hi


def _search_accountant(event: events.DpEvent, accountant: str,
                       target: float) -> Callable[[], dp_accounting.PrivacyAccountant] | None:
    """A cheaper accountant whose ε approximates the real one's, used only to locate the calibrated scale
    (`calibrate` brackets and verifies it with the real one); None where the real one is cheap enough.

    PLD: the value grid coarsened by min(10, ε) (none below ε = 2). RDP: the integers among the default
    orders, a subset, so its ε is never below the default orders'.
    """
    if isinstance(_accountant_for(event, accountant), ExactGaussianAccountant):
        return None
    if accountant == "pld":
        # A coarser grid is several times faster where evaluations are slow (large ε: small noise, wide
        # loss distributions), and its pessimism is roughly absolute in ε (~0.01–0.04 at 10×): harmless
        # at large ε, far off at small ε.
        coarsening = min(10.0, target)
        if coarsening < 2:
            return None
        return functools.partial(pld_privacy_accountant.PLDAccountant, NEIGHBORING_RELATION,
                                 value_discretization_interval=coarsening * PLD_DISCRETIZATION)
    # Fractional orders cost most of an RDP evaluation (a series per order): integers alone are 4–5× faster.
    orders = [order for order in rdp_privacy_accountant.DEFAULT_RDP_ORDERS if float(order).is_integer()]
    return functools.partial(rdp_privacy_accountant.RdpAccountant, orders, NEIGHBORING_RELATION)


def _search(gap, start: float, target: float, delta: float, slope: float = -1.0,
            aim: bool = False) -> tuple[float, float, float]:
    """(lo, hi, slope): gap(lo) > 0 ≥ gap(hi), hi ≤ lo·(1 + _TOLERANCE), gap(s) = log ε(s) − log target,
    and the log-log slope of ε between lo and hi.

    log ε is nearly linear in log s (ε ∝ 1/s for a Gaussian, steeper under subsampling), so the search
    works in log-log: from `start` it steps to the root predicted by `slope` (then by the secant of its
    last two points) until the target is bracketed, then to the chord's root on the bracket. Once a
    prediction is trusted (`aim`, or two successive predictions within 2%) it evaluates just above it
    and, if that meets the target, just below it: an accurate prediction closes the bracket in two
    evaluations.
    """
    # Few evaluations matter: a subsampled event's costs up to ~0.15 s at small noise, and a bisection
    # to 0.1% needs a dozen.
    half_step = (1 + 0.9 * _TOLERANCE) ** 0.5
    lo = hi = None
    history: list[float] = []  # scales evaluated, in order

    def record(scale: float) -> bool:
        """Evaluates `scale`; True if it meets the target."""
        nonlocal lo, hi
        history.append(scale)
        if gap(scale) > 0:
            lo = scale if lo is None else max(lo, scale)
            return False
        hi = scale if hi is None else min(hi, scale)
        return True

    def checked(scale: float) -> float:
        if scale < _MIN_SCALE:
            raise PrivacyParameterError(f"epsilon={target} at delta={delta} is reached with no noise at all")
        if scale > _MAX_SCALE:
            raise PrivacyParameterError(
                f"epsilon={target} at delta={delta} needs a noise scale above {_MAX_SCALE:g}: "
                "the released head would be pure noise; raise epsilon or delta"
            )
        return scale

    def probe_around(guess: float) -> None:
        # Above the guess first: if the target fails there, the root is higher and the probe below it
        # would only repeat that.
        if record(checked(guess * half_step)) and (lo is None or guess / half_step > lo):
            record(checked(guess / half_step))

    record(checked(start))
    previous = None
    while lo is None or hi is None:  # step toward the predicted root (at most 16× at once)
        base = history[-1]
        g = gap(base)
        if len(history) > 1 and all(math.isfinite(gap(s)) for s in history[-2:]) and gap(history[-2]) != g:
            slope = (g - gap(history[-2])) / math.log(base / history[-2])
        if not (math.isfinite(g) and slope < 0):
            predicted = base * (16 if g > 0 else 1 / 16)
        else:
            predicted = base * math.exp(min(max(-g / slope, -math.log(16)), math.log(16)))
        # Strictly beyond the one end known so far, so every step learns something.
        predicted = min(predicted, hi / (1 + _TOLERANCE)) if lo is None else max(predicted, lo * (1 + _TOLERANCE))
        if aim:
            probe_around(predicted)
        else:
            record(checked(predicted))
        previous = predicted
    while hi > lo * (1 + _TOLERANCE):
        g_lo, g_hi = gap(lo), gap(hi)
        if math.isfinite(g_lo) and math.isfinite(g_hi) and g_lo > g_hi:
            guess = lo * (hi / lo) ** (g_lo / (g_lo - g_hi))
        else:  # ε infinite at lo or zero at hi: no chord, halve the bracket (in log scale)
            guess = math.sqrt(lo * hi)
        guess = min(max(guess, lo * half_step), hi / half_step)
        trusted = previous is not None and abs(math.log(guess / previous)) < 0.02
        previous = guess
        if trusted:
            probe_around(guess)
        else:
            record(guess)
    g_lo, g_hi = gap(lo), gap(hi)
    slope = (g_hi - g_lo) / math.log(hi / lo) if math.isfinite(g_lo) and math.isfinite(g_hi) else -1.0
    return lo, hi, slope if slope < 0 else -1.0


def calibrate(
    make_event: Callable[[float], events.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: str = "pld",
) -> Calibration:
    """The smallest noise scale s (to 0.1%) for which ``make_event(s)`` is (target_epsilon, delta)-DP.

    `make_event` must give events whose ε falls as s rises and whose structure does not depend on s.
    The returned scale and one at most 0.1% below it were both evaluated by the real accountant (the one
    `epsilon` uses): the first meets the target, the second does not, and the ε reported is the first's.
    A cheaper accountant (`_search_accountant`) only chooses where to look.
    """
    check_privacy_parameters(target_epsilon, delta, accountant)
    probe = make_event(1.0)

    def gap_of(make_fresh):
        epsilons: dict[float, float] = {}  # one evaluation per scale and calibration

        def gap(scale: float) -> float:
            if scale not in epsilons:
                epsilons[scale] = float(make_fresh().compose(make_event(scale)).get_epsilon(delta))
            eps = epsilons[scale]
            return math.inf if eps == math.inf else (math.log(eps / target_epsilon) if eps > 0 else -math.inf)

        return gap, epsilons

    start = _unsampled_upper_end(make_event, target_epsilon, delta) or 2.0
    slope, aim = -1.0, False
    cheap = _search_accountant(probe, accountant, target_epsilon)
    if cheap is not None:
        try:
            _, start, slope = _search(gap_of(cheap)[0], start, target_epsilon, delta)
            aim = True
        except PrivacyParameterError:  # only the real accountant says what cannot be met
            pass
    gap, epsilons = gap_of(functools.partial(_accountant_for, probe, accountant))
    _, scale, _ = _search(gap, start, target_epsilon, delta, slope, aim)
    reached = epsilons[scale]
    if not reached <= target_epsilon:  # the search's invariant; checked, as ε must never be under-reported
        raise AssertionError(f"calibration ended at ε = {reached} above the target {target_epsilon}")
    return Calibration(
        noise_scale=scale,
        epsilon=float(reached),
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        accountant=describe_accountant(probe, accountant),
        event=make_event(scale),
    )


def ledger_event(releases: Iterable) -> events.DpEvent:
    """The composition of the releases a fit actually made, as declared: each a Gaussian with its noise
    multiplier (over its sensitivity), Poisson-subsampled at its rate; identical releases grouped. The
    audit and the tests rebuild ε from this and compare it with what the method's `dp_event` claims."""
    counts: dict[tuple[float, float], int] = {}
    for release in releases:
        key = (release.noise_multiplier, release.sampling_probability)
        counts[key] = counts.get(key, 0) + 1
    parts = []
    for (sigma, q), count in counts.items():
        part: events.DpEvent = events.GaussianDpEvent(sigma)
        if q < 1:
            part = events.PoissonSampledDpEvent(q, part)
        parts.append(events.SelfComposedDpEvent(part, count) if count > 1 else part)
    return events.ComposedDpEvent(parts)


def calibrate_function(epsilon_of: Callable[[float], float], target_epsilon: float, delta: float,
                       start: float = 2.0) -> tuple[float, float]:
    """(s, ε(s)): the smallest scale s (to 0.1%) with ``epsilon_of(s) ≤ target_epsilon``, by `calibrate`'s
    search, for an ε that falls as s rises but that no dp-accounting accountant composes (`epsilon_of`
    computes it; the caller states which accountant). The returned ε was evaluated at s and meets the
    target; 0.1% below s it does not."""
    check_privacy_parameters(target_epsilon, delta, "rdp")
    epsilons: dict[float, float] = {}

    def gap(scale: float) -> float:
        if scale not in epsilons:
            epsilons[scale] = float(epsilon_of(scale))
        eps = epsilons[scale]
        return math.inf if eps == math.inf else (math.log(eps / target_epsilon) if eps > 0 else -math.inf)

    _, scale, _ = _search(gap, start, target_epsilon, delta)
    if not epsilons[scale] <= target_epsilon:  # the search's invariant; ε must never be under-reported
        raise AssertionError(f"calibration ended at ε = {epsilons[scale]} above the target {target_epsilon}")
    return scale, epsilons[scale]
