"""Tail counts of the release's integer noise sampler against the Gaussian, and of the old float32 sampler.

Command (≈ 2 min on 2 cores at the default N = 10⁹):

    python benchmarks/sampler_tails.py [--count 1000000000] [--old-count N] [--scale 3.6776e8]

What it measures: N coordinates of featdp.mechanism.integer_noise(key_i, chunk, scale) — the rounded
Gaussian the releases add, at a production scale s = 1.37·2²⁸ grid units (choose_grid keeps s ≥ 2²⁸) —
drawn `--chunk` at a time (chunk i from make_key(--seed).child("sampler_tails", i), so no two chunks share
bits and 10⁹ int64 never sit in memory), standardized by the rounded Gaussian's own std
σ_r = √(s² + 1/12), z = k/σ_r. For t ∈ {4, 4.5, 5, 5.2, 5.5, 6, 6.5} it counts |z| > t, compared in exact
integers (|z| > t ⇔ |k| > c_t, c_t = ⌊t·σ_r⌋), against
* the Gaussian's expectation 2·Φ(−t)·N, and
* the rounded Gaussian's exact one, 2·Φ(−(c_t + ½)/s)·N (mpmath; differs from the first by ~1e-9 relative),
with the two-sided Poisson p-value of the observed count (scipy.stats.poisson, against the exact mean), and
the largest |z| seen. For contrast the same counts for the float32 sampler the releases used before,
jax.random.normal(key, (chunk,), float32) with keys fold_in(PRNGKey(seed), i), over `--old-count`
(default: the same N), whose values never exceed +5.2201 or go below −5.4200.

Goal (PASS/FAIL line): the new sampler's counts beyond 5.5σ and 6σ agree with the Gaussian (two-sided
Poisson p ≥ 0.01 at both thresholds).

Expected at N = 10⁹: new sampler within Poisson noise of 2Φ(−t)N at every t (≈ 63,342 beyond 4σ, ≈ 38
beyond 5.5σ, ≈ 2 beyond 6σ, ≈ 0.08 beyond 6.5σ), max |z| ≈ 6; old float32 sampler 0 beyond 5.5σ (p ≈ 1e-16
against the 38 expected) and max |z| = 5.42.

The table is printed and written to benchmarks/results/sampler_tails.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import platform
import sys
import time

import mpmath
import numpy as np
from scipy import stats as sstats

THRESHOLDS = (4.0, 4.5, 5.0, 5.2, 5.5, 6.0, 6.5)
GOAL_THRESHOLDS = (5.5, 6.0)
GOAL_P = 0.01
DEFAULT_SCALE = 1.37 * 2**28

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def gaussian_tail(t: float) -> float:
    """2·Φ(−t) in high precision."""
    with mpmath.workdps(40):
        return float(2 * mpmath.ncdf(-mpmath.mpf(t)))


def poisson_two_sided(observed: int, mean: float) -> float:
    if mean <= 0:
        return 1.0 if observed == 0 else 0.0
    low = sstats.poisson.cdf(observed, mean)
    high = sstats.poisson.sf(observed - 1, mean)
    return float(min(1.0, 2 * min(low, high)))


def count_new(count: int, chunk: int, scale: float, seed: int) -> dict:
    from featdp.mechanism import integer_noise
    from featdp.randomness import make_key

    sigma_r = math.sqrt(scale * scale + 1 / 12)
    cutoffs = np.array([math.floor(t * sigma_r) for t in THRESHOLDS], np.int64)
    counts = np.zeros(len(THRESHOLDS), np.int64)
    root = make_key(seed).child("sampler_tails")
    biggest, total, sum_sq = 0, 0, 0.0
    start = time.perf_counter()
    for index, begin in enumerate(range(0, count, chunk)):
        size = min(chunk, count - begin)
        k = integer_noise(root.child(index), size, scale)
        magnitude = np.abs(k)
        sum_sq += float(np.dot(k.astype(np.float64), k.astype(np.float64)))
        far = magnitude[magnitude > cutoffs[0]]  # ~6e-5 of the chunk: count the rest on these only
        counts += (far[:, None] > cutoffs[None, :]).sum(axis=0)
        biggest = max(biggest, int(magnitude.max()))
        total += size
        if index % 16 == 15:
            print(f"  new sampler: {total:,} drawn, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    return {"counts": counts, "cutoffs": cutoffs, "sigma_r": sigma_r, "max_z": biggest / sigma_r,
            "std": math.sqrt(sum_sq / total) / sigma_r, "seconds": seconds, "n": total}


def count_old(count: int, chunk: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    thresholds = jnp.asarray(THRESHOLDS, jnp.float32)

    @jax.jit
    def one(key):
        x = jax.random.normal(key, (chunk,), jnp.float32)
        return (jnp.abs(x)[:, None] > thresholds[None, :]).sum(axis=0), x.max(), x.min()

    root = jax.random.PRNGKey(seed)
    counts = np.zeros(len(THRESHOLDS), np.int64)
    top, bottom, total = -np.inf, np.inf, 0
    start = time.perf_counter()
    chunks = -(-count // chunk)
    for index in range(chunks):
        c, hi, lo = one(jax.random.fold_in(root, index))
        counts += np.asarray(c, np.int64)
        top, bottom = max(top, float(hi)), min(bottom, float(lo))
        total += chunk  # the jitted draw has a fixed shape: the last chunk is drawn whole
        if index % 16 == 15:
            print(f"  old sampler: {total:,} drawn, {time.perf_counter() - start:.0f} s", flush=True)
    return {"counts": counts, "max": top, "min": bottom, "seconds": time.perf_counter() - start, "n": total}


def _mean(value: float) -> str:
    return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000_000, help="coordinates of the new sampler")
    parser.add_argument("--old-count", type=int, default=None, help="coordinates of the old one (default: --count)")
    parser.add_argument("--chunk", type=int, default=1 << 24)
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="s in grid units (≥ 2^28 in releases)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    old_count = args.count if args.old_count is None else args.old_count

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    print(f"new sampler: {args.count:,} coordinates at s = {args.scale:.6g}", flush=True)
    new = count_new(args.count, args.chunk, args.scale, args.seed)
    print(f"  {new['seconds']:.0f} s", flush=True)
    print(f"old sampler: {old_count:,} coordinates", flush=True)
    old = count_old(old_count, args.chunk, args.seed)
    print(f"  {old['seconds']:.0f} s", flush=True)

    s = args.scale
    lines = [
        "| t | expected 2Φ(−t)·N | exact mean (rounded law) | new: observed | new: obs/exp | new: p (two-sided) "
        f"| expected, old N = {old['n']:.3g} | old float32: observed | old: p (two-sided) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for i, t in enumerate(THRESHOLDS):
        expected = gaussian_tail(t) * new["n"]
        with mpmath.workdps(40):
            exact = float(2 * mpmath.ncdf(-(mpmath.mpf(int(new["cutoffs"][i])) + mpmath.mpf(0.5)) / mpmath.mpf(s)))
        exact *= new["n"]
        observed = int(new["counts"][i])
        p_new = poisson_two_sided(observed, exact)
        expected_old = gaussian_tail(t) * old["n"]
        observed_old = int(old["counts"][i])
        p_old = poisson_two_sided(observed_old, expected_old)
        if t in GOAL_THRESHOLDS:
            verdicts.append((t, p_new >= GOAL_P))
        ratio = f"{observed / expected:.4f}" if expected >= 1 else "—"
        lines.append(
            f"| {t:g} | {_mean(expected)} | {_mean(exact)} | {observed:,} | {ratio} | {p_new:.3g} "
            f"| {_mean(expected_old)} | {observed_old:,} | {p_old:.3g} |"
        )

    import jax

    ok = all(v for _, v in verdicts)
    command = " ".join([pathlib.Path(sys.executable).as_posix(), "benchmarks/sampler_tails.py"] + sys.argv[1:])
    header = [
        f"# sampler_tails: N = {new['n']:,} rounded-Gaussian draws at s = {s:.6g} (= {s / 2**28:.4g}·2²⁸) "
        f"vs the old float32 sampler (N = {old['n']:,})",
        "",
        f"Command: `{command}`. "
        f"Started {started:%Y-%m-%d %H:%M} UTC on {platform.node() or 'host'}: {os.cpu_count()} CPUs, "
        f"numpy {np.__version__}, jax {jax.__version__}, Python {platform.python_version()}; load average at "
        f"start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} (other jobs share this machine).",
        "",
        f"New: featdp.mechanism.integer_noise(make_key({args.seed}).child('sampler_tails', i), {args.chunk:,}, s) "
        f"per chunk i, z = k/σ_r with σ_r = √(s² + 1/12); counts compare |k| > ⌊t·σ_r⌋ exactly. "
        f"{new['seconds']:.0f} s ({new['n'] / new['seconds'] / 1e6:.1f} M draws/s including counting). "
        f"Empirical std of z: {new['std']:.6f}; max |z| = {new['max_z']:.4f}. "
        f"p-values: two-sided Poisson against the exact mean.",
        "",
        f"Old: jax.random.normal(fold_in(PRNGKey({args.seed}), i), ({args.chunk:,},), float32), z = the draw; "
        f"{old['seconds']:.0f} s. Range seen: [{old['min']:.4f}, {old['max']:.4f}], so max |z| = "
        f"{max(old['max'], -old['min']):.4f}. p-values against 2Φ(−t)·N.",
        "",
    ]
    summary = [
        "",
        "Goal: new sampler's counts beyond 5.5σ and 6σ agree with the Gaussian (two-sided Poisson p ≥ "
        f"{GOAL_P:g}): " + ", ".join(f"t = {t:g}: {'PASS' if v else 'FAIL'}" for t, v in verdicts)
        + f" → {'PASS' if ok else 'FAIL'}",
    ]
    table = "\n".join(header + lines + summary) + "\n"
    print()
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sampler_tails.md").write_text(table)
    print(f"written to {RESULTS / 'sampler_tails.md'}")


if __name__ == "__main__":
    main()
