"""Oracle rows ("oracle selection (not private)"): each method's hyperparameters chosen per ε on a
held-out part of the train split.

This is how the papers report their best numbers, and it is not free: the choice depends on the private
training data, and its privacy cost is not counted here. Tables that show oracle rows say so; the
private-tuned rows beside them make the same choice privately (`featdp.selection`, Papernot & Steinke
2022) within the column's ε. Each candidate is fitted once, with a seed no evaluation fit uses.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from featdp.cache import StatisticsCache
from featdp.data import RowSource, RowSubset, example_count, views_per_example
from featdp.methods import Method, get_method, registry
from featdp.training import fit

# Tuning fits use seeds far from the evaluation seeds 0..S−1, so a candidate is never chosen for the noise
# it will be evaluated with.
TUNING_SEED = 1_000_003
# The held-out rows are a fixed, data-independent permutation: reruns tune on the same split.
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Choice:
    method: Method
    index: int  # position in the tuning grid, to rebuild the candidate for another n
    validation_accuracy: float | None  # None when the grid has a single candidate
    candidates: tuple[tuple[dict, float], ...]  # every candidate with its held-out accuracy


def split_holdout(train: RowSource, fraction: float) -> tuple[RowSubset, RowSubset]:
    """(fit part, held-out part), the held-out part `fraction` of the examples, at least one each; both in
    row order, masks over `train` (no copy of its rows). An example's views stay together."""
    views = views_per_example(train)
    n = example_count(train)
    held = min(max(1, round(fraction * n)), n - 1)
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng(SPLIT_SEED).permutation(n)[:held]] = True
    out = np.repeat(out, views)
    return RowSubset(train, ~out), RowSubset(train, out)


def choose(name: str, fit_part: RowSource, holdout: RowSource, epsilon: float, delta: float,
           accountant: str = "pld", cache: StatisticsCache | None = None) -> Choice:
    """The candidate of `name`'s tuning grid with the best held-out accuracy at (ε, δ); ties keep the
    earlier candidate, so the defaults win unless something beats them. `cache`: as `training.fit`'s
    (candidates that differ only in λ release the same noisy matrix, decomposed once)."""
    grid = registry()[name].tuning_grid(example_count(fit_part))
    if len(grid) == 1:  # nothing to choose: no held-out fit
        return Choice(get_method(name, **grid[0]), 0, None, ((grid[0], None),))
    scored = []
    for candidate in grid:
        method = get_method(name, **candidate)
        result = fit(fit_part, method, epsilon=epsilon, delta=delta, seed=TUNING_SEED, accountant=accountant,
                     cache=cache)
        accuracy = result.accuracy(holdout)
        scored.append((method, candidate, accuracy))
    best = max(range(len(scored)), key=lambda i: (scored[i][2], -i))
    return Choice(scored[best][0], best, scored[best][2], tuple((c, a) for _, c, a in scored))


def for_examples(name: str, choice: Choice, num_examples: int) -> Method:
    """The chosen candidate rebuilt for `num_examples` examples: grids may scale with n (e.g. a batch size
    that keeps the sampling rate), and the final fit uses all of the train split, not the fit part."""
    return get_method(name, **registry()[name].tuning_grid(num_examples)[choice.index])
