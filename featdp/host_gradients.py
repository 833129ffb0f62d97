"""The numpy backend's clipped gradient sum over rows held in memory (an `ArraySource` or a `RowSubset`
of one), one step at a time.

    Σ_{i∈S} clip_C(x̃_i (p_i − e_{y_i})ᵀ),   x̃_i = s_i·x_i the preprocessed row, p_i = softmax(Wᵀx̃_i)

What it does differently from a pass over preprocessed row blocks (`TrainingData.blocks_with_norms`), and
why each is exact (the same sum, up to float32 rounding):

* Preprocessing is a per-row scale s_i (`Preprocessing`: C'/‖x_i‖ or min(1, C'/‖x_i‖)), so it is folded
  into the K-wide products instead of rewriting d-wide rows: Wᵀx̃_i = s_i·(Wᵀx_i) and
  Σ x̃_i g_iᵀ = Σ x_i (s_i g_i)ᵀ. The scales and the preprocessed norms ‖x̃_i‖ = s_i‖x_i‖ are computed
  once per fit, or once across fits with a cache (`row_state`), so a step reads each sampled row once.
* Clipping needs no per-example gradient: x̃_i g_iᵀ has Frobenius norm ‖x̃_i‖·‖g_i‖, so clipping is a
  per-row scale on the K-wide residual g_i (as in `stats.clipped_softmax_gradient_sum`).
* The sampled rows are gathered `CHUNK_BYTES` at a time into a reused buffer (np.take with out=); both
  products of a chunk then read it from cache, not memory. Chunks are grouped into at most `SLABS`
  contiguous slabs, each summed in float64 in chunk order; slabs run on a thread pool with BLAS limited to
  one thread per call (BLAS's own threads help little at K columns, and spin against the gather), and
  their sums are added in slab order. The slabs depend only on the sample, not on the number of threads,
  so a result is the same whatever the thread count.

Poisson masks are asked for exactly as the block pass asks: `select(block, rows)` for each block of
`data.block_rows` rows of the underlying arrays, in order, `rows` the block's rows that are `data`'s, on the
calling thread, so a seed samples the same rows on every path.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os

import numpy as np

from featdp import stats
from featdp.data import RowSubset, holds_rows_in_memory, row_norms

CHUNK_BYTES = 2 << 20  # rows per gathered chunk (132 at d = 3969): the fastest of 0.5–4 MiB on 2 cores here
MAX_CHUNK_ROWS = 4096
SLABS = 16  # units of work handed to the threads: enough to balance two to four busy cores


def holds_rows(data) -> bool:
    """Whether `data`'s rows are one array in memory (an `ArraySource`, or a `RowSubset` of one): the path
    here, rather than streamed blocks."""
    return holds_rows_in_memory(data.source)


def _rows(data) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(features, labels, members): the arrays holding `data`'s rows, and which of their rows are
    `data`'s, in order (None: all of them)."""
    source = data.source
    if isinstance(source, RowSubset):
        return source.parent.features, source.parent.labels, np.flatnonzero(source.mask)
    return source.features, source.labels, None


def row_state(data) -> tuple[np.ndarray, np.ndarray]:
    """(s, ‖x̃‖), float32, for each of `data`'s rows in order: the preprocessing's scale
    (`Preprocessing.row_scales`) and the preprocessed row's norm s·‖x‖. Computed once per fit, or once
    across fits with a `featdp.cache.StatisticsCache` (`TrainingData.shared`)."""

    def compute():
        features, _, members = _rows(data)
        count = len(features) if members is None else len(members)
        scale, norms = np.empty(count, np.float32), np.empty(count, np.float32)
        # 4 MiB of rows at a time: the second pass over them (the norms) then reads the cache, not memory.
        step = max(1, (4 << 20) // (4 * max(data.feature_dim, 1)))
        for start in range(0, count, step):
            part = slice(start, start + step)
            x = features[part] if members is None else features[members[part]]
            scale[part] = data.preprocessing.row_scales(x)
            norms[part] = scale[part] * row_norms(x)
        return scale, norms

    return data.shared(("host row scales", data.preprocessing), compute)


def sampled_rows(data, select) -> np.ndarray | None:
    """Positions (among `data`'s rows) of the rows `select` keeps (None: every row), asked for block by
    block as the block pass asks: `select(block, rows)` for every block of the underlying rows, `rows`
    being how many of that block's rows are `data`'s."""
    if select is None:
        return None
    features, _, members = _rows(data)
    total, block_rows = len(features), data.block_rows
    starts = range(0, total, block_rows)
    if members is None:
        counts = [min(block_rows, total - start) for start in starts]
    else:
        counts = np.diff(np.searchsorted(members, [*starts, total])).tolist()
    kept, offset = [], 0
    for block, count in enumerate(counts):
        kept.append(np.flatnonzero(select(block, count)) + offset)
        offset += count
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def clipped_gradient_sum(data, weights: np.ndarray, clip: float, select=None) -> np.ndarray:
    """Σ over the selected rows of the clipped softmax gradient of the preprocessed rows, (d, K) float64
    (the `Backend.clipped_gradient_sum` contract), for `data` whose source holds its rows in memory."""
    features, labels, members = _rows(data)
    scale, norms = row_state(data)
    index = sampled_rows(data, select)  # positions among data's rows
    count = data.num_examples if index is None else len(index)
    d, k = data.feature_dim, data.num_classes
    total = np.zeros((k, d), np.float64)  # transposed: see _chunk_gradient
    if count == 0:
        return total.T.copy()
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    rows = max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * max(d, 1))))
    chunks = -(-count // rows)
    slabs = min(SLABS, chunks)
    threads = min(_threads(), slabs)
    parts: list = [None] * slabs
    claims = itertools.count()  # next() is atomic: each slab goes to exactly one worker

    def work(buffer: np.ndarray) -> None:
        while (number := next(claims)) < slabs:
            out = np.zeros((k, d), np.float64)
            first, last = number * chunks // slabs, (number + 1) * chunks // slabs
            for start in range(first * rows, min(last * rows, count), rows):
                stop = min(start + rows, count)
                part = slice(start, stop) if index is None else index[start:stop]
                rows_of = part if members is None else members[part]  # rows of `features`
                if isinstance(rows_of, slice):  # every row, in order: a view, nothing to gather
                    x = features[rows_of]
                else:
                    x = np.take(features, rows_of, axis=0, out=buffer[: stop - start])
                out += _chunk_gradient(x, labels[rows_of], scale[part], norms[part], weights, clip)
            parts[number] = out

    buffers = _buffers(data, rows, threads)
    # One BLAS thread per call even when the slabs run here: BLAS's idle threads spin on the cores the
    # gather needs (a tenfold slowdown when other jobs share the machine).
    with _blas_controller().limit(limits=1, user_api="blas"):
        if threads == 1:
            work(buffers[0])
        else:  # one task per thread, not per slab: a task handed over costs ~0.2 ms on a busy machine
            list(_pool(threads).map(work, buffers))
    for part in parts:  # in slab order: the same sum whatever thread finished first
        total += part
    return np.ascontiguousarray(total.T)


def _chunk_gradient(x, y, scale, norms, weights, clip) -> np.ndarray:
    """(Σ_i clip_C(s_i x_i g_iᵀ))ᵀ, K×d float32, over one chunk of raw rows x."""
    logits = x @ weights
    logits *= scale[:, None]  # = x̃ W
    residual = stats.softmax(logits)
    residual[np.arange(len(y)), y] -= 1
    gradient_norms = norms * np.sqrt(np.einsum("ij,ij->i", residual, residual))
    residual *= (np.minimum(1.0, clip / np.maximum(gradient_norms, 1e-30)) * scale)[:, None]
    return residual.T @ x  # gᵀx (K×d) rather than xᵀg (d×K): 25–35% faster in OpenBLAS at K = 10


def _buffers(data, rows: int, count: int) -> list[np.ndarray]:
    """`count` gather buffers of `rows` rows, one per thread, allocated once per TrainingData."""
    key = ("host-gather-buffers", rows, data.feature_dim)
    kept = data.device_cache.setdefault(key, [])
    while len(kept) < count:
        kept.append(np.empty((rows, data.feature_dim), np.float32))
    return kept[:count]


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _threads() -> int:
    """Threads for the slabs: BLAS's configured thread count (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS...),
    at most the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    blas = [info["num_threads"] for info in _blas_controller().info() if info["user_api"] == "blas"]
    return max(1, min([cores] + blas))


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="featdp-gradient")
