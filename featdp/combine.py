"""Feature files of the same examples side by side: one feature file whose rows join theirs (`featdp combine`).

Each source's part of a row is rescaled to norm √w_s, with weights w_s > 0 that sum to 1 (default: equal),
so every combined row has norm 1 (less only where a source's row is zero, which stays zero) and each
backbone holds its share of the row whatever its raw scale. The map acts on each example alone and its form
is fixed before any data is read, so a fit on the combined file is private exactly as a fit on any feature
file is: stage two still bounds every row by the clip norm, and the weights only decide how a row's norm
is shared between backbones.

The sources must hold the same examples in the same order: the same split names, classes and dataset, the
same source fingerprint where both record one, and in every split the same labels and the same index, row
by row. Files of augmented views are refused: two backbones' views are different random crops of images of
different sizes, not views of one augmented image.

The result is written under a temporary name beside `out`, with `out`'s lock held, and renamed into place:
it appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
from typing import Callable, Sequence

import numpy as np

from featdp.featurefile import FeatureFile, FeatureFileError, FeatureFileLock, FeatureWriter, written_whole
from featdp.featurefile_parts import parts_dir
from featdp.progress import Update

BLOCK_ROWS = 8192


class CombineError(FeatureFileError):
    """The sources cannot be combined (they describe different examples), or the request is invalid."""


def parse_weights(text: str | None, count: int) -> tuple[float, ...]:
    """`count` weights from a comma-separated list of positive numbers (normalised to sum 1); None: equal."""
    if text is None:
        return (1.0 / count,) * count
    parts = [part.strip() for part in text.split(",")]
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise CombineError(f"--weights: {part!r} is not a number (give one positive number per file, "
                               "e.g. --weights 1,1)") from None
        if not (math.isfinite(value) and value > 0):
            raise CombineError(f"--weights: every weight must be a positive finite number, got {part!r}")
        values.append(value)
    if len(values) != count:
        raise CombineError(f"--weights gives {len(values)} weights ({text!r}) for {count} feature files; give one "
                           "per file")
    return _normalised(values, count)


def combine(
    out: os.PathLike | str,
    sources: Sequence[os.PathLike | str],
    *,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    block_rows: int = BLOCK_ROWS,
    on_progress: Callable[[Update], None] | None = None,
) -> pathlib.Path:
    """Writes `out`, the row-wise join of `sources` (module docstring); returns its path.

    `weights`: one positive number per source, normalised to sum 1; None: equal. The stored dtype is
    float32 if any source stores float32, else float16. CombineError if the sources disagree on what they
    hold; FeatureFileError for an unreadable source, or `out` existing without `overwrite`."""
    out = pathlib.Path(out)
    paths = [pathlib.Path(source) for source in sources]
    if len(paths) < 2:
        raise CombineError(f"combining needs at least two feature files, got {len(paths)}")
    resolved = [path.resolve() for path in paths]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise CombineError(f"{paths[i]} is given twice; combine different feature files")
    target = out.resolve()
    if target in resolved or any(target.parent == parts_dir(path) for path in resolved):
        raise CombineError(f"{out}: the output would replace one of its own sources (or a part of a sharded "
                           "source); choose another --out")
    shares = parse_weights(None, len(paths)) if weights is None else _normalised(weights, len(paths))
    if out.is_dir():
        raise FeatureFileError(f"{out}: is a directory; the output must be a file path (e.g. {out / 'combined.h5'})")
    with FeatureFileLock(out):
        if out.exists() and not overwrite:
            raise FeatureFileError(f"{out}: file exists; pass --overwrite to replace it")
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(FeatureFile(path)) for path in paths]
            metadata = _joint_metadata(files, shares)
            # Every split's shape and index first: a mismatch anywhere is found before anything is written.
            splits = {name: _matching_splits(name, files) for name in files[0].split_names}
            with written_whole(out) as tmp, FeatureWriter(tmp, overwrite=True, **metadata) as writer:
                for name, (opened, index) in splits.items():
                    _combine_split(writer, name, files, opened, index, shares, block_rows, on_progress)
    return out


# A share this far below the largest would scale its backbone's part to (nearly) nothing in float16/float32.
SMALLEST_SHARE_RATIO = 1e-6


def _normalised(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """The weights as shares summing to 1; CombineError unless `count` positive finite numbers within a factor
    1/SMALLEST_SHARE_RATIO of each other."""
    values = [float(w) for w in weights]
    if len(values) != count or not all(math.isfinite(v) and v > 0 for v in values):
        raise CombineError(f"weights must be {count} positive finite numbers, one per file, got {list(weights)}")
    largest = max(values)
    relative = [v / largest for v in values]  # divided first, so that a sum of huge weights cannot overflow
    if min(relative) < SMALLEST_SHARE_RATIO:
        raise CombineError(f"weights {list(weights)}: {min(values)!r} is below {SMALLEST_SHARE_RATIO:g} of the "
                           "largest, so its backbone would contribute nothing; leave that file out instead")
    total = math.fsum(relative)
    return tuple(v / total for v in relative)


def _joint_metadata(files: list[FeatureFile], shares: tuple[float, ...]) -> dict:
    """The combined file's metadata, after checking that the sources describe the same examples."""
    first = files[0]
    meta = first.metadata
    for other in files[1:]:
        theirs = other.metadata
        for field in ("num_classes", "class_names", "dataset"):
            if getattr(theirs, field) != getattr(meta, field):
                raise CombineError(f"{other.path} and {first.path} differ in {field} ({getattr(theirs, field)!r} "
                                   f"against {getattr(meta, field)!r}): they do not hold the same examples")
        if meta.source_fingerprint and theirs.source_fingerprint and \
                theirs.source_fingerprint != meta.source_fingerprint:
            raise CombineError(f"{other.path} and {first.path} were extracted from different contents of "
                               f"{meta.dataset!r} (their source fingerprints differ): they do not hold the same "
                               "examples")
        if set(other.split_names) != set(first.split_names):
            raise CombineError(f"{other.path} has splits {sorted(other.split_names)}, {first.path} has "
                               f"{sorted(first.split_names)}: combine files with the same splits")
    fingerprint = next((f.metadata.source_fingerprint for f in files if f.metadata.source_fingerprint), {})
    sizes = {f.metadata.image_size for f in files}
    provenance = [
        {
            "file": f.path.name,
            "weight": share,
            "feature_dim": f.metadata.feature_dim,
            "backbone": f.metadata.backbone,
            "checkpoint": f.metadata.checkpoint,
            "checkpoint_sha256": f.metadata.checkpoint_sha256,
            "image_size": f.metadata.image_size,
            "preprocessing": f.metadata.preprocessing,
            "created_utc": f.metadata.created_utc,
            "featdp_version": f.metadata.featdp_version,
        }
        for f, share in zip(files, shares)
    ]
    return dict(
        feature_dim=sum(f.metadata.feature_dim for f in files),
        num_classes=meta.num_classes,
        class_names=meta.class_names,
        backbone="+".join(f.metadata.backbone for f in files),
        checkpoint="+".join(f.metadata.checkpoint for f in files),
        checkpoint_sha256="+".join(f.metadata.checkpoint_sha256 for f in files),
        dataset=meta.dataset,
        image_size=sizes.pop() if len(sizes) == 1 else 0,
        preprocessing={"combined": provenance,
                       "rows": "each source's part rescaled to norm sqrt(weight); a zero part stays zero"},
        source_fingerprint=fingerprint,
    )


def _matching_splits(name: str, files: list[FeatureFile]) -> tuple[list, np.ndarray]:
    """Split `name` of every source and their common index; CombineError unless each holds one view per
    example, the same number of rows and the same index, row by row."""
    splits = [f.split(name) for f in files]
    first = splits[0]
    for split, f in zip(splits, files):
        if split.views_per_example != 1:
            raise CombineError(f"{f.path}: split {name!r} holds {split.views_per_example} augmented views per "
                               "example; combine one-view files (views of different backbones are not views of "
                               "the same augmented image)")
        if split.num_examples != first.num_examples:
            raise CombineError(f"split {name!r} has {split.num_examples} rows in {f.path} but "
                               f"{first.num_examples} in {files[0].path}: they do not hold the same examples")
    index = first.read_index()
    for split, f in zip(splits[1:], files[1:]):
        _require_equal(index, split.read_index(), "index", name, f.path, files[0].path, 0)
    return splits, index


def _combine_split(writer: FeatureWriter, name: str, files: list[FeatureFile], splits: list, index: np.ndarray,
                   shares: tuple[float, ...], block_rows: int, on_progress) -> None:
    """Writes split `name`: each row the sources' rows at their shares (module docstring), after checking
    that the sources' labels agree row by row."""
    dtype = "float32" if any(np.dtype(s.dtype) == np.float32 for s in splits) else "float16"
    n = splits[0].num_examples
    writer.create_split(name, n, dtype=dtype)
    scales = [np.float32(math.sqrt(share)) for share in shares]
    done = 0
    for blocks in zip(*(split.blocks(block_rows) for split in splits)):
        labels = blocks[0][1]
        for (_, theirs), f in zip(blocks[1:], files[1:]):
            _require_equal(labels, theirs, "label", name, f.path, files[0].path, done)
        joined = np.concatenate([_unit_rows(x) * scale for (x, _), scale in zip(blocks, scales)], axis=1)
        writer.append(name, joined, labels, index[done : done + len(labels)])
        done += len(labels)
        if on_progress is not None:
            on_progress(Update(name, done, n))
    writer.mark_complete(name)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row of `x` divided by its norm (a zero row stays zero), as float32."""
    # Norms in float64: squares of large float32 features would overflow.
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    scale = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-300), 0.0)
    return (x * scale[:, None]).astype(np.float32)


def _require_equal(ours: np.ndarray, theirs: np.ndarray, what: str, split: str, path, first_path,
                   first_row: int) -> None:
    differs = np.flatnonzero(ours != theirs)
    if differs.size:
        row = int(differs[0])
        raise CombineError(f"split {split!r}, row {first_row + row}: {what} {theirs[row]} in {path} but {ours[row]} "
                           f"in {first_path}: the files do not hold the same examples in the same order")
