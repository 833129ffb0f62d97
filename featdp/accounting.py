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


def _bracket(make_event, eps_at, target: float, delta: float) -> tuple[float, float]:
    """Scales lo < hi with ε(lo) > target ≥ ε(hi).

    Accountant evaluations at small noise are the expensive ones for subsampled events (wide privacy
    loss distributions), so the search comes down from above. Subsampling never increases ε, so the
    exact noise scale for the event without sampling is a valid, cheaply computed upper end.
    """
    hi = 2.0
    unsampled = lambda s: without_sampling(make_event(s))  # noqa: E731
    if ExactGaussianAccountant().supports(unsampled(1.0)):
        exact = lambda s: ExactGaussianAccountant().compose(unsampled(s)).get_epsilon(delta)  # noqa: E731
        hi = 1.0
        while exact(hi) > target:
            hi *= 2
        while hi > 2 * _MIN_SCALE and exact(hi / 2) <= target:
            hi /= 2
    while eps_at(hi) > target:
        hi *= 2
        if hi > _MAX_SCALE:
            raise PrivacyParameterError(
                f"epsilon={target} at delta={delta} needs a noise scale above {_MAX_SCALE:g}: "
                "the released head would be pure noise; raise epsilon or delta"
            )
    lo = hi / 2
    while eps_at(lo) <= target:
        if lo < _MIN_SCALE:
            raise PrivacyParameterError(f"epsilon={target} at delta={delta} is reached with no noise at all")
        hi, lo = lo, lo / 2
    return lo, hi


def calibrate(
    make_event: Callable[[float], events.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: str = "pld",
) -> Calibration:
    """The smallest noise scale s (to 0.1%) for which ``make_event(s)`` is (target_epsilon, delta)-DP.

    `make_event` must give events whose ε falls as s rises and whose structure does not depend on s.
    """
    check_privacy_parameters(target_epsilon, delta, accountant)
    probe = make_event(1.0)
    make_fresh = functools.partial(_accountant_for, probe, accountant)
    eps_at = lambda s: make_fresh().compose(make_event(s)).get_epsilon(delta)  # noqa: E731
    lo, hi = _bracket(make_event, eps_at, target_epsilon, delta)
    scale = float(
        dp_accounting.calibrate_dp_mechanism(
            make_fresh,
            make_event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
            # 0.1% of the bracket's low end: far below anything that changes accuracy, and each
            # bisection step costs one accountant evaluation.
            tol=1e-3 * lo,
        )
    )
    # The root finder stops within its tolerance on either side: step up until the target holds.
    reached = eps_at(scale)
    while reached > target_epsilon:
        scale *= 1.0005
        reached = eps_at(scale)
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
