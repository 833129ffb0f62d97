"""Every method across ε on a synthetic many-class Gaussian mixture, where the papers' ordering should show.

    python benchmarks/bench_synthetic.py [--classes 100] [--dim 512] [--per-class 500] [--seeds 3]
                                         [--spread 0.25] [--nuisance-dims 64] [--nuisance-scale 5]
                                         [--eps 0.1,0.5,1,2,3,4,8] [--out benchmarks/results]

K class means drawn once (public synthetic data, fixed seed), examples = mean + noise (see
`gaussian_mixture`), written
to a feature file and run through `featdp bench` (default, tuned, non-private rows). Expected (Mehta et
al. 2023): DP-LS ahead of DP-Newton at small ε (Newton's √K sensitivity over K Hessians), DP-FC at or near
the top. Results: benchmarks/results/synthetic_gmm_k<K>_d<d>_nuisance<m>.{md,csv,json,png}.
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


def gaussian_mixture(classes: int, dim: int, per_class: int, seed: int = 0, spread: float = 0.2,
                     nuisance_dims: int = 0, nuisance_scale: float = 5.0):
    """x = μ_y + z, means μ_c ~ N(0, spread²·I) and noise z ~ N(0, diag(s²)) with s = nuisance_scale on the
    first `nuisance_dims` coordinates and 1 elsewhere. Isotropic noise (nuisance_dims = 0) is the case
    where the class-mean (prototype) classifier is optimal; high-variance directions that carry no class
    information, as in pretrained features, are where a covariance-aware head (LS, DP-FC) should win."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * spread
    labels = np.repeat(np.arange(classes), per_class)
    scale = np.where(np.arange(dim) < nuisance_dims, nuisance_scale, 1.0)
    features = means[labels] + rng.normal(size=(len(labels), dim)) * scale
    order = rng.permutation(len(labels))
    return features[order].astype(np.float32), labels[order]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--spread", type=float, default=0.25)
    parser.add_argument("--nuisance-dims", type=int, default=64)
    parser.add_argument("--nuisance-scale", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eps", default="0.1,0.5,1,2,3,4,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv)

    x, y = gaussian_mixture(args.classes, args.dim, args.per_class + args.per_class // 5, spread=args.spread,
                            nuisance_dims=args.nuisance_dims, nuisance_scale=args.nuisance_scale)
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
    stem = f"synthetic_gmm_k{args.classes}_d{args.dim}_nuisance{args.nuisance_dims}"
    title = (f"Gaussian mixture, K = {args.classes}, d = {args.dim}, n = {n_train}, spread {args.spread:g}, "
             f"{args.nuisance_dims} nuisance dims × {args.nuisance_scale:g}")
    report.write_all(result, args.out, stem, title, command)
    print(report.markdown(result, title, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
