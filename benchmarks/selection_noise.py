"""Each candidate's noise scale under the selection's two noise plans (featdp.selection, step 4), across ε.

    python benchmarks/selection_noise.py [--eps 0.5,1,3,8] [--n 60000] [--methods dp-sgd]

The selection's budget is approximated as select() forms it before the sampler's slack: ε and δ less the
released count's share (the slack is ~1e-6 in ε). R = the grid's size (as `featdp bench` does). Expected:
full-batch candidates get the same noise under both plans; Poisson-subsampled ones markedly less under
"equal standalone privacy", for a score multiplier σ_run within a fraction of a percent of domination's.
"""

from __future__ import annotations

import argparse
import sys

from featdp import selection
from featdp.training import COUNT_SHARE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", default="0.5,1,3,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--n", type=float, default=60000)
    parser.add_argument("--methods", default="dp-sgd")
    args = parser.parse_args(argv)
    fit_size = (1 - selection.VALIDATION_FRACTION) * args.n
    candidates = selection.build_candidates(args.methods.split(","), None, fit_size)
    distribution = selection.RunsDistribution(float(len(candidates)))
    print(f"Command: `python benchmarks/selection_noise.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("| ε | candidate | domination: scale | equal standalone privacy: scale | ratio |")
    print("|---|---|---|---|---|")
    for epsilon in (float(e) for e in args.eps.split(",")):
        budget, delta = (1 - COUNT_SHARE) * epsilon, (1 - COUNT_SHARE) * args.delta
        plans = {p.rule: p for p in selection.plan_noise(candidates, distribution, budget, delta, fit_size) if p}
        dom = plans["domination"]
        equal = plans.get("equal standalone privacy", dom)
        rows = [("score σ_run", dom.run_noise_multiplier, equal.run_noise_multiplier)]
        rows += [(f"{m.name} {selection._changed(m) if hasattr(selection, '_changed') else m.hyperparameters().get('steps')} steps",
                  a, b) for m, a, b in zip(candidates, dom.scales, equal.scales)]
        for label, a, b in rows:
            print(f"| {epsilon:g} | {label} | {a:.4g} | {b:.4g} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
