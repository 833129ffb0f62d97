"""Candidate defaults of dp-sgd and dp-fc on public proxy data only, across ε: the table the defaults and
tuning grids in featdp/methods/{dp_sgd,dp_fc}.py were chosen from.

    python benchmarks/choose_defaults.py [--eps 0.5,1,3,8] [--seeds 2] [--out benchmarks/results]

Proxies (no Fashion-MNIST: it is the evaluation set of issue 15, and choosing on it would be unaccounted
tuning): scikit-learn's digits (raw pixels / 16, d = 64, K = 10, 1437 train / 360 test rows, a fixed
public permutation) and a synthetic Gaussian mixture with nuisance directions (benchmarks/bench_synthetic.py:
K = 10, d = 512, 64 nuisance coordinates of std 5, spread 0.1, 2000 train / 400 test per class). Every
candidate is a function of (n, d, K) only; each cell is one `featdp.training.fit` at (ε, δ = 1e-5),
test top-1 %, median over seeds. Expected: dp-sgd's one full-batch step (a noisy prototype classifier) is
far behind the short Poisson-sampled recipes wherever the classes are not isotropic around their means.
Results: benchmarks/results/choose_defaults.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_synthetic import gaussian_mixture  # noqa: E402
from tables import finish, seed_accuracies  # noqa: E402

from featdp.data import ArraySource  # noqa: E402
from featdp.methods.dp_sgd import TRAMER_BONEH_RATE, TRAMER_BONEH_STEP  # noqa: E402

DELTA = 1e-5


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32), y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def mixture():
    x, y = gaussian_mixture(10, 512, 2400, seed=0, spread=0.1, nuisance_dims=64, nuisance_scale=5.0)
    return x[:20000], y[:20000], x[20000:], y[20000:]


def recipe(n: int, d: int, steps: int, clip_norm: float | None = None) -> dict:
    """Tramèr & Boneh's ScatterNet recipe as a function of (n, d): sampling rate q = 8192/60000, C = √d
    (their features had norm ≈ √3969 = 63), C_g = 0.1, lr 16, momentum 0.9, `steps` steps."""
    return {"clip_norm": clip_norm or float(np.sqrt(d)), "steps": steps,
            "batch_size": max(1, round(n * TRAMER_BONEH_RATE)), **TRAMER_BONEH_STEP}


def candidates(n: int, d: int) -> dict[str, tuple[str, dict]]:
    epochs = lambda e: max(1, round(e * 60000 / 8192))  # noqa: E731  steps for e epochs at q = 8192/60000
    return {
        "dp-sgd one full-batch step": ("dp-sgd", {}),
        "dp-sgd 40 epochs, C = √d": ("dp-sgd", recipe(n, d, epochs(40))),
        "dp-sgd 10 epochs, C = √d": ("dp-sgd", recipe(n, d, epochs(10))),
        "dp-sgd 5 epochs, C = √d": ("dp-sgd", recipe(n, d, epochs(5))),
        "dp-sgd 10 epochs, C = 63": ("dp-sgd", recipe(n, d, epochs(10), clip_norm=63.0)),
        "dp-fc defaults (10 steps)": ("dp-fc", {"steps": 10}),
        "dp-fc 30 steps": ("dp-fc", {"steps": 30}),
        "dp-fc lam_scale 0.3": ("dp-fc", {"lam_scale": 0.3}),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", default="0.5,1,3,8")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    command = "python benchmarks/choose_defaults.py " + " ".join(sys.argv[1:] if argv is None else argv)
    epsilons = [float(e) for e in args.eps.split(",")]
    started = time.perf_counter()
    lines = [f"# Candidate defaults on public proxies\n\nCommand: `{command}`\n",
             f"δ = {DELTA:g}; cells: test top-1 %, median over {args.seeds} seeds (min–max).\n"]
    for name, load in (("digits (d = 64, K = 10, n = 1437)", digits),
                       ("Gaussian mixture with nuisance (d = 512, K = 10, n = 20000)", mixture)):
        x, y, tx, ty = load()
        train, test = ArraySource(x, y, 10), ArraySource(tx, ty, 10)
        lines += [f"\n## {name}\n", "| candidate | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " |",
                  "|---|" + "---|" * len(epsilons)]
        for label, (method, overrides) in candidates(len(y), x.shape[1]).items():
            cells = []
            for epsilon in epsilons:
                accs = seed_accuracies(train, test, method, overrides, epsilon, DELTA, args.seeds)
                cells.append(f"{np.median(accs):.1f} ({min(accs):.1f}–{max(accs):.1f})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    finish(lines, started, args.out, "choose_defaults")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
