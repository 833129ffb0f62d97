"""Augmentation multiplicity on Fashion-MNIST ScatterNet features: what V views per training example cost to
extract and what they give, private end to end.

    python benchmarks/views.py --workdir /tmp/featdp_views [--views 1,4,8] [--eps 0.5,1,3,8] [--seeds 3]
                               [--methods dp-sgd,dp-fc] [--augment-shift PX] [--no-augment-flip]
                               [--out benchmarks/results]

For each V: `featdp extract -b scatternet -d fashion_mnist --views V` into the workdir (timed; reused, with
its recorded time, when the file is already complete), then the bench (`featdp.bench.runner.run_bench`) on
it: each method's default row and its private-tuned row (`featdp tune`'s selection, accounted within the
same ε), at each ε, seeds 0…S−1, test top-1 % (the test split has one view). Every statistic counts a
training example as the average over its views, so the sensitivities are the one-view ones.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time
import warnings

from featdp.accounting import DeltaWarning
from featdp.bench.runner import BenchConfig, load_splits, run_bench
from featdp.cache import StatisticsCache
from featdp.featurefile import FeatureFile, FeatureFileError


def extracted(workdir: pathlib.Path, views: int, shift: int | None = None, flip: bool = True
              ) -> tuple[pathlib.Path, float]:
    """(the V-view feature file, the seconds its extraction took), extracting it unless it is complete; the
    seconds are NaN (not measured) when this call only finished an extraction an earlier run had begun."""
    from featdp.extraction.extract import ExtractConfig, extract

    variant = ("" if shift is None or views == 1 else f"_shift{shift}") + ("" if flip or views == 1 else "_noflip")
    path = workdir / f"fmnist_scatternet_views{views}{variant}.h5"
    timing = path.with_suffix(".seconds.json")
    try:
        with FeatureFile(path) as features:
            complete = all(features.split(name).complete for name in features.split_names)
        if complete and timing.exists():
            return path, float(json.loads(timing.read_text())["seconds"])
    except (FeatureFileError, OSError):
        pass
    fresh = not path.exists()
    started = time.perf_counter()
    extract(ExtractConfig(backbone="scatternet", dataset="fashion_mnist", out=path, views=views,
                          augment_shift=shift, augment_flip=flip))
    seconds = time.perf_counter() - started if fresh else float("nan")
    timing.write_text(json.dumps({"seconds": seconds}))
    return path, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/featdp_views"))
    parser.add_argument("--views", default="1,4,8")
    parser.add_argument("--eps", default="0.5,1,3,8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="dp-sgd,dp-fc")
    parser.add_argument("--memory-gib", type=float, default=16.0, help="hold splits up to this size in memory")
    parser.add_argument("--augment-shift", type=int, default=None, help="largest shift in px; default R/8")
    parser.add_argument("--no-augment-flip", action="store_true", help="augmented views are never flipped")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write views<variant>.md there")
    args = parser.parse_args()
    view_counts = [int(v) for v in args.views.split(",")]
    epsilons = tuple(float(e) for e in args.eps.split(","))
    config = BenchConfig(epsilons=epsilons, delta=1e-5, seeds=args.seeds, methods=tuple(args.methods.split(",")),
                         references=False, tune=False, private_tune=True, auto=False)
    args.workdir.mkdir(parents=True, exist_ok=True)

    cells: dict[tuple[int, str, str], dict[float, list[float]]] = {}
    seconds: dict[tuple[int, str, str], list[float]] = {}
    extraction: dict[int, float] = {}
    for views in view_counts:
        path, extraction[views] = extracted(args.workdir, views, args.augment_shift, not args.no_augment_flip)
        train, test = load_splits(path, budget_bytes=int(args.memory_gib * 2**30))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeltaWarning)
            result = run_bench(train, test, config, on_row=lambda row: print(
                f"V={views} {row.kind} {row.method} ε={row.epsilon:g} seed {row.seed}: {100 * row.accuracy:.1f}% "
                f"({row.fit_seconds:.0f} s)", flush=True), cache=StatisticsCache())
        for row in result.rows:
            key = (views, row.kind, row.method)
            cells.setdefault(key, {}).setdefault(row.epsilon, []).append(100 * row.accuracy)
            seconds.setdefault(key, []).append(row.fit_seconds)
        del train, test, result

    augmentation = ("" if args.augment_shift is None else f" --augment-shift {args.augment_shift}") + (
        " --no-augment-flip" if args.no_augment_flip else "")
    lines = [
        "# Augmentation multiplicity: Fashion-MNIST ScatterNet, V views per training example",
        "",
        f"Command: `python benchmarks/views.py --views {args.views} --eps {args.eps} --seeds {args.seeds} "
        f"--methods {args.methods}{augmentation}`",
        "",
        f"Test top-1 %, median over seeds 0…{args.seeds - 1} (δ = 1e-5; test split: one view). Private-tuned rows:"
        " hyperparameters chosen by `featdp tune`'s accounted selection within the same ε. Extraction: "
        f"`featdp extract -b scatternet -d fashion_mnist --views V{augmentation}` on this machine (train 60k × V "
        "images, test 10k × 1; other jobs shared its 2 cores).",
        "",
        "| V | extract s | kind | method | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " | fit s (median) |",
        "|---|---|---|---|" + "---|" * len(epsilons) + "---|",
    ]
    for (views, kind, method), by_epsilon in cells.items():
        values = " | ".join(f"{statistics.median(by_epsilon[e]):.1f}" if e in by_epsilon else "—" for e in epsilons)
        seconds_cell = "not measured" if math.isnan(extraction[views]) else f"{extraction[views]:.0f}"
        lines.append(f"| {views} | {seconds_cell} | {kind} | {method} | {values} | "
                     f"{statistics.median(seconds[(views, kind, method)]):.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "views" + augmentation.replace(" --augment-shift ", "_shift").replace(" --no-augment-flip", "_noflip")
        (args.out / f"{name}.md").write_text(table)


if __name__ == "__main__":
    main()
