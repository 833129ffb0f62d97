"""Trajectory levers of dp-sgd and dp-fc (issue 15, lever 2): iterate averages of the heads and learning-rate
schedules (featdp/methods/_trajectory.py), and dp-fc with Poisson-sampled steps and momentum, each against
the same method without it, on held-out data that is not the Fashion-MNIST test set.

    python benchmarks/trajectories.py [--features /tmp/featdp_cpu/fmnist_scatternet.h5] [--eps 1,3] [--seeds 3]
                                      [--out benchmarks/results]

Data: the public proxies of benchmarks/choose_defaults.py (digits, the nuisance Gaussian mixture; their own
test rows), and, when `--features` names the Fashion-MNIST ScatterNet file, its train split only: a fixed
10,000 rows (numpy permutation, seed 0) held out for validation and the other 50,000 fitted. The test split
is never read. Every cell is one `featdp.training.fit` at (ε, δ = 1e-5) with `seed=` (the real count,
calibration and accounting), top-1 % on the held-out rows, median over seeds (min–max); Δ is the median
over seeds of the paired difference with the row the lever is added to (same seed, same noise draws).
dp-sgd's base is `tramer_boneh_recipe(n)`, the first entry of its tuning grid; "grid: 73 steps" is its
second, shown because a lever only earns a grid entry by beating every candidate already there.

Expected (benchmarks/results/trajectories.md): an average or a decaying schedule added to the 293-step
recipe gains at ε = 1 on all three datasets (about one point on Fashion-MNIST) and ties or loses a little
at ε = 3 there; on Fashion-MNIST and the mixture the grid's 73-step entry gains more at ε = 1, so no
lever earns a dp-sgd grid entry. On dp-fc, whose 10 to 30 steps have not converged, averages and schedules
lose; Poisson-sampled steps with momentum beat 30 full-batch steps on Fashion-MNIST but lose on digits.
Runs in 15 to 25 min on 2 cores, most of it the Fashion-MNIST fits.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from choose_defaults import DELTA, digits, mixture  # noqa: E402
from tables import finish  # noqa: E402

from featdp.cache import StatisticsCache  # noqa: E402
from featdp.data import ArraySource  # noqa: E402
from featdp.methods import get_method  # noqa: E402
from featdp.methods.dp_sgd import tramer_boneh_recipe  # noqa: E402
from featdp.training import fit  # noqa: E402

HELD_OUT = 10_000


def fashion_mnist_validation(path: str):
    """(fit x, fit y, held-out x, held-out y) from the train split of `path`; its test split stays unread."""
    from featdp.featurefile import FeatureFile

    with FeatureFile(path) as features:
        x, y = features.split("train").read()
    order = np.random.default_rng(0).permutation(len(y))
    fit_rows, held_rows = np.sort(order[HELD_OUT:]), np.sort(order[:HELD_OUT])
    return x[fit_rows], y[fit_rows], x[held_rows], y[held_rows]


def candidates(n: int) -> list[tuple[str, str, dict, str | None]]:
    """(label, method, hyperparameters, label of the row Δ is taken against); functions of n only."""
    recipe = tramer_boneh_recipe(n)
    tb, fc, fc30 = "dp-sgd T&B recipe (293 steps)", "dp-fc defaults (10 steps)", "dp-fc grid: 30 steps"
    return [
        (tb, "dp-sgd", recipe, None),
        ("  + average=ema, ema_decay=0.99", "dp-sgd", recipe | {"average": "ema", "ema_decay": 0.99}, tb),
        ("  + average=tail, tail_fraction=0.5", "dp-sgd", recipe | {"average": "tail", "tail_fraction": 0.5}, tb),
        ("  + schedule=cosine", "dp-sgd", recipe | {"schedule": "cosine"}, tb),
        ("  + schedule=linear", "dp-sgd", recipe | {"schedule": "linear"}, tb),
        ("dp-sgd grid: 73 steps (Δ vs 293)", "dp-sgd", recipe | {"steps": 73}, tb),
        (fc, "dp-fc", {"steps": 10}, None),
        ("  + average=ema, ema_decay=0.5", "dp-fc", {"steps": 10, "average": "ema", "ema_decay": 0.5}, fc),
        ("  + schedule=cosine", "dp-fc", {"steps": 10, "schedule": "cosine"}, fc),
        (fc30, "dp-fc", {"steps": 30}, fc),
        ("dp-fc Poisson q = 8192/60000, 73 steps, momentum 0.9, lr 0.1 (Δ vs 30 steps)", "dp-fc",
         {"batch_size": recipe["batch_size"], "steps": 73, "momentum": 0.9, "lr": 0.1}, fc30),
    ]


def table(x, y, tx, ty, epsilons, seeds) -> list[str]:
    train, held = ArraySource(x, y, 10), ArraySource(tx, ty, 10)
    cache = StatisticsCache(max_bytes=2 << 30)  # dp-fc's exact Σxxᵀ, once per dataset; each fit's noise is its own
    lines = ["| candidate | " + " | ".join(f"ε = {e:g} | Δ" for e in epsilons) + " | fit s |",
             "|---|" + "---|---|" * len(epsilons) + "---|"]
    accuracy: dict[tuple[str, float], list[float]] = {}
    for label, method, hyperparameters, base in candidates(len(y)):
        cells, seconds = [], []
        for epsilon in epsilons:
            accs = []
            for seed in range(seeds):
                result = fit(train, get_method(method, **hyperparameters), epsilon=epsilon, delta=DELTA, seed=seed,
                             cache=cache)
                accs.append(100 * result.accuracy(held))
                seconds.append(result.fit_seconds)
            accuracy[label, epsilon] = accs
            delta = "" if base is None else f"{np.median(np.subtract(accs, accuracy[base, epsilon])):+.2f}"
            cells.append(f"{np.median(accs):.2f} ({min(accs):.2f}–{max(accs):.2f}) | {delta}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {np.median(seconds):.1f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", default=None, help="Fashion-MNIST ScatterNet feature file (train split used)")
    parser.add_argument("--eps", default="1,3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    command = "python benchmarks/trajectories.py " + " ".join(sys.argv[1:] if argv is None else argv)
    epsilons = [float(e) for e in args.eps.split(",")]
    started = time.perf_counter()
    lines = [f"# Trajectory levers of dp-sgd and dp-fc, on held-out data\n\nCommand: `{command}`\n",
             f"δ = {DELTA:g}; cells: held-out top-1 %, median over seeds 0…{args.seeds - 1} (min–max); Δ: median "
             "paired difference with the row the lever is added to (same seeds). No Fashion-MNIST test row is read.\n"]
    datasets = [("digits (d = 64, K = 10, n = 1437; its 360 test rows)", digits),
                ("Gaussian mixture with nuisance (d = 512, K = 10, n = 20000; its 4000 test rows)", mixture)]
    if args.features:
        datasets.append((f"Fashion-MNIST ScatterNet, train split only (d = 3969, K = 10): fit on 50,000 rows, "
                         f"{HELD_OUT:,} held out", lambda: fashion_mnist_validation(args.features)))
    for name, load in datasets:
        lines += [f"\n## {name}\n"]
        print(lines[-1], flush=True)
        lines += table(*load(), epsilons, args.seeds)
    finish(lines, started, args.out, "trajectories")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
