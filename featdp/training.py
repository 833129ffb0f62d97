"""Fit a head: release the example count, calibrate the method's noise to what remains of (ε, δ), run it
with fresh OS randomness, and account for the run as it was sampled.

Privacy model, as implemented (README: "Privacy as implemented"): neighbours differ by adding or removing one example, so the
true n is private. A fit therefore first releases a noisy count ñ (Δ = 1, `COUNT_SHARE` of ε, and of δ
when δ is given), and everything that needs n — the Poisson rate q = B/ñ, mean gradients, ridge floors,
the default δ — uses ñ. The count and the method compose by basic composition (ε_c + ε_m, δ_c + δ_m),
which holds although the method's event may depend on ñ. A share `SAMPLER_RESERVE` of both is kept back
for the sampler's slack (`mechanism.sampling_slack`), which is added to what the report states.
With `center` > 0 the method's share also pays for a released mean of the train rows, composed into the
method's event (featdp/centering.py).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from dp_accounting import dp_event as events

from featdp import accounting, centering, distributed, progress
from featdp.cache import StatisticsCache
from featdp.accounting import DeltaWarning, PrivacyTarget, default_delta
from featdp.backend import resolve as resolve_backend
from featdp.data import (
    DEFAULT_BLOCK_ROWS, IN_MEMORY_BUDGET_BYTES, PIECE_BYTES, ArraySource, DataError, RowSource, TrainingData, aligned_block_rows,
    example_count, maybe_in_memory, views_per_example,
)
from featdp.featurefile import check_allocation
from featdp.mechanism import Release, Releaser, ReleaserInterface, sampling_slack
from featdp.methods import Method, get_method

__all__ = ["CountRelease", "DeltaWarning", "FitResult", "LinearHead", "PrivacySpent", "default_delta", "fit", "fit_arrays",
           "release_count"]

COUNT_SHARE = 0.01  # of ε (and of δ when the user gives δ) spent on the released count ñ
COUNT_DELTA_WHEN_DEFAULT = 1e-12  # δ of the count when δ is left to its default (which needs ñ first)
UPPER_BOUND_STDS = 6.0
SAMPLER_RESERVE = 1e-4  # of the method's ε and δ kept back for the sampler's slack


@dataclasses.dataclass(frozen=True)
class CountRelease:
    """The released example count ñ and what it cost."""

    value: int  # ñ = max(1, round(n + noise))
    epsilon: float
    delta: float
    noise_multiplier: float
    noise_std: float = 0.0  # of ñ (σ·Δ' with Δ' ≈ 1)

    @property
    def upper_bound(self) -> float:
        """ñ + 6·std: at least n except with probability 1e-9. The default δ and the δ ≥ 1/n warning use it,
        so that a count that came out low never yields a larger δ (at n = 200 and ε = 1 the count's std is
        in the hundreds)."""
        return self.value + UPPER_BOUND_STDS * self.noise_std


@dataclasses.dataclass(frozen=True)
class PrivacySpent:
    """What a fit's report states: the accountant's figures plus the sampler's slack."""

    epsilon: float
    delta: float
    accountant_epsilon: float  # count + method, by basic composition, for the ideal mechanism
    accountant_delta: float
    coordinates: int  # noisy coordinates drawn in all


class LinearHead:
    """Prediction with a fitted head: argmax_c (Wᵀ P(x))_c, P the method's preprocessing, or
    argmax_c (Wᵀ P(P(x) − μ̃))_c when the rows were centred on a released mean μ̃ (`center`,
    featdp/centering.py). Needs `method` and `weights` (d, K)."""

    method: Method
    weights: np.ndarray
    center: np.ndarray | None = None

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        return centering.head_rows(self.method.preprocessing(), features, self.center) @ self.weights

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.decision_function(features), axis=1)

    def accuracy(self, source: RowSource) -> float:
        # A piece of rows at a time: the preprocessed copy of a whole block would be as large as a pass's.
        rows = max(1, PIECE_BYTES // (4 * max(source.feature_dim, 1)))
        correct = 0
        for x, y in source.blocks():
            for start in range(0, len(y), rows):
                correct += int(np.sum(self.predict(x[start : start + rows]) == y[start : start + rows]))
        return correct / max(source.num_examples, 1)


@dataclasses.dataclass
class FitResult(LinearHead):
    method: Method
    weights: np.ndarray  # (d, K); predict argmax_c (Wᵀ preprocess(x))_c
    num_examples: int  # the true n (examples, not views): for the caller's own use, never written to a report
    releases: list[Release]
    calibration: accounting.Calibration | None  # the method's noise; None for non-private methods
    seeded: bool
    fit_seconds: float
    count: CountRelease | None = None
    privacy: PrivacySpent | None = None
    target: PrivacyTarget | None = None  # with δ resolved
    views_per_example: int = 1  # rows per example of the train split (augmentation multiplicity)
    # When `Method.for_budget` chose hyperparameters: what was asked for and the public budget it saw.
    budget_choice: dict | None = None
    center: np.ndarray | None = None  # μ̃ (d,) the rows were centred on (method.center > 0), else None
    center_noise_multiplier: float | None = None  # σ_c of the mean's release (None: exact or no mean)


def release_count(num_examples: int, releaser: ReleaserInterface, epsilon: float, delta: float) -> CountRelease:
    """ñ = max(1, round(n + Gaussian noise)) at (ε, δ) with Δ = 1: adding or removing one example moves n by 1."""
    sigma = accounting.calibrate(lambda s: events.GaussianDpEvent(s), epsilon, delta).noise_scale
    noisy = releaser.release("num_examples", np.array([float(num_examples)]), sensitivity=1.0, noise_multiplier=sigma)
    std = releaser.releases[-1].noise_std if releaser.releases else sigma
    return CountRelease(max(1, int(round(float(noisy[0])))), float(epsilon), float(delta), float(sigma), float(std))


def fit(
    train: RowSource,
    method: str | Method = "dp-fc",
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    seed: int | None = None,
    accountant: str = "pld",
    hyperparameters: dict | None = None,
    releaser: ReleaserInterface | None = None,
    device: str = "auto",
    cache: StatisticsCache | None = None,
    processes: distributed.LocalGroup | distributed.ProcessGroup | None = None,
    block_rows: int | None = None,
    memory_budget_bytes: int = IN_MEMORY_BUDGET_BYTES,
) -> FitResult:
    """Trains `method` on `train` with (ε, δ)-DP; noise comes from the OS unless `seed` is given.

    `releaser` replaces the one built from the seed (an audit's recorder, say). `device` chooses where the
    passes over the data run (`featdp.backend.DEVICES`: "auto" is an accelerator if JAX has one, else
    numpy on the CPU); noise is always drawn on the host.

    `train` is held in memory when its float32 rows fit `memory_budget_bytes` and streamed otherwise. With
    several views per example (`featdp.data`: augmentation multiplicity) n counts examples, and every
    statistic counts an example as the average of its views, at the one-view sensitivity.
    With `cache` (`featdp.cache.StatisticsCache`) the fit reuses exact pre-noise statistics of `train`
    computed by earlier fits sharing it, and uses `train` where it is (its holder chose); the result is
    the same, bit for bit, and the noise is still this fit's own.

    `processes` (`featdp.distributed`): `train` is this process's share of the rows, starting at global
    row `train.first_row`, a multiple of `block_rows` (`featdp.data.DEFAULT_BLOCK_ROWS` by default); every
    statistic, the count ñ included, is summed over the processes before its single noisy release
    (`distributed.SummingReleaser`), so every process gets the same head, and the same head as one process
    with the same seed (up to float64 summation order: `featdp.distributed`)."""
    if isinstance(method, str):
        method = get_method(method, **(hyperparameters or {}))
    elif hyperparameters:
        method = dataclasses.replace(method, **hyperparameters)
    group = processes if processes is not None else distributed.LOCAL
    if group.count > 1 and not method.private:
        raise distributed.DistributedError(
            f"method {method.name!r} is a non-private reference, which runs on one process only; drop "
            "--num-processes (or pass --num-processes 1)"
        )
    # Row blocks: the caller's, or TrainingData's own default; several processes need the size they align to
    # (whole examples: a block never splits an example's views).
    views = views_per_example(train)
    blocks = {} if block_rows is None and group.count == 1 else {
        "block_rows": aligned_block_rows(block_rows or DEFAULT_BLOCK_ROWS, views)}
    local_n = example_count(train)  # examples, not rows: one example is what a neighbour adds or removes
    n = group.total(local_n)
    if n == 0:
        raise DataError("the training split is empty: there is nothing to fit")
    check_allocation(working_memory_bytes(method, train.feature_dim, train.num_classes),
                     f"method {method.name!r} at d = {train.feature_dim}, K = {train.num_classes}")
    backend = resolve_backend(device)
    key = group.shared_key(seed)
    releaser = releaser if releaser is not None else Releaser(key)
    releaser = group.releaser(releaser, getattr(train, "first_row", 0), blocks.get("block_rows", DEFAULT_BLOCK_ROWS))
    # Progress over the fit's phases (read, [count, calibrate,] train); the method reports its own loops.
    task, phases = f"fit {method.name}", 4 if method.private else 2
    progress.report(task, 0, phases, "reading the train split")
    source = train if cache is not None else maybe_in_memory(train, memory_budget_bytes)
    if not method.private:
        progress.report(task, 1, phases, "training")
        start = time.perf_counter()
        mean = None
        if method.center:  # a reference centres on the exact mean
            (source, mean), cache = centering.centre_rows(source, method.preprocessing(), releaser, None, n,
                                                          **blocks), None
        data = TrainingData(source, method.preprocessing(), public_num_examples=n, device=backend, cache=cache,
                            **blocks)
        weights = method.fit(data, 0.0, releaser)
        progress.report(task, phases, phases)
        result = _result(method, weights, n, releaser, None, key.seeded, time.perf_counter() - start)
        return dataclasses.replace(result, center=mean)
    if epsilon is None:
        raise accounting.PrivacyParameterError(f"method {method.name!r} is private: epsilon is required")
    target = PrivacyTarget(epsilon, delta, accountant)
    count_delta = COUNT_SHARE * target.delta if target.delta is not None else COUNT_DELTA_WHEN_DEFAULT
    progress.report(task, 1, phases, "releasing the example count")
    count = release_count(local_n, releaser, COUNT_SHARE * target.epsilon, count_delta)  # summed: n
    target = target.with_default_delta(count.upper_bound)
    if target.delta <= 2 * count.delta:
        raise accounting.PrivacyParameterError(
            f"delta={target.delta:g} is too small to leave room for the released count's {count.delta:g}"
        )
    method_epsilon = (target.epsilon - count.epsilon) * (1 - SAMPLER_RESERVE)
    method_delta = (target.delta - count.delta) * (1 - SAMPLER_RESERVE)
    # Hyperparameters chosen from the budget see only public values: ñ, the method's ε and d.
    requested, method = method, method.for_budget(count.value, method_epsilon, train.feature_dim)
    budget_choice = None if method == requested else {
        "requested": requested.changed_hyperparameters(), "released_count": count.value,
        "method_epsilon": method_epsilon, "feature_dim": train.feature_dim}
    progress.report(task, 2, phases, "calibrating the noise")
    # Centring (featdp/centering.py): the mean's noise is fixed from the budget first; the method's scale is
    # then calibrated with the mean's Gaussian composed into its event.
    center_sigma = (centering.center_noise_multiplier(method.center, method_epsilon, method_delta, accountant)
                    if method.center else None)
    calibration = accounting.calibrate(
        lambda scale: centering.with_mean(method.dp_event(scale, count.value), center_sigma), method_epsilon,
        method_delta, accountant,
    )
    progress.report(task, 3, phases, "training")
    start = time.perf_counter()
    mean = None
    if center_sigma is not None:  # the centred rows are this fit's own: nothing about them is shared
        (source, mean), cache = centering.centre_rows(source, method.preprocessing(), releaser, center_sigma,
                                                      count.value, **blocks), None
    data = TrainingData(source, method.preprocessing(), public_num_examples=count.value, device=backend,
                        cache=cache, **blocks)
    weights = method.fit(data, calibration.noise_scale, releaser)
    elapsed = time.perf_counter() - start
    progress.report(task, phases, phases)
    ideal_epsilon, ideal_delta = count.epsilon + calibration.epsilon, count.delta + method_delta
    spent_epsilon, spent_delta = sampling_slack(releaser.releases, ideal_epsilon, ideal_delta)
    if spent_delta > target.delta or spent_epsilon > target.epsilon:
        # The sampler's slack grows as e^ε: at a large ε its δ term outgrows the reserve. Nothing is returned.
        raise accounting.PrivacyParameterError(
            f"at epsilon={target.epsilon:g} the noise sampler's slack brings the guarantee to (ε, δ) = "
            f"({spent_epsilon:.6g}, {spent_delta:.3g}), beyond the target delta={target.delta:g}; use a smaller "
            "epsilon (the sampler's bound grows as e^ε)"
        )
    privacy = PrivacySpent(spent_epsilon, spent_delta, ideal_epsilon, ideal_delta,
                           sum(r.coordinates for r in releaser.releases))
    result = _result(method, weights, n, releaser, calibration, key.seeded, elapsed)
    return dataclasses.replace(result, count=count, privacy=privacy, target=target, views_per_example=views,
                               budget_choice=budget_choice, center=mean, center_noise_multiplier=center_sigma)


def working_memory_bytes(method: Method, dim: int, num_classes: int) -> int:
    """What a fit holds at once, beyond the data: a method may say (`working_memory_bytes(d, K)`); the
    default covers a d×d statistic, its noisy copy and a decomposition (float64), and a few d×K arrays."""
    own = getattr(method, "working_memory_bytes", None)
    if own is not None:
        return int(own(dim, num_classes))
    return 8 * (4 * dim * dim + 6 * dim * num_classes)


def _result(method, weights, n, releaser, calibration, seeded, elapsed) -> FitResult:
    if not np.all(np.isfinite(weights)):
        raise FloatingPointError(f"method {method.name!r} produced a non-finite head")
    return FitResult(method, np.asarray(weights, np.float32), n, list(releaser.releases), calibration, seeded,
                     elapsed)


def fit_arrays(features, labels, method="dp-fc", *, num_classes=None, **kwargs) -> FitResult:
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return fit(ArraySource(features, labels, num_classes), method, **kwargs)
