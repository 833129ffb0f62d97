"""Peak memory of `fit` and of a small bench, relative to the float32 rows they hold (issue 12, item 8).

Command (≈ 10 min on 2 shared cores, most of it the two bench cases; the feature files, ≈ 0.7 GB, are
generated once in --workdir):

    python benchmarks/fit_memory.py [--n 200000] [--dim 512] [--classes 100] \
        [--workdir /tmp/featdp_fit_memory] [--cases load,dp-ls,dp-fc,bench] [--dtypes float32,float16]

Data: a train split of n rows (and a test split of n/10 rows) of d-dimensional Gaussian-mixture features
(K classes, means 0.1·N(0, I), unit noise), stored once as float32 and once as float16. Below
`featdp.data.IN_MEMORY_BUDGET_BYTES` (1 GiB of float32 features) `fit` holds the train split in memory, and
the bench holds both splits there.

Each case runs in a fresh subprocess, for each stored dtype:
* ``load``   `featdp.data.maybe_in_memory(split)`: the split as `fit` loads it, and nothing else;
* ``dp-ls``  `featdp.training.fit(split, "dp-ls", epsilon=1, delta=1e-6, seed=0, device="cpu")`, then its
  test accuracy;
* ``dp-fc``  the same with dp-fc at 10 full-batch steps (pinned; its default is now 30);
* ``bench``  `featdp.bench.runner.load_splits` + `run_bench` for dp-ls, dp-fc, ridge and logreg at ε = 1,
  δ = 1e-5, one seed: default, oracle (hold-out part) and private-tuned (selection parts) rows.
Peak: the subprocess's ru_maxrss after the case minus its baseline, the resident set after the imports and
after a warm-up of the same case on 300 in-memory rows. The warm-up pays what does not grow with the data
(JAX's CPU runtime and compilations, BLAS buffers, thread pools: the "fixed costs" column, ≈ 0.1 GB for the
bench); "data" is the float32 bytes of the rows the case holds (the train split; for the bench, train +
test). The target is peak / data ≤ 1.3 for every case (PASS/FAIL printed as measured). Works with any
featdp on PYTHONPATH: the "before" figures below came from the commit before this script
(`git archive c5ca42f featdp | tar -x -C /tmp/orig`, then `PYTHONPATH=/tmp/orig`).

Expected at the default size (results/fit_memory.md): load ≈ 1.03×, fits ≈ 1.1×, bench ≈ 1.22×, every
case PASS, for float32 and float16 files alike. Before (c5ca42f): load 1.30×, dp-ls 1.35×, dp-fc 1.45×
(an n×d boolean NaN scan, a whole-block read and its float32 copy beside the result, a new preprocessed
block per block), bench 6.3× (a read-only copy of both splits, a preprocessed copy of the train split
cached for reuse, copies of its hold-out and selection parts, and theirs preprocessed).

The table is printed and written to --out-dir (default benchmarks/results) as fit_memory.md
(fit_memory_n<N>_d<D>.md at another size).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

SEED = 0
GENERATE_BLOCK = 16384
TARGET = 1.3
CASES = ("load", "dp-ls", "dp-fc", "bench")
BENCH_METHODS = ("dp-ls", "dp-fc", "ridge", "logreg")
HYPERPARAMETERS = {"dp-fc": {"steps": 10}}  # the dp-fc case: 10 full-batch steps (its default is now 30)


# ---------------------------------------------------------------------------------------------------
# Data


def _path(workdir: pathlib.Path, n: int, dim: int, classes: int, dtype: str) -> pathlib.Path:
    return workdir / f"memory_v2_n{n}_d{dim}_k{classes}_{dtype}.h5"


def generate(path: pathlib.Path, n: int, dim: int, classes: int, dtype: str) -> None:
    """Writes train (n rows) and test (n/10 rows) block by block, then renames: never O(n) in memory."""
    import numpy as np

    from featdp.featurefile import FeatureWriter

    rng = np.random.default_rng(SEED)
    means = (0.1 * rng.standard_normal((classes, dim))).astype(np.float32)
    tmp = path.with_name(f".{path.name}.tmp")
    with FeatureWriter(tmp, feature_dim=dim, num_classes=classes, dataset="synthetic-memory", overwrite=True) as writer:
        for split_id, (split, rows) in enumerate((("train", n), ("test", max(1, n // 10))), start=1):
            writer.create_split(split, rows, dtype=dtype)
            for index, start in enumerate(range(0, rows, GENERATE_BLOCK)):
                stream = np.random.default_rng([SEED, split_id, index])
                size = min(GENERATE_BLOCK, rows - start)
                labels = stream.integers(classes, size=size)
                x = stream.standard_normal((size, dim), dtype=np.float32) + means[labels]
                writer.append(split, x.astype(dtype), labels, np.arange(start, start + size, dtype=np.int64))
            writer.mark_complete(split)
    os.replace(tmp, path)


def _ready(path: pathlib.Path, n: int) -> bool:
    from featdp.featurefile import FeatureFile, FeatureFileError

    if not path.exists():
        return False
    try:
        with FeatureFile(path) as f:
            return f.split("train").num_examples == n
    except FeatureFileError:
        return False


# ---------------------------------------------------------------------------------------------------
# One case, in a fresh subprocess


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _bench_config():
    from featdp.bench.runner import BenchConfig

    return BenchConfig(epsilons=(1.0,), delta=1e-5, seeds=1, methods=BENCH_METHODS)


def _warm_up(case: str, dim: int, classes: int) -> None:
    """The case on 300 in-memory rows: pays the costs that do not grow with the data (JAX's runtime and
    compilations, BLAS buffers, thread pools) before the baseline is taken."""
    import numpy as np

    from featdp.bench.runner import run_bench
    from featdp.data import ArraySource
    from featdp.training import fit

    rng = np.random.default_rng(1)
    labels = np.arange(300) % classes
    rows = ArraySource(rng.standard_normal((300, dim), dtype=np.float32), labels, classes)
    if case in ("dp-ls", "dp-fc"):
        fit(rows, case, epsilon=1.0, delta=1e-6, seed=0, device="cpu", hyperparameters=HYPERPARAMETERS.get(case))
    elif case == "bench":
        run_bench(rows, rows, _bench_config())


def run_case(spec: dict) -> dict:
    import gc
    import warnings

    import featdp.methods  # noqa: F401 (every method, JAX included, imported before the baseline)
    from featdp.accounting import DeltaWarning
    from featdp.bench.runner import load_splits, run_bench
    from featdp.data import maybe_in_memory
    from featdp.featurefile import FeatureFile
    from featdp.training import fit

    warnings.simplefilter("ignore", DeltaWarning)
    case, path = spec["case"], spec["path"]
    gc.collect()
    imported = _current_rss()
    with FeatureFile(path) as features:
        train = features.split("train")
        test = features.split("test")
        data_bytes = train.nbytes_float32() + (test.nbytes_float32() if case == "bench" else 0)
        _warm_up(case, train.feature_dim, train.num_classes)
        gc.collect()
        baseline = _current_rss()
        start = time.perf_counter()
        accuracy = None
        if case == "load":
            held = maybe_in_memory(train)
            rows = held.num_examples
            del held
        elif case in ("dp-ls", "dp-fc"):
            result = fit(train, case, epsilon=1.0, delta=1e-6, seed=0, device="cpu",
                         hyperparameters=HYPERPARAMETERS.get(case))
            accuracy = result.accuracy(test)
            rows = result.num_examples
        else:
            bench = run_bench(*load_splits(path), _bench_config())
            rows = bench.num_train
            accuracy = max(r.accuracy for r in bench.rows if r.kind == "default")
        seconds = time.perf_counter() - start
    peak = _peak_rss()
    return {"data_bytes": data_bytes, "imported": imported, "baseline": baseline, "peak": peak,
            "above": max(0, peak - baseline), "seconds": seconds, "rows": rows, "accuracy": accuracy}


def run_in_subprocess(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--child", json.dumps({**spec, "out": str(out)})]
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = proc.stdout.strip().splitlines()[-5:]
            return {"error": f"exit {proc.returncode}: {' / '.join(tail)}"}
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------
# Report


def render(header: list[str], results: list[tuple[str, str, dict]]) -> str:
    mb = 1e6
    lines = header + [
        "",
        "| stored dtype | case | data (float32) MB | RSS after imports MB | fixed costs MB | peak above "
        f"baseline MB | ratio | goal | ≤ {TARGET}× | seconds | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for dtype, case, r in results:
        if "error" in r:
            lines.append(f"| {dtype} | {case} | | | | | | {TARGET} | ERROR | | {r['error']} |")
            continue
        ratio = r["above"] / r["data_bytes"]
        accuracy = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(
            f"| {dtype} | {case} | {r['data_bytes'] / mb:.0f} | {r['imported'] / mb:.0f} "
            f"| {(r['baseline'] - r['imported']) / mb:.0f} | {r['above'] / mb:.0f} | {ratio:.2f} | {TARGET} "
            f"| {'PASS' if ratio <= TARGET else 'FAIL'} | {r['seconds']:.1f} | {accuracy} |"
        )
    return "\n".join(lines) + "\n"


def _featdp_location() -> str:
    """Which featdp ran: this checkout's, or the one PYTHONPATH put first (a "before" copy, say)."""
    import featdp

    package = pathlib.Path(featdp.__file__).resolve().parent
    checkout = pathlib.Path(__file__).resolve().parents[1] / "featdp"
    return "this checkout" if package == checkout else str(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/featdp_fit_memory"))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        pathlib.Path(spec["out"]).write_text(json.dumps(run_case(spec)))
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; known: {', '.join(CASES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for dtype in args.dtypes.split(","):
        path = _path(args.workdir, args.n, args.dim, args.classes, dtype)
        if not _ready(path, args.n):
            generate(path, args.n, args.dim, args.classes, dtype)
        for case in cases:
            r = run_in_subprocess({"case": case, "path": str(path)})
            results.append((dtype, case, r))
            ratio = f"{r['above'] / r['data_bytes']:.2f}×" if "error" not in r else r["error"]
            print(f"{dtype} {case}: {ratio}", flush=True)
    header = [
        f"# fit_memory: n = {args.n}, d = {args.dim}, K = {args.classes}",
        "",
        f"`{' '.join(['python', 'benchmarks/fit_memory.py'] + sys.argv[1:])}` — "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, featdp from {_featdp_location()}. Each case "
        "in its own subprocess. Peak: ru_maxrss after the case minus the baseline, the resident set after the "
        "imports and a warm-up of the same case on 300 rows (whose cost, which does not grow with the data, is "
        "the fixed-costs column); data: the float32 bytes of the rows held.",
    ]
    table = render(header, results)
    print(table)
    default = (args.n, args.dim) == (200_000, 512)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / ("fit_memory.md" if default else f"fit_memory_n{args.n}_d{args.dim}.md")).write_text(table)


if __name__ == "__main__":
    main()
