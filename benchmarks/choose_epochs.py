"""How many epochs the Tramèr–Boneh dp-sgd recipe should run, as a function of the budget n·ε, on public
proxy data only: the table `dp-sgd recipe=auto` (featdp/methods/dp_sgd.py) was chosen from.

    python benchmarks/choose_epochs.py [--eps 0.5,1,2,3,8] [--epochs 5,10,20,40] [--seeds 2] [--out DIR]

Proxies (no Fashion-MNIST: it is the evaluation set of issue 15): scikit-learn's digits (d = 64) and
Gaussian mixtures with nuisance directions (benchmarks/bench_synthetic.py: K = 10, spread 0.1, 64
nuisance coordinates of std 5) at n = 5,000, 20,000 and 60,000 with d = 512, and n = 20,000 with
d = 2,048; and real images through the real backbone: digits upsampled to 28×28, deformed into n = 20,000
and 60,000 rows, through featdp's ScatterNet (d = 3969), once mildly and once hard enough for the classes
to overlap like Fashion-MNIST's (`digits_scatternet`). Every candidate is `benchmarks/choose_defaults.py`'s recipe (q = 8192/60000, C = √d, C_g = 0.1,
lr 16, momentum 0.9) for e epochs (steps = e/q), with a constant or a linearly decaying rate. Each cell is
one `featdp.training.fit` at (ε, δ = 1e-5), test top-1 %, median over seeds; the last table ranks the
candidates within each (proxy, ε) by n·ε. Results: benchmarks/results/choose_epochs.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_synthetic import gaussian_mixture  # noqa: E402
from choose_defaults import DELTA, digits, recipe  # noqa: E402

from featdp.data import ArraySource  # noqa: E402
from featdp.methods import get_method  # noqa: E402
from featdp.training import fit  # noqa: E402


def mixture(n: int, d: int):
    def load():
        per_class = (n + n // 5) // 10
        x, y = gaussian_mixture(10, d, per_class, seed=0, spread=0.1, nuisance_dims=64, nuisance_scale=5.0)
        return x[:n], y[:n], x[n:], y[n:]
    return load


def digits_scatternet(n: int, test: int = 4000, hard: bool = False):
    """Real images through the real backbone: scikit-learn's digits (its 1437 / 360 split of
    `choose_defaults.digits`), upsampled to 28×28 and randomly rotated (±12°), scaled (0.9–1.1) and shifted
    (±2 px) into n training and `test` test images, drawn from the two halves apart, then featdp's
    weight-free ScatterNet (d = 3969, GroupNorm): the feature geometry of the evaluation files, another task.
    `hard`: rotations ±30°, scales 0.75–1.2, shifts ±3.5 px and pixel noise of std 45, so that the classes
    overlap about as much as Fashion-MNIST's do under a linear head (scikit-learn's logistic regression on
    8,000 such unit-norm rows: 88% on 1,000 test rows, against 98% without `hard`)."""
    from PIL import Image
    from scipy import ndimage
    from sklearn.datasets import load_digits

    from featdp.extraction.backbones.registry import load_backbone

    def load():
        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(y))
        x, y = x[order], y[order]
        base = np.stack([np.asarray(Image.fromarray((255 * im.reshape(8, 8) / 16).astype(np.uint8)).resize(
            (20, 20), Image.BICUBIC), np.float32) for im in x])
        rng = np.random.default_rng(1)
        backbone = load_backbone("scatternet")

        def draw(pool: np.ndarray, count: int):
            picks = rng.choice(pool, count)
            images = np.empty((count, 28, 28), np.uint8)
            for i, pick in enumerate(picks):
                angle = np.deg2rad(rng.uniform(-30, 30) if hard else rng.uniform(-12, 12))
                scale = rng.uniform(0.75, 1.2) if hard else rng.uniform(0.9, 1.1)
                shift = rng.uniform(-3.5, 3.5, 2) if hard else rng.uniform(-2, 2, 2)
                rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
                canvas = np.zeros((28, 28), np.float32)
                canvas[4:24, 4:24] = base[pick]
                centre = np.array([13.5, 13.5])
                warped = ndimage.affine_transform(canvas, rotation, centre - rotation @ (centre + shift), order=1)
                if hard:
                    warped = warped + rng.normal(0, 45, warped.shape)
                images[i] = np.clip(warped, 0, 255).astype(np.uint8)
            rgb = np.repeat(images[..., None], 3, axis=-1)
            features = np.concatenate([np.asarray(backbone.apply(backbone.variables, rgb[i:i + 2000]))
                                       for i in range(0, count, 2000)])
            return features.astype(np.float32), y[picks]

        train_x, train_y = draw(np.arange(1437), n)
        test_x, test_y = draw(np.arange(1437, len(y)), test)
        return train_x, train_y, test_x, test_y
    return load


PROXIES = {
    "digits (n = 1437, d = 64)": digits,
    "mixture (n = 5000, d = 512)": mixture(5000, 512),
    "mixture (n = 20000, d = 512)": mixture(20000, 512),
    "mixture (n = 60000, d = 512)": mixture(60000, 512),
    "mixture (n = 20000, d = 2048)": mixture(20000, 2048),
    "digits ScatterNet (n = 20000, d = 3969)": digits_scatternet(20000),
    "digits ScatterNet (n = 60000, d = 3969)": digits_scatternet(60000),
    "hard digits ScatterNet (n = 60000, d = 3969)": digits_scatternet(60000, hard=True),
}


def steps_for(epochs: float) -> int:
    return max(1, round(epochs * 60000 / 8192))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", default="0.5,1,2,3,8")
    parser.add_argument("--epochs", default="5,10,20,40")
    parser.add_argument("--schedules", default="constant,linear")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--proxies", default=None, help="comma-separated substrings of proxy names; default: all")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--name", default="choose_epochs", help="file stem under --out")
    args = parser.parse_args(argv)
    command = "python benchmarks/choose_epochs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    epsilons = [float(e) for e in args.eps.split(",")]
    epochs = [float(e) for e in args.epochs.split(",")]
    schedules = args.schedules.split(",")
    started = time.perf_counter()
    lines = [f"# dp-sgd epochs against the budget n·ε, on public proxies\n\nCommand: `{command}`\n",
             f"δ = {DELTA:g}; cells: test top-1 %, median over {args.seeds} seeds.\n"]
    ranking = ["\n## Best candidate per (proxy, ε), by n·ε\n",
               "| n·ε | proxy | ε | best | its accuracy | runner-up (gap) |", "|---|---|---|---|---|---|"]
    ranked = []
    wanted = args.proxies.split(",") if args.proxies else [""]
    for name, load in PROXIES.items():
        if not any(part in name for part in wanted):
            continue
        x, y, tx, ty = load()
        n, d = x.shape
        train, test = ArraySource(x, y, 10), ArraySource(tx, ty, 10)
        lines += [f"\n## {name}\n", "| candidate | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " |",
                  "|---|" + "---|" * len(epsilons)]
        scores: dict[str, list[float]] = {}
        for schedule in schedules:
            for e in epochs:
                label = f"{e:g} epochs, {schedule}"
                overrides = recipe(n, d, steps_for(e)) | {"schedule": schedule}
                scores[label] = [float(np.median([
                    100 * fit(train, get_method("dp-sgd", **overrides), epsilon=epsilon, delta=DELTA,
                              seed=seed).accuracy(test) for seed in range(args.seeds)])) for epsilon in epsilons]
                lines.append(f"| {label} | " + " | ".join(f"{a:.1f}" for a in scores[label]) + " |")
                print(lines[-1], flush=True)
        for i, epsilon in enumerate(epsilons):
            order = sorted(scores, key=lambda label: -scores[label][i])
            best, second = order[0], order[1]
            ranked.append((n * epsilon, f"| {n * epsilon:,.0f} | {name} | {epsilon:g} | {best} | "
                           f"{scores[best][i]:.1f} | {second} ({scores[best][i] - scores[second][i]:.1f}) |"))
    ranking += [row for _, row in sorted(ranked)]
    lines += ranking
    lines.append(f"\nWhole run: {(time.perf_counter() - started) / 60:.1f} min.")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
