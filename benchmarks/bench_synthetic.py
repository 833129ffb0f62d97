"""Every method across ε on a synthetic many-class Gaussian mixture, where the papers' ordering should show.

    python benchmarks/bench_synthetic.py [--classes 100] [--dim 512] [--per-class 500] [--seeds 3]
                                         [--eps 0.1,0.5,1,2,3,4,8] [--out benchmarks/results]

K class means drawn once (public synthetic data, fixed seed), examples = mean + isotropic noise, written
to a feature file and run through `featdp bench` (default, tuned, non-private rows). Expected (Mehta et
al. 2023): DP-LS ahead of DP-Newton at small ε (Newton's √K sensitivity over K Hessians), DP-FC at or near
the top. Results: benchmarks/results/synthetic_gmm_k<K>_d<d>.{md,csv,json,png}.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

from featdp.bench import report
from featdp.bench.runner import BenchConfig, load_splits, run_bench
from featdp.featurefile import write_features


def gaussian_mixture(classes: int, dim: int, per_class: int, seed: int = 0, spread: float = 0.2):
    """x = μ_y + z with z ~ N(0, I) and means μ_c ~ N(0, spread²·I): two means lie ≈ spread·√(2d) apart,
    so at d = 512 and spread 0.2 the half-distance is ≈ 3.2 noise standard deviations."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * spread
    labels = np.repeat(np.arange(classes), per_class)
    features = means[labels] + rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    return features[order].astype(np.float32), labels[order]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eps", default="0.1,0.5,1,2,3,4,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv)

    x, y = gaussian_mixture(args.classes, args.dim, args.per_class + args.per_class // 5)
    n_train = args.classes * args.per_class
    with tempfile.TemporaryDirectory() as workdir:
        path = write_features(pathlib.Path(workdir) / "gmm.h5",
                              {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:])},
                              num_classes=args.classes)
        train, test = load_splits(path)
    config = BenchConfig(epsilons=tuple(float(e) for e in args.eps.split(",")), delta=args.delta, seeds=args.seeds)

    def show(row):
        budget = "non-private" if row.epsilon is None else f"eps={row.epsilon:g} seed {row.seed}"
        print(f"  {row.kind:<11} {row.method:<12} {budget:<18} {100 * row.accuracy:5.1f}%  {row.fit_seconds:7.2f} s",
              flush=True)

    result = run_bench(train, test, config, on_row=show)
    stem = f"synthetic_gmm_k{args.classes}_d{args.dim}"
    title = f"Gaussian mixture, K = {args.classes}, d = {args.dim}, n = {n_train}"
    report.write_all(result, args.out, stem, title, command)
    print(report.markdown(result, title, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
