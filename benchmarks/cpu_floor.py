"""featdp's DP-SGD on the CPU against the machine's floor for it, and against Opacus on the same recipe.

Command (≈ 5 min on 2 cores, most of it Opacus; +1 min with --block-path). The feature file is
Fashion-MNIST ScatterNet from `featdp extract -b scatternet -d fashion_mnist --out F.h5`, d = 3969;
without --features the rows are synthetic, of the same shape:

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python benchmarks/cpu_floor.py [--features F.h5]
        [--repeats 3] [--epsilon 3] [--opacus-steps 293] [--block-path]

The recipe: `tramer_boneh_recipe(60000)` (Tramèr & Boneh's ScatterNet + linear: 293 Poisson steps at
q = 8192/60000, C_g = 0.1, lr 16, momentum 0.9, rows rescaled to norm 63, W₀ = 0, no bias), at ε = 3,
δ = 1e-5, n = 60,000, d = 3969, K = 10, float32, on as many threads as BLAS is configured for (T).

The floor it assumes (measured here, on the same cores, right before each featdp fit):
* arithmetic: each step multiplies the B = 8192 expected sampled rows by W (B×d·d×K, the logits) and by
  the residuals (d×B·B×K, the gradient sum): 4·B·d·K flops, 0.381 TFLOP over 293 steps. Its time is
  that ÷ the best rate numpy's BLAS reaches at these shapes here: the whole contiguous batch on T BLAS
  threads, or T threads each multiplying an m-row chunk already in cache (m from 64 to 2048 rows, one
  BLAS thread each); the best of all;
* data movement: the sampled rows must be read from memory once: 293·B·d·4 bytes = 38.1 GB ÷ the copy
  bandwidth of T threads each copying 64 MiB (np.copyto, bytes copied per second);
* floor = arithmetic + data movement. No overlap is assumed: on T cores both need the same cores.
Everything else a fit does (softmax and clipping on B×K, Poisson masks, noise, the optimizer) is
counted against featdp, not in the floor.

What it times, side by side in one process, alternating:
* featdp: `featdp.training.fit(ArraySource, "dp-sgd", hyperparameters=recipe, epsilon, delta, seed=i,
  device="cpu")`: the method's fit (`fit_seconds`: every step, the per-row preprocessing scales, not the
  count release and calibration, which Opacus is not charged for either) and the whole call; medians
  over `--repeats`, and the median of fit / floor with each floor measured just before its fit;
* Opacus 1.6: the same recipe built from its public parts: `DPDataLoader(sample_rate=q)` (Poisson,
  gathering whole batches as featdp.bench.peers does), `nn.Linear(d, K, bias=False)` from zero,
  ghost clipping (`GradSampleModuleFastGradientClipping`, max_grad_norm C_g; Opacus' fastest mode for a
  linear layer, which never materializes per-example gradients), `DPOptimizerFastGradientClipping` with
  featdp's calibrated noise multiplier and expected batch size q·n, SGD(lr, momentum), on the same
  preprocessed rows (norm 63) and T torch threads; timed over its training loop only. Its batches are
  gathered by np.take, as featdp's are (torch indexing takes 3–4× longer here: Opacus is timed on its
  step, not on a slow copy). With
  `--opacus-steps S` < 293 it times S steps and extrapolates to 293 (the table says so; no accuracy then).
  Its own RDP accountant's ε for that (σ, q, steps) is printed as a check that the privacy is the same.
* `--block-path`: once, featdp's block-by-block path (the one streamed sources take, and the one rows in
  memory took before `featdp.host_gradients`): `method.fit` on a TrainingData whose source is not an
  ArraySource, same seed.
Accuracy: top-1 on the test split (real features) or on held-out synthetic rows.

Goals: featdp fit ≤ 2 × floor; Opacus / featdp ≥ 10 at comparable accuracy.

Expected (results/cpu_floor.md, load 1.6–4.5; every figure moves with the machine's load): floors of
9.5–12.4 s (BLAS at 47–59 GFLOP/s on these shapes, 95 when the machine was quiet for a moment; copies at
9–12.5 GB/s); featdp's fit 16.8–18.6 s, 1.45–1.97 × the floor measured before it (median 1.50: PASS);
the block-by-block path 55 s (3.0 × featdp); Opacus 131 s, 7.1 × featdp (FAIL; 5.9 ×, 9.7 × and 7.3 × in
earlier runs, Opacus slowing more than featdp as the load rises); test accuracy 0.896 for both.

The table is printed and written to benchmarks/results/cpu_floor.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from featdp import host_gradients, training
from featdp.data import ArraySource, TrainingData
from featdp.methods import get_method
from featdp.methods import _gradients as gradients
from featdp.methods.dp_sgd import tramer_boneh_recipe

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
N, D, K = 60_000, 3969, 10
DELTA = 1e-5
FIT_GOAL, SPEEDUP_GOAL = 2.0, 10.0


# ---------------------------------------------------------------------------------------------------
# data


def load(path: str | None, seed: int = 0):
    """(train x, train y, test x, test y, description): the feature file's splits, or synthetic rows of
    the same shape (class means plus noise, so that accuracy means something)."""
    if path:
        from featdp.featurefile import FeatureFile

        with FeatureFile(path) as features:
            (train_x, train_y), (test_x, test_y) = features.split("train").read(), features.split("test").read()
        return train_x, train_y, test_x, test_y, f"{path} (train {len(train_y):,}, test {len(test_y):,})"
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, D)).astype(np.float32) * 0.1
    labels = rng.integers(0, K, N + 10_000)
    x = rng.standard_normal((N + 10_000, D), dtype=np.float32)
    x += means[labels]
    return x[:N], labels[:N], x[N:], labels[N:], "synthetic (class means + N(0, 1), numpy seed 0)"


# ---------------------------------------------------------------------------------------------------
# the floor


def _parallel(threads: int, work) -> float:
    """Wall seconds for `work(i)` on threads i = 0..threads−1 at once, BLAS at one thread per call."""
    with host_gradients._blas_controller().limit(limits=1, user_api="blas"):
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(pool.map(work, range(threads)))
            return time.perf_counter() - start


def matmul_rate(batch: int, threads: int, repeats: int = 3) -> tuple[float, str]:
    """(flop/s, how): the best rate of the step's two products at these shapes (module docstring)."""
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((D, K), dtype=np.float32)
    best, how = 0.0, ""
    whole = rng.standard_normal((batch, D), dtype=np.float32)
    residual = rng.standard_normal((K, batch), dtype=np.float32)
    seconds = []
    for _ in range(repeats):  # BLAS's own threads on the contiguous batch
        start = time.perf_counter()
        whole @ weights
        residual @ whole  # (gᵀx, K×d: faster than xᵀg, d×K, in OpenBLAS)
        seconds.append(time.perf_counter() - start)
    best, how = 4 * batch * D * K / min(seconds), f"whole batch, {threads} BLAS threads"
    del whole
    for rows in (64, 128, 256, 512, 1024, 2048):
        chunks = [rng.standard_normal((rows, D), dtype=np.float32) for _ in range(threads)]
        small = rng.standard_normal((K, rows), dtype=np.float32)
        reps = max(1, batch // (rows * threads))

        def work(i, chunk_list=chunks, small=small, reps=reps):
            x = chunk_list[i]
            for _ in range(reps):
                x @ weights
                small @ x

        _parallel(threads, work)  # warm: the chunks into cache, the pool's threads started
        elapsed = min(_parallel(threads, work) for _ in range(repeats))
        rate = 4 * rows * D * K * reps * threads / elapsed
        if rate > best:
            best, how = rate, f"{rows}-row chunks in cache, {threads} threads × 1 BLAS thread"
    return best, how


def copy_bandwidth(threads: int, repeats: int = 3, nbytes: int = 64 << 20) -> float:
    """Bytes copied per second by `threads` threads each copying `nbytes` (far beyond the caches)."""
    sources = [np.ones(nbytes // 4, np.float32) for _ in range(threads)]
    targets = [np.empty_like(s) for s in sources]
    work = lambda i: np.copyto(targets[i], sources[i])  # noqa: E731
    _parallel(threads, work)  # the targets' pages touched once
    return threads * nbytes / min(_parallel(threads, work) for _ in range(repeats))


def measure_floor(steps: int, batch: int, threads: int) -> dict:
    flops, nbytes = steps * 4 * batch * D * K, steps * batch * D * 4
    rate, how = matmul_rate(batch, threads)
    bandwidth = copy_bandwidth(threads)
    arithmetic, movement = flops / rate, nbytes / bandwidth
    return {"flops": flops, "bytes": nbytes, "rate": rate, "how": how, "bandwidth": bandwidth,
            "arithmetic": arithmetic, "movement": movement, "floor": arithmetic + movement}


# ---------------------------------------------------------------------------------------------------
# featdp


def fit_featdp(train: ArraySource, test: ArraySource, recipe: dict, epsilon: float, seed: int) -> dict:
    start = time.perf_counter()
    result = training.fit(train, "dp-sgd", hyperparameters=recipe, epsilon=epsilon, delta=DELTA, seed=seed,
                          device="cpu")
    total = time.perf_counter() - start
    return {"fit": result.fit_seconds, "total": total, "accuracy": result.accuracy(test),
            "noise": result.calibration.noise_scale, "epsilon": result.privacy.epsilon}


class _Streamed:
    """The rows as a source that is not an ArraySource: the backend takes its block-by-block path."""

    def __init__(self, source: ArraySource):
        self.inner = source
        self.num_examples, self.feature_dim, self.num_classes = source.num_examples, D, K

    def blocks(self, block_rows):
        return self.inner.blocks(block_rows)


def fit_block_path(train: ArraySource, test: ArraySource, recipe: dict, noise: float, seed: int) -> dict:
    from featdp.mechanism import Releaser, make_key

    method = get_method("dp-sgd", **recipe)
    data = TrainingData(_Streamed(train), method.preprocessing(), public_num_examples=N, device="cpu")
    assert not host_gradients.holds_rows(data)
    start = time.perf_counter()
    weights = method.fit(data, noise, Releaser(make_key(seed)))
    seconds = time.perf_counter() - start
    predictions = np.argmax(method.preprocessing()(test.features) @ weights, axis=1)
    return {"fit": seconds, "accuracy": float(np.mean(predictions == test.labels))}


# ---------------------------------------------------------------------------------------------------
# Opacus


def _numpy_batches(x: np.ndarray, y: np.ndarray):
    """A dataset handing Opacus' loader each Poisson batch whole (PyTorch's `__getitems__`), gathered by
    np.take: 3–4× faster here than torch indexing (`tensor[index]`, 140 ms a batch), so Opacus is timed on
    its training step, not on a slow copy. Opacus' sampler still chooses the rows."""
    import torch

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):  # one row: Opacus reads row 0 for the shapes of an empty batch
            return torch.from_numpy(x[i]), torch.as_tensor(y[i])

        def __getitems__(self, indices):
            index = np.asarray(indices, np.int64)
            return [torch.from_numpy(np.take(x, index, axis=0)), torch.from_numpy(np.take(y, index))]

    return Batches()


def fit_opacus(train_x, train_y, test_x, test_y, recipe: dict, noise: float, steps: int, threads: int,
               seed: int) -> dict:
    import torch
    from opacus import __version__ as opacus_version
    from opacus.accountants import RDPAccountant
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    q, expected_batch = gradients.expected_batch_size(N, recipe["batch_size"])
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    linear = torch.nn.Linear(D, K, bias=False)
    torch.nn.init.zeros_(linear.weight)  # W₀ = 0, as featdp
    model = GradSampleModuleFastGradientClipping(linear, batch_first=True, loss_reduction="mean",
                                                 max_grad_norm=recipe["grad_clip"], use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(linear.parameters(), lr=recipe["lr"], momentum=recipe["momentum"]),
        noise_multiplier=noise, max_grad_norm=recipe["grad_clip"], expected_batch_size=int(expected_batch),
        loss_reduction="mean", generator=torch.Generator().manual_seed(seed + 1),
    )
    criterion = DPLossFastGradientClipping(model, optimizer, torch.nn.CrossEntropyLoss(), loss_reduction="mean")
    loader = DPDataLoader(_numpy_batches(train_x, train_y), sample_rate=q, collate_fn=lambda batch: batch,
                          generator=torch.Generator().manual_seed(seed + 2))
    done = 0
    start = time.perf_counter()
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    seconds = time.perf_counter() - start
    accountant = RDPAccountant()
    accountant.history = [(noise, q, recipe["steps"])]
    weights = linear.weight.detach().numpy().T
    full = done == recipe["steps"]
    return {"fit": seconds * recipe["steps"] / done, "steps": done, "full": full,
            "accuracy": float(np.mean(np.argmax(test_x @ weights, axis=1) == test_y)) if full else None,
            "rdp_epsilon": accountant.get_epsilon(DELTA), "version": opacus_version}


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", help="feature file (Fashion-MNIST ScatterNet); default: synthetic rows")
    parser.add_argument("--repeats", type=int, default=3, help="featdp fits (and floors)")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--opacus-steps", type=int, default=293, help="< 293: time that many, extrapolate")
    parser.add_argument("--opacus-runs", type=int, default=1)
    parser.add_argument("--block-path", action="store_true", help="also time featdp's block-by-block path once")
    args = parser.parse_args()

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    train_x, train_y, test_x, test_y, described = load(args.features)
    if train_x.shape != (N, D):
        raise SystemExit(f"expected {N}×{D} training rows, got {train_x.shape}")
    train, test = ArraySource(train_x, train_y, K), ArraySource(test_x, test_y, K)
    recipe = tramer_boneh_recipe(N)
    steps, (q, batch) = recipe["steps"], gradients.expected_batch_size(N, recipe["batch_size"])
    threads = host_gradients._threads()
    preprocessing = get_method("dp-sgd", **recipe).preprocessing()
    opacus_train, opacus_test = preprocessing(train_x), preprocessing(test_x)
    print(f"data: {described}; recipe {recipe}; q = {q:.6f}; threads {threads}", flush=True)

    floors, fits, opacus, block = [], [], [], None
    order = ["featdp"] * args.repeats
    for i in range(args.opacus_runs):  # Opacus runs between featdp fits, so both see the same load
        order.insert(min(len(order), 1 + 2 * i), "opacus")
    for what in order:
        if what == "featdp":
            floors.append(measure_floor(steps, int(batch), threads))
            fits.append(fit_featdp(train, test, recipe, args.epsilon, seed=len(fits)))
            print(f"floor {floors[-1]['floor']:.2f} s (arithmetic {floors[-1]['arithmetic']:.2f} at "
                  f"{floors[-1]['rate'] / 1e9:.1f} GFLOP/s, {floors[-1]['how']}; rows {floors[-1]['movement']:.2f} "
                  f"at {floors[-1]['bandwidth'] / 1e9:.1f} GB/s); featdp fit {fits[-1]['fit']:.2f} s, "
                  f"total {fits[-1]['total']:.2f} s, accuracy {fits[-1]['accuracy']:.4f}", flush=True)
        else:
            opacus.append(fit_opacus(opacus_train, train_y, opacus_test, test_y, recipe, fits[0]["noise"],
                                     args.opacus_steps, threads, seed=len(opacus)))
            accuracy = opacus[-1]["accuracy"]
            print(f"opacus {opacus[-1]['fit']:.1f} s for {steps} steps ({opacus[-1]['steps']} run), accuracy "
                  f"{'n/a' if accuracy is None else f'{accuracy:.4f}'}", flush=True)
    if args.block_path:
        block = fit_block_path(train, test, recipe, fits[0]["noise"], seed=0)
        print(f"block path {block['fit']:.2f} s, accuracy {block['accuracy']:.4f}", flush=True)

    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    fit_s = med(fits, "fit")
    f0 = sorted(floors, key=lambda f: f["floor"])[len(floors) // 2]  # the median floor, shown in parts
    ratio = statistics.median(f["fit"] / fl["floor"] for f, fl in zip(fits, floors))
    opacus_s = med(opacus, "fit")
    speedup = opacus_s / fit_s
    opacus_acc = [o["accuracy"] for o in opacus if o["accuracy"] is not None]
    extrapolated = not all(o["full"] for o in opacus)
    rows = [
        "| what | seconds (median) | ratio | goal | test accuracy |",
        "|---|---:|---:|---|---:|",
        f"| floor: arithmetic, {f0['flops'] / 1e12:.3f} TFLOP at {f0['rate'] / 1e9:.1f} GFLOP/s "
        f"(best: {f0['how']}) | {f0['arithmetic']:.2f} | | | |",
        f"| floor: sampled rows read once, {f0['bytes'] / 1e9:.1f} GB at {f0['bandwidth'] / 1e9:.1f} GB/s "
        f"copy bandwidth | {f0['movement']:.2f} | | | |",
        f"| **floor** (sum; the median of {len(floors)}, each measured before a fit) | {f0['floor']:.2f} | 1 | | |",
        f"| **featdp** dp-sgd fit ({len(fits)} fits, seeds 0–{len(fits) - 1}) | {fit_s:.2f} | {ratio:.2f} × floor "
        f"| ≤ {FIT_GOAL:g} × floor: {'PASS' if ratio <= FIT_GOAL else 'FAIL'} "
        f"| {statistics.median(f['accuracy'] for f in fits):.4f} |",
        f"| featdp whole `training.fit` (count release + calibration + fit) | {med(fits, 'total'):.2f} | | | |",
    ]
    if block is not None:
        rows.append(f"| featdp block-by-block path (streamed sources; rows in memory before host_gradients), "
                    f"1 fit | {block['fit']:.2f} | {block['fit'] / fit_s:.2f} × featdp | | {block['accuracy']:.4f} |")
    rows.append(
        f"| **Opacus {opacus[0]['version']}** ghost clipping, same recipe, σ = {fits[0]['noise']:.4g} "
        f"({len(opacus)} run{'s' if len(opacus) > 1 else ''}"
        f"{f'; {args.opacus_steps} steps timed, extrapolated to {steps}' if extrapolated else ''}) "
        f"| {opacus_s:.1f} | {speedup:.1f} × featdp "
        f"| ≥ {SPEEDUP_GOAL:g} ×: {'PASS' if speedup >= SPEEDUP_GOAL else 'FAIL'} "
        f"| {statistics.median(opacus_acc) if opacus_acc else float('nan'):.4f} |")
    header = [
        f"# cpu_floor: dp-sgd, Tramèr–Boneh recipe (293 Poisson steps, B = {int(batch)}, d = {D}, K = {K}), "
        f"ε = {args.epsilon:g}, δ = {DELTA:g}",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '?')} "
        f"{pathlib.Path(sys.executable).as_posix()} benchmarks/cpu_floor.py"
        f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`. Started {started:%Y-%m-%d %H:%M} UTC: "
        f"{os.cpu_count()} CPUs, {threads} threads, numpy {np.__version__}, Python {platform.python_version()}; "
        f"load average at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} (other jobs share this "
        f"machine). Data: {described}.",
        "",
        f"featdp's noise multiplier σ = {fits[0]['noise']:.4g} per step (PLD, ε reported with the count "
        f"release {fits[0]['epsilon']:.4f}); Opacus' RDP accountant gives ε = {opacus[0]['rdp_epsilon']:.3f} for "
        f"the same σ, q = {q:.6f}, {steps} steps (RDP is looser than PLD). Each fit's ratio is to the floor "
        f"measured just before it; per fit: "
        + ", ".join(f"{f['fit']:.2f} s / {fl['floor']:.2f} s" for f, fl in zip(fits, floors)) + ".",
        "",
    ]
    table = "\n".join(header + rows) + "\n"
    print()
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_floor.md").write_text(table)
    print(f"written to {RESULTS / 'cpu_floor.md'}")


if __name__ == "__main__":
    main()
