"""The one-run audit (Steinke, Nasr & Jagielski 2023): M canaries, each included with probability 1/2, in
a single fit. Canary i is C·e_{f_i} on a coordinate of its own, so the releases keep the canaries apart and
each is scored as in the canary audit; guessing "included" for the highest scores and counting correct
guesses bounds ε (`jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run`). One fit instead of M, at
the price of a looser bound: δ enters it multiplied by 2M, so it says something only for δ ≪ 1/M
(with 1000 canaries an honest method at (2, 1e-5) audits at ≈ 0.2–0.5, one with σ/4 at ≈ 2.5–3).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Callable

import numpy as np
from jax_privacy import auditing

from featdp.audit.canary import AuditResult, check_audit_arguments
from featdp.audit.design import AuditData, at_budget, claimed_noise_scale
from featdp.audit.recording import Recorder, replay_contributions
from featdp.audit.scores import head_margins, release_scores
from featdp.mechanism import Releaser, ReleaserInterface, RootKey, make_key
from featdp.methods import Method


def one_run_audit(
    method: Method,
    epsilon: float,
    delta: float = 1e-5,
    *,
    canaries: int = 1000,
    seed: int | None = None,
    confidence: float = 0.95,
    score: str = "releases",
    releaser: Callable[[RootKey], ReleaserInterface] = Releaser,
    data: AuditData = AuditData(),
    accountant: str = "pld",
) -> AuditResult:
    """Audits `method` at the claimed (ε, δ) with `canaries` canaries in one fit."""
    check_audit_arguments(epsilon, delta, canaries, accountant, confidence, score)
    start = time.perf_counter()
    # At least as many other examples as canaries, so the canaries-alone replay fits the same n.
    data = dataclasses.replace(data, num_examples=max(data.num_examples, canaries))
    method = at_budget(method, epsilon, data, canaries)
    # Inclusion is drawn apart from the noise: from the OS, or from the seed's own stream.
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else [seed, 1])
    include = rng.random(canaries) < 0.5
    if include.all() or not include.any():
        include[0] = not include[0]
    train = data.training_data(method, np.arange(canaries), include)
    n = train.num_examples
    scale = claimed_noise_scale(method, epsilon, delta, train.public_size, accountant)
    recorder = Recorder(releaser(make_key(seed)))
    weights = method.fit(train, scale, recorder)
    labels = data.canaries(canaries, method.clip_norm)[1]
    ratio = post_processing = None
    if score == "head":
        scores = head_margins(weights, method.clip_norm, data.base_dim, labels)
    else:
        contributions, post_processing = replay_contributions(
            method, data.canaries_alone(method, canaries, n), scale, recorder, weights
        )
        result = release_scores(recorder.releases, recorder.released, contributions,
                                dim=data.base_dim + canaries, base_dim=data.base_dim, count=canaries)
        scores, ratio = result.scores, result.sensitivity_ratio
    in_scores, out_scores = scores[include], scores[~include]
    bound = auditing.CanaryScoreAuditor(in_scores, out_scores).epsilon_one_run(1 - confidence, delta)
    return AuditResult(
        method=method.name, mode="one-run", score=score, claimed_epsilon=float(epsilon), delta=float(delta),
        empirical_epsilon=float(bound), confidence=confidence, trials=canaries, noise_scale=scale,
        in_scores=in_scores, out_scores=out_scores, sensitivity_ratio=ratio, post_processing=post_processing,
        seconds=time.perf_counter() - start,
    )
