"""Time of the grid releases inside a DP-LS fit, against the fit itself and against the old float32 JAX release.

Command (≈ 3 min on 2 quiet cores at the default 3 repeats, 10 min for 5 repeats under load; the 2 GB
ImageNet-shaped feature file of benchmarks/fit_scale.py is generated once in --workdir if missing, ≈ 25 s
here, and reused):

    python benchmarks/release_time.py [--repeats 3] [--workdir /tmp/featdp_bench]
        [--imagenet-n 1281167] [--shapes fmnist,imagenet]

Shapes (DP-LS, ε = 1):
* fmnist: Fashion-MNIST ScatterNet shape, n = 60,000, d = 3969, K = 10, δ = 1e-5; synthetic unit-norm
  float32 features (class means + Gaussian noise, numpy seed 0) held in memory as an ArraySource, fitted
  without a `featdp.cache.StatisticsCache`, so every fit does its own Gram pass;
* imagenet: n = 1,281,167, d = 768, K = 1000, δ = 1e-6; the synthetic float16 HDF5 file that
  benchmarks/fit_scale.py generates (its data_path/generate are imported, so both benchmarks share the
  file), streamed from disk by fit() with the page cache warm. `--imagenet-n` uses a smaller file instead;
  the table then says so.

What it measures, per repeat, side by side in one process:
* fit s: wall time of featdp.training.fit(train, "dp-ls", epsilon=1, delta=δ, seed=0, releaser=R), where
  R is a featdp.mechanism.Releaser whose `release` is timed (everything inside: grid choice, upper
  triangle, rounding, integer noise, mirroring); the count release num_examples is included;
* release s (in fit): the sum of those times. The block tables (integer_gaussian.block_table, mpmath,
  cached per noise scale per process) are cleared before every fit, so each fit pays for building them as
  a fresh process does; "tables s" is the time to rebuild them alone, measured after the fit;
* old path: what the releases cost before, on the same statistics (the old Releaser, re-implemented
  here: fold_in keys, jitted jax.random.normal(key, shape, float32) with triu + mirrored strict upper
  triangle for symmetric statistics, to float64, times σΔ, plus the value), cold (jax.clear_caches()
  first, so it includes jit compilation, as a fresh process does);
* warm: then `--inner` alternated runs of the same releases of the same statistics, new (a fresh
  Releaser, tables cached) and old (compiled); their median.
Per shape: medians over `--repeats` fits; ratios (release/fit, new/old) are computed within each repeat
and their median reported, so both sides of a ratio ran next to each other.

Goals (PASS/FAIL): release (in fit) / fit ≤ 10% at both shapes. The new/old release ratio is reported,
no target.

Expected (results/release_time.md, 5 repeats; the machine's load rose from 2 to 8 during that run):
fmnist fit 12–14 s when quiet (25–57 s loaded), releases 0.56–0.78 s of which ≈ 0.19 s is building the
block tables, release/fit 2.6–6.2% (median 4.6%); imagenet fit 75–92 s in that run (11–15 s in an earlier
3-repeat run at load ≈ 2), releases 0.55–1.2 s (≈ 0.25 s at load ≈ 2), mostly block tables (two noise
scales plus the count's), release/fit ≈ 0.9% in that run (≈ 2.1% at load ≈ 2). New vs old: warm ≈ 1.1×
at fmnist (both ≈ 0.5 s for the 7.9·10⁶-coordinate Gram), ≈ 2.6× at imagenet (0.1 s vs 0.04 s); cold, the
new release is faster than the old one (≈ 0.3–0.5×), whose first call compiles the JAX kernels.

The table is printed and written to benchmarks/results/release_time.md (release_time_imagenet-n<N>.md
when --imagenet-n is not the full size).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fit_scale  # noqa: E402  (the ImageNet-shaped data: same file, same generator)

from featdp import integer_gaussian, mechanism, training  # noqa: E402
from featdp.data import ArraySource  # noqa: E402

EPSILON = 1.0
FMNIST = {"n": 60_000, "d": 3969, "k": 10, "delta": 1e-5}
GOAL_SHARE = 0.10

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class TimedReleaser(mechanism.Releaser):
    """The real Releaser, with every `release` call timed and its input kept (for the old path)."""

    def __init__(self, key):
        super().__init__(key)
        self.seconds: dict[str, float] = {}
        self.inputs: list[tuple[np.ndarray, mechanism.Release]] = []

    def release(self, name, value, **kwargs):
        start = time.perf_counter()
        out = super().release(name, value, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.inputs.append((np.asarray(value, np.float64), self.releases[-1]))
        return out

    def release_stack(self, *args, **kwargs):  # not used by DP-LS; refuse rather than time it wrongly
        raise NotImplementedError("release_time.py times DP-LS, which releases no stacks")


# ---------------------------------------------------------------------------------------------------
# The old release (featdp before the grid release), for comparison


@functools.partial(jax.jit, static_argnums=1)
def _old_symmetric_standard_normal(key, shape):
    draw = jax.random.normal(key, shape, dtype=jnp.float32)
    return jnp.triu(draw) + jnp.swapaxes(jnp.triu(draw, 1), -1, -2)


def old_releases(inputs, seed: int = 0) -> float:
    """Seconds to release `inputs` the old way: N(0, (σΔ)²) in float32, mirrored for symmetric ones."""
    start = time.perf_counter()
    root, _ = jax.random.split(jax.random.key(seed))
    for index, (value, record) in enumerate(inputs):
        if record.name == "num_examples":
            continue  # the old path released no count
        key = jax.random.fold_in(root, index)
        std = record.noise_multiplier * record.sensitivity
        if record.symmetric:
            noise = np.asarray(_old_symmetric_standard_normal(key, value.shape), np.float64) * std
        else:
            noise = np.asarray(jax.random.normal(key, value.shape, dtype=np.float32), np.float64) * std
        out = value + noise
        assert out.shape == value.shape
    return time.perf_counter() - start


def new_releases_warm(inputs) -> dict[str, float]:
    releaser = mechanism.Releaser(mechanism.make_key(1))
    seconds = {}
    for value, record in inputs:
        start = time.perf_counter()
        releaser.release(record.name, value, sensitivity=record.sensitivity,
                         noise_multiplier=record.noise_multiplier, symmetric=record.symmetric)
        seconds[record.name] = time.perf_counter() - start
    return seconds


def table_seconds(records) -> float:
    integer_gaussian.block_table.cache_clear()
    start = time.perf_counter()
    for record in records:
        if record.grid:
            integer_gaussian.block_table(record.grid_scale)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------
# Data


def fmnist_source() -> ArraySource:
    n, d, k = FMNIST["n"], FMNIST["d"], FMNIST["k"]
    rng = np.random.default_rng(0)
    labels = rng.integers(k, size=n)
    means = 0.3 * rng.standard_normal((k, d)).astype(np.float32)
    features = np.empty((n, d), np.float32)
    for start in range(0, n, 8192):
        stop = min(n, start + 8192)
        block = rng.standard_normal((stop - start, d), dtype=np.float32) + means[labels[start:stop]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        features[start:stop] = block
    return ArraySource(features, labels, k)


def imagenet_path(workdir: pathlib.Path, n: int) -> pathlib.Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = fit_scale.data_path(workdir, n)
    if path.exists() and fit_scale._file_ok(path, n):
        print(f"reusing {path}", flush=True)
    else:
        print(f"generating {path} (fit_scale.generate) ...", flush=True)
        start = time.perf_counter()
        fit_scale.generate(path, n)
        print(f"  generated in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"warming the page cache: {fit_scale.warm_page_cache(path):.1f} s", flush=True)
    return path


# ---------------------------------------------------------------------------------------------------
# Measurement


def measure(label: str, train, delta: float, repeats: int, inner: int) -> dict:
    reps = []
    for rep in range(repeats):
        integer_gaussian.block_table.cache_clear()
        releaser = TimedReleaser(mechanism.make_key(0))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = training.fit(train, "dp-ls", epsilon=EPSILON, delta=delta, seed=0, releaser=releaser)
        fit_seconds = time.perf_counter() - start
        assert [r.name for r in result.releases] == ["num_examples", "gram", "class_sums"], result.releases
        tables = table_seconds(result.releases)  # leaves the tables cached for the warm runs
        jax.clear_caches()
        old_cold = old_releases(releaser.inputs)
        warm_runs, old_warm_runs = [], []
        for _ in range(inner):  # alternated, so load drift hits both alike
            warm_runs.append(new_releases_warm(releaser.inputs))
            old_warm_runs.append(old_releases(releaser.inputs))
        warm = {k: statistics.median(w[k] for w in warm_runs) for k in warm_runs[0]}
        old_warm = statistics.median(old_warm_runs)
        new_warm = statistics.median(sum(w.values()) for w in warm_runs)
        rep_result = {
            "fit": fit_seconds, "method_fit": result.fit_seconds, "release": sum(releaser.seconds.values()),
            "per_release": dict(releaser.seconds), "tables": tables, "warm": new_warm,
            "per_release_warm": warm, "old_cold": old_cold, "old_warm": old_warm,
            "records": {r.name: r for r in result.releases},
        }
        rep_result["share"] = rep_result["release"] / fit_seconds
        rep_result["cold_ratio"] = rep_result["release"] / old_cold
        rep_result["warm_ratio"] = new_warm / old_warm
        reps.append(rep_result)
        print(f"  {label} rep {rep + 1}/{repeats}: fit {fit_seconds:.1f} s, releases {rep_result['release']:.3f} s "
              f"({', '.join(f'{k} {v:.3f}' for k, v in releaser.seconds.items())}), tables {tables:.3f} s, "
              f"new warm {rep_result['warm']:.3f} s, old cold {old_cold:.3f} s, old warm {old_warm:.3f} s",
              flush=True)
        del releaser, result
    med = {key: statistics.median(r[key] for r in reps)
           for key in ("fit", "method_fit", "release", "tables", "warm", "old_cold", "old_warm", "share",
                       "cold_ratio", "warm_ratio")}
    names = list(reps[0]["per_release"])
    med["per_release"] = {k: statistics.median(r["per_release"][k] for r in reps) for k in names}
    med["per_release_warm"] = {k: statistics.median(r["per_release_warm"][k] for r in reps) for k in names}
    med["records"] = reps[0]["records"]
    med["reps"] = reps
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fits per shape")
    parser.add_argument("--inner", type=int, default=3, help="warm new/old release runs per fit, alternated")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/featdp_bench"))
    parser.add_argument("--imagenet-n", type=int, default=fit_scale.IMAGENET_TRAIN,
                        help="train rows of the ImageNet-shaped file (smaller if generating the full one is too slow)")
    parser.add_argument("--shapes", default="fmnist,imagenet")
    args = parser.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if set(shapes) - {"fmnist", "imagenet"}:
        parser.error("--shapes: choose from fmnist, imagenet")

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    wall = time.perf_counter()
    results = {}
    for shape in shapes:
        if shape == "fmnist":
            print("building the fmnist-shaped features ...", flush=True)
            train = fmnist_source()
            results[shape] = (dict(FMNIST), measure(shape, train, FMNIST["delta"], args.repeats, args.inner))
            del train
        else:
            from featdp.featurefile import FeatureFile

            path = imagenet_path(args.workdir, args.imagenet_n)
            spec = {"n": args.imagenet_n, "d": fit_scale.DIM, "k": fit_scale.CLASSES, "delta": fit_scale.DELTA}
            with FeatureFile(path) as f:
                results[shape] = (spec, measure(shape, f.split("train"), spec["delta"], args.repeats, args.inner))

    lines = [
        "| shape | n | d | K | δ | fit s | method.fit s | releases in fit s | of which tables s | release / fit "
        f"| ≤ {GOAL_SHARE:.0%} | new warm s | old cold s (jit) | old warm s | new/old cold | new/old warm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    detail = [
        "",
        "Per release (medians; the old path has no count release):",
        "",
        "| shape | release | shape of statistic | m | grid scale s | in fit s | new warm s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    raw = ["", "Per repeat (fit s / releases in fit s / release share / new warm s / old warm s):", ""]
    verdicts = []
    for shape, (spec, m) in results.items():
        share = m["share"]
        ok = share <= GOAL_SHARE
        verdicts.append((shape, ok, share))
        n_note = "" if shape != "imagenet" or spec["n"] == fit_scale.IMAGENET_TRAIN else " (reduced: --imagenet-n)"
        lines.append(
            f"| {shape} | {spec['n']:,}{n_note} | {spec['d']} | {spec['k']} | {spec['delta']:g} | {m['fit']:.2f} "
            f"| {m['method_fit']:.2f} | {m['release']:.3f} | {m['tables']:.3f} | {share:.2%} "
            f"| {'PASS' if ok else 'FAIL'} | {m['warm']:.3f} | {m['old_cold']:.3f} | {m['old_warm']:.3f} "
            f"| {m['cold_ratio']:.2f} | {m['warm_ratio']:.2f} |"
        )
        for name, seconds in m["per_release"].items():
            record = m["records"][name]
            detail.append(
                f"| {shape} | {name} | {'×'.join(map(str, record.shape))}{' (symmetric)' if record.symmetric else ''} "
                f"| {record.coordinates:,} | {record.grid_scale:.4g} | {seconds:.4f} "
                f"| {m['per_release_warm'][name]:.4f} |"
            )
        raw.append(f"* {shape}: " + "; ".join(
            f"{r['fit']:.1f} / {r['release']:.3f} / {r['share']:.2%} / {r['warm']:.3f} / {r['old_warm']:.3f}"
            for r in m["reps"]))

    reduced = "imagenet" in results and args.imagenet_n != fit_scale.IMAGENET_TRAIN
    command = " ".join([pathlib.Path(sys.executable).as_posix(), "benchmarks/release_time.py"] + sys.argv[1:])
    header = [
        f"# release_time: DP-LS at ε = {EPSILON:g}, grid release vs fit and vs the old float32 release",
        "",
        f"Command: `{command}`. "
        f"Started {started:%Y-%m-%d %H:%M} UTC on {platform.node() or 'host'}: {os.cpu_count()} CPUs, "
        f"numpy {np.__version__}, jax {jax.__version__}, Python {platform.python_version()}; "
        f"OMP/OPENBLAS/MKL threads {os.environ.get('OMP_NUM_THREADS', 'unset')}/"
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}/{os.environ.get('MKL_NUM_THREADS', 'unset')}, "
        f"mechanism threads {mechanism._THREADS}; load average at start {load_start[0]:.1f}, at end "
        f"{os.getloadavg()[0]:.1f} (other jobs share this machine); {time.perf_counter() - wall:.0f} s in all. "
        f"Medians over {args.repeats} repeats (fits); each repeat times the fit, then the old release cold, then "
        f"{args.inner} alternated warm runs of new and old (their median). Ratios are medians of the per-repeat "
        f"ratios (side by side), not ratios of medians.",
        "",
        "fit s: training.fit wall time (calibration, count release, Gram pass, releases, PSD ridge solve); "
        "method.fit s: FitResult.fit_seconds. Releases in fit: the timed Releaser.release calls of that fit "
        "(num_examples, gram, class_sums), block tables built cold; new warm: the same releases again, tables "
        "cached; old: the pre-grid float32 JAX release of the same statistics, cold = after jax.clear_caches().",
    ]
    if reduced:
        header.append(f"ImageNet shape run with n = {args.imagenet_n:,} (--imagenet-n), not 1,281,167.")
    header.append("")
    summary = [
        "",
        f"Goal: release / fit ≤ {GOAL_SHARE:.0%}: "
        + ", ".join(f"{shape} {share:.2%} {'PASS' if ok else 'FAIL'}" for shape, ok, share in verdicts)
        + f" → {'PASS' if all(ok for _, ok, _ in verdicts) else 'FAIL'}",
    ]
    table = "\n".join(header + lines + summary + detail + raw) + "\n"
    print()
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "release_time" + (f"_imagenet-n{args.imagenet_n}" if reduced else "")
    if shapes != ["fmnist", "imagenet"]:
        name += "_" + "-".join(shapes)
    (RESULTS / f"{name}.md").write_text(table)
    print(f"written to {RESULTS / (name + '.md')}")


if __name__ == "__main__":
    main()
