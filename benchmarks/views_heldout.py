"""One Tramèr–Boneh dp-sgd fit per ε on a view file's train split, scored on held-out train examples: how
much a way of making views (their number, shift, flips) changes accuracy, without touching the test split.

    python benchmarks/views_heldout.py FILE.h5 [--eps 1,3] [--seed 0]

The train split's examples (all their views) are split once (a fixed public permutation): 10,000 held out,
scored on their first view (the unaugmented image, as a test split holds), the rest fitted with
`featdp.methods.dp_sgd.tramer_boneh_recipe` at (ε, δ = 1e-5), every statistic counting an example as the
average of its views. One seed: an exploration, not a table of medians.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from featdp.data import ArraySource, example_count
from featdp.featurefile import FeatureFile
from featdp.methods import get_method
from featdp.methods.dp_sgd import tramer_boneh_recipe
from featdp.training import fit

HELD_OUT = 10000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features")
    parser.add_argument("--eps", default="1,3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with FeatureFile(args.features) as features:
        split = features.split("train")
        views = split.views_per_example
        x, labels = split.read()
    n = len(labels) // views
    x, y = x.reshape(n, views, -1), labels[::views]
    held = np.zeros(n, bool)
    held[np.random.default_rng(0).permutation(n)[:HELD_OUT]] = True
    train = ArraySource(x[~held], y[~held], int(y.max()) + 1)
    held_out = ArraySource(np.ascontiguousarray(x[held, 0]), y[held], train.num_classes)
    del x
    for epsilon in (float(e) for e in args.eps.split(",")):
        started = time.perf_counter()
        method = get_method("dp-sgd", **tramer_boneh_recipe(example_count(train)))
        result = fit(train, method, epsilon=epsilon, delta=1e-5, seed=args.seed)
        print(f"| {args.features} | {views} | {epsilon:g} | {100 * result.accuracy(held_out):.2f} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
