"""Empirical privacy auditing: does a method's noise deliver the (ε, δ) it claims?

* `canary_audit`: M fits at the claimed (ε, δ), a canary in half of them; a Clopper–Pearson lower bound
  on ε from the canary's scores.
* `one_run_audit`: M canaries, each included with probability 1/2, in a single fit (Steinke, Nasr &
  Jagielski 2023).
* `white_box_audit`: the noise of every release, over many fits, against its declared σ·Δ
  (Kolmogorov–Smirnov), its independence across classes, steps and fits, and the ε its ledger composes to.

A lower bound above the claim proves the implementation wrong; one below it is no proof of privacy.
"""

from featdp.audit.canary import SCORES, AuditResult, canary_audit
from featdp.audit.design import AuditData, claimed_noise_scale
from featdp.audit.one_run import one_run_audit
from featdp.accounting import ledger_event
from featdp.audit.whitebox import Check, WhiteBoxResult, white_box_audit

__all__ = [
    "SCORES", "AuditData", "AuditResult", "Check", "WhiteBoxResult", "canary_audit", "claimed_noise_scale",
    "ledger_event", "one_run_audit", "white_box_audit",
]
