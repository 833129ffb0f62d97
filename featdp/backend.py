"""Where stage two's sums over examples are computed: numpy on the host, or JAX on an accelerator.

A fit picks one backend (`resolve(device)`) and hands it to its `TrainingData`; methods reach the heavy
passes only through `data.backend`, never by testing the device themselves. The primitives:

* ``second_moments(data)``                  -> (Σ x xᵀ (d, d), Σ x e_yᵀ (d, K))
* ``clipped_gradient_sum(data, W, C_g, select)`` -> Σ_{i∈S} clip_{C_g}(x_i (softmax(Wᵀx_i) − e_{y_i})ᵀ) (d, K)
* ``newton_statistics(data, W)``            -> (Σ x (σ(Wᵀx) − e_y)ᵀ (d, K), [Σ s_c(1 − s_c) x xᵀ]_{c<K} (K, d, d))

Every result is a clean (pre-noise) float64 numpy array on the host. Noise is never drawn here nor on a
device: the caller hands the result to its releaser (`featdp.mechanism`), exactly as on the CPU path.
Poisson sampling is `select(block, rows)`, a boolean mask per row block drawn on the host by the releaser
(`poisson_mask`); the JAX path sends the mask (as the kept row indices) to the device, so it sums exactly
the rows the numpy path sums.

Devices (`resolve`): "auto" is JAX on an accelerator when `jax.default_backend()` is not "cpu", else numpy
(numpy's BLAS beats XLA on a few CPU cores); "cpu" is numpy; "gpu" / "tpu" is JAX on the first such device
(an error if JAX sees none); "cpu-jax" is JAX on the CPU, for testing the JAX path without an accelerator.

Numerical contract (both backends):
* Rows are preprocessed (`Preprocessing`: x ↦ x·min(1, C'/‖x‖) or x·C'/‖x‖, C' = C(1 − 10⁻⁴)) in float32;
  the margin covers float32 rounding of the norm whatever the summation order, so ‖x‖ ≤ C on either path.
* Within a row block (`data.block_rows` rows; numpy: a piece of one, `TrainingData.piece_rows`), products
  and sums are float32: numpy's sgemm, or XLA matmuls at `Precision.HIGHEST` (true float32: never TF32 or
  bf16 passes, whatever the chip's default).
  (numpy's clipped gradient sum over rows in memory works in smaller gathered chunks, the same way:
  `featdp.host_gradients`.)
* Across blocks, numpy sums in float64 on the host. JAX sums on the device by compensated (Kahan)
  float32 summation and returns total − compensation in float64, so the cross-block error stays at a few
  units of 2⁻²⁴ relative to Σ|block statistic|, independent of the number of blocks.
* So the two agree to the per-block float32 rounding: relative to the statistic's scale (max |entry|),
  differences of ~1e-6; the parity tests assert rtol 1e-5 of that scale (tests/test_backend_parity.py).
  Results are deterministic on either path (no atomics: class sums are one-hot matmuls on the device).

Memory (JAX): the preprocessed rows stay on the device when they fit in `RESIDENT_FRACTION` of its free
memory (kept for the data's lifetime: a fit's `TrainingData`, or its `featdp.cache.StatisticsCache` across fits);
otherwise every pass streams row blocks host → device, each transfer dispatched before the previous block's
result is waited for (at most `IN_FLIGHT` blocks outstanding), so reading overlaps device compute. A
file's blocks are read `PREFETCH` blocks ahead on a helper thread. With Poisson sampling, resident rows are
gathered on the device (kept indices padded to a power of two), streamed ones are dropped on the host
before the transfer; either way a sampled-out row costs no arithmetic and zero rows pad what is left.
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
from typing import Callable, Iterator, Protocol

import numpy as np

from featdp import host_gradients, progress, stats
from featdp.data import holds_rows_in_memory

DEVICES = ("auto", "cpu", "gpu", "tpu", "cpu-jax")
RESIDENT_FRACTION = 0.6  # of the device's free memory the preprocessed rows may take
IN_FLIGHT = 3  # blocks dispatched ahead of the one waited for
PREFETCH = 2  # blocks of a file read ahead on a helper thread
_MIN_BUCKET = 128

Select = Callable[[int, int], np.ndarray]


class Backend(Protocol):
    name: str

    def second_moments(self, data) -> tuple[np.ndarray, np.ndarray]: ...

    def clipped_gradient_sum(self, data, weights: np.ndarray, clip: float,
                             select: Select | None = None) -> np.ndarray: ...

    def newton_statistics(self, data, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class DeviceError(ValueError):
    """A --device that is unknown or that JAX cannot see."""


def resolve(device: "str | Backend" = "auto") -> Backend:
    """The backend for `device` (a name in DEVICES, or a backend object, returned as is)."""
    if not isinstance(device, str):
        return device
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    return _resolve_name(device)


@functools.cache
def _resolve_name(device: str) -> Backend:
    if device == "cpu":
        return NumpyBackend()
    import jax

    # Local devices: with several processes (`featdp.distributed`) jax.devices() lists every process's.
    if device == "auto":
        return JaxBackend(jax.local_devices()[0]) if jax.default_backend() != "cpu" else NumpyBackend()
    platform = "cpu" if device == "cpu-jax" else device
    try:
        found = jax.local_devices(backend=platform)
    except RuntimeError as error:
        raise DeviceError(f"device={device!r}: JAX sees no {platform} device ({error})") from None
    return JaxBackend(found[0])


class ViewAveraging:
    """`inner`'s sums with each example counted as the average of its V consecutive rows (views): every
    primitive returns inner's row sum divided by V, which is Σ_examples (1/V)·Σ_views f(row). Each summand
    f(row) is bounded as in the one-view case (a clipped gradient, x xᵀ of a row of norm ≤ C, ...), so an
    example's average is bounded alike and every sensitivity is unchanged (De et al. 2022's augmentation
    multiplicity). A Poisson mask is drawn over a block's examples and applied to all their views."""

    def __init__(self, inner: Backend, views: int):
        self.inner, self.views = inner, int(views)
        self.name = inner.name

    def __repr__(self) -> str:
        return f"ViewAveraging({self.inner!r}, views={self.views})"

    def _per_example(self, select: Select | None) -> Select | None:
        if select is None:
            return None
        views = self.views

        def rows_of_examples(block: int, rows: int) -> np.ndarray:
            if rows % views:
                raise ValueError(f"block {block} holds {rows} rows, not whole examples of {views} views")
            return np.repeat(np.asarray(select(block, rows // views), dtype=bool), views)

        return rows_of_examples

    def second_moments(self, data):
        gram, cross = self.inner.second_moments(data)
        return gram / self.views, cross / self.views

    def clipped_gradient_sum(self, data, weights, clip, select=None):
        return self.inner.clipped_gradient_sum(data, weights, clip, self._per_example(select)) / self.views

    def newton_statistics(self, data, weights):
        gradient, hessians = self.inner.newton_statistics(data, weights)
        return gradient / self.views, hessians / self.views


def _reported_pass(blocks: Iterator) -> Iterator:
    """`blocks` of one statistics pass, reported as progress (`featdp.progress`) when it starts and when it
    ends, never block by block: the number of blocks follows the true n, which is private (logs may be
    shared with whoever receives the head)."""
    progress.report(STATISTICS_PASS, 0, None)
    try:
        yield from blocks
    finally:
        progress.report(STATISTICS_PASS, 1, 1)


STATISTICS_PASS = "statistics pass"


# ---------------------------------------------------------------------------------------------------
# numpy: float32 BLAS per block, float64 sums on the host


class NumpyBackend:
    name = "numpy"

    def __repr__(self) -> str:
        return "NumpyBackend()"

    def second_moments(self, data):
        d, k = data.feature_dim, data.num_classes
        gram = np.zeros((d, d), dtype=np.float64)
        cross = np.zeros((d, k), dtype=np.float64)
        for x, y in _reported_pass(data.blocks()):
            gram += x.T @ x
            cross += stats.class_sums(x, y, k)
        return gram, cross

    def clipped_gradient_sum(self, data, weights, clip, select=None):
        if host_gradients.holds_rows(data):  # rows in memory: gathered chunk by chunk, on every core
            return host_gradients.clipped_gradient_sum(data, weights, clip, select)
        total = np.zeros((data.feature_dim, data.num_classes), dtype=np.float64)
        for x, y, row_norms in data.blocks_with_norms(select):
            total += stats.clipped_softmax_gradient_sum(x, y, weights, clip, row_norms)
        return total

    def newton_statistics(self, data, weights):
        d, k = weights.shape
        gradient = np.zeros((d, k))
        hessians = np.zeros((k, d, d))
        for x, y in data.blocks():
            probs = stats.sigmoid(x @ weights.astype(np.float32))
            gradient += x.T @ (probs - stats.one_hot(y, k))
            curvature = probs * (1 - probs)
            for cls in range(k):
                hessians[cls] += (x * curvature[:, cls : cls + 1]).T @ x
        return gradient, hessians


# ---------------------------------------------------------------------------------------------------
# JAX: float32 blocks on the device, compensated sums across blocks


@functools.cache
def _kernels(donate: bool):
    """The jitted block kernels (built once; jit caches one compilation per shape)."""
    import jax
    import jax.numpy as jnp

    highest = jax.lax.Precision.HIGHEST

    def mm(a, b):
        return jnp.matmul(a, b, precision=highest)

    def kahan(state, value):
        # Kahan: `comp` holds the low-order bits `total` lost (negated); total − comp is the better sum.
        total, comp = state
        corrected = value - comp
        new_total = total + corrected
        return new_total, (new_total - total) - corrected

    def preprocess(x, target, unit: bool):
        # Preprocessing.__call__ in float32: x·C'/‖x‖ ('unit', zero rows stay zero) or x·min(1, C'/‖x‖).
        norms = jnp.sqrt(jnp.sum(x * x, axis=1))
        inverse = target / jnp.maximum(norms, 1e-30)
        if unit:
            scale = jnp.where(norms > 0, inverse, 0.0)
        else:
            scale = jnp.where(norms > target, inverse, 1.0)
        x = x * scale.astype(jnp.float32)[:, None]
        return x, jnp.sqrt(jnp.sum(x * x, axis=1))

    def gather(x, y, norms, index):
        # Rows `index` of the block; indices past its end (padding) give zero rows, which add nothing.
        take = functools.partial(jnp.take, indices=index, axis=0, mode="fill", fill_value=0)
        return take(x), take(y), take(norms)

    def moments(state, x, y, num_classes: int):
        one_hot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
        return kahan(state[0], mm(x.T, x)), kahan(state[1], mm(x.T, one_hot))

    def gradient(state, x, y, norms, weights, clip):
        # stats.clipped_softmax_gradient_sum: per-example clipping from ‖x_i‖·‖p_i − e_{y_i}‖.
        residual = jax.nn.softmax(mm(x, weights), axis=1)
        residual = residual - jax.nn.one_hot(y, weights.shape[1], dtype=jnp.float32)
        norms = norms * jnp.sqrt(jnp.sum(residual * residual, axis=1))
        residual = residual * jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-30))[:, None]
        return kahan(state, mm(x.T, residual))

    def newton(state, x, y, weights, first_class, with_gradient: bool):
        # Gradient Σ x (s − e_y)ᵀ (first pass only) and the Hessians of classes
        # [first_class, first_class + chunk) (state[1] has the chunk's shape; W's padded classes add zeros).
        gradient_state, hessian_state = state
        probs = 0.5 * (1.0 + jnp.tanh(0.5 * mm(x, weights)))
        if with_gradient:
            residual = probs - jax.nn.one_hot(y, weights.shape[1], dtype=jnp.float32)
            gradient_state = kahan(gradient_state, mm(x.T, residual))
        chunk = hessian_state[0].shape[0]
        curvature = jax.lax.dynamic_slice_in_dim(probs * (1 - probs), first_class, chunk, axis=1)
        hessians = jax.lax.map(lambda c: mm((x * c[:, None]).T, x), curvature.T)
        return gradient_state, kahan(hessian_state, hessians)

    def accumulating(step, static):
        # (state, block...) -> (new state, token): the accumulator is donated where the client can reuse
        # it; the token, a scalar computed last, is what the host waits on to bound the blocks in flight.
        def run(state, *args, **kwargs):
            state = step(state, *args, **kwargs)
            return state, jax.tree_util.tree_leaves(state)[0].ravel()[0]

        return jax.jit(run, static_argnames=static, donate_argnums=(0,) if donate else ())

    return {
        "preprocess": jax.jit(preprocess, static_argnames="unit"),
        "gather": jax.jit(gather),
        "moments": accumulating(moments, "num_classes"),
        "gradient": accumulating(gradient, ()),
        "newton": accumulating(newton, "with_gradient"),
    }


def _prefetched(blocks: Iterator, depth: int = PREFETCH) -> Iterator:
    """`blocks`, read up to `depth` blocks ahead on a helper thread: reading a file (h5py, the float16 →
    float32 conversion, the finiteness check) overlaps this thread's uploads and kernel dispatches. The
    items and their order are unchanged; an error in the reader is raised here; closing this generator
    stops the reader."""
    items: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read():
        try:
            for item in blocks:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((done, error))
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()

    reader = threading.Thread(target=read, name="featdp-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item, error = items.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        reader.join()


def _bucket(rows: int, block_rows: int) -> int:
    """Padded row count for `rows` selected rows: a power of two (≥ 128, ≤ the block), so that sampled
    steps compile only a handful of shapes."""
    return min(block_rows, max(_MIN_BUCKET, 1 << max(0, rows - 1).bit_length()))


class JaxBackend:
    """The primitives in JAX on one device (module docstring: numerical contract, memory).

    `resident_bytes` overrides the budget for keeping the preprocessed rows on the device (0: always
    stream; tests use it to exercise both paths).
    """

    def __init__(self, device, resident_bytes: int | None = None):
        self.device = device
        self.platform = device.platform
        self.name = f"jax-{self.platform}"
        self.resident_bytes = resident_bytes
        # Donated accumulators save device memory; the CPU client cannot reuse donated buffers (and warns).
        self._k = _kernels(self.platform != "cpu")

    def __repr__(self) -> str:
        return f"JaxBackend({self.device})"

    # -- data on the device ---------------------------------------------------------------------------

    def free_bytes(self) -> int | None:
        """Free device memory as the device reports it (None where it does not, e.g. the CPU client)."""
        memory = self.device.memory_stats() if hasattr(self.device, "memory_stats") else None
        if not memory or "bytes_limit" not in memory:
            return None
        return int(memory["bytes_limit"]) - int(memory.get("bytes_in_use", 0))

    def _resident_budget(self) -> int:
        if self.resident_bytes is not None:
            return self.resident_bytes
        free = self.free_bytes()
        if free is None:
            from featdp.data import IN_MEMORY_BUDGET_BYTES

            return IN_MEMORY_BUDGET_BYTES
        return int(RESIDENT_FRACTION * free)

    @staticmethod
    def _cache(data) -> dict:
        # With a cache, shared by every fit on the same rows.
        return data.cache.device_rows(data.source) if data.cache is not None else data.device_cache

    def _put(self, array):
        import jax

        return jax.device_put(array, self.device)

    def _upload(self, x: np.ndarray, y: np.ndarray, padded_rows: int, preprocessing):
        """Raw host rows → preprocessed device block (x, y, ‖x‖) of `padded_rows` rows (zero rows pad it)."""
        rows = len(y)
        if rows < padded_rows:
            x = np.concatenate([x, np.zeros((padded_rows - rows, x.shape[1]), np.float32)])
            y = np.concatenate([y, np.zeros(padded_rows - rows, y.dtype)])
        x_dev = self._put(np.asarray(x, np.float32))
        y_dev = self._put(np.asarray(y, np.int32))
        x_dev, norms = self._k["preprocess"](
            x_dev, preprocessing.target, unit=preprocessing.normalize == "unit"
        )
        return x_dev, y_dev, norms

    def _blocks(self, data, select: Select | None = None) -> Iterator[tuple]:
        """Preprocessed device blocks (x, y, ‖x‖) of the data; with `select`, only the selected rows of each
        block (padded to a power of two with zero rows). Row blocks are `data.block_rows` long and numbered
        as `TrainingData.blocks` numbers them, so `select(index, rows)` sees what the numpy path sees."""
        block_rows = data.block_rows
        key = ("device-resident", self.name, str(self.device), data.preprocessing, block_rows)
        cache = self._cache(data)
        resident = cache.get(key)
        if resident is None:
            blocks = -(-data.num_examples // block_rows)
            needed = blocks * block_rows * (4 * data.feature_dim + 8)
            keep = needed <= self._resident_budget()
            stored = [] if keep else None
            source_blocks = data.source.blocks(block_rows)
            if not holds_rows_in_memory(data.source):  # rows in memory need no reading ahead
                source_blocks = _prefetched(source_blocks)
            for index, (x, y) in enumerate(source_blocks):
                rows = len(y)
                if keep:
                    block = self._upload(x, y, max(rows, block_rows), data.preprocessing)
                    stored.append((block, rows))
                    selected = self._select(block, rows, index, select, block_rows)
                    if selected is not None:
                        yield selected
                    continue
                if select is not None:
                    mask = select(index, rows)
                    x, y = x[mask], y[mask]
                    if len(y) == 0:
                        continue
                padded = block_rows if select is None else _bucket(len(y), block_rows)
                yield self._upload(x, y, max(len(y), padded), data.preprocessing)
            if keep:
                cache[key] = stored
            return
        for index, (block, rows) in enumerate(resident):
            selected = self._select(block, rows, index, select, block_rows)
            if selected is not None:
                yield selected

    def _select(self, block, rows, index, select, block_rows):
        if select is None:
            return block
        kept = np.flatnonzero(select(index, rows))
        if kept.size == 0:
            return None
        padded = np.full(_bucket(kept.size, block_rows), block[0].shape[0], np.int32)
        padded[: kept.size] = kept
        return self._k["gather"](*block, self._put(padded))

    def _accumulate(self, kernel: str, state, blocks, *args, **static):
        """Folds every block into `state` with the kernel, keeping at most IN_FLIGHT blocks outstanding:
        the next block's transfer and kernel are dispatched before the oldest result is waited for."""
        pending = collections.deque()
        for block in blocks:
            state, token = self._k[kernel](state, *block, *args, **static)
            pending.append(token)
            if len(pending) > IN_FLIGHT:
                pending.popleft().block_until_ready()
        return state

    def _zeros(self, shape):
        return self._put(np.zeros(shape, np.float32)), self._put(np.zeros(shape, np.float32))

    @staticmethod
    def _to_host(state) -> np.ndarray:
        import jax

        total, comp = jax.device_get(state)
        return np.asarray(total, np.float64) - np.asarray(comp, np.float64)

    # -- primitives -----------------------------------------------------------------------------------

    def second_moments(self, data):
        d, k = data.feature_dim, data.num_classes
        blocks = (block[:2] for block in _reported_pass(self._blocks(data)))
        state = self._accumulate("moments", (self._zeros((d, d)), self._zeros((d, k))), blocks, num_classes=k)
        return self._to_host(state[0]), self._to_host(state[1])

    def clipped_gradient_sum(self, data, weights, clip, select=None):
        state = self._zeros(weights.shape)
        weights = self._put(np.asarray(weights, np.float32))
        state = self._accumulate("gradient", state, self._blocks(data, select), weights, np.float32(clip))
        return self._to_host(state)

    def newton_statistics(self, data, weights):
        d, k = weights.shape
        # Hessians of `chunk` classes at a time: the chunk's sum, its compensation and a block's result.
        budget = self.free_bytes()
        budget = (budget // 4) if budget is not None else (1 << 30)
        chunk = int(max(1, min(k, budget // (4 * d * d * 4))))
        chunks = -(-k // chunk)
        padded = np.zeros((d, chunks * chunk), np.float32)
        padded[:, :k] = weights
        weights_dev = self._put(padded)
        gradient_state = self._zeros((d, chunks * chunk))
        hessians = np.empty((k, d, d))
        for first in range(0, k, chunk):
            blocks = (block[:2] for block in self._blocks(data))
            state = self._accumulate("newton", (gradient_state, self._zeros((chunk, d, d))), blocks,
                                     weights_dev, np.int32(first), with_gradient=first == 0)
            gradient_state = state[0]
            stop = min(k, first + chunk)
            hessians[first:stop] = self._to_host(state[1])[: stop - first]
        return self._to_host(gradient_state)[:, :k], hessians
