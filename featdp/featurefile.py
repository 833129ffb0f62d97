"""The HDF5 feature file: the only thing passed from extraction (stage one) to fitting (stage two).

Layout, format version 1 (DESIGN.md section 5)::

    /                  attrs: format, format_version, featdp_version, backbone, checkpoint,
                              checkpoint_sha256, dataset, image_size, preprocessing (JSON),
                              feature_dim, num_classes, class_names (JSON), created_utc
    /<split>/features  (N, D) float16 or float32, chunked by rows, uncompressed
    /<split>/labels    (N,) int32
    /<split>/index     (N,) int64, position of the example in the source dataset
    /<split>           attrs: num_examples, rows_done, complete

This module is the only code that knows the layout; everything else goes through `FeatureWriter`,
`write_features` and `FeatureFile`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import uuid
from typing import Any, Iterator

import h5py
import numpy as np

from featdp.checksums import file_sha256  # noqa: F401 (re-exported: part of this module's API)

import featdp

FORMAT = "featdp-features"
FORMAT_VERSION = 1

_FEATURE_DTYPES = ("float16", "float32")
# ~1 MiB chunks: large enough that HDF5's per-chunk overhead is negligible, small enough that a
# resumed extraction rewrites little and a block read touches few chunks it does not need.
_CHUNK_BYTES = 1 << 20
# write_features converts to the stored dtype this many rows at a time, bounding the extra copy.
_WRITE_BLOCK_ROWS = 65536


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable, inconsistent, or would be made so by a write."""


def _error(path: os.PathLike | str, message: str) -> FeatureFileError:
    return FeatureFileError(f"{path}: {message}")


@dataclasses.dataclass(frozen=True)
class FileMetadata:
    """Typed view of the root attributes."""

    feature_dim: int
    num_classes: int
    class_names: tuple[str, ...]
    backbone: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    dataset: str = ""
    image_size: int = 0
    preprocessing: dict = dataclasses.field(default_factory=dict)
    created_utc: str = ""
    featdp_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_json_dict(self) -> dict:
        """The metadata as JSON-serialisable values (for run reports)."""
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        return d


# What makes two extractions "the same run": a resumed extraction must match on all of these.
_IDENTIFYING = (
    "feature_dim",
    "num_classes",
    "class_names",
    "backbone",
    "checkpoint",
    "checkpoint_sha256",
    "dataset",
    "image_size",
    "preprocessing",
)
_ROOT_ATTRS = ("format", "format_version") + _IDENTIFYING + ("featdp_version", "created_utc")


def _canonical_json(path, name: str, value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise _error(path, f"{name} must be JSON-serialisable: {exc}") from None


def _to_attrs(meta: FileMetadata) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": np.int64(meta.format_version),
        "featdp_version": meta.featdp_version,
        "backbone": meta.backbone,
        "checkpoint": meta.checkpoint,
        "checkpoint_sha256": meta.checkpoint_sha256,
        "dataset": meta.dataset,
        "image_size": np.int64(meta.image_size),
        "preprocessing": json.dumps(meta.preprocessing, sort_keys=True),
        "feature_dim": np.int64(meta.feature_dim),
        "num_classes": np.int64(meta.num_classes),
        "class_names": json.dumps(list(meta.class_names)),
        "created_utc": meta.created_utc,
    }


def _check_format(path, attrs: h5py.AttributeManager) -> None:
    fmt = attrs.get("format")
    if isinstance(fmt, bytes):  # fixed-length strings written by other tools come back as bytes
        fmt = fmt.decode("utf-8", "replace")
    if fmt != FORMAT:
        raise _error(path, f"not a featdp feature file: root attribute format={fmt!r}, expected {FORMAT!r}")
    version = attrs.get("format_version")
    version = version.item() if isinstance(version, np.generic) else version
    if version != FORMAT_VERSION:
        raise _error(
            path,
            f"unsupported format_version {version!r}; this featdp ({featdp.__version__}) reads "
            f"format_version {FORMAT_VERSION}",
        )


def _from_attrs(path, attrs: h5py.AttributeManager) -> FileMetadata:
    missing = [name for name in _ROOT_ATTRS if name not in attrs]
    if missing:
        raise _error(path, f"root attributes missing: {', '.join(missing)}")
    try:
        class_names = json.loads(attrs["class_names"])
        preprocessing = json.loads(attrs["preprocessing"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise _error(path, f"class_names/preprocessing attribute is not valid JSON: {exc}") from None
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise _error(path, f"class_names must be a JSON list of strings, got {attrs['class_names']!r}")
    if not isinstance(preprocessing, dict):
        raise _error(path, f"preprocessing must be a JSON object, got {attrs['preprocessing']!r}")
    meta = FileMetadata(
        feature_dim=int(attrs["feature_dim"]),
        num_classes=int(attrs["num_classes"]),
        class_names=tuple(class_names),
        backbone=str(attrs["backbone"]),
        checkpoint=str(attrs["checkpoint"]),
        checkpoint_sha256=str(attrs["checkpoint_sha256"]),
        dataset=str(attrs["dataset"]),
        image_size=int(attrs["image_size"]),
        preprocessing=preprocessing,
        created_utc=str(attrs["created_utc"]),
        featdp_version=str(attrs["featdp_version"]),
        format_version=int(attrs["format_version"]),
    )
    if meta.feature_dim < 1 or meta.num_classes < 1:
        raise _error(path, f"feature_dim={meta.feature_dim} and num_classes={meta.num_classes} must be >= 1")
    return meta


def _open_h5(path: pathlib.Path, mode: str) -> h5py.File:
    if mode != "w" and not path.exists():
        raise _error(path, "no such file")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise _error(path, f"not a readable HDF5 feature file (truncated or corrupt?): {exc}") from None


def _split_group(path, h5: h5py.File, name: str) -> h5py.Group:
    obj = h5.get(name)
    if not isinstance(obj, h5py.Group):
        available = sorted(k for k in h5 if isinstance(h5[k], h5py.Group))
        raise _error(path, f"no split {name!r}; available splits: {available or 'none'}")
    return obj


def _first_nonfinite_row(x: np.ndarray) -> int | None:
    # Fast path: a NaN or ±Inf anywhere makes the float64 sum non-finite (finite float16/32 values cannot
    # overflow it), so the row-wise scan, which allocates a boolean copy, runs only when something is bad.
    if np.isfinite(np.sum(x, dtype=np.float64)):
        return None
    finite_rows = np.isfinite(x).all(axis=1)
    return None if finite_rows.all() else int(np.argmin(finite_rows))


def _first_label_outside(labels: np.ndarray, num_classes: int) -> int | None:
    if labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes):
        return None
    return int(np.argmax((labels < 0) | (labels >= num_classes)))


class FeatureWriter:
    """Creates, or resumes, a feature file; a context manager.

    An existing file is reopened for resuming when its identifying metadata (everything except
    created_utc and featdp_version) equals the arguments; otherwise FeatureFileError, unless
    overwrite=True, which starts a fresh file.
    """

    def __init__(
        self,
        path: os.PathLike | str,
        *,
        feature_dim: int,
        num_classes: int,
        class_names: tuple[str, ...] | list[str] | None = None,
        backbone: str = "",
        checkpoint: str = "",
        checkpoint_sha256: str = "",
        dataset: str = "",
        image_size: int = 0,
        preprocessing: dict | None = None,
        overwrite: bool = False,
    ):
        self.path = pathlib.Path(path)
        if int(feature_dim) < 1 or int(num_classes) < 1:
            raise _error(self.path, f"feature_dim={feature_dim} and num_classes={num_classes} must be >= 1")
        if class_names is None:
            # Keeps len(class_names) == num_classes an invariant readers can rely on.
            class_names = [str(k) for k in range(int(num_classes))]
        class_names = tuple(str(c) for c in class_names)
        if len(class_names) != int(num_classes):
            raise _error(self.path, f"{len(class_names)} class_names given for num_classes={num_classes}")
        # Round-trip through JSON so comparison with a stored file sees what the file would hold.
        preprocessing = json.loads(_canonical_json(self.path, "preprocessing", preprocessing or {}))
        wanted = FileMetadata(
            feature_dim=int(feature_dim),
            num_classes=int(num_classes),
            class_names=class_names,
            backbone=str(backbone),
            checkpoint=str(checkpoint),
            checkpoint_sha256=str(checkpoint_sha256),
            dataset=str(dataset),
            image_size=int(image_size),
            preprocessing=preprocessing,
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            featdp_version=featdp.__version__,
        )
        if self.path.exists() and not overwrite:
            self._h5 = _open_h5(self.path, "r+")
            try:
                _check_format(self.path, self._h5.attrs)
                self.metadata = _from_attrs(self.path, self._h5.attrs)
                for name in _IDENTIFYING:
                    have, want = getattr(self.metadata, name), getattr(wanted, name)
                    if have != want:
                        raise _error(
                            self.path,
                            f"cannot resume: attribute {name!r} differs (file has {have!r}, "
                            f"arguments give {want!r}); pass overwrite=True to start a fresh file",
                        )
            except BaseException:
                self._h5.close()
                raise
        else:
            self._h5 = _open_h5(self.path, "w")
            self._h5.attrs.update(_to_attrs(wanted))
            self._h5.flush()
            self.metadata = wanted

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    def _group(self, split: str) -> h5py.Group:
        return _split_group(self.path, self._h5, split)

    def rows_done(self, split: str) -> int:
        """Rows of `split` durably written so far."""
        return int(self._group(split).attrs["rows_done"])

    def create_split(
        self, name: str, num_examples: int, dtype: str = "float16", chunk_rows: int | None = None
    ) -> int:
        """Creates `name` for `num_examples` rows, or keeps a matching existing one; returns its rows_done."""
        dtype = np.dtype(dtype).name
        if dtype not in _FEATURE_DTYPES:
            raise _error(self.path, f"split {name!r}: feature dtype {dtype!r} not in {_FEATURE_DTYPES}")
        if not name or "/" in name or name == ".":
            raise _error(self.path, f"invalid split name {name!r}")
        n, d = int(num_examples), self.metadata.feature_dim
        if n < 0:
            raise _error(self.path, f"split {name!r}: num_examples={n} must be >= 0")
        if name in self._h5:
            group = self._group(name)
            have = group["features"]
            if have.shape != (n, d) or have.dtype != np.dtype(dtype):
                raise _error(
                    self.path,
                    f"split {name!r} exists with features {have.shape} {have.dtype}, requested "
                    f"{(n, d)} {dtype}; reopen with overwrite=True to start a fresh file",
                )
            return int(group.attrs["rows_done"])

        itemsize = np.dtype(dtype).itemsize
        if chunk_rows is None:
            chunk_rows = max(1, _CHUNK_BYTES // (d * itemsize))
        elif chunk_rows < 1:
            raise _error(self.path, f"split {name!r}: chunk_rows={chunk_rows} must be >= 1")
        group = self._h5.create_group(name)
        # HDF5 refuses a chunk larger than a fixed-size dataset, so an empty split is left contiguous.
        chunks = n > 0
        group.create_dataset(
            "features", shape=(n, d), dtype=dtype, chunks=(min(n, chunk_rows), d) if chunks else None
        )
        group.create_dataset(
            "labels", shape=(n,), dtype=np.int32, chunks=(min(n, _CHUNK_BYTES // 4),) if chunks else None
        )
        group.create_dataset(
            "index", shape=(n,), dtype=np.int64, chunks=(min(n, _CHUNK_BYTES // 8),) if chunks else None
        )
        group.attrs.update(
            {"num_examples": np.int64(n), "rows_done": np.int64(0), "complete": np.bool_(False)}
        )
        self._h5.flush()
        return 0

    def append(self, split: str, features: np.ndarray, labels: np.ndarray, index: np.ndarray) -> int:
        """Writes the next rows of `split` and returns the new rows_done.

        Rows go to [rows_done, rows_done + b); rows_done is advanced only after they are flushed, so a
        process killed at any moment leaves rows_done <= the rows actually on disk.
        """
        group = self._group(split)
        ds = group["features"]
        start, n, d = int(group.attrs["rows_done"]), int(group.attrs["num_examples"]), self.metadata.feature_dim
        where = f"split {split!r}"

        features = np.asarray(features)
        labels = np.asarray(labels)
        index = np.asarray(index)
        if features.ndim != 2 or features.shape[1] != d:
            raise _error(self.path, f"{where}: features have shape {features.shape}, expected (b, {d})")
        b = features.shape[0]
        if labels.shape != (b,) or index.shape != (b,):
            raise _error(
                self.path,
                f"{where}: labels {labels.shape} and index {index.shape} must both have shape ({b},) "
                f"to match features {features.shape}",
            )
        if start + b > n:
            raise _error(
                self.path, f"{where}: appending {b} rows at row {start} would pass num_examples={n}"
            )
        if features.dtype.kind == "c":
            raise _error(self.path, f"{where}: features are complex ({features.dtype})")
        for arr, label in ((labels, "labels"), (index, "index")):
            if arr.dtype.kind not in "iu":
                raise _error(self.path, f"{where}: {label} must be integers, got dtype {arr.dtype}")
        bad = _first_label_outside(labels, self.metadata.num_classes)
        if bad is not None:
            raise _error(
                self.path,
                f"{where}, row {start + bad}: label {labels[bad]} outside [0, {self.metadata.num_classes})",
            )
        if b and index.min() < 0:
            bad = int(np.argmax(index < 0))
            raise _error(self.path, f"{where}, row {start + bad}: negative index {index[bad]}")
        with np.errstate(over="ignore"):  # overflow is reported below, with its row
            stored = features.astype(ds.dtype, copy=False)
        bad = _first_nonfinite_row(stored)
        if bad is not None:
            # Checked after the cast: float32 values beyond 65504 become inf in a float16 file.
            overflow = bool(np.isfinite(features[bad]).all())
            reason = f"overflows {ds.dtype} (|x| > {np.finfo(ds.dtype).max})" if overflow else "is not finite"
            raise _error(self.path, f"{where}, row {start + bad}: feature vector {reason}")
        if b == 0:
            return start

        stop = start + b
        ds[start:stop] = stored
        group["labels"][start:stop] = labels
        group["index"][start:stop] = index
        # Two flushes order the writes on disk: rows first, then the counter that vouches for them.
        self._h5.flush()
        group.attrs["rows_done"] = np.int64(stop)
        self._h5.flush()
        return stop

    def mark_complete(self, split: str) -> None:
        """Marks `split` complete; all num_examples rows must have been appended."""
        group = self._group(split)
        done, n = int(group.attrs["rows_done"]), int(group.attrs["num_examples"])
        if done != n:
            raise _error(self.path, f"split {split!r}: cannot mark complete with rows_done={done} of {n}")
        group.attrs["complete"] = np.bool_(True)
        self._h5.flush()


def write_features(
    path: os.PathLike | str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    **metadata: Any,
) -> pathlib.Path:
    """Writes whole in-memory splits {name: (features, labels)} at once, each marked complete.

    index is arange(n). num_classes defaults to 1 + the largest label. The file is written next to
    `path` under a temporary name and renamed into place, so a failure never leaves a partial file.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise _error(path, "file exists; pass overwrite=True to replace it")
    if not splits:
        raise _error(path, "no splits given")
    arrays = {name: (np.asarray(x), np.asarray(y)) for name, (x, y) in splits.items()}
    first = next(iter(arrays.values()))[0]
    if "feature_dim" not in metadata:
        if first.ndim != 2:
            raise _error(path, f"features have shape {first.shape}, expected (n, D)")
        metadata["feature_dim"] = first.shape[1]
    if num_classes is None:
        sizes = [int(y.max()) + 1 for _, y in arrays.values() if y.size]
        if not sizes:
            raise _error(path, "num_classes cannot be inferred from empty splits; pass it")
        num_classes = max(sizes)

    # Same directory, so the final rename is atomic; h5py creates it, so the umask sets its mode.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with FeatureWriter(tmp, num_classes=num_classes, overwrite=True, **metadata) as writer:
            for name, (x, y) in arrays.items():
                if x.ndim != 2 or y.shape != (x.shape[0],):
                    raise _error(
                        path, f"split {name!r}: features {x.shape} and labels {y.shape} must be (n, D) and (n,)"
                    )
                n = x.shape[0]
                writer.create_split(name, n, dtype=dtype)
                for s in range(0, n, _WRITE_BLOCK_ROWS):
                    e = min(s + _WRITE_BLOCK_ROWS, n)
                    writer.append(name, x[s:e], y[s:e], np.arange(s, e, dtype=np.int64))
                writer.mark_complete(name)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, FeatureFileError):
            # Report the destination, not the temporary name the user never asked for.
            raise FeatureFileError(str(exc).replace(str(tmp), str(path))) from None
        raise
    return path


class Split:
    """One split of an open FeatureFile, read in row blocks as float32 features and int64 labels."""

    def __init__(self, path: pathlib.Path, name: str, group: h5py.Group, num_examples: int, num_classes: int):
        self.path = path
        self.name = name
        self.num_examples = num_examples
        self._features = group["features"]
        self._labels = group["labels"]
        self._index = group["index"]
        self.feature_dim = int(self._features.shape[1])
        self.num_classes = num_classes
        self.dtype = self._features.dtype
        self.complete = bool(group.attrs.get("complete", False))
        self.rows_done = int(group.attrs.get("rows_done", 0))

    def __repr__(self) -> str:
        return (
            f"Split({self.name!r}, num_examples={self.num_examples}, feature_dim={self.feature_dim}, "
            f"dtype={self.dtype})"
        )

    def nbytes_float32(self) -> int:
        """Bytes the whole split takes as float32, for deciding whether to load it into memory."""
        return self.num_examples * self.feature_dim * 4

    def _read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            features = self._features[start:stop]
            labels = self._labels[start:stop]
        except OSError as exc:
            raise _error(
                self.path,
                f"split {self.name!r}, rows [{start}, {stop}): not a readable HDF5 feature file "
                f"(truncated or corrupt?): {exc}",
            ) from None
        features = features.astype(np.float32, copy=False)
        labels = labels.astype(np.int64, copy=False)
        bad = _first_nonfinite_row(features)
        if bad is not None:
            raise _error(self.path, f"split {self.name!r}, row {start + bad}: feature vector is not finite")
        bad = _first_label_outside(labels, self.num_classes)
        if bad is not None:
            raise _error(
                self.path,
                f"split {self.name!r}, row {start + bad}: label {labels[bad]} outside "
                f"[0, {self.num_classes})",
            )
        return features, labels

    def blocks(self, block_rows: int = 32768) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields validated (features (b, D) float32, labels (b,) int64) blocks in row order."""
        if block_rows < 1:
            raise ValueError(f"block_rows={block_rows} must be >= 1")
        for start in range(0, self.num_examples, block_rows):
            yield self._read_rows(start, min(start + block_rows, self.num_examples))

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole split as (float32 (N, D), int64 (N,)), validated like blocks()."""
        return self._read_rows(0, self.num_examples)

    def read_index(self) -> np.ndarray:
        """Positions of the rows in the source dataset, int64 (N,)."""
        return self._index[: self.num_examples].astype(np.int64, copy=False)


class FeatureFile:
    """Reads a feature file; a context manager. Opening checks the format, not the data."""

    def __init__(self, path: os.PathLike | str):
        self.path = pathlib.Path(path)
        self._h5 = _open_h5(self.path, "r")
        try:
            _check_format(self.path, self._h5.attrs)
            self.metadata = _from_attrs(self.path, self._h5.attrs)
            self.split_names = tuple(k for k in self._h5 if isinstance(self._h5[k], h5py.Group))
        except BaseException:
            self._h5.close()
            raise

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    def split(self, name: str, *, require_complete: bool = True) -> Split:
        """Opens split `name` after checking its shapes and attributes.

        With require_complete=False an unfinished split is accepted and covers its rows_done rows.
        """
        group = _split_group(self.path, self._h5, name)
        where = f"split {name!r}"
        missing = [k for k in ("features", "labels", "index") if not isinstance(group.get(k), h5py.Dataset)]
        missing += [k for k in ("num_examples", "rows_done", "complete") if k not in group.attrs]
        if missing:
            raise _error(self.path, f"{where} lacks {', '.join(missing)}")
        features, labels, index = group["features"], group["labels"], group["index"]
        n, done = int(group.attrs["num_examples"]), int(group.attrs["rows_done"])
        complete = bool(group.attrs["complete"])
        d = self.metadata.feature_dim
        if features.ndim != 2 or features.shape[1] != d:
            raise _error(
                self.path,
                f"{where}: features have shape {features.shape}, but the file's feature_dim is {d}",
            )
        if features.dtype.name not in _FEATURE_DTYPES or labels.dtype.kind not in "iu":
            raise _error(self.path, f"{where}: features {features.dtype} / labels {labels.dtype} unsupported")
        if labels.shape != (features.shape[0],) or index.shape != (features.shape[0],):
            raise _error(
                self.path,
                f"{where}: labels {labels.shape} and index {index.shape} do not match features "
                f"{features.shape}",
            )
        if n != features.shape[0] or not 0 <= done <= n:
            raise _error(self.path, f"{where}: num_examples={n}, rows_done={done}, features {features.shape}")
        if complete and done != n:
            raise _error(self.path, f"{where}: marked complete with rows_done={done} of {n}")
        if not complete:
            if require_complete:
                raise _error(
                    self.path,
                    f"{where} is incomplete (rows_done={done} of num_examples={n}); re-run the "
                    f"extraction to finish it",
                )
            n = done
        return Split(self.path, name, group, n, self.metadata.num_classes)
