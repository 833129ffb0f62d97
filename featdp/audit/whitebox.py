"""The white-box audit: over many fits, the noise each release actually carries against what it declares.

For every release the noise is released − clean (read through a `Recorder`), divided by its declared
std σ·Δ. Checks, each a p-value, all Bonferroni-corrected together at `significance`:
* scale     per release name, the standardized noise is N(0, 1) (Kolmogorov–Smirnov);
* tails     over all releases, the counts of |noise| beyond 2.5σ, 3σ and 4σ are the Gaussian's (binomial test):
            a sampler that cuts or thins its tails fails (a cut at 5.2σ is invisible at this sample size;
            `benchmarks/sampler_tails.py` counts 10⁹ draws for that);
* classes   per release with a class axis, the noise of any two classes is uncorrelated;
* steps     per release name made more than once in a fit, the noise of any two steps is uncorrelated;
* fits      the noise of consecutive fits is uncorrelated (no key reused across fits);
* ledger    the releases a fit actually made, composed as independent Gaussians (Poisson-sampled where
            declared), give at most the claimed ε: nothing released was left out of the accounting.
A correlation r of N independent pairs is ≈ N(0, 1/N); a pair of classes, steps or fits drawing the same
noise gives r = 1.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import numpy as np
import scipy.stats

from featdp import accounting, progress
from featdp.audit.canary import check_audit_arguments
from featdp.audit.design import AuditData, at_budget, claimed_noise_scale
from featdp.audit.recording import Recorder, independent_entries
from featdp.mechanism import Release, Releaser, ReleaserInterface, RootKey, make_key
from featdp.methods import Method

# ε of the ledger may exceed the calibrated claim by the accountants' own rounding, no more.
LEDGER_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class Check:
    kind: str  # scale, tails, classes, steps, fits, ledger
    release: str  # the release name, or "" for checks over the whole fit
    p_value: float
    detail: str
    passed: bool = True


@dataclasses.dataclass(frozen=True)
class WhiteBoxResult:
    method: str
    claimed_epsilon: float
    delta: float
    trials: int
    significance: float
    checks: list[Check]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


def white_box_audit(
    method: Method,
    epsilon: float,
    delta: float = 1e-5,
    *,
    trials: int = 200,
    seed: int | None = None,
    significance: float = 1e-3,
    releaser: Callable[[RootKey], ReleaserInterface] = Releaser,
    data: AuditData = AuditData(),
    accountant: str = "pld",
) -> WhiteBoxResult:
    """Runs `trials` fits at the claimed (ε, δ) and checks every release's noise (module docstring)."""
    check_audit_arguments(epsilon, delta, trials, accountant)
    method = at_budget(method, epsilon, data, 1)
    if not 0 < significance < 1:
        raise accounting.PrivacyParameterError(f"significance must lie in (0, 1), got {significance!r}")
    start = time.perf_counter()
    train = data.training_data(method, np.arange(1), np.array([True]))
    scale = claimed_noise_scale(method, epsilon, delta, train.public_size, accountant)
    root = make_key(seed)
    records: list[Release] | None = None
    noise: list[list[np.ndarray]] = []  # [release][trial]: standardized noise, full shape
    for trial in progress.track(range(trials), "audit fits", trials):
        recorder = Recorder(releaser(root.child("trial", trial)))
        method.fit(train, scale, recorder)
        layout = [(r.name, r.shape, r.symmetric) for r in recorder.releases]
        if records is None:
            records = list(recorder.releases)
            noise = [[] for _ in records]
        elif layout != [(r.name, r.shape, r.symmetric) for r in records]:
            raise RuntimeError(f"fit {trial} made different releases from fit 0: {layout}")
        for j, (record, clean, out) in enumerate(zip(records, recorder.clean, recorder.released, strict=True)):
            noise[j].append((out - clean) / record.noise_std)
    checks = (
        _scale_checks(records, noise)
        + _tail_checks(records, noise)
        + _class_checks(records, noise, data.num_classes)
        + _step_checks(records, noise)
        + _fit_checks(records, noise)
    )
    threshold = significance / (len(checks) + 1)
    checks = [dataclasses.replace(c, passed=c.p_value >= threshold) for c in checks]
    checks.append(_ledger_check(records, epsilon, delta, accountant))
    return WhiteBoxResult(method.name, float(epsilon), float(delta), trials, significance, checks,
                          time.perf_counter() - start)


def _by_name(records: list[Release]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for j, record in enumerate(records):
        groups[record.name].append(j)
    return groups


def _flat(record: Release, draws: list[np.ndarray]) -> np.ndarray:
    """(trials, independent entries) of one release."""
    return np.stack([independent_entries(record, d).ravel() for d in draws])


def _scale_checks(records, noise) -> list[Check]:
    checks = []
    for name, indices in _by_name(records).items():
        sample = np.concatenate([_flat(records[j], noise[j]).ravel() for j in indices])
        p = scipy.stats.kstest(sample, "norm").pvalue
        checks.append(Check("scale", name, float(p), f"std of noise / declared σ·Δ = {sample.std():.4f} "
                                                     f"over {sample.size} draws"))
    return checks


TAIL_THRESHOLDS = (2.5, 3.0, 4.0)


def _tail_checks(records, noise) -> list[Check]:
    sample = np.abs(np.concatenate([_flat(record, draws).ravel() for record, draws in zip(records, noise)]))
    checks = []
    for threshold in TAIL_THRESHOLDS:
        beyond = int(np.count_nonzero(sample > threshold))
        expected = 2 * scipy.stats.norm.sf(threshold)
        p = scipy.stats.binomtest(beyond, sample.size, expected).pvalue
        checks.append(Check("tails", f">{threshold:g}σ", float(p),
                            f"{beyond} of {sample.size} draws beyond {threshold:g}σ (expected "
                            f"{expected * sample.size:.1f}); largest {sample.max():.2f}σ"))
    return checks


def _max_correlation(rows: np.ndarray) -> tuple[float, float]:
    """(max |r| over pairs of rows, its Bonferroni p-value under independence): rows are (items, draws)."""
    items, draws = rows.shape
    r = np.corrcoef(rows)[np.triu_indices(items, 1)]
    worst = float(np.max(np.abs(r)))
    pairs = items * (items - 1) // 2
    p = min(1.0, 2 * pairs * scipy.stats.norm.sf(worst * np.sqrt(draws))) if worst < 1 - 1e-9 else 0.0
    return worst, float(p)


def _class_checks(records, noise, num_classes: int) -> list[Check]:
    checks = []
    for name, indices in _by_name(records).items():
        record = records[indices[0]]
        candidates = record.shape[:-2] if record.symmetric else record.shape
        if candidates.count(num_classes) != 1:
            continue  # no class axis (e.g. a Gram matrix), or one that cannot be told apart
        axis = candidates.index(num_classes)
        per_class = []
        for j in indices:
            for draw in noise[j]:
                moved = np.moveaxis(draw, axis, 0)  # (K, ...); for a symmetric stack (K, d, d)
                if record.symmetric:
                    rows, cols = np.triu_indices(moved.shape[-1])
                    moved = moved[..., rows, cols]
                per_class.append(moved.reshape(num_classes, -1))
        worst, p = _max_correlation(np.concatenate(per_class, axis=1))
        checks.append(Check("classes", name, p, f"max |correlation| between classes {worst:.4f}"))
    return checks


def _step_checks(records, noise) -> list[Check]:
    checks = []
    for name, indices in _by_name(records).items():
        if len(indices) < 2:
            continue
        per_step = np.stack([_flat(records[j], noise[j]).ravel() for j in indices])
        worst, p = _max_correlation(per_step)
        checks.append(Check("steps", name, p, f"max |correlation| between {len(indices)} steps {worst:.4f}"))
    return checks


def _fit_checks(records, noise) -> list[Check]:
    if len(noise[0]) < 3:
        return []
    per_fit = np.concatenate([_flat(record, draws) for record, draws in zip(records, noise)], axis=1)
    worst, p = _max_correlation(np.stack([per_fit[:-1].ravel(), per_fit[1:].ravel()]))
    return [Check("fits", "", p, f"correlation between consecutive fits {worst:.4f}")]


def _ledger_check(records, epsilon: float, delta: float, accountant: str) -> Check:
    spent = accounting.epsilon(accounting.ledger_event(records), delta, accountant)
    ok = spent <= epsilon * (1 + LEDGER_TOLERANCE)
    return Check("ledger", "", 1.0 if ok else 0.0,
                 f"{len(records)} releases compose to ε = {spent:.4f} (claimed {epsilon:g})", ok)
