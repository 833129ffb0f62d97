"""How many epochs the Tramèr–Boneh dp-sgd recipe should run, as a function of the budget n·ε, on public
proxy data only: the table `dp-sgd recipe=auto` (featdp/methods/dp_sgd.py) was chosen from.

    python benchmarks/choose_epochs.py [--eps 0.5,1,2,3,8] [--epochs 5,10,20,40] [--seeds 2] [--out DIR]

Proxies (no Fashion-MNIST: it is the evaluation set of issue 15): scikit-learn's digits (d = 64) and
Gaussian mixtures with nuisance directions (benchmarks/bench_synthetic.py: K = 10, spread 0.1, 64
nuisance coordinates of std 5) at n = 5,000, 20,000 and 60,000 with d = 512, and n = 20,000 with
d = 2,048; and real images through the real backbone: digits upsampled to 28×28, deformed into n = 20,000
and 60,000 rows, through featdp's ScatterNet (d = 3969), once mildly and once hard enough for the classes
to overlap like Fashion-MNIST's (`digits_scatternet`). Every candidate is `recipe_for_epochs` in
featdp/methods/dp_sgd.py (q = 8192/60000, C = √d, C_g = 0.1, lr 16, momentum 0.9) for e epochs, with a
constant or a linearly decaying rate. Each cell is one `featdp.training.fit` at (ε, δ = 1e-5), test top-1
%, median over seeds; then the best candidate within each (proxy, ε) by n·ε, and the rule `recipe=auto`
uses (`best_rule`: the four bands with the least mean regret). Results: benchmarks/results/choose_epochs.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import pathlib
import re
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_synthetic import gaussian_mixture  # noqa: E402
from choose_defaults import DELTA, digits  # noqa: E402
from tables import finish, seed_accuracies  # noqa: E402

from featdp.data import ArraySource  # noqa: E402
from featdp.methods.dp_sgd import recipe_for_epochs  # noqa: E402
from featdp.training import COUNT_SHARE, SAMPLER_RESERVE  # noqa: E402


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


# Band edges a rule may use (ñ·ε); round numbers, so that no proxy cell is fitted to an edge.
THRESHOLDS = (2_000, 3_000, 5_000, 10_000, 20_000, 35_000, 50_000, 100_000, 150_000, 250_000)
BANDS = 4
RULE_HEADING = "## The rule: recipe=auto's bands"


def method_budget(n: int, epsilon: float) -> float:
    """ñ·ε as a fit resolves it: ñ ≈ n, and the method's share of ε after the count and the sampler."""
    return n * epsilon * (1 - COUNT_SHARE) * (1 - SAMPLER_RESERVE)


def read_cells(text: str) -> list[tuple[float, str, dict[tuple[float, str], float]]]:
    """(ñ·ε, proxy, {(epochs, schedule): accuracy}) for every (proxy, ε) of a results file this script wrote."""
    cells = []
    for section in re.split(r"\n## ", text)[1:]:
        name = section.splitlines()[0].strip()
        size = re.search(r"\bn = (\d+)", name)
        header = next((line for line in section.splitlines() if line.startswith("| candidate |")), None)
        if size is None or header is None:
            continue
        epsilons = [float(cell.split("=")[1]) for cell in header.strip("|").split("|")[1:]]
        scores: dict[float, dict[tuple[float, str], float]] = {e: {} for e in epsilons}
        for line in section.splitlines():
            row = re.match(r"\| ([\d.]+) epochs, (\w+) \| (.*) \|$", line)
            if row:
                for epsilon, value in zip(epsilons, row.group(3).split(" | ")):
                    scores[epsilon][(float(row.group(1)), row.group(2))] = float(value)
        cells += [(method_budget(int(size.group(1)), e), name, scores[e]) for e in epsilons]
    return cells


def best_rule(cells) -> tuple[tuple[tuple[float, float, str], ...], float, float]:
    """The rule of `BANDS` bands (edges from `THRESHOLDS`, epochs never fewer in a higher band) with the
    least mean regret against the best candidate of each cell, ties broken by the worst regret and then
    by the rule's order: ((below, epochs, schedule), …, (inf, epochs, schedule)), mean, worst."""
    options = sorted(cells[0][2])
    regret = np.array([[max(scores.values()) - scores[o] for o in options] for _, _, scores in cells])
    budgets = np.array([budget for budget, _, _ in cells])
    sequences = [seq for seq in itertools.product(range(len(options)), repeat=BANDS)
                 if all(options[a][0] <= options[b][0] for a, b in zip(seq, seq[1:]))]
    best = None
    for edges in itertools.combinations(THRESHOLDS, BANDS - 1):
        band = np.searchsorted(np.array(edges), budgets, side="right")
        total = np.array([regret[band == b].sum(axis=0) for b in range(BANDS)])
        worst = np.array([regret[band == b].max(axis=0) if (band == b).any() else np.zeros(len(options))
                          for b in range(BANDS)])
        for seq in sequences:
            key = (sum(total[b, o] for b, o in enumerate(seq)) / len(cells),
                   max(worst[b, o] for b, o in enumerate(seq)), edges, seq)
            if best is None or key < best:
                best = key
    mean, worst, edges, seq = best
    rule = tuple((below, *options[o]) for below, o in zip((*map(float, edges), math.inf), seq))
    return rule, mean, worst


def rule_section(text: str) -> str:
    cells = read_cells(text)
    rule, mean, worst = best_rule(cells)
    options = sorted(cells[0][2])
    fixed = {o: [max(s.values()) - s[o] for _, _, s in cells] for o in options}
    single = min(options, key=lambda o: (np.mean(fixed[o]), max(fixed[o])))
    bands = ", ".join(f"below {below:,.0f}: {epochs:g} epochs {schedule}" if math.isfinite(below)
                      else f"above: {epochs:g} epochs {schedule}" for below, epochs, schedule in rule)
    return (f"\n{RULE_HEADING}\n\nOver {len(cells)} (proxy, ε) cells, each at ñ·ε = n·ε·(1 − count share)·(1 − "
            f"sampler reserve) as a fit resolves it, the {BANDS}-band rule with edges from {THRESHOLDS} and "
            "epochs never fewer in a higher band with the least mean regret (points below the cell's best "
            f"candidate): **{bands}**; mean regret {mean:.2f}, worst {worst:.1f}. The best single recipe, "
            f"{single[0]:g} epochs {single[1]}: mean {np.mean(fixed[single]):.2f}, worst {max(fixed[single]):.1f}.\n\n"
            f"`AUTO_EPOCHS = ({', '.join(_band(band) for band in rule)})`\n")


def _band(band: tuple[float, float, str]) -> str:
    below, epochs, schedule = band
    return f"({'math.inf' if math.isinf(below) else f'{below:_.1f}'}, {epochs:.1f}, {schedule!r})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", default="0.5,1,2,3,8")
    parser.add_argument("--epochs", default="5,10,20,40")
    parser.add_argument("--schedules", default="constant,linear")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--proxies", default=None, help="comma-separated substrings of proxy names; default: all")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--name", default="choose_epochs", help="file stem under --out")
    parser.add_argument("--rule-from", type=pathlib.Path, default=None,
                        help="fit nothing: derive the rule from this results file and rewrite its rule section")
    args = parser.parse_args(argv)
    if args.rule_from is not None:
        text = args.rule_from.read_text().split(f"\n{RULE_HEADING}")[0].rstrip("\n") + "\n"
        section = rule_section(text)
        print(section)
        args.rule_from.write_text(text + section)
        return 0
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
                overrides = recipe_for_epochs(n, d, e, schedule)
                scores[label] = [float(np.median(seed_accuracies(train, test, "dp-sgd", overrides, epsilon, DELTA,
                                                                 args.seeds))) for epsilon in epsilons]
                lines.append(f"| {label} | " + " | ".join(f"{a:.1f}" for a in scores[label]) + " |")
                print(lines[-1], flush=True)
        for i, epsilon in enumerate(epsilons):
            order = sorted(scores, key=lambda label: -scores[label][i])
            best, second = order[0], order[1]
            ranked.append((n * epsilon, f"| {n * epsilon:,.0f} | {name} | {epsilon:g} | {best} | "
                           f"{scores[best][i]:.1f} | {second} ({scores[best][i] - scores[second][i]:.1f}) |"))
    ranking += [row for _, row in sorted(ranked)]
    lines += ranking
    lines.append(rule_section("\n".join(lines)))
    finish(lines, started, args.out, args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
