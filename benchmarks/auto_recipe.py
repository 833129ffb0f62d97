"""`featdp fit --method dp-sgd --set recipe=auto` on feature files: test top-1 across ε, private end to end
(the recipe is chosen from the released count and ε only, so no selection is spent).

    python benchmarks/auto_recipe.py FILE.h5 [FILE.h5 ...] [--eps 0.5,1,3,8] [--seeds 3] [--uncentred]
                                     [--out DIR]

Each cell is `featdp.training.fit` on the file's train split at (ε, δ = 1e-5), seeds 0…N−1, scored on its
test split: median ± std over seeds, with the epochs and schedule the recipe chose and the median fit
time. `--uncentred` adds, side by side, the recipe with its centring left out (`center` = 0: the recipe
before centring, featdp/centering.py). Writes auto_recipe.md under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tables import finish  # noqa: E402

from featdp.data import example_count, maybe_in_memory
from featdp.featurefile import FeatureFile
from featdp.methods import get_method
from featdp.methods.dp_sgd import DPSGD
from featdp.training import fit

DELTA = 1e-5


class Uncentred(DPSGD):
    """dp-sgd whose recipe=auto leaves out the centring (the recipe as it was before centring)."""

    def for_budget(self, num_examples, epsilon, feature_dim):
        return dataclasses.replace(super().for_budget(num_examples, epsilon, feature_dim), center=0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features", nargs="+", type=pathlib.Path)
    parser.add_argument("--eps", default="0.5,1,3,8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--uncentred", action="store_true", help="also run the recipe without its centring")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    command = "python benchmarks/auto_recipe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    epsilons = [float(e) for e in args.eps.split(",")]
    variants = {"auto": get_method("dp-sgd", recipe="auto")}
    if args.uncentred:
        variants["auto, center = 0"] = Uncentred(recipe="auto")
    started = time.perf_counter()
    lines = ["# dp-sgd recipe=auto on feature files, private end to end\n", f"Command: `{command}`\n",
             f"δ = {DELTA:g}; cells: test top-1 %, median ± std over seeds 0…{args.seeds - 1}; the recipe's "
             "choice (epochs at q = 8192/60000, schedule); median fit s.\n",
             "| file | n | d | ε | recipe | test top-1 % | chosen | fit s |", "|---|---|---|---|---|---|---|---|"]
    for path in args.features:
        with FeatureFile(path) as features:
            train, test = (maybe_in_memory(features.split(name), 8 << 30) for name in ("train", "test"))
            for epsilon in epsilons:
                for label, method in variants.items():
                    accuracies, seconds, chosen = [], [], set()
                    for seed in range(args.seeds):
                        result = fit(train, method, epsilon=epsilon, delta=DELTA, seed=seed)
                        accuracies.append(100 * result.accuracy(test))
                        seconds.append(result.fit_seconds)
                        chosen.add(f"{result.method.steps * 8192 / 60000:.0f} epochs ({result.method.steps} steps), "
                                   f"{result.method.schedule}")
                    lines.append(f"| {path.name} | {example_count(train)} | {train.feature_dim} | {epsilon:g} | "
                                 f"{label} | {np.median(accuracies):.2f} ± {np.std(accuracies):.2f} | "
                                 f"{'; '.join(sorted(chosen))} | {np.median(seconds):.1f} |")
                    print(lines[-1], flush=True)
    finish(lines, started, args.out, "auto_recipe")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
