"""The share of the budget spent on centring (`center`, featdp/centering.py), on public proxy data only: the
table dp-sgd recipe=auto's share (`AUTO_CENTER_SHARE` in featdp/methods/dp_sgd.py) was chosen from.

    python benchmarks/choose_center.py [--eps 0.5,1,3,8] [--seeds 2] [--out benchmarks/results]

Proxies (as in benchmarks/choose_defaults.py, no Fashion-MNIST): scikit-learn's digits (pixels / 16: non-
negative, so the rows share a large mean, as pretrained features after a ReLU do); the Gaussian mixture
with nuisance directions (mean near zero: centring has nothing to remove, so the rows show what it costs);
and the same mixture shifted by a common offset of norm 2× the rows' spread (a common direction holding
about 80% of each row's squared norm). Cells: test top-1 %, median over seeds, at (ε, δ = 1e-5).
Results: benchmarks/results/choose_center.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from choose_defaults import digits, mixture  # noqa: E402
from tables import finish, seed_accuracies  # noqa: E402

from featdp.data import ArraySource  # noqa: E402

DELTA = 1e-5
SHARES = (0.0, 0.005, 0.02, 0.05, 0.1)
METHODS = {"dp-sgd recipe=auto": ("dp-sgd", {"recipe": "auto"}), "dp-fc defaults": ("dp-fc", {}),
           "dp-ls defaults": ("dp-ls", {})}


def shifted_mixture():
    """The mixture plus one fixed random direction of norm twice the rows' typical norm."""
    x, y, tx, ty = mixture()
    direction = np.random.default_rng(1).normal(size=x.shape[1])
    offset = 2 * np.median(np.linalg.norm(x, axis=1)) * direction / np.linalg.norm(direction)
    return (x + offset).astype(np.float32), y, (tx + offset).astype(np.float32), ty


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", default="0.5,1,3,8")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    command = "python benchmarks/choose_center.py " + " ".join(sys.argv[1:] if argv is None else argv)
    epsilons = [float(e) for e in args.eps.split(",")]
    started = time.perf_counter()
    lines = [f"# The centring share on public proxies\n\nCommand: `{command}`\n",
             f"δ = {DELTA:g}; cells: test top-1 %, median over {args.seeds} seeds; `center` = the share of the "
             "budget spent on the released mean (0: no centring).\n"]
    for name, load in (("digits (d = 64, K = 10, n = 1437)", digits),
                       ("Gaussian mixture with nuisance, mean ≈ 0 (d = 512, K = 10, n = 20000)", mixture),
                       ("the same mixture shifted by a common offset (d = 512, K = 10, n = 20000)", shifted_mixture)):
        x, y, tx, ty = load()
        train, test = ArraySource(x, y, 10), ArraySource(tx, ty, 10)
        lines += [f"\n## {name}\n", "| method | center | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " |",
                  "|---|---|" + "---|" * len(epsilons)]
        for label, (method, overrides) in METHODS.items():
            for share in SHARES:
                cells = [f"{np.median(seed_accuracies(train, test, method, {**overrides, 'center': share}, e, DELTA, args.seeds)):.1f}"
                         for e in epsilons]
                lines.append(f"| {label} | {share:g} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    finish(lines, started, args.out, "choose_center")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
