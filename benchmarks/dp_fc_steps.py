"""dp-fc's number of full-batch steps on public proxies only: the table its default (30) was chosen from.

    python benchmarks/dp_fc_steps.py [--eps 0.5,1,3,8] [--seeds 2] [--out benchmarks/results]

Proxies (never Fashion-MNIST, the evaluation set): scikit-learn's digits (benchmarks/choose_defaults.py) and
Gaussian mixtures with 64 nuisance coordinates of std 5 (benchmarks/bench_synthetic.py: K = 10, d = 512) at
n = 2,000 to 60,000 train rows and class spreads 0.05 to 0.2, 4,000 test rows each. Each cell: one
`featdp.training.fit` of dp-fc with only `steps` set, at (ε, δ = 1e-5), test top-1 %, median over seeds.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_synthetic import gaussian_mixture  # noqa: E402
from choose_defaults import DELTA, digits  # noqa: E402
from tables import finish, seed_accuracies  # noqa: E402

from featdp.data import ArraySource  # noqa: E402

STEPS = (10, 20, 30)
TEST_ROWS = 4000


def mixture(n: int, spread: float):
    x, y = gaussian_mixture(10, 512, (n + TEST_ROWS) // 10, seed=0, spread=spread, nuisance_dims=64,
                            nuisance_scale=5.0)
    return x[:n], y[:n], x[n : n + TEST_ROWS], y[n : n + TEST_ROWS]


PROXIES = {
    "digits (d = 64, n = 1437)": digits,
    **{f"mixture, spread {spread}, n = {n}": (lambda n=n, spread=spread: mixture(n, spread))
       for n, spread in ((2000, 0.1), (6000, 0.1), (20000, 0.1), (60000, 0.1), (2000, 0.2), (60000, 0.05))},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", default="0.5,1,3,8")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write dp_fc_steps.md there")
    args = parser.parse_args(argv)
    epsilons = [float(e) for e in args.eps.split(",")]
    started = time.perf_counter()
    command = "python benchmarks/dp_fc_steps.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# dp-fc steps on public proxies\n\nCommand: `{command}`\n",
             f"δ = {DELTA:g}; cells: test top-1 %, median over {args.seeds} seeds.\n",
             "| proxy | steps | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " |",
             "|---|---|" + "---|" * len(epsilons)]
    for name, load in PROXIES.items():
        x, y, tx, ty = load()
        train, test = ArraySource(x, y, 10), ArraySource(tx, ty, 10)
        for steps in STEPS:
            cells = []
            for epsilon in epsilons:
                accs = seed_accuracies(train, test, "dp-fc", {"steps": steps}, epsilon, DELTA, args.seeds)
                cells.append(f"{np.median(accs):.1f}")
            lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    finish(lines, started, args.out, "dp_fc_steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
