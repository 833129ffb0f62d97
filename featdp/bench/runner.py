"""The bench grid: every registered method × ε × seed on one feature file, plus non-private and peer rows.

Row kinds, kept apart in every table (the markdown names them by `report.KIND_LABELS`):
* ``default``        the method's data-independent defaults: the whole pipeline is private.
* ``auto``           methods with a ``recipe`` hyperparameter (dp-sgd): ``recipe=auto``, whose hyperparameters
                     `Method.for_budget` chooses inside the fit from the released count ñ and the method's ε
                     only, so nothing is selected and the whole fit is within the column's (ε, δ). Fitted
                     like the default rows (same seeds, same cache); each records the hyperparameters that ran.
* ``private-tuned``  hyperparameters chosen privately by `featdp.selection.select` (random stopping,
                     Papernot & Steinke 2022) among the method's `tuning_grid`, the whole selection within
                     the column's (ε, δ): what `featdp tune --method M --eps E` does, seeded per row. Only
                     for methods whose grid has more than one candidate (otherwise the default row is
                     already private end to end).
* ``oracle``         "oracle selection (not private)": hyperparameters chosen per ε by accuracy on a
                     held-out part of the train split (`featdp.bench.tuning`). The privacy cost of that
                     choice is NOT counted, as in the papers; the tables say so.
* ``non-private``    ridge and logistic regression on the same features: the price of privacy.
* ``peer``           other libraries on the same preprocessed features (`featdp.bench.peers`).

Exact pre-noise statistics (the Gram matrix, per-row scales) are computed once per rows and preprocessing
and reused by later fits through one `featdp.cache.StatisticsCache`; every fit still calibrates and draws
its own noise. Fit times are therefore the method's cost given those statistics; the one-time pass is
reported separately.

Memory: each split is held once, read-only, while the float32 rows held fit the in-memory budget
(`load_splits`), and streamed from the feature file on every pass otherwise; the hold-out and selection
parts are masks over the train split (`featdp.data.RowSubset`), never copies. Peers, which need arrays,
add a preprocessed copy of both splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import warnings
from typing import Callable, Iterable

from featdp import progress, selection, stats
from featdp.accounting import DeltaWarning, PrivacyParameterError, PrivacyTarget
from featdp.bench import tuning
from featdp.cache import StatisticsCache
from featdp.data import (
    IN_MEMORY_BUDGET_BYTES, ArraySource, Preprocessing, RowSource, TrainingData, example_count, views_per_example,
)
from featdp.methods import get_method, registry
from featdp.training import fit


class BenchError(ValueError):
    """Bad bench arguments: ε ≤ 0, no seeds, an unknown method or peer, a mean number of runs < 1."""


# The probe size at which a grid's candidates are counted (as `featdp tune` checks its arguments): no
# registered method's grid size depends on n, and a fixed size keeps R a public constant.
_GRID_PROBE_SIZE = 1000.0


def grid_size(name: str) -> int:
    """The number of distinct candidates in `name`'s tuning grid (public: fixed before any data is read)."""
    return len(selection.build_candidates([name], None, _GRID_PROBE_SIZE))


def mean_runs_for(name: str, config: "BenchConfig") -> float:
    """R for `name`'s private-tuned rows: `config.mean_runs`, or by default the grid's size.

    Why the grid's size: every candidate is then drawn once on average, while random stopping's ε grows
    only like log R (Papernot & Steinke, Theorem 2). Doubling R is not free either: at δ = 1e-5 it
    raises the noise of every run by 12–15% (σ_run at ε = 1 / 3 / 8: ≈ 7.03 / 2.38 / 0.87 for
    R = 3 against 8.00 / 2.71 / 1.00 for R = 6; R = 4 → 8 likewise 12%), doubles the expected running
    time, and with K geometric only lowers the chance that a given candidate is never drawn from
    (m−1)/(2m−1) to (m−1)/(3m−1) (m = 3: 40% → 25%; m = 4: 43% → 27%). R = m is the cheaper end of that
    trade; `--mean-runs` sets another R.
    """
    return float(config.mean_runs) if config.mean_runs is not None else float(grid_size(name))


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    epsilons: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 8.0)
    delta: float = 1e-5
    seeds: int = 5
    methods: tuple[str, ...] | None = None  # None: every registered method
    references: bool = True  # the non-private rows (ridge, logreg) also when `methods` names only others
    tune: bool = True  # oracle rows: selection on held-out train rows, not private
    private_tune: bool = True  # private-tuned rows: `featdp.selection.select` within the same (ε, δ)
    auto: bool = True  # auto rows: recipe=auto for the methods that have it (`has_auto_recipe`)
    mean_runs: float | None = None  # R of the private selection; None: each method's grid size (`mean_runs_for`)
    holdout_fraction: float = 0.1
    peers: tuple[str, ...] = ()
    peer_epsilons: tuple[float, ...] | None = None  # None: the same ε as the methods
    peer_seeds: int | None = None  # None: the same number of seeds as the methods
    accountant: str = "pld"

    def __post_init__(self):
        for epsilons in (self.epsilons, self.peer_epsilons or (1.0,)):
            if not epsilons:
                raise BenchError("at least one ε is needed")
            for epsilon in epsilons:
                PrivacyTarget(epsilon, self.delta, self.accountant)  # the one place (ε, δ) rules live
        if self.seeds < 1 or (self.peer_seeds is not None and self.peer_seeds < 1):
            raise BenchError(f"seeds must be ≥ 1, got {self.seeds} (peers: {self.peer_seeds})")
        if not 0 < self.holdout_fraction < 1:
            raise BenchError(f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        if self.mean_runs is not None and (
            isinstance(self.mean_runs, bool) or not isinstance(self.mean_runs, (int, float))
            or not (math.isfinite(self.mean_runs) and self.mean_runs >= 1)
        ):
            raise BenchError(f"the mean number of runs must be a finite number >= 1, got {self.mean_runs!r}")
        known = registry()
        unknown = [m for m in (self.methods or ()) if m not in known]
        if unknown:
            raise BenchError(f"unknown method {unknown[0]!r}; registered: {', '.join(sorted(known))}")
        if self.peers:
            from featdp.bench.peers import PEERS

            unknown = [p for p in self.peers if p not in PEERS]
            if unknown:
                raise BenchError(f"unknown peer {unknown[0]!r}; known: {', '.join(PEERS)}")


@dataclasses.dataclass
class BenchRow:
    """One fit: what ran, on which budget, and how it did on the test split."""

    kind: str  # default | auto | private-tuned | oracle | non-private | peer
    method: str
    epsilon: float | None  # the target: for private-tuned rows the total ε of the whole selection
    delta: float | None
    seed: int
    accuracy: float
    fit_seconds: float  # private-tuned rows: the whole selection, every run included
    hyperparameters: dict  # what differs from the defaults; auto rows: every one, as resolved for the budget
    noise_scale: float | None = None
    # oracle rows: the held-out accuracy that chose them; private-tuned rows: the chosen run's released
    # noisy validation accuracy (what `featdp tune` reports)
    validation_accuracy: float | None = None
    epsilon_spent: float | None = None  # private rows: the ε the privacy report states (≤ epsilon)
    delta_spent: float | None = None
    mean_runs: float | None = None  # private-tuned rows: R, public. K, the number of runs drawn, is not
    # recorded anywhere: the guarantee covers the best run alone, and K with it would void the bound.


@dataclasses.dataclass
class BenchResult:
    config: BenchConfig
    rows: list[BenchRow]
    num_train: int
    num_test: int
    feature_dim: int
    num_classes: int
    statistics_seconds: float  # the one-time exact Gram pass shared by the second-moment methods
    total_seconds: float
    skipped: dict[str, str]  # peer, or "method private-tuned at ε = e" -> why it did not run
    train_views: int = 1  # views per training example (augmentation multiplicity); num_train counts examples


def load_splits(path, train_split: str = "train", test_split: str = "test",
                budget_bytes: int = IN_MEMORY_BUDGET_BYTES) -> tuple[RowSource, RowSource]:
    """The bench's (train, test) splits of a feature file. Each is held in memory, read-only, while the
    float32 rows held fit `budget_bytes` (train first: every fit reads it), and is otherwise the file's split,
    streamed on every pass; the file then stays open while that split is referenced."""
    from featdp.featurefile import FeatureFile

    features = FeatureFile(path)
    held, sources = 0, []
    try:
        for name in (train_split, test_split):
            split = features.split(name)
            if held + split.nbytes_float32() > budget_bytes:
                sources.append(split)
                continue
            x, y = split.read()
            x.flags.writeable = y.flags.writeable = False  # the cache's statistics of them stay true
            sources.append(ArraySource(x, y, split.num_classes, views_per_example(split)))
            held += split.nbytes_float32()
    finally:
        if all(isinstance(source, ArraySource) for source in sources) or len(sources) < 2:
            features.close()
    return sources[0], sources[1]


def run_bench(
    train: RowSource,
    test: RowSource,
    config: BenchConfig,
    on_row: Callable[[BenchRow], None] | None = None,
    cache: StatisticsCache | None = None,
) -> BenchResult:
    """Every row of `config` on (train, test). The rows of both must not change while it runs: exact
    statistics of them are computed once and kept in `cache` (None: a new cache for this run)."""
    started = time.perf_counter()
    cache = cache if cache is not None else StatisticsCache()
    private, public = _method_names(config)
    rows: list[BenchRow] = []
    planned = planned_rows(config)

    def emit(row: BenchRow) -> None:
        rows.append(row)
        progress.report("bench rows", len(rows), planned)
        if on_row:
            on_row(row)

    progress.report("bench rows", 0, planned)

    statistics_seconds = _precompute_statistics(train, cache)
    with warnings.catch_warnings():
        # The bench's δ is the user's choice, stated in every table; one warning per fit is noise.
        warnings.simplefilter("ignore", DeltaWarning)
        for name in public:
            result = fit(train, name, cache=cache)
            emit(BenchRow("non-private", name, None, None, 0, _accuracy(result, test), result.fit_seconds,
                          result.method.hyperparameters()))
        if config.tune:
            fit_part, holdout = tuning.split_holdout(train, config.holdout_fraction)
        # One (method, ε) at a time, defaults (then recipe=auto) then tuning then oracle: candidates that differ
        # only in λ or in later steps, and oracle fits with the default fits' seeds, release bit-identical noisy
        # Gram matrices, whose decompositions are then still in the cache. No later fit meets them: they are
        # dropped after each (method, ε).
        for name in private:
            for epsilon in config.epsilons:
                for seed in range(config.seeds):
                    emit(_private_row("default", train, test, get_method(name), epsilon, config, seed, cache))
                if config.auto and has_auto_recipe(name):
                    for seed in range(config.seeds):
                        emit(_private_row("auto", train, test, get_method(name, recipe="auto"), epsilon, config,
                                          seed, cache))
                if config.tune:
                    choice = tuning.choose(name, fit_part, holdout, epsilon, config.delta, config.accountant,
                                           cache)
                    choice = dataclasses.replace(choice, method=tuning.for_examples(name, choice, example_count(train)))
                    for seed in range(config.seeds):
                        row = _tuned_row(choice, rows, train, test, epsilon, config, seed, cache)
                        row.validation_accuracy = choice.validation_accuracy
                        emit(row)
                cache.drop_decompositions()
        skipped: dict[str, str] = {}
        if config.private_tune:
            for name in private:
                if grid_size(name) < 2:
                    continue  # one candidate: nothing to select; the default row is private end to end
                for epsilon in config.epsilons:
                    for seed in range(config.seeds):
                        try:
                            emit(_private_tuned_row(name, train, test, epsilon, config, seed, cache))
                        except (PrivacyParameterError, selection.SelectionError) as error:
                            skipped[f"{name} private-tuned at ε = {epsilon:g}"] = str(error)
                            break
        skipped.update(_run_peers(train, test, config, emit))
    progress.report("bench rows", len(rows), len(rows))  # done, also when skipped rows left it short of `planned`
    return BenchResult(config, rows, example_count(train), example_count(test), train.feature_dim,
                       train.num_classes, statistics_seconds, time.perf_counter() - started, skipped,
                       views_per_example(train))


def _method_names(config: BenchConfig) -> tuple[list[str], list[str]]:
    """(private, non-private) methods to run: `config.methods` (all by default), plus every non-private
    reference unless `config.references` is off (then only those `config.methods` names)."""
    known = registry()
    names = config.methods or tuple(sorted(known))
    private = [n for n in names if known[n].private]
    named = set(config.methods or ())
    public = [n for n in sorted(known) if not known[n].private and (config.references or n in named)]
    return private, public


def has_auto_recipe(name: str) -> bool:
    """Whether `name` gets auto rows: its class has a dataclass field `recipe` (taking "auto", as dp-sgd's)."""
    return any(field.name == "recipe" for field in dataclasses.fields(registry()[name]))


def planned_rows(config: BenchConfig) -> int:
    """The rows `run_bench` makes when none is skipped (a peer that cannot run here, or a private-tuned ε too
    small for a selection): the total its progress counts towards."""
    private, public = _method_names(config)
    per_method = len(config.epsilons) * config.seeds
    rows = len(public) + len(private) * per_method * (2 if config.tune else 1)
    if config.auto:
        rows += per_method * sum(has_auto_recipe(name) for name in private)
    if config.private_tune:
        rows += per_method * sum(grid_size(name) >= 2 for name in private)
    if config.peers:
        from featdp.bench import peers

        runs = len(config.peer_epsilons or config.epsilons) * (config.peer_seeds or config.seeds)
        rows += sum(runs if peers.is_private(name) else 1 for name in config.peers)
    return rows


def _precompute_statistics(train: RowSource, cache: StatisticsCache) -> float:
    start = time.perf_counter()
    stats.second_moments(TrainingData(train, Preprocessing(), cache=cache))
    return time.perf_counter() - start


def _private_row(kind, train, test, method, epsilon, config: BenchConfig, seed: int, cache) -> BenchRow:
    result = fit(train, method, epsilon=epsilon, delta=config.delta, seed=seed, accountant=config.accountant,
                 cache=cache)
    # An auto row's method is resolved inside the fit: record all of what ran (recipe "manual", the steps, …),
    # as a diff against the defaults would hide that the recipe was resolved.
    hyperparameters = (result.method.hyperparameters() if kind == "auto"
                       else result.method.changed_hyperparameters())
    return BenchRow(kind, method.name, epsilon, config.delta, seed, _accuracy(result, test), result.fit_seconds,
                    hyperparameters, result.calibration.noise_scale,
                    epsilon_spent=result.privacy.epsilon, delta_spent=result.privacy.delta)


def _tuned_row(choice, rows, train, test, epsilon, config, seed, cache) -> BenchRow:
    """When tuning keeps the defaults, the seeded fit is the default row's fit: reuse it, do not redo it."""
    if choice.method == type(choice.method)():
        for row in rows:
            if (row.kind, row.method, row.epsilon, row.seed) == ("default", choice.method.name, epsilon, seed):
                return dataclasses.replace(row, kind="oracle")
    return _private_row("oracle", train, test, choice.method, epsilon, config, seed, cache)


def private_tuning_seed(method: str, epsilon: float, seed: int) -> int:
    """The seed of one private-tuned row: a fixed function of (method, ε, seed), so reruns reproduce every
    draw (K, the candidates, the noise), and rows draw independently of each other and of the default
    fits (which use the seed itself)."""
    text = f"featdp bench private-tuned v1|{method}|{float(epsilon)!r}|{int(seed)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def _private_tuned_row(name, train, test, epsilon, config: BenchConfig, seed: int, cache) -> BenchRow:
    """`featdp tune --method name --eps epsilon --delta δ --mean-runs R`, seeded: the head comes from the
    fit part (90%) of the train split, chosen among `name`'s tuning grid by noisy validation accuracy."""
    mean_runs = mean_runs_for(name, config)
    result = selection.select(train, [name], epsilon=epsilon, delta=config.delta, mean_runs=mean_runs,
                              seed=private_tuning_seed(name, epsilon, seed), cache=cache)
    accuracy = result.accuracy(test)
    return BenchRow(
        "private-tuned", name, epsilon, config.delta, seed, accuracy, result.seconds,
        result.method.changed_hyperparameters(), result.best.noise_scale,
        validation_accuracy=result.best.noisy_accuracy(result.public_validation_size),
        epsilon_spent=result.privacy.epsilon, delta_spent=result.privacy.delta, mean_runs=mean_runs,
    )


def _accuracy(result, test: RowSource) -> float:
    return result.accuracy(test)


def _run_peers(train, test, config: BenchConfig, emit) -> dict[str, str]:
    if not config.peers:
        return {}
    from featdp.bench import peers

    if not (isinstance(train, ArraySource) and isinstance(test, ArraySource)):
        reason = "the splits are streamed (larger than the in-memory budget); peers need them in memory"
        return {name: reason for name in config.peers}
    # Peers get exactly the rows featdp's default methods train on: unit norm ≤ 1. They count rows as
    # examples, so with several views per example they get each example's first view only (their ε would
    # otherwise be per view, not per example).
    preprocess = Preprocessing()
    train_views, test_views = views_per_example(train), views_per_example(test)
    train_x, train_y = preprocess(train.features[::train_views]), train.labels[::train_views]
    test_x, test_y = preprocess(test.features[::test_views]), test.labels[::test_views]
    skipped = {}
    for name in config.peers:
        reason = peers.peer_available(name)
        if reason is not None:
            skipped[name] = reason
            continue
        budgets: Iterable = (config.peer_epsilons or config.epsilons) if peers.is_private(name) else (None,)
        for epsilon in budgets:
            for seed in range(config.peer_seeds or config.seeds if epsilon is not None else 1):
                result = peers.run_peer(name, train_x, train_y, test_x, test_y, train.num_classes,
                                        epsilon, config.delta if epsilon is not None else None, seed)
                emit(BenchRow("peer", name, result.epsilon, result.delta, seed, result.accuracy, result.seconds,
                              dict(result.settings)))
    return skipped
