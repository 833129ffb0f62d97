"""Options of the gradient methods' trajectories (DP-SGD, DP-FC): learning-rate schedules and averages of
the heads W_1 … W_T.

An average is post-processing: a function of the heads, which are functions of the released noisy
gradients and public hyperparameters. A schedule changes the heads at which later gradients are taken, as
lr does; each step's release keeps its sensitivity (the clip bound) and its noise, and adaptive composition
covers a step chosen from earlier releases. A method's `dp_event` therefore depends on neither.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optax

AVERAGES = ("none", "ema", "tail")
SCHEDULES = ("constant", "cosine", "linear")

DESCRIPTIONS = {
    "schedule": "learning rate over the steps: constant, cosine (to 0 after the last step) or linear (likewise)",
    "average": "head returned: none (the last), ema (exponential moving average of the heads) or tail "
               "(uniform mean of the last tail_fraction of them)",
    "ema_decay": "decay β of average=ema, in [0, 1): W̄ ∝ Σ_t β^(T−1−t) W_t (0: the last head)",
    "tail_fraction": "share of the steps whose heads average=tail averages, in (0, 1]",
}


def validate(method) -> None:
    """Raises ValueError naming the first trajectory hyperparameter of `method` out of its range."""
    if method.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {method.schedule!r}")
    if method.average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {method.average!r}")
    if not 0 <= method.ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {method.ema_decay}")
    if not 0 < method.tail_fraction <= 1:
        raise ValueError(f"tail_fraction must lie in (0, 1], got {method.tail_fraction}")


def learning_rate(lr: float, schedule: str, steps: int) -> float | optax.Schedule:
    """The rate of step t = 0 … steps−1: lr throughout (constant), lr·(1 + cos(πt/steps))/2 (cosine) or
    lr·(1 − t/steps) (linear). Both decays reach 0 one step after the last, so the last step still moves."""
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps)
    if schedule == "linear":
        return optax.linear_schedule(lr, 0.0, steps)
    return lr


@dataclasses.dataclass(frozen=True)
class IterateAverage:
    """W̄ = Σ_{t ≥ first} decay^(T−1−t) W_t / Σ_{t ≥ first} decay^(T−1−t) over the heads W_t after steps
    t = 0 … T−1 (0⁰ = 1: at decay 0 the last head has weight 1 and every other 0).

    One rule covers the three kinds: the last head is decay 0; the EMA is decay β from the first step,
    debiased (normalized by the weights' sum, so W₀ = 0 pulls nothing toward zero); the tail mean is decay 1
    from step `first`. State is explicit, as in optax: (Σ weighted heads, Σ weights)."""

    decay: float
    first: int

    @classmethod
    def of(cls, method, steps: int) -> "IterateAverage":
        if method.average == "ema":
            return cls(method.ema_decay, 0)
        if method.average == "tail":
            return cls(1.0, steps - max(1, math.ceil(method.tail_fraction * steps)))
        return cls(0.0, steps - 1)  # the last head: earlier steps need no bookkeeping at all

    def init(self, weights: np.ndarray) -> tuple[np.ndarray, float]:
        return np.zeros(np.shape(weights), np.float64), 0.0

    def update(self, state: tuple[np.ndarray, float], weights, step: int) -> tuple[np.ndarray, float]:
        total, norm = state
        if step < self.first:
            return state
        # decay 0 must give exactly the last head: 0·total is 0 for every finite total.
        return self.decay * total + np.asarray(weights, np.float64), self.decay * norm + 1.0

    def value(self, state: tuple[np.ndarray, float]) -> np.ndarray:
        total, norm = state
        return total / norm
