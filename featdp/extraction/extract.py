"""Stage one: run a frozen backbone over a dataset and append the features to the feature file.

* Loader processes (grain) decode and `prepare` images while the accelerator runs the previous
  batch; JAX's asynchronous dispatch keeps one batch in flight while the last one is written.
* One compiled program per batch shape: every batch has the same global size; the last partial batch is
  padded with zeros and its padding rows are dropped before writing.
* Data-parallel over all local devices: the batch is sharded along a 1-D mesh, the weights replicated.
* bfloat16 weight matrices and activations on GPU/TPU by default (biases, norms and BatchNorm
  statistics stay float32), float32 on CPU.
* Resumable: rows are appended in order and `rows_done` is raised only after they are on disk, so a
  killed run restarts at `rows_done` and, since batches start at the same rows, computes exactly what an
  uninterrupted run would have. The file's metadata identifies the command, and its source fingerprint
  what the dataset held when the file was created; a different command, or a changed source, is refused
  unless `overwrite`.
* One writer at a time: the file's `FeatureFileLock` (`<file>.lock`) is held from before the backbone is
  loaded until the last row is written; a second extraction onto the same file stops at once.
* Memory is checked before it is asked for: a batch size whose padded batch cannot fit stops with a message.
* A corrupt or unreadable image is fatal: the run stops naming the file, keeping the rows written so
  far, so that a file's rows always correspond one-to-one to source indices 0..n−1.
* Views (`ExtractConfig.views` = V > 1): each example of the `train` split is written as V rows, its
  unaugmented image and V − 1 augmented views (`featdp.extraction.augment`, seeded by `augment_seed`,
  recorded in the file's `preprocessing` metadata); other splits keep one row per example. `batch_size`
  stays the number of images per forward pass: a train batch holds ⌊batch_size / V⌋ whole examples (at
  least one; the pass is then V images wide), padded like the last batch. Rows are appended in whole
  examples, so a killed run resumes at example rows_done / V.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import pathlib
import threading
import time
from typing import Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from featdp.extraction.augment import Augmentation, max_shift_for
from featdp.extraction.backbones.registry import Backbone, load_backbone
from featdp.checksums import ChecksumMismatchError, normalized_sha256, verify_sha256
from featdp.extraction.datasets import open_dataset
from featdp.featurefile import AllocationError, FeatureFileLock, FeatureWriter, check_allocation
from featdp.extraction.loading import LoadBatch

DTYPES = ("auto", "float32", "bfloat16")
# Views are written for the training split only: augmentation multiplicity averages a private example's
# gradient over its views, and evaluation reads the unaugmented images.
AUGMENTED_SPLITS = ("train",)
# Beyond De et al.'s 16 augmentations per example (their largest that still helped) by a margin; each view
# costs a forward pass and a row of storage.
MAX_VIEWS = 64


class ExtractError(ValueError):
    """Bad extraction arguments (splits, batch size, output path)."""


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    backbone: str = "efficientnet-lite0"
    dataset: str = "fashion_mnist"
    out: pathlib.Path = pathlib.Path("features.h5")
    splits: tuple[str, ...] | None = None  # None: every split of the dataset
    data_dir: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None  # pinned digest of the weights; a mismatch stops the run
    batch_size: int | None = None  # None: 256 on GPU/TPU, 32 on the CPU (see default_batch_size)
    limit: int | None = None  # at most this many examples per split (quick runs)
    overwrite: bool = False
    dtype: str = "auto"
    store_dtype: str = "float16"
    workers: int = min(16, os.cpu_count() or 1)  # loader processes; 1 loads in the main process
    views: int = 1  # rows per example of the `train` split: 1 unaugmented + views − 1 augmented (module docstring)
    augment_seed: int = 0  # seeds the augmentations (public randomness, recorded in the file)
    augment_shift: int | None = None  # largest shift in pixels of an augmented view; None: R/8 (`augment`)
    augment_flip: bool = True  # whether augmented views may be flipped left-right


def views_of(config: ExtractConfig, split: str) -> int:
    """Rows per example that `config` writes for `split`."""
    return config.views if split in AUGMENTED_SPLITS else 1


@dataclasses.dataclass
class SplitProgress:
    split: str
    rows_done: int
    num_examples: int  # rows: examples × views per example
    images_per_second: float  # over the rows this run wrote
    rows_at_start: int = 0  # rows the file held before this run: = num_examples when it had nothing to do


def default_batch_size() -> int:
    """Large batches keep an accelerator busy; on the CPU, activations of 256 images at 224² (over 1 GB
    per layer) fall out of cache, and 32 is as fast per image (measured: Lite0 39 img/s at 16, 35 at 64)."""
    return 256 if jax.default_backend() in ("gpu", "tpu") else 32


def compute_dtype(requested: str) -> jnp.dtype:
    if requested not in DTYPES:
        raise ExtractError(f"dtype must be one of {DTYPES}, got {requested!r}")
    if requested == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(requested)


def cast_weights(tree, dtype):
    """Weight matrices and kernels (floating, ndim ≥ 2) to the compute dtype. Vectors (biases,
    normalisation scales, BatchNorm statistics) stay as they are: they are small, the backbones apply
    them in float32, and rounding a running mean to bfloat16 costs accuracy for nothing."""
    return jax.tree_util.tree_map(
        lambda leaf: leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2 else leaf,
        tree,
    )


class ShardedForward:
    """The backbone compiled once, data-parallel over every local device."""

    def __init__(self, backbone: Backbone, batch_size: int, dtype):
        devices = jax.local_devices()
        self.num_devices = len(devices)
        # Each device gets an equal share: round the global batch up to a multiple of the device count.
        self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
        mesh = Mesh(np.asarray(devices), ("data",))
        self._batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        variables = cast_weights(jax.tree_util.tree_map(jnp.asarray, backbone.variables), dtype)
        self._variables = jax.device_put(variables, replicated)
        self._apply = backbone.apply

    def __call__(self, images: np.ndarray) -> jax.Array:
        """Starts the forward pass on a full uint8 batch; returns without waiting for it."""
        return _forward(self._apply, self._variables, jax.device_put(images, self._batch_sharding))


# `apply` is static: the compiled program is cached per backbone function and batch shape, so running
# the same backbone again (another split, another file) does not recompile.
@functools.partial(jax.jit, static_argnums=0)
def _forward(apply, variables, images):
    return apply(variables, images).astype(jnp.float32)


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """Runs in each loader process: exit once the extracting process is gone (e.g. SIGKILLed), which
    multiprocessing does not do by itself."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="featdp-parent-watch").start()


@contextlib.contextmanager
def _loaded_batches(dataset, split: str, backbone: Backbone, start: int, stop: int, batch_size: int, workers: int,
                    augmentation: Augmentation | None = None) -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """`_batches`, each batch's shared memory unlinked on arrival, the loader closed when the split ends."""
    batches = _batches(dataset, split, backbone, start, stop, batch_size, workers, augmentation)
    try:
        yield map(_unlink_shared_memory, batches)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        del batches
        gc.collect()  # grain's interleaving threads keep the last batches in reference cycles: free their mappings


def _unlink_shared_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes the /dev/shm names of a batch that grain's worker processes handed over.

    grain unlinks a segment when its array is freed, on a background thread; an array freed late (held in
    a reference cycle, or at interpreter exit) is never unlinked and Python warns of "leaked shared_memory
    objects". Unlinking on arrival is deterministic and costs nothing: the mapping stays valid until the
    array is freed, and no other process opens the segment again. `_unlink_on_del` is grain's private
    flag; should a release rename it, batches are left to grain's own deleter.
    """
    for leaf in batch.values():
        segment = getattr(leaf, "shm", None)
        if segment is not None and getattr(leaf, "_unlink_on_del", False):
            leaf._unlink_on_del = False
            segment.unlink()
    return batch


def _batches(dataset, split: str, backbone: Backbone, start: int, stop: int, batch_size: int,
             workers: int, augmentation: Augmentation | None = None) -> Iterator[dict[str, np.ndarray]]:
    # Batches are contiguous example ranges [start + k·B, start + (k+1)·B) built before any worker sees
    # them, so however many workers load them, rows reach the file in order; an example's views are made
    # by the worker that loads it (`LoadBatch`), from seeds of their own. Worker *processes*:
    # Pillow decoding holds the GIL often enough that threads stop scaling after ~2 (measured on a
    # 16-core host: 1 thread 1.1k img/s, 16 threads 0.5k).
    pipeline = (
        grain.MapDataset.range(start, stop)
        .batch(batch_size)
        .map(LoadBatch(dataset, split, backbone.prepare, augmentation))
        # One thread and a short buffer per loader: parallelism comes from the processes, and grain's
        # default (16 threads, 500 elements ahead) held 4.6 GB of prepared batches per worker.
        .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    )
    if workers > 1:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; our CLI is typer, not absl
            flags.FLAGS.mark_as_parsed()
        pipeline = pipeline.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
            worker_init_fn=functools.partial(_exit_with_parent, os.getpid()),
        )
    return iter(pipeline)


def _pad(images: np.ndarray, batch_size: int) -> np.ndarray:
    if len(images) == batch_size:
        return images
    padding = np.zeros((batch_size - len(images),) + images.shape[1:], images.dtype)
    return np.concatenate([images, padding])


def extract(
    config: ExtractConfig,
    on_progress: Callable[[SplitProgress], None] | None = None,
    backbone: Backbone | None = None,
    processes=None,
) -> pathlib.Path:
    """Writes (or finishes) `config.out`; returns its path. `backbone` overrides `config.backbone`
    with one already loaded (a custom or randomly initialised model). With `processes`, a
    `featdp.distributed` group of several processes, each writes its share of every split to a part file
    and process 0 writes `config.out` as their manifest (`featdp.extraction.sharded`)."""
    if config.batch_size is not None and config.batch_size < 1:
        raise ExtractError(f"batch size must be ≥ 1, got {config.batch_size}")
    batch_size = config.batch_size or default_batch_size()
    if config.limit is not None and config.limit < 1:
        raise ExtractError(f"limit must be ≥ 1, got {config.limit}")
    if config.store_dtype not in ("float16", "float32"):
        raise ExtractError(f"store dtype must be float16 or float32, got {config.store_dtype!r}")
    if isinstance(config.views, bool) or not isinstance(config.views, int) or not 1 <= config.views <= MAX_VIEWS:
        raise ExtractError(f"views must be an integer in [1, {MAX_VIEWS}] (1: no augmentation), got {config.views!r}")
    if isinstance(config.augment_seed, bool) or not isinstance(config.augment_seed, int) or config.augment_seed < 0:
        raise ExtractError(f"augment seed must be an integer >= 0, got {config.augment_seed!r}")
    shift = config.augment_shift
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, int) or shift < 0):
        raise ExtractError(f"augment shift must be an integer >= 0 (pixels), got {shift!r}")
    if config.views == 1 and (shift is not None or not config.augment_flip or config.augment_seed != 0):
        # Silently ignored, they would not be recorded either: the user meant augmented views.
        raise ExtractError("the augment seed, shift and flip options shape augmented views: they need views > 1 "
                           "(--views N)")
    out = pathlib.Path(config.out)
    if not out.parent.exists():
        raise ExtractError(f"cannot write {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ExtractError(f"cannot write {out}: permission denied")
    dataset = open_dataset(config.dataset, data_dir=config.data_dir)
    splits = tuple(config.splits) if config.splits else tuple(dataset.splits)
    unknown = [s for s in splits if s not in dataset.splits]
    if unknown:
        raise ExtractError(f"dataset {config.dataset!r} has no split {unknown[0]!r}; splits: {', '.join(dataset.splits)}")
    if config.views > 1 and not any(s in AUGMENTED_SPLITS for s in splits):
        raise ExtractError(f"views={config.views} augments the split named {' or '.join(map(repr, AUGMENTED_SPLITS))}, "
                           f"but the splits extracted are {', '.join(map(repr, splits))}; extract it too, or use "
                           "views=1")
    dtype = compute_dtype(config.dtype)
    if processes is not None and processes.count > 1:
        from featdp.extraction.sharded import extract_parts

        return extract_parts(config, on_progress, backbone, out, dataset, splits, batch_size, dtype, processes)
    # Held for the whole extraction: a second run onto this file stops here, before loading anything.
    with FeatureFileLock(out) as lock:
        return _extract_locked(config, on_progress, backbone, out, dataset, splits, batch_size, dtype, lock)


def _augmentation(config: ExtractConfig, backbone: Backbone) -> Augmentation | None:
    """What the loaders apply (None: one view of every split, as without views)."""
    if config.views == 1:
        return None
    shift = max_shift_for(backbone.image_size) if config.augment_shift is None else config.augment_shift
    if shift >= backbone.image_size:  # reflect padding mirrors at most the image once
        raise ExtractError(f"augment shift {shift} must be below the image size {backbone.image_size}")
    return Augmentation(config.views, config.augment_seed, shift, AUGMENTED_SPLITS, config.augment_flip)


def _check_batch_memory(batch_size: int, backbone: Backbone) -> None:
    """Every batch is padded to the full batch size (uint8 (R, R, 3) images) and comes back as float32
    features: stop before asking for more memory than there is."""
    image_bytes = backbone.image_size * backbone.image_size * 3
    per_example = image_bytes + backbone.feature_dim * 4
    try:
        check_allocation(
            batch_size * per_example,
            f"a batch of {batch_size} images ({backbone.image_size}x{backbone.image_size}x3 uint8, "
            f"{backbone.feature_dim} float32 features each)",
        )
    except AllocationError as error:
        raise ExtractError(f"--batch-size {batch_size}: {error}; choose a smaller batch size") from None


def _extract_locked(config, on_progress, backbone, out, dataset, splits, batch_size, dtype, lock,
                    shard=None) -> pathlib.Path:
    """The extraction into `out`, whose lock is held: every split whole, or with `shard` (a part of a
    sharded file: `featdp.extraction.sharded.Shard`) the rows [first, stop) of each split it assigns."""
    expected_sha256 = None
    if config.checkpoint_sha256 is not None:
        try:
            expected_sha256 = normalized_sha256(config.checkpoint_sha256)
        except ValueError as error:
            raise ExtractError(f"--checkpoint-sha256: {error}") from None
        # Before spending time (and memory) loading the weights; an hf-hub: reference is checked after
        # loading, against the cached file's digest.
        if config.checkpoint is not None and not config.checkpoint.startswith("hf-hub:"):
            verify_sha256(config.checkpoint, expected_sha256)
    if backbone is None:
        backbone = load_backbone(config.backbone, config.checkpoint)
    if expected_sha256 is not None and backbone.checkpoint_sha256 != expected_sha256:
        raise ChecksumMismatchError(f"{backbone.name} weights {backbone.checkpoint or '(none)'} have sha256 "
                                    f"{backbone.checkpoint_sha256 or '(none: weight-free)'}, expected {expected_sha256}")
    devices = jax.local_device_count()
    images = max(batch_size, config.views)  # a batch holds at least one whole example
    _check_batch_memory(-(-images // devices) * devices, backbone)  # ShardedForward's rounded size
    fingerprint = dataset.fingerprint()
    forward = ShardedForward(backbone, images, dtype)
    augmentation = _augmentation(config, backbone)
    preprocessing = {**backbone.preprocessing, "compute_dtype": jnp.dtype(dtype).name}
    if augmentation is not None:
        # Identifying metadata: a resume with other views or another seed is refused. Absent for one view,
        # so files written before views existed still resume.
        preprocessing["augmentation"] = augmentation.describe()
    with FeatureWriter(
        out,
        feature_dim=backbone.feature_dim,
        num_classes=len(dataset.class_names),
        class_names=list(dataset.class_names),
        backbone=backbone.name,
        checkpoint=backbone.checkpoint,
        checkpoint_sha256=backbone.checkpoint_sha256,
        dataset=config.dataset,
        image_size=backbone.image_size,
        preprocessing=preprocessing,
        source_fingerprint=fingerprint,
        overwrite=config.overwrite,
        lock=lock,
        **({} if shard is None else {"part": shard.identity}),
    ) as writer:
        for split in splits:
            total = dataset.splits[split] if config.limit is None else min(config.limit, dataset.splits[split])
            first, stop = (0, total) if shard is None else shard.rows[split]
            views = views_of(config, split)
            done = writer.create_split(split, (stop - first) * views, dtype=config.store_dtype, views=views)
            _extract_split(dataset, split, backbone, forward, writer, done, stop - first, config.workers,
                           on_progress, first, augmentation)
            writer.mark_complete(split)
    return out


def _extract_split(dataset, split, backbone, forward, writer, done, examples, workers, on_progress, first=0,
                   augmentation=None):
    """Rows [done, examples · V) of the file's split (V: the split's views; `done` a multiple of it), which
    hold the source's examples first + done / V … first + examples. Progress counts rows (images)."""
    views = 1 if augmentation is None else augmentation.views_of(split)
    total = examples * views
    started, start_rows = time.perf_counter(), done
    pending = None  # (features in flight on the device, labels, indices, valid rows)

    def flush(item):
        nonlocal done
        features, labels, index, rows = item
        done = writer.append(split, np.asarray(features)[:rows], labels, index)
        if on_progress:
            rate = (done - start_rows) / max(time.perf_counter() - started, 1e-9)
            on_progress(SplitProgress(split, done, total, rate, start_rows))

    if on_progress:
        on_progress(SplitProgress(split, done, total, 0.0, start_rows))
    # forward.batch_size >= views (see _extract_locked): every batch holds at least one whole example.
    per_batch = forward.batch_size // views
    with _loaded_batches(dataset, split, backbone, first + done // views, first + examples, per_batch, workers,
                         augmentation) as batches:
        batch = None
        for batch in batches:
            features = forward(_pad(batch["image"], forward.batch_size))
            if pending is not None:
                flush(pending)  # overlaps with the batch just dispatched
            pending = (features, batch["label"], batch["index"], len(batch["label"]))
        # Drop our references to the last batch so that closing the loader frees its mappings.
        del batch
        if pending is not None:
            flush(pending)
            pending = None
