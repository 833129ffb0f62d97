"""The sharded layout of a feature file: what `featdp extract` writes when N processes extract together.

Layout (format version 1, or 2 with views; `featdp.featurefile` specifies the ordinary layout)::

    <out>                                   the manifest: an HDF5 file with a feature file's root attributes,
                                            plus layout="parts", no split groups, and one dataset
                                            /manifest, a JSON string:
        {"run_id": hex,
         "parts":  [{"file": "part-00000-of-00003.h5", "size": bytes, "sha256": hex}, ...],
         "splits": {name: {"num_examples": n, "dtype": "float16", "chunk_rows": G,
                           "parts": [{"first_row": r, "num_rows": m, "digests": [hex, ...]}, ...]}}}
    <out>.parts/part-IIIII-of-NNNNN.h5      part i: a feature file in the ordinary layout holding rows
                                            [r_i, r_i + m_i) of every split (`index` still gives positions
                                            in the source dataset), plus the root attribute `part` (JSON:
                                            run_id, index, count, first_rows per split).

A split of V views per example (`featdp.featurefile`, "Views") is shared in whole examples: every part's
split declares the same V, and each part's r_i and m_i are multiples of it; a reader refuses anything else.

Process i of N writes part i and resumes it on its own; process 0 writes the manifest, atomically, once
every part is complete. Rows of a split are the parts' rows in part order: global row r_i + j is row j of
part i, and the parts cover [0, n) exactly once.

What a reader trusts, and why that is enough (the file may come from anyone, as any feature file):

* Names. Parts are read only at `<out>.parts/part-IIIII-of-NNNNN.h5`, the names the manifest's own path
  and part count imply; a manifest listing any other name is refused. So a manifest cannot make featdp
  read a file outside its parts folder, which is what the ordinary layout's ban on external storage,
  external links and virtual datasets protects against.
* At open, every part, metadata only: it exists; its byte size is the manifest's; it passes every check an
  ordinary feature file passes (storage inside itself, typed attributes, rows on disk); its `part`
  attribute names the manifest's run_id and its own index and count; its metadata (backbone, dataset,
  classes, …) equals the manifest's; every split is complete with exactly the rows the manifest assigns
  it. A missing part, a part from another run and a truncated one are refused here, naming the part,
  before a row is read.
* Content, lazily. A split's rows in a part are cut into chunks of `chunk_rows` rows (about 8 MiB of
  features), and the manifest records each chunk's SHA-256 over its canonical bytes (split name, global
  first row, stored dtype, the features as stored, labels and index as int64). A reader reads whole chunks
  and checks each one the first time it is read, before any of its rows leave the reader: no statistic,
  hence no release, is ever computed from a row that differs from what the extraction wrote, and an
  altered part stops the fit naming the part and its rows.

Why lazily, and not a SHA-256 of each whole part at every open: hashing runs at ~1.8 GB/s on one idle core
with SHA-NI (`benchmarks/scale_out.py` measures it), comparable to reading, so the content is hashed once,
during the first pass, by the process
that reads it, instead of in a separate pass that doubles the I/O of a one-pass method (DP-LS) and would
hash, on every host, parts other hosts read. Chunks are verified once per open file: rewriting a part
while a fit reads it needs write access to the parts, which could equally rewrite the manifest.

The manifest also records each part's whole-file SHA-256 (`sha256`): `verify_parts` recomputes it, and a
copy can be checked with standard tools (`sha256sum`). Readers rely on the chunk digests instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import struct
import uuid
from typing import Any, Iterator

import h5py
import numpy as np

from featdp.checksums import file_sha256

LAYOUT = "parts"
PARTS_SUFFIX = ".parts"
CHUNK_BYTES = 8 << 20  # features per digest chunk: reading one more at a range's edge costs little
MANIFEST_LIMIT = 256 << 20  # bytes of manifest JSON a reader accepts (14M rows of ViT-L features: ~0.3 MB)
_PART_NAME = re.compile(r"part-(\d{5})-of-(\d{5})\.h5")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK_DOMAIN = b"featdp feature chunk v1\0"


def parts_dir(path: os.PathLike | str) -> pathlib.Path:
    """The folder holding the parts of the sharded feature file `path`: `<path>.parts`."""
    path = pathlib.Path(path)
    return path.with_name(path.name + PARTS_SUFFIX)


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.h5"


def part_path(path: os.PathLike | str, index: int, count: int) -> pathlib.Path:
    return parts_dir(path) / part_name(index, count)


def default_chunk_rows(feature_dim: int, dtype: str) -> int:
    return max(1, CHUNK_BYTES // (int(feature_dim) * np.dtype(dtype).itemsize))


def part_identity(run_id: str, index: int, count: int, first_rows: dict[str, int]) -> dict:
    """The `part` root attribute of part `index` of `count`; identifying: a part is resumed only by the
    same run (`FeatureWriter` compares it)."""
    return {"run_id": str(run_id), "index": int(index), "count": int(count),
            "first_rows": {str(k): int(v) for k, v in first_rows.items()}}


def new_run_id() -> str:
    return uuid.uuid4().hex


def chunk_digest(split: str, first_row: int, features: np.ndarray, labels: np.ndarray, index: np.ndarray) -> str:
    """SHA-256 of one chunk's canonical bytes (module docstring)."""
    features = np.ascontiguousarray(features, dtype=features.dtype.newbyteorder("<"))
    digest = hashlib.sha256(_CHUNK_DOMAIN)
    digest.update(split.encode() + b"\0" + features.dtype.name.encode() + b"\0")
    rows, columns = features.shape[0], features.shape[1] if features.ndim == 2 else 0
    digest.update(struct.pack("<qqq", int(first_row), rows, columns))
    digest.update(memoryview(features).cast("B"))
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(index, dtype="<i8").tobytes())
    return digest.hexdigest()


def _error(path, message: str):
    from featdp.featurefile import FeatureFileError

    return FeatureFileError(f"{path}: {message}")


# --- writing ---------------------------------------------------------------------------------------------


def describe_part(path: pathlib.Path, identity: dict, chunk_rows: dict[str, int] | None = None) -> dict:
    """The manifest's entry for a complete part file: size, SHA-256, and per split its rows and chunk
    digests (read back from the file, so a resumed part is described by what is on disk)."""
    from featdp.featurefile import FeatureFile

    splits = {}
    with FeatureFile(path) as part:
        for name, first in identity["first_rows"].items():
            split = part.split(name)
            rows = chunk_rows.get(name) if chunk_rows else None
            rows = rows or default_chunk_rows(split.feature_dim, split.dtype.name)
            digests = []
            for start in range(0, split.num_examples, rows):
                stop = min(start + rows, split.num_examples)
                features, labels, index = split.read_stored(start, stop)
                digests.append(chunk_digest(name, first + start, features, labels, index))
            splits[name] = {"first_row": int(first), "num_rows": split.num_examples, "dtype": split.dtype.name,
                            "chunk_rows": int(rows), "digests": digests, "views": split.views_per_example}
    return {"file": path.name, "size": path.stat().st_size, "sha256": file_sha256(path), "index": identity["index"],
            "run_id": identity["run_id"], "splits": splits}


def write_manifest(path: os.PathLike | str, metadata, run_id: str, descriptions: list[dict]) -> pathlib.Path:
    """Writes the manifest of the parts `descriptions` (from `describe_part`, one per part, in order) next
    to them, atomically: a temporary file renamed into place. Checks that the parts cover every split's
    rows exactly once, in order."""
    from featdp.featurefile import _open_h5, _to_attrs

    path = pathlib.Path(path)
    count = len(descriptions)
    parts, splits = [], {}
    for index, entry in enumerate(descriptions):
        if entry["index"] != index or entry["run_id"] != run_id or entry["file"] != part_name(index, count):
            raise _error(path, f"part {index} is described as {entry['file']} of run {entry['run_id']}, index "
                               f"{entry['index']}: not part {index} of run {run_id}")
        parts.append({"file": entry["file"], "size": int(entry["size"]), "sha256": entry["sha256"]})
        for name, rows in entry["splits"].items():
            layout = splits.setdefault(name, {"num_examples": 0, "dtype": rows["dtype"],
                                              "chunk_rows": rows["chunk_rows"], "parts": []})
            if rows.get("views", 1) > 1:  # recorded, so that a part that loses its attribute is refused
                layout["views"] = rows["views"]
            if rows["first_row"] != layout["num_examples"] or rows["dtype"] != layout["dtype"] or (
                    rows["chunk_rows"] != layout["chunk_rows"]) or rows.get("views", 1) != layout.get("views", 1):
                raise _error(path, f"split {name!r}: part {index} starts at row {rows['first_row']} "
                                   f"({rows['dtype']}), the parts before it end at row {layout['num_examples']} "
                                   f"({layout['dtype']})")
            layout["parts"].append({k: rows[k] for k in ("first_row", "num_rows", "digests")})
            layout["num_examples"] += rows["num_rows"]
    for name, layout in splits.items():
        if len(layout["parts"]) != count:
            raise _error(path, f"split {name!r} is in {len(layout['parts'])} of the {count} parts")
    manifest = json.dumps({"run_id": run_id, "parts": parts, "splits": splits}, sort_keys=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        h5 = _open_h5(tmp, "w")
        try:
            h5.attrs.update(_to_attrs(metadata))
            h5.attrs["layout"] = LAYOUT
            h5.create_dataset("manifest", data=manifest, dtype=h5py.string_dtype("utf-8"))
        finally:
            h5.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_parts(path: os.PathLike | str, splits: dict[str, tuple[np.ndarray, np.ndarray]], num_parts: int, *,
                num_classes: int | None = None, dtype: str = "float32", chunk_rows: int | None = None,
                **metadata: Any) -> pathlib.Path:
    """Writes in-memory splits {name: (features, labels)} as a sharded feature file of `num_parts` parts
    (what `featdp extract` writes with --num-processes num_parts), all from this process: for tests and
    benchmarks of the sharded readers. `chunk_rows` overrides the digest chunk size. Features (n, V, D)
    make a split of V views per example, as in `featurefile.write_features`, shared in whole examples."""
    from featdp import distributed
    from featdp.featurefile import FeatureFile, FeatureWriter

    path = pathlib.Path(path)
    arrays = {name: (np.asarray(x), np.asarray(y)) for name, (x, y) in splits.items()}
    if num_classes is None:
        num_classes = max(int(y.max()) + 1 for _, y in arrays.values() if y.size)
    metadata.setdefault("feature_dim", next(iter(arrays.values()))[0].shape[-1])
    views = {name: x.shape[1] if x.ndim == 3 else 1 for name, (x, _) in arrays.items()}
    run_id = new_run_id()
    parts_dir(path).mkdir(exist_ok=True)
    descriptions = []
    for index in range(num_parts):
        ranges = {name: distributed.row_range(len(y), index, num_parts) for name, (_, y) in arrays.items()}
        identity = part_identity(run_id, index, num_parts, {name: r[0] * views[name] for name, r in ranges.items()})
        target = part_path(path, index, num_parts)
        with FeatureWriter(target, num_classes=num_classes, overwrite=True, part=identity, **metadata) as writer:
            for name, (x, y) in arrays.items():
                start, stop = ranges[name]
                v = views[name]
                writer.create_split(name, (stop - start) * v, dtype=dtype, views=v)
                examples = np.arange(start, stop, dtype=np.int64)
                writer.append(name, x[start:stop].reshape(-1, x.shape[-1]), np.repeat(y[start:stop], v),
                              np.repeat(examples, v))
                writer.mark_complete(name)
        sizes = {name: chunk_rows for name in arrays} if chunk_rows else None
        descriptions.append(describe_part(target, identity, sizes))
    with FeatureFile(part_path(path, 0, num_parts)) as first:
        meta = first.metadata
    return write_manifest(path, meta, run_id, descriptions)


def verify_parts(path: os.PathLike | str) -> None:
    """Recomputes every part's whole-file SHA-256 and compares it with the manifest's; FeatureFileError
    naming the first part that differs. (Readers check chunk digests as they read; this is the full check.)"""
    from featdp.featurefile import FeatureFile

    with FeatureFile(path) as features:
        manifest = features._parts
        if manifest is None:
            raise _error(path, "not a sharded feature file: it has no parts to verify")
        for entry in manifest.parts:
            have = file_sha256(entry.path)
            if have != entry.sha256:
                raise _error(path, f"part {entry.path.name} has SHA-256 {have}, the manifest records {entry.sha256}: "
                                   "altered after the extraction, or from another run")


# --- reading ---------------------------------------------------------------------------------------------


def read_part_identity(path: os.PathLike | str) -> dict:
    """The `part` attribute of a feature file ({} for a whole file), after the format checks every
    reader makes; for resuming, so the splits (possibly unfinished) are not opened."""
    from featdp.featurefile import _json_attr, _open_checked

    path = pathlib.Path(path)
    h5 = _open_checked(path, "r")
    try:
        return _json_attr(path, h5.attrs, "part", dict, default="{}")
    finally:
        h5.close()


def read_run_id(path: os.PathLike | str) -> str | None:
    """The run_id of a sharded feature file's manifest, None for a whole feature file. Reads the manifest
    only, not its parts, which may be missing or unfinished while an extraction resumes them."""
    from featdp.featurefile import _open_checked

    path = pathlib.Path(path)
    h5 = _open_checked(path, "r")
    try:
        if not is_manifest(h5.attrs):
            return None
        data = json.loads(Manifest._text_of(path, h5))
    except json.JSONDecodeError as exc:
        raise _error(path, f"the manifest is not valid JSON ({exc})") from None
    finally:
        h5.close()
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        raise _error(path, "the manifest must be a JSON object with a run_id")
    return data["run_id"]


def is_manifest(attrs) -> bool:
    value = attrs.get("layout")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value == LAYOUT


@dataclasses.dataclass(frozen=True)
class PartEntry:
    path: pathlib.Path
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class PartSlice:
    """The rows of one split held by one part: global rows [first_row, first_row + num_rows)."""

    part: int
    first_row: int
    num_rows: int
    digests: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SplitLayout:
    name: str
    num_examples: int
    dtype: str
    chunk_rows: int
    slices: tuple[PartSlice, ...]
    views: int = 1  # views per example the manifest records (absent: 1); every part must hold as many


class Manifest:
    """A parsed and checked manifest, with its parts open (module docstring: what is checked at open)."""

    def __init__(self, path: pathlib.Path, h5: h5py.File, metadata):
        self.path = path
        self.metadata = metadata
        text = self._text_of(path, h5)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _error(path, f"the manifest is not valid JSON ({exc})") from None
        self.run_id, self.parts, self.splits = self._parse(data)
        self.views: dict[str, int] = {}  # views per example of each split, as its parts declare it
        self._files: list = []
        try:
            for index, entry in enumerate(self.parts):
                self._files.append(self._open_part(index, entry))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _text_of(path: pathlib.Path, h5: h5py.File) -> str:
        dataset = h5.get("manifest")
        if not isinstance(dataset, h5py.Dataset) or dataset.shape != () or dataset.dtype.kind not in "OS":
            raise _error(path, "layout='parts' but no /manifest string dataset")
        if dataset.id.get_storage_size() > MANIFEST_LIMIT:
            raise _error(path, f"/manifest is larger than {MANIFEST_LIMIT} bytes")
        value = dataset[()]
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise _error(path, "/manifest is not UTF-8 text") from None
        if not isinstance(value, str):
            raise _error(path, f"/manifest holds {type(value).__name__}, expected a JSON string")
        return value

    def _parse(self, data: Any):
        path = self.path
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
            raise _error(path, "the manifest must be a JSON object with a run_id")
        raw_parts, raw_splits = data.get("parts"), data.get("splits")
        if not isinstance(raw_parts, list) or not raw_parts or not isinstance(raw_splits, dict):
            raise _error(path, "the manifest must list its parts and splits")
        count = len(raw_parts)
        parts = []
        for index, entry in enumerate(raw_parts):
            expected = part_name(index, count)
            if not isinstance(entry, dict) or entry.get("file") != expected:
                name = entry.get("file") if isinstance(entry, dict) else entry
                raise _error(path, f"manifest part {index} is {str(name)[:80]!r}, expected {expected!r}: parts are "
                                   f"read only from {parts_dir(path).name}/ under their own names")
            size, sha = entry.get("size"), entry.get("sha256")
            if not _is_int(size) or size < 0 or not isinstance(sha, str) or not _HEX64.fullmatch(sha):
                raise _error(path, f"manifest part {expected}: size {size!r} / sha256 {str(sha)[:80]!r} invalid")
            parts.append(PartEntry(part_path(path, index, count), int(size), sha))
        splits = {}
        for name, layout in raw_splits.items():
            splits[name] = self._parse_split(name, layout, count)
        return data["run_id"], tuple(parts), splits

    def _parse_split(self, name: str, layout: Any, count: int) -> SplitLayout:
        from featdp.featurefile import _FEATURE_DTYPES

        where = f"manifest split {name!r}"
        if not name or "/" in name or not isinstance(layout, dict):
            raise _error(self.path, f"{where}: invalid")
        n, dtype, rows, slices = (layout.get(k) for k in ("num_examples", "dtype", "chunk_rows", "parts"))
        if not _is_int(n) or n < 0 or dtype not in _FEATURE_DTYPES or not _is_int(rows) or rows < 1:
            raise _error(self.path, f"{where}: num_examples {n!r}, dtype {dtype!r}, chunk_rows {rows!r} invalid")
        from featdp.featurefile import MAX_VIEWS

        views = layout.get("views", 1)
        if not _is_int(views) or not 1 <= views <= MAX_VIEWS or n % views:
            raise _error(self.path, f"{where}: views {views!r} invalid for {n!r} rows")
        if not isinstance(slices, list) or len(slices) != count:
            raise _error(self.path, f"{where} must list a row range for each of the {count} parts")
        parsed, next_row = [], 0
        for index, item in enumerate(slices):
            first, num, digests = (item.get(k) for k in ("first_row", "num_rows", "digests")) if isinstance(
                item, dict) else (None, None, None)
            if not _is_int(first) or not _is_int(num) or num < 0 or first != next_row:
                raise _error(self.path, f"{where}, part {index}: rows start at {first!r} ({num!r} rows), expected "
                                        f"to start at {next_row}: the parts must cover the split in order")
            if (not isinstance(digests, list) or len(digests) != -(-num // rows)
                    or not all(isinstance(d, str) and _HEX64.fullmatch(d) for d in digests)):
                raise _error(self.path, f"{where}, part {index}: expected {-(-num // rows)} chunk digests")
            parsed.append(PartSlice(index, first, num, tuple(digests)))
            next_row += num
        if next_row != n:
            raise _error(self.path, f"{where}: the parts hold {next_row} rows, num_examples is {n}")
        return SplitLayout(name, n, dtype, rows, tuple(parsed), views)

    def _open_part(self, index: int, entry: PartEntry):
        from featdp.featurefile import _IDENTIFYING, FeatureFile, _json_attr

        name = entry.path.name
        if not entry.path.is_file():
            raise _error(self.path, f"part {name} is missing (expected at {entry.path}); the feature file is "
                                    "incomplete: copy every part with the manifest, or re-run the extraction")
        part = FeatureFile(entry.path)
        try:
            if is_manifest(part._h5.attrs):  # parts hold rows; a manifest there would nest part folders
                raise _error(self.path, f"part {name} is itself a manifest, not a part file")
            identity = _json_attr(entry.path, part._h5.attrs, "part", dict, default="{}")
            if identity.get("run_id") != self.run_id:
                theirs = str(identity.get("run_id"))[:40]
                raise _error(self.path, f"part {name} is from another run (run_id {theirs!r}, the manifest's is "
                                        f"{self.run_id!r})")
            if identity.get("index") != index or identity.get("count") != len(self.parts):
                raise _error(self.path, f"part {name} says it is part {identity.get('index')} of "
                                        f"{identity.get('count')}")
            size = entry.path.stat().st_size
            if size != entry.size:
                raise _error(self.path, f"part {name} has {size} bytes, the manifest records {entry.size}: altered "
                                        "or truncated since the extraction")
            for field in _IDENTIFYING:
                if getattr(part.metadata, field) != getattr(self.metadata, field):
                    raise _error(self.path, f"part {name}: attribute {field!r} differs from the manifest's")
            for layout in self.splits.values():
                piece = layout.slices[index]
                split = part.split(layout.name) if layout.name in part.split_names else None
                if split is None or split.num_examples != piece.num_rows or split.dtype.name != layout.dtype or (
                        identity.get("first_rows", {}).get(layout.name) != piece.first_row):
                    held = "no such split" if split is None else f"{split.num_examples} rows of {split.dtype}"
                    raise _error(self.path, f"part {name}, split {layout.name!r}: holds {held}, the manifest "
                                            f"assigns it rows [{piece.first_row}, {piece.first_row + piece.num_rows}) "
                                            f"of {layout.dtype}")
                views = self.views.setdefault(layout.name, layout.views)
                if split.views_per_example != views:
                    raise _error(self.path, f"part {name}, split {layout.name!r}: holds "
                                            f"{split.views_per_example} views per example, the manifest records "
                                            f"{views}; every part of a split must hold that many")
                # Implied today by each part's own check (its rows are whole examples) and the contiguity
                # checked at parse; stated here so that no change to those makes a part boundary cut an example.
                if piece.first_row % views or piece.num_rows % views:
                    raise _error(self.path, f"part {name}, split {layout.name!r}: the manifest assigns it rows "
                                            f"[{piece.first_row}, {piece.first_row + piece.num_rows}), which split "
                                            f"examples of {views} views: part boundaries must be multiples of "
                                            f"{views}")
        except BaseException:
            part.close()
            raise
        return part

    def split_names(self) -> tuple[str, ...]:
        return tuple(self.splits)

    def split(self, name: str) -> PartedSplit:
        if name not in self.splits:
            raise _error(self.path, f"no split {name!r}; available splits: {sorted(self.splits) or 'none'}")
        layout = self.splits[name]
        return PartedSplit(self.path, layout, [f.split(name) for f in self._files], self.metadata.num_classes,
                           self.views.get(name, 1))

    def close(self) -> None:
        for part in self._files:
            part.close()
        self._files = []


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PartedSplit:
    """One split of a sharded feature file, read like `featurefile.Split` (blocks of validated float32
    features and int64 labels, in global row order, with `views_per_example` rows per example), each chunk
    checked against its digest on first read."""

    complete = True

    def __init__(self, path: pathlib.Path, layout: SplitLayout, parts: list, num_classes: int, views: int = 1):
        self.path, self.name, self.layout = path, layout.name, layout
        self.num_examples = self.rows_done = self.declared_examples = layout.num_examples
        self.views_per_example = int(views)
        self._parts = parts
        self.feature_dim = parts[0].feature_dim
        self.num_classes = num_classes
        self.dtype = np.dtype(layout.dtype)
        self._verified: set[tuple[int, int]] = set()
        self._starts = [piece.first_row for piece in layout.slices]

    def __repr__(self) -> str:
        views = f", views_per_example={self.views_per_example}" if self.views_per_example > 1 else ""
        return (f"PartedSplit({self.name!r}, num_examples={self.num_examples}, feature_dim={self.feature_dim}, "
                f"parts={len(self._parts)}, dtype={self.dtype}{views})")

    def nbytes_float32(self) -> int:
        return self.num_examples * self.feature_dim * 4

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[PartSlice, int, int]]:
        """(part slice, local start, local stop) of every part holding rows of [start, stop)."""
        for piece in self.layout.slices:
            lo, hi = max(start, piece.first_row), min(stop, piece.first_row + piece.num_rows)
            if lo < hi:
                yield piece, lo - piece.first_row, hi - piece.first_row

    def _stored(self, piece: PartSlice, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [lo, hi) of a part as stored, every chunk they touch checked against its digest."""
        from featdp.featurefile import _CHECKED_READ_BYTES, check_allocation

        size = self.layout.chunk_rows
        first, last = lo // size, -(-hi // size)
        split = self._parts[piece.part]
        if all((piece.part, c) in self._verified for c in range(first, last)):
            return split.read_stored(lo, hi)
        a, b = first * size, min(last * size, piece.num_rows)
        # Whole chunks are read to check their digests; chunk_rows comes from the (untrusted) manifest.
        nbytes = (b - a) * (self.feature_dim * (4 + self.dtype.itemsize) + 24)
        if nbytes >= _CHECKED_READ_BYTES:
            check_allocation(nbytes, f"{self.path}: checking rows [{a}, {b}) of part {split.path.name}, split "
                                     f"{self.name!r} (chunk_rows {size} in the manifest)")
        features, labels, index = split.read_stored(a, b)
        for chunk in range(first, last):
            if (piece.part, chunk) in self._verified:
                continue
            s, e = chunk * size - a, min((chunk + 1) * size, piece.num_rows) - a
            digest = chunk_digest(self.name, piece.first_row + a + s, features[s:e], labels[s:e], index[s:e])
            if digest != piece.digests[chunk]:
                part_file = self._parts[piece.part].path.name
                raise _error(self.path, f"part {part_file}, split {self.name!r}, rows [{a + s}, {a + e}) of the part: "
                                        "the content differs from the manifest's SHA-256 (altered after the "
                                        "extraction, or from another run); re-extract it: delete the part and "
                                        "re-run the same extraction")
            self._verified.add((piece.part, chunk))
        return features[lo - a : hi - a], labels[lo - a : hi - a], index[lo - a : hi - a]

    def _gather(self, start: int, stop: int, with_index: bool):
        features = np.empty((stop - start, self.feature_dim), np.float32)
        labels = np.empty(stop - start, np.int64)
        index = np.empty(stop - start, np.int64) if with_index else None
        for piece, lo, hi in self._pieces(start, stop):
            out = slice(piece.first_row + lo - start, piece.first_row + hi - start)
            f, y, i = self._stored(piece, lo, hi)
            features[out], labels[out] = f, y
            if with_index:
                index[out] = i
        return features, labels, index

    def _read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        from featdp.featurefile import (_CHECKED_READ_BYTES, _check_groups, _first_label_outside,
                                        _first_nonfinite_row, check_allocation)

        nbytes = (stop - start) * (self.feature_dim * (4 + self.dtype.itemsize) + 24)
        if nbytes >= _CHECKED_READ_BYTES:
            check_allocation(nbytes, f"{self.path}: reading rows [{start}, {stop}) of split {self.name!r}")
        features, labels, _ = self._gather(start, stop, with_index=False)
        bad = _first_nonfinite_row(features)
        if bad is not None:
            raise _error(self.path, f"split {self.name!r}, row {start + bad}: feature vector is not finite")
        bad = _first_label_outside(labels, self.num_classes)
        if bad is not None:
            raise _error(self.path, f"split {self.name!r}, row {start + bad}: label {labels[bad]} outside "
                                    f"[0, {self.num_classes})")
        if self.views_per_example > 1:
            # A read from inside an example compares its first row with the row before it, as Split does.
            before = self._gather(start - 1, start, with_index=False)[1] if start % self.views_per_example else None
            _check_groups(self.path, self.name, "label", labels, start, self.views_per_example, before)
        return features, labels

    def blocks(self, block_rows: int = 32768) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if block_rows < 1:
            raise ValueError(f"block_rows={block_rows} must be >= 1")
        for start in range(0, self.num_examples, block_rows):
            yield self._read_rows(start, min(start + block_rows, self.num_examples))

    def read(self, block_rows: int = 32768) -> tuple[np.ndarray, np.ndarray]:
        from featdp.featurefile import _CHECKED_READ_BYTES, check_allocation

        n, d = self.num_examples, self.feature_dim
        if n * (4 * d + 8) >= _CHECKED_READ_BYTES:
            check_allocation(n * (4 * d + 8), f"{self.path}: reading split {self.name!r} ({n} x {d} features)")
        features = np.empty((n, d), np.float32)
        labels = np.empty(n, np.int64)
        for start, (x, y) in zip(range(0, n, block_rows), self.blocks(block_rows)):
            features[start : start + len(y)], labels[start : start + len(y)] = x, y
        return features, labels

    def read_index(self) -> np.ndarray:
        from featdp.featurefile import _check_groups

        index = self._gather(0, self.num_examples, with_index=True)[2]
        _check_groups(self.path, self.name, "index", index, 0, self.views_per_example)
        return index

    def rows(self, start: int, stop: int):
        from featdp.featurefile import RowRange

        return RowRange(self, start, stop)


__all__ = ["LAYOUT", "Manifest", "PartedSplit", "chunk_digest", "default_chunk_rows", "describe_part",
           "is_manifest", "new_run_id", "part_identity", "part_name", "part_path", "parts_dir", "verify_parts",
           "write_manifest", "write_parts"]

