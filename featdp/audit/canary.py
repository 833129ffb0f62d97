"""The canary audit: many fits, half of them with a canary, and a lower bound on ε from its scores.

In trial t (of M) the canary C·e_f (the worst case for a linear head: a direction the other examples leave unused)
is included iff t is even; the method's own `fit` runs at the noise scale `featdp fit` would calibrate for
the claimed (ε, δ), with the key child(root, t) through the given releaser, and the canary is scored. If
the method is (ε, δ)-DP, any test separating the two score samples has TPR ≤ e^ε·FPR + δ; Clopper–Pearson
intervals on TPR and FPR at every threshold (Bonferroni-corrected; `jax_privacy.auditing`) turn the
samples into an ε that the method's true ε exceeds with probability ≥ `confidence` (Jagielski et al.
2020, Nasr et al. 2021). A lower bound above the claim proves the claim false; one below proves nothing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
from jax_privacy import auditing

from featdp import accounting, progress
from featdp.audit.design import AuditData, at_budget, claimed_noise_scale
from featdp.audit.recording import Recorder, replay_contributions
from featdp.audit.scores import head_margins, release_scores
from featdp.mechanism import Releaser, ReleaserInterface, RootKey, make_key
from featdp.methods import Method

SCORES = ("releases", "head")
# ‖canary contribution‖ / declared Δ above this is a sensitivity bug (float32 statistics round a little).
SENSITIVITY_TOLERANCE = 1 + 1e-5


@dataclasses.dataclass(frozen=True)
class AuditResult:
    method: str
    mode: str  # "canary" (M fits) or "one-run" (M canaries in one fit)
    score: str
    claimed_epsilon: float
    delta: float
    empirical_epsilon: float  # the lower bound: the true ε is at least this with probability `confidence`
    confidence: float
    trials: int  # fits (canary) or canaries (one-run)
    noise_scale: float  # calibrated for the claim (canary mode: on the data without the canary)
    in_scores: np.ndarray
    out_scores: np.ndarray
    sensitivity_ratio: float | None  # max ‖canary contribution‖ / declared Δ; None for the head score
    post_processing: bool | None  # every head was a function of its releases and n alone
    seconds: float

    @property
    def bound_exceeds_claim(self) -> bool:
        return self.empirical_epsilon > self.claimed_epsilon

    @property
    def passed(self) -> bool:
        checks_ok = self.post_processing is not False and (
            self.sensitivity_ratio is None or self.sensitivity_ratio <= SENSITIVITY_TOLERANCE
        )
        return checks_ok and not self.bound_exceeds_claim


def check_audit_arguments(epsilon, delta, trials, accountant="pld", confidence=0.95, score="releases") -> None:
    """Raises `PrivacyParameterError` naming the bad value and the allowed range."""
    accounting.check_privacy_parameters(epsilon, delta, accountant)
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 2:
        raise accounting.PrivacyParameterError(f"trials must be an integer >= 2, got {trials!r}")
    if not 0.5 < confidence < 1:
        raise accounting.PrivacyParameterError(f"confidence must lie in (0.5, 1), got {confidence!r}")
    if score not in SCORES:
        raise accounting.PrivacyParameterError(f"score must be one of {SCORES}, got {score!r}")


def canary_audit(
    method: Method,
    epsilon: float,
    delta: float = 1e-5,
    *,
    trials: int = 2000,
    seed: int | None = None,
    confidence: float = 0.95,
    score: str = "releases",
    releaser: Callable[[RootKey], ReleaserInterface] = Releaser,
    data: AuditData = AuditData(),
    accountant: str = "pld",
) -> AuditResult:
    """Audits `method` at the claimed (ε, δ) with `trials` fits, half of them with the canary.

    `score`: "releases" (the log-likelihood ratio of the released statistics, see `featdp.audit.scores`)
    or "head" (the canary's logit margin under the released head: black-box, weaker).
    `releaser` makes the releaser of each fit from its key; tests pass deliberately broken ones.
    """
    check_audit_arguments(epsilon, delta, trials, accountant, confidence, score)
    method = at_budget(method, epsilon, data, 1)
    start = time.perf_counter()
    worlds, alone, scales = {}, {}, {}
    for included in (False, True):
        worlds[included] = data.training_data(method, np.arange(1), np.array([included]))
        n = worlds[included].num_examples
        alone[included] = data.canaries_alone(method, 1, n)
        scales[included] = claimed_noise_scale(method, epsilon, delta, worlds[included].public_size, accountant)
    label = data.canaries(1, method.clip_norm)[1]
    root = make_key(seed)
    scores = {False: [], True: []}
    ratio, post_processing = 0.0, True
    for trial in progress.track(range(trials), "audit fits", trials):
        included = trial % 2 == 0
        recorder = Recorder(releaser(root.child("trial", trial)))
        weights = method.fit(worlds[included], scales[included], recorder)
        if score == "head":
            scores[included].append(head_margins(weights, method.clip_norm, data.base_dim, label)[0])
            continue
        contributions, same_head = replay_contributions(
            method, alone[included], scales[included], recorder, weights
        )
        post_processing &= same_head
        result = release_scores(recorder.releases, recorder.released, contributions,
                                dim=data.base_dim + 1, base_dim=data.base_dim, count=1)
        scores[included].append(result.scores[0])
        ratio = max(ratio, result.sensitivity_ratio)
    in_scores, out_scores = np.array(scores[True]), np.array(scores[False])
    bound = auditing.CanaryScoreAuditor(in_scores, out_scores).epsilon_clopper_pearson(1 - confidence, delta)
    return AuditResult(
        method=method.name, mode="canary", score=score, claimed_epsilon=float(epsilon), delta=float(delta),
        empirical_epsilon=float(bound), confidence=confidence, trials=trials, noise_scale=scales[False],
        in_scores=in_scores, out_scores=out_scores,
        sensitivity_ratio=None if score == "head" else ratio,
        post_processing=None if score == "head" else post_processing,
        seconds=time.perf_counter() - start,
    )
