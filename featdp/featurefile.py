"""The HDF5 feature file: the only thing passed from extraction (stage one) to fitting (stage two).

Layout, format version 1, or 2 for a file with a split of several views (this docstring is the format's
specification)::

    /                  attrs: format, format_version, featdp_version, backbone, checkpoint,
                              checkpoint_sha256, dataset, image_size, preprocessing (JSON),
                              feature_dim, num_classes, class_names (JSON), created_utc,
                              source_fingerprint (JSON; absent in files written before it existed)
    /<split>/features  (N, D) float16 or float32, chunked by rows, uncompressed
    /<split>/labels    (N,) int32
    /<split>/index     (N,) int64, position of the example in the source dataset
    /<split>           attrs: num_examples, rows_done, complete, views (int64 >= 1; absent: 1)

Views: a split may hold V augmented views of each example (`featdp extract --views V`). Its rows are then
example-major: rows [i·V, (i+1)·V) are the V views of its i-th example, with equal labels and index; view 0
is the unaugmented image, exactly the row a one-view extraction writes. num_examples and rows_done count
rows (N = n·V) and are multiples of V. A split without the attribute holds one view per example, so every
file written before views existed reads as it always did. Whoever fits on such a split must treat the V
rows of an example as one record of the neighbouring relation.

A combined file (`featdp combine`, `featdp.combine`) is an ordinary feature file: its rows join those of
several files of the same examples, its `backbone`, `checkpoint` and `checkpoint_sha256` are theirs joined
by '+', and its `preprocessing` is {"combined": [one entry per source: file, weight, feature_dim, backbone,
checkpoint, checkpoint_sha256, image_size, preprocessing, created_utc, featdp_version], "rows": ...}.

The part files of a sharded feature file (written by `featdp extract` with several processes) also carry
the root attribute `part` (JSON: run_id, index, count, first_rows); the manifest that lists them is
specified in `featdp.featurefile_parts`, and `FeatureFile` reads either kind.

This module is the only code that knows the layout; everything else goes through `FeatureWriter`,
`write_features` and `FeatureFile`.

A feature file may come from anyone, so opening one trusts nothing in it:

* Every object featdp reads must be stored in the file itself. HDF5 can make a dataset read other files
  (external storage, external links, virtual datasets) or alias another path (soft links); such a file is
  refused when it is opened, before anything is read through it. The one way a feature file spans several
  files is featdp's own sharded layout, whose manifest names parts only inside its own parts folder and
  whose parts are each checked like a feature file, against the manifest's sizes and checksums
  (`featdp.featurefile_parts`).
* Attributes are checked for type and against the datasets' shapes, and every row a split vouches for must
  be on disk: HDF5 answers unwritten storage with its fill value, so a few kilobytes could otherwise declare
  terabytes of features. `check_allocation` stops large reads (and lets the fit check its own matrices)
  with a message naming the size and the memory available, instead of an out-of-memory kill.
* A writer holds featdp's own lock, `<file>.lock` (`FeatureFileLock`), for as long as it is open, so a
  second writer, or a reader, learns that the file is in use whether or not HDF5's own file locking works
  on the filesystem (HDF5_USE_FILE_LOCKING=FALSE, common on NFS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import math
import os
import pathlib
import socket
import threading
import uuid
import warnings
from typing import Any, Iterator

import h5py
import numpy as np

from featdp.checksums import file_sha256  # noqa: F401 (re-exported: part of this module's API)
from featdp.data import DataError

import featdp

FORMAT = "featdp-features"
FORMAT_VERSION = 1
# A file holding a split of several views per example says so in its version, so that a featdp that
# predates views refuses it instead of counting each view as an example (which would break its accounting).
VIEWS_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, VIEWS_FORMAT_VERSION)

_FEATURE_DTYPES = ("float16", "float32")
# ~1 MiB chunks: large enough that HDF5's per-chunk overhead is negligible, small enough that a
# resumed extraction rewrites little and a block read touches few chunks it does not need.
_CHUNK_BYTES = 1 << 20
# write_features converts to the stored dtype this many rows at a time, bounding the extra copy.
_WRITE_BLOCK_ROWS = 65536
# Reads at least this large are checked against the memory available first.
_CHECKED_READ_BYTES = 1 << 28
# The most views per example a split may declare: far beyond any augmentation multiplicity in use (De et
# al. 2022 use 16), low enough that a forged attribute cannot make a reader group rows by the billion.
MAX_VIEWS = 1024


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable, inconsistent, or would be made so by a write."""


class FileInUseError(FeatureFileError):
    """Another process holds the feature file: featdp's lock (it is writing the file), or HDF5's."""


class AllocationError(FeatureFileError, DataError):
    """An allocation larger than the memory available; raised by `check_allocation` before allocating."""


def _error(path: os.PathLike | str, message: str) -> FeatureFileError:
    return FeatureFileError(f"{path}: {message}")


# --- memory -----------------------------------------------------------------------------------------


def format_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, or v1 memory.limit_in_bytes), if any."""
    candidates = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                hierarchy, _, rest = line.strip().partition(":")
                controllers, _, group = rest.partition(":")
                if hierarchy == "0" and controllers == "":
                    candidates.append(f"/sys/fs/cgroup{group.rstrip('/')}/memory.max")
                elif "memory" in controllers.split(","):
                    candidates.append(f"/sys/fs/cgroup/memory{group.rstrip('/')}/memory.limit_in_bytes")
    except OSError:
        pass
    # Inside a container the process's group is usually the namespace root.
    candidates += ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    for candidate in candidates:
        try:
            text = pathlib.Path(candidate).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's huge "no limit" value, are no limit
            return int(text)
        return None
    return None


def available_memory() -> int | None:
    """Bytes of memory this process can expect to allocate: the kernel's MemAvailable (free memory plus
    reclaimable caches), capped by the cgroup's limit; total physical memory where MemAvailable is
    unknown; None where nothing is known."""
    known = [v for v in (_meminfo_available(), _cgroup_limit()) if v is not None]
    if not known:
        try:
            known = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            return None
    return min(known)


def check_allocation(bytes_needed: int, what: str, *, available: int | None = None) -> None:
    """Raises AllocationError, naming `what`, its size and the memory available, when `bytes_needed`
    exceeds the memory available (`available`, default `available_memory()`); returns otherwise.

    Call it before allocating anything whose size comes from a file or an argument (a d×d Gram matrix, a
    d×K head, a batch of images), so that an absurd size stops with a message rather than an
    out-of-memory kill or minutes of swapping."""
    bytes_needed = int(bytes_needed)
    if bytes_needed < 0:
        raise ValueError(f"bytes_needed={bytes_needed} must be >= 0")
    if available is None:
        available = available_memory()
        if available is None:  # nothing known about this machine: nothing to check against
            return
    if bytes_needed > available:
        raise AllocationError(
            f"{what} needs {format_bytes(bytes_needed)} ({bytes_needed} bytes) of memory, but only "
            f"{format_bytes(available)} is available"
        )


# --- featdp's own lock -------------------------------------------------------------------------------

_HELD_LOCKS: set[str] = set()  # lock files this process holds (readers here need not wait for them)
_HELD_GUARD = threading.Lock()


def lock_path(path: os.PathLike | str) -> pathlib.Path:
    """The lock file of a feature file: `<file>.lock`, next to it."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".lock")


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if len(text) >= 2 and text[0].isdigit():
        return f" (pid {text[0]} on host {text[1]})"
    return ""


def _in_use(path, holder: str) -> FileInUseError:
    return FileInUseError(
        f"{path}: in use by another featdp process{holder} that is writing it; wait for it to finish or "
        f"stop it (its lock file is {lock_path(path)})"
    )


class FeatureFileLock:
    """featdp's exclusive lock on a feature file, held by whoever writes it; a context manager.

    `fcntl.flock` on `<file>.lock`, non-blocking: a second writer gets FileInUseError at once, naming the
    holder's pid and host. It does not depend on HDF5's own file locking, which NFS setups often turn off
    (HDF5_USE_FILE_LOCKING=FALSE) and without which two writers corrupt the file. The kernel drops the
    lock when its holder dies, however it dies; a clean release also removes the lock file. On a
    filesystem without any locking the lock is skipped with a warning.
    """

    def __init__(self, path: os.PathLike | str):
        self.path = pathlib.Path(path)
        self.lock_path = lock_path(self.path)
        self._fd: int | None = None
        self._key = os.path.abspath(self.lock_path)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FeatureFileLock:
        if self._fd is not None:
            return self
        for _ in range(20):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise _error(self.path, f"cannot create its lock file {self.lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise _in_use(self.path, holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    warnings.warn(
                        f"{self.lock_path}: the filesystem does not support file locks ({exc.strerror}); "
                        "nothing stops another process from writing the same feature file",
                        stacklevel=3,
                    )
                    return self
                raise _error(self.path, f"cannot lock {self.lock_path}: {exc.strerror}") from None
            # The previous holder removes the file just before releasing it: a lock taken on a file no
            # longer at that name excludes no one, so take the one now there.
            try:
                current = os.stat(self.lock_path)
                mine = os.fstat(fd)
                same = (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
                self._fd = fd
                with _HELD_GUARD:
                    _HELD_LOCKS.add(self._key)
                return self
            os.close(fd)
        raise _error(self.path, f"cannot lock {self.lock_path}: it keeps being replaced")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _HELD_GUARD:
            _HELD_LOCKS.discard(self._key)
        try:  # removed while still held, so that no one can take a lock on a name about to disappear
            current, mine = os.stat(self.lock_path), os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.lock_path)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> FeatureFileLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _check_not_being_written(path: pathlib.Path) -> None:
    """FileInUseError when another process holds the file's featdp lock (a reader takes no lock itself:
    it may lack write access to the folder)."""
    lock = lock_path(path)
    with _HELD_GUARD:
        if os.path.abspath(lock) in _HELD_LOCKS:
            return
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise _in_use(path, holder) from None
    except OSError:
        pass
    os.close(fd)  # closing drops the shared lock


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
    # What the source held when the file was created (`ImageDataset.fingerprint()`); {} when unknown.
    source_fingerprint: dict = dataclasses.field(default_factory=dict)
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
    "source_fingerprint",
)
# source_fingerprint is optional: files written before it existed lack it (and read as {}).
_ROOT_ATTRS = ("format", "format_version") + _IDENTIFYING[:-1] + ("featdp_version", "created_utc")


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
        "source_fingerprint": json.dumps(meta.source_fingerprint, sort_keys=True),
        "created_utc": meta.created_utc,
    }


# --- reading attributes: a file's attributes may hold any type, or shape, of value ---------------------


def _show(value: Any) -> str:
    """A value read from a file, shortened, with its type: 7 (int64), '224' (str), [4, 4] (int64 array...)."""
    if isinstance(value, np.generic):
        text, kind = repr(value.item()), value.dtype.name
    elif isinstance(value, np.ndarray):
        head = value.ravel()[:8].tolist()
        text = repr(head)[:-1] + (", ...]" if value.size > 8 else "]")
        kind = f"{value.dtype} array of shape {value.shape}"
    else:
        text, kind = repr(value), type(value).__name__
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({kind})"


def _attr(path, attrs: h5py.AttributeManager, name: str, where: str, default: Any = KeyError) -> Any:
    """The attribute's value (a 0-d array as its scalar); `default` if absent, an error if no default."""
    if name not in attrs:
        if default is KeyError:
            raise _error(path, f"{where} attribute {name!r} is missing")
        return default
    try:
        value = attrs[name]
    except (OSError, TypeError, ValueError, RuntimeError) as exc:  # a datatype h5py cannot read
        raise _error(path, f"{where} attribute {name!r} cannot be read: {exc}") from None
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    return value


def _int_attr(path, attrs, name: str, where: str = "root") -> int:
    value = _attr(path, attrs, name, where)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _error(path, f"{where} attribute {name!r} must be an integer, got {_show(value)}")
    return int(value)


def _bool_attr(path, attrs, name: str, where: str) -> bool:
    value = _attr(path, attrs, name, where)
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise _error(path, f"{where} attribute {name!r} must be a boolean, got {_show(value)}")


def _str_attr(path, attrs, name: str, where: str = "root", default: Any = KeyError) -> str:
    value = _attr(path, attrs, name, where, default)
    if isinstance(value, bytes):  # fixed-length strings written by other tools come back as bytes
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _error(path, f"{where} attribute {name!r} is not UTF-8 text: {_show(value)}") from None
    if not isinstance(value, str):
        raise _error(path, f"{where} attribute {name!r} must be a string, got {_show(value)}")
    return value


def _json_attr(path, attrs, name: str, kind: type, default: Any = KeyError) -> Any:
    text = _str_attr(path, attrs, name, default=default)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(path, f"root attribute {name!r} is not valid JSON ({exc}): {_show(text)}") from None
    if not isinstance(value, kind):
        expected = {dict: "object", list: "list"}.get(kind, kind.__name__)
        raise _error(path, f"root attribute {name!r} must be a JSON {expected}, got {_show(text)}")
    return value


def _check_format(path, attrs: h5py.AttributeManager) -> None:
    fmt = _attr(path, attrs, "format", "root", None)
    if isinstance(fmt, bytes):  # fixed-length strings written by other tools come back as bytes
        fmt = fmt.decode("utf-8", "replace")
    if not isinstance(fmt, str) or fmt != FORMAT:
        shown = fmt if isinstance(fmt, str) or fmt is None else _show(fmt)
        raise _error(path, f"not a featdp feature file: root attribute format={shown!r}, expected {FORMAT!r}")
    version = _attr(path, attrs, "format_version", "root", None)
    version = version.item() if isinstance(version, np.generic) else version
    if isinstance(version, (bool, float)) or not isinstance(version, int) or version not in READABLE_FORMAT_VERSIONS:
        version = version if isinstance(version, (int, float, str, type(None))) else _show(version)
        raise _error(
            path,
            f"unsupported format_version {version!r}; this featdp ({featdp.__version__}) reads "
            f"format_version {' and '.join(map(str, READABLE_FORMAT_VERSIONS))}",
        )


def _from_attrs(path, attrs: h5py.AttributeManager) -> FileMetadata:
    missing = [name for name in _ROOT_ATTRS if name not in attrs]
    if missing:
        raise _error(path, f"root attributes missing: {', '.join(missing)}")
    class_names = _json_attr(path, attrs, "class_names", list)
    if not all(isinstance(c, str) for c in class_names):
        bad = next(c for c in class_names if not isinstance(c, str))
        raise _error(path, f"root attribute 'class_names' must be a JSON list of strings, holds {_show(bad)}")
    meta = FileMetadata(
        feature_dim=_int_attr(path, attrs, "feature_dim"),
        num_classes=_int_attr(path, attrs, "num_classes"),
        class_names=tuple(class_names),
        backbone=_str_attr(path, attrs, "backbone"),
        checkpoint=_str_attr(path, attrs, "checkpoint"),
        checkpoint_sha256=_str_attr(path, attrs, "checkpoint_sha256"),
        dataset=_str_attr(path, attrs, "dataset"),
        image_size=_int_attr(path, attrs, "image_size"),
        preprocessing=_json_attr(path, attrs, "preprocessing", dict),
        source_fingerprint=_json_attr(path, attrs, "source_fingerprint", dict, default="{}"),
        created_utc=_str_attr(path, attrs, "created_utc"),
        featdp_version=_str_attr(path, attrs, "featdp_version"),
        format_version=_int_attr(path, attrs, "format_version"),
    )
    if meta.feature_dim < 1 or meta.num_classes < 1:
        raise _error(path, f"feature_dim={meta.feature_dim} and num_classes={meta.num_classes} must be >= 1")
    if len(meta.class_names) != meta.num_classes:
        raise _error(
            path,
            f"num_classes={meta.num_classes} but class_names lists {len(meta.class_names)} names; the two must "
            "agree",
        )
    return meta


# --- where the data is stored: only inside the file itself ----------------------------------------------

_OUTSIDE = (
    "featdp reads only data stored inside the feature file itself (no external storage, external or soft "
    "links, or virtual datasets: they would make it read other files)"
)


def _link_problem(group: h5py.Group, name: str) -> str | None:
    """Why the link `name` in `group` is not a plain (hard) link, or None. Reads the link, never follows it."""
    try:
        link = group.get(name, getlink=True)
    except (OSError, TypeError, KeyError, ValueError) as exc:  # user-defined link types, among others
        return f"is a link featdp cannot inspect ({exc})"
    if isinstance(link, h5py.HardLink):
        return None
    if isinstance(link, h5py.ExternalLink):
        return f"is an external link to {link.path!r} in file {link.filename!r}"
    if isinstance(link, h5py.SoftLink):
        return f"is a soft link to {link.path!r}"
    return f"is a link of unknown type {type(link).__name__}"


def _storage_problem(dataset: h5py.Dataset) -> str | None:
    """Why the dataset's values are not stored in its own file, or None."""
    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        sources = sorted({
            f"{plist.get_virtual_filename(i)}:{plist.get_virtual_dsetname(i)}"
            for i in range(plist.get_virtual_count())
        })
        shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        return f"is a virtual dataset mapping {shown or 'no source'}"
    count = plist.get_external_count()
    if count:
        files = sorted({os.fsdecode(plist.get_external(i)[0]) for i in range(count)})
        shown = ", ".join(repr(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return f"has external storage in {shown}"
    return None


def _check_storage(path, h5: h5py.File) -> None:
    """Refuses a file in which anything featdp reads (the splits, and every object in them) is not stored
    in the file itself. Only link metadata and dataset creation properties are read: nothing is followed."""
    for name in h5:
        problem = _link_problem(h5, name)
        if problem is None:
            obj = h5[name]
            if isinstance(obj, h5py.Dataset):
                problem = _storage_problem(obj)
            elif isinstance(obj, h5py.Group):
                for child in obj:
                    where = f"/{name}/{child}"
                    child_problem = _link_problem(obj, child)
                    if child_problem is None:
                        member = obj[child]
                        child_problem = _storage_problem(member) if isinstance(member, h5py.Dataset) else None
                    if child_problem is not None:
                        raise _error(path, f"{where} {child_problem}; {_OUTSIDE}")
        if problem is not None:
            raise _error(path, f"/{name} {problem}; {_OUTSIDE}")


def _check_written(path, where: str, name: str, dataset: h5py.Dataset, rows: int) -> None:
    """The first `rows` rows of an unfiltered dataset must be on disk. HDF5 allocates storage only when
    it is written and answers reads of the rest with the fill value, so a file of a few kilobytes can
    declare rows and columns by the billion; a split vouches for its rows_done rows, so they must exist.
    (Compressed datasets, written by other tools, store fewer bytes than they hold: not checked here.)"""
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters():
        return
    row_bytes = dataset.dtype.itemsize * math.prod(dataset.shape[1:])
    needed = rows * row_bytes
    stored = dataset.id.get_storage_size()
    if stored < needed:
        raise _error(
            path,
            f"{where}: {name} declares shape {dataset.shape} {dataset.dtype}, and {rows} rows of it "
            f"({format_bytes(needed)}) are marked written, but the file stores only {format_bytes(stored)} "
            f"for it (truncated, or not written by featdp)",
        )


def _views_attr(path, attrs, where: str) -> int:
    """The split's `views` attribute: views per example, 1 when absent (files written before views)."""
    value = _attr(path, attrs, "views", where, 1)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not (
            1 <= value <= MAX_VIEWS):
        raise _error(path, f"{where} attribute 'views' must be an integer in [1, {MAX_VIEWS}], got {_show(value)}")
    return int(value)


def _check_views_version(path, group: h5py.Group, where: str, views: int) -> None:
    """A split of several views must sit in a file whose format_version says views may occur, and every
    split of such a file must say how many views it holds: one that lost the attribute would otherwise read
    as one view per example, each view counted as an example."""
    version = group.file.attrs.get("format_version")
    if version == VIEWS_FORMAT_VERSION and "views" not in group.attrs:
        raise _error(path, f"{where} of a format_version {VIEWS_FORMAT_VERSION} file lacks its 'views' attribute "
                           "(every split of such a file states it; a file written before that rule must be "
                           "extracted again)")
    if views > 1 and version != VIEWS_FORMAT_VERSION:
        raise _error(path, f"{where} declares views={views}, but the file's format_version {_show(version)} has "
                           f"one view per example (format_version {VIEWS_FORMAT_VERSION} files may hold views)")


def _check_views(path, where: str, views: Any) -> int:
    """`views` as given to the writer: an integer in [1, MAX_VIEWS]."""
    if isinstance(views, (bool, np.bool_)) or not isinstance(views, (int, np.integer)) or not 1 <= views <= MAX_VIEWS:
        raise _error(path, f"{where}: views={views!r} must be an integer in [1, {MAX_VIEWS}]")
    return int(views)


def _first_split_group(values: np.ndarray, first_row: int, views: int) -> int | None:
    """The offset in `values` (the labels, or index, of rows first_row, first_row + 1, ...) of the first row
    whose value differs from the row before it although both are views of one example; None if none.
    Only pairs held in `values` are compared: a caller reading from the middle of an example passes the row
    before its first (and first_row one lower) to cover the pair across the boundary."""
    if views == 1 or values.size < 2:
        return None
    differs = values[1:] != values[:-1]
    if not differs.any():  # fast path: the usual outcome, no row numbers needed
        return None
    same_example = (first_row + 1 + np.arange(values.size - 1)) % views != 0
    bad = np.flatnonzero(differs & same_example)
    return None if bad.size == 0 else int(bad[0]) + 1


def _check_groups(path, split: str, what: str, values: np.ndarray, first_row: int, views: int,
                  before: np.ndarray | None = None) -> None:
    """FeatureFileError naming the row when two views of one example among rows first_row, first_row + 1,
    ... hold different `values` (labels or index); `before`: the value of row first_row - 1, if read."""
    if before is not None and len(before):
        values, first_row = np.concatenate([before, values]), first_row - 1
    bad = _first_split_group(values, first_row, views)
    if bad is not None:
        raise _split_group_error(path, split, what, values, first_row, bad, views)


def _split_group_error(path, split: str, what: str, values: np.ndarray, first_row: int, offset: int,
                       views: int) -> FeatureFileError:
    row = first_row + offset
    return _error(
        path,
        f"split {split!r}, row {row}: {what} {values[offset]} differs from {what} {values[offset - 1]} of row "
        f"{row - 1}, another view of the same example (example {row // views}, {views} views per example: its "
        f"rows must share one {what})",
    )


def _split_state(path, group: h5py.Group, name: str, feature_dim: int) -> tuple[int, int, bool, int]:
    """Checks a split group's datasets and attributes against each other; returns (num_examples,
    rows_done, complete, views)."""
    where = f"split {name!r}"
    missing = [k for k in ("features", "labels", "index") if not isinstance(group.get(k), h5py.Dataset)]
    missing += [k for k in ("num_examples", "rows_done", "complete") if k not in group.attrs]
    if missing:
        raise _error(path, f"{where} lacks {', '.join(missing)}")
    features, labels, index = group["features"], group["labels"], group["index"]
    n = _int_attr(path, group.attrs, "num_examples", where)
    done = _int_attr(path, group.attrs, "rows_done", where)
    complete = _bool_attr(path, group.attrs, "complete", where)
    d = feature_dim
    if features.ndim != 2 or features.shape[1] != d:
        raise _error(path, f"{where}: features have shape {features.shape}, but the file's feature_dim is {d}")
    if features.dtype.name not in _FEATURE_DTYPES or labels.dtype.kind not in "iu" or index.dtype.kind not in "iu":
        raise _error(
            path, f"{where}: features {features.dtype} / labels {labels.dtype} / index {index.dtype} unsupported"
        )
    if labels.shape != (features.shape[0],) or index.shape != (features.shape[0],):
        raise _error(
            path, f"{where}: labels {labels.shape} and index {index.shape} do not match features {features.shape}"
        )
    if n != features.shape[0] or not 0 <= done <= n:
        raise _error(path, f"{where}: num_examples={n}, rows_done={done}, features {features.shape}")
    if complete and done != n:
        raise _error(path, f"{where}: marked complete with rows_done={done} of {n}")
    views = _views_attr(path, group.attrs, where)
    _check_views_version(path, group, where, views)
    if n % views or done % views:
        raise _error(
            path,
            f"{where}: num_examples={n} and rows_done={done} must be multiples of views={views} (rows come in "
            "whole examples of views rows each)",
        )
    for dataset_name, dataset in (("features", features), ("labels", labels), ("index", index)):
        _check_written(path, where, dataset_name, dataset, done)
    return n, done, complete, views


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 20 else text[:16] + "…"


_ABSENT = object()


def _fingerprint_change(dataset: str, have: dict, want: dict) -> str:
    """Says what differs between the source fingerprint a file records and the current one."""
    if not have:
        return (
            f"the file records no fingerprint of its source (it was written before featdp recorded one), so "
            f"featdp cannot tell whether {dataset or 'the source'} still holds the examples its rows came from"
        )
    old, new = _flatten(have), _flatten(want)
    changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key, _ABSENT) != new.get(key, _ABSENT)]
    shown = "; ".join(
        f"{key}: {_short(old.get(key, _ABSENT))} in the file, {_short(new.get(key, _ABSENT))} now"
        for key in changed[:4]
    )
    more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
    source = f"the source {dataset}" if dataset else "the source"
    return (
        f"{source} changed since the file was created ({shown}{more}); resuming would mix rows of the old "
        "and the new examples"
    )


def _open_h5(path: pathlib.Path, mode: str) -> h5py.File:
    if mode != "w" and not path.exists():
        raise _error(path, "no such file")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in str(exc):
            raise FileInUseError(
                f"{path}: in use by another process, which holds HDF5's lock on it (a running extraction, or "
                f"a program that has it open for writing); try again once it has finished ({exc})"
            ) from None
        raise _error(path, f"not a readable HDF5 feature file (truncated or corrupt?): {exc}") from None


def _open_checked(path: pathlib.Path, mode: str) -> h5py.File:
    """Opens an existing feature file and checks its format and storage before anything else reads it."""
    h5 = _open_h5(path, mode)
    try:
        _check_format(path, h5.attrs)
        _check_storage(path, h5)
    except BaseException:
        h5.close()
        raise
    return h5


def _group_names(h5: h5py.File) -> list[str]:
    """The root's hard-linked groups (the splits); links are not followed."""
    return [k for k in h5 if isinstance(h5.get(k, getlink=True), h5py.HardLink) and isinstance(h5[k], h5py.Group)]


def _split_group(path, h5: h5py.File, name: str) -> h5py.Group:
    obj = h5.get(name) if name in _group_names(h5) else None
    if not isinstance(obj, h5py.Group):
        available = sorted(_group_names(h5))
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


def _refuse_manifest(path, h5: h5py.File) -> None:
    from featdp import featurefile_parts

    if featurefile_parts.is_manifest(h5.attrs):
        raise _error(
            path,
            f"is a sharded feature file (a manifest of parts in {featurefile_parts.parts_dir(path).name}/, written by "
            "several processes): resume it with the same --num-processes, or pass overwrite=True (featdp extract "
            "--overwrite) to replace it",
        )


def _part_change(have: dict, want: dict) -> str:
    """What differs between the part a file is and the part a run writes (module docstring: `part`)."""
    if not have or not want:
        kinds = ["a whole feature file" if not p else "a part of a sharded feature file" for p in (have, want)]
        return f"the file is {kinds[0]}, this run writes {kinds[1]}"
    old, new = _flatten(have), _flatten(want)
    changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key, _ABSENT) != new.get(key, _ABSENT)]
    return "its part attribute differs from this run's in " + ", ".join(
        f"{key} ({_short(old.get(key, _ABSENT))} in the file, {_short(new.get(key, _ABSENT))} now)" for key in changed)


class FeatureWriter:
    """Creates, or resumes, a feature file; a context manager.

    An existing file is reopened for resuming when its identifying metadata (everything except
    created_utc and featdp_version) equals the arguments; otherwise FeatureFileError, unless
    overwrite=True, which starts a fresh file. The identifying metadata includes `source_fingerprint`
    (what the source held when the file was created), so rows of a changed source are never appended to
    rows of the old one.

    The writer holds the file's `FeatureFileLock` from before it opens the file until `close()`;
    FileInUseError if another process holds it. Pass `lock` (held, for the same path) to use a lock the
    caller took earlier and will release itself.

    `part` makes the file a part of a sharded feature file (`featdp.featurefile_parts.part_identity`); it
    is identifying: a part is resumed only by the run that created it.
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
        source_fingerprint: dict | None = None,
        overwrite: bool = False,
        lock: FeatureFileLock | None = None,
        part: dict | None = None,
    ):
        self.path = pathlib.Path(path)
        self._h5 = None
        if lock is not None and (not lock.held or os.path.abspath(lock.path) != os.path.abspath(self.path)):
            raise ValueError(f"lock must be held, and for {self.path}; got one for {lock.path} (held: {lock.held})")
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
        source_fingerprint = json.loads(_canonical_json(self.path, "source_fingerprint", source_fingerprint or {}))
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
            source_fingerprint=source_fingerprint,
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            featdp_version=featdp.__version__,
        )
        self._lock = lock if lock is not None else FeatureFileLock(self.path).acquire()
        self._owns_lock = lock is None
        try:
            if self.path.exists() and not overwrite:
                self._h5 = _open_checked(self.path, "r+")
                _refuse_manifest(self.path, self._h5)
                self.metadata = _from_attrs(self.path, self._h5.attrs)
                have_part = _json_attr(self.path, self._h5.attrs, "part", dict, default="{}")
                want_part = json.loads(_canonical_json(self.path, "part", part or {}))
                if have_part != want_part:
                    raise _error(
                        self.path,
                        f"cannot resume: {_part_change(have_part, want_part)}; pass overwrite=True (featdp extract "
                        "--overwrite) to start a fresh file",
                    )
                for name in _IDENTIFYING:
                    have, want = getattr(self.metadata, name), getattr(wanted, name)
                    if have == want:
                        continue
                    if name == "source_fingerprint":
                        reason = _fingerprint_change(wanted.dataset, have, want)
                    else:
                        reason = f"attribute {name!r} differs (file has {have!r}, arguments give {want!r})"
                    raise _error(
                        self.path,
                        f"cannot resume: {reason}; pass overwrite=True (featdp extract --overwrite) to start a "
                        "fresh file",
                    )
            else:
                self._h5 = _open_h5(self.path, "w")
                self._h5.attrs.update(_to_attrs(wanted))
                if part:
                    self._h5.attrs["part"] = _canonical_json(self.path, "part", part)
                self._h5.flush()
                self.metadata = wanted
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._h5 is not None:
                self._h5.close()
        finally:
            if self._owns_lock:
                self._lock.release()

    def _group(self, split: str) -> h5py.Group:
        return _split_group(self.path, self._h5, split)

    def rows_done(self, split: str) -> int:
        """Rows of `split` durably written so far."""
        return _int_attr(self.path, self._group(split).attrs, "rows_done", f"split {split!r}")

    def create_split(
        self, name: str, num_examples: int, dtype: str = "float16", chunk_rows: int | None = None, views: int = 1
    ) -> int:
        """Creates `name` for `num_examples` rows, or keeps a matching existing one; returns its rows_done.

        `views` > 1 makes it a split of `views` rows per example (module docstring, "Views"): num_examples
        still counts rows and must be a multiple of it. An existing split with another shape, dtype or
        number of views is refused."""
        dtype = np.dtype(dtype).name
        if dtype not in _FEATURE_DTYPES:
            raise _error(self.path, f"split {name!r}: feature dtype {dtype!r} not in {_FEATURE_DTYPES}")
        if not name or "/" in name or name == ".":
            raise _error(self.path, f"invalid split name {name!r}")
        n, d = int(num_examples), self.metadata.feature_dim
        if n < 0:
            raise _error(self.path, f"split {name!r}: num_examples={n} must be >= 0")
        views = _check_views(self.path, f"split {name!r}", views)
        if n % views:
            raise _error(
                self.path,
                f"split {name!r}: num_examples={n} rows is not a whole number of examples of views={views} rows",
            )
        if name in self._h5:
            group = self._group(name)
            have = group.get("features")
            if isinstance(have, h5py.Dataset) and (have.shape != (n, d) or have.dtype != np.dtype(dtype)):
                raise _error(
                    self.path,
                    f"split {name!r} exists with features {have.shape} {have.dtype}, requested "
                    f"{(n, d)} {dtype}; reopen with overwrite=True to start a fresh file",
                )
            _, done, _, have_views = _split_state(self.path, group, name, d)
            if have_views != views:
                raise _error(
                    self.path,
                    f"split {name!r} exists with views={have_views} per example, requested views={views}; reopen "
                    "with overwrite=True to start a fresh file",
                )
            return done

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
        if views > 1 and self._h5.attrs.get("format_version") != VIEWS_FORMAT_VERSION:
            # The file may now hold views: every split states its number (one-view files stay as before).
            self._h5.attrs["format_version"] = np.int64(VIEWS_FORMAT_VERSION)
            for other in _group_names(self._h5):
                self._h5[other].attrs.setdefault("views", np.int64(1))
        if self._h5.attrs.get("format_version") == VIEWS_FORMAT_VERSION:
            group.attrs["views"] = np.int64(views)
        self._h5.flush()
        return 0

    def append(self, split: str, features: np.ndarray, labels: np.ndarray, index: np.ndarray) -> int:
        """Writes the next rows of `split` and returns the new rows_done.

        Rows go to [rows_done, rows_done + b); rows_done is advanced only after they are flushed, so a
        process killed at any moment leaves rows_done <= the rows actually on disk. In a split of V views
        per example the rows are whole examples (b a multiple of V, example-major), each example's V rows
        with one label and one index, so rows_done always ends an example.
        """
        group = self._group(split)
        ds = group["features"]
        where = f"split {split!r}"
        start = _int_attr(self.path, group.attrs, "rows_done", where)
        n = _int_attr(self.path, group.attrs, "num_examples", where)
        views = _views_attr(self.path, group.attrs, where)
        d = self.metadata.feature_dim

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
        if b % views:
            raise _error(
                self.path,
                f"{where}: appending {b} rows at row {start}, not whole examples: the split holds views={views} "
                f"rows per example, so rows are appended {views} at a time",
            )
        for values, what in ((labels, "label"), (index, "index")):
            _check_groups(self.path, split, what, values, start, views)
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
        where = f"split {split!r}"
        done = _int_attr(self.path, group.attrs, "rows_done", where)
        n = _int_attr(self.path, group.attrs, "num_examples", where)
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

    features (n, D) with labels (n,) make a one-view split, index arange(n); features (n, V, D) with labels
    (n,) a split of V views per example (module docstring, "Views"): n·V rows, example-major, each
    example's label and index (its position, 0..n-1) repeated over its V rows. num_classes defaults to
    1 + the largest label. The file is written next to `path` under a temporary name and renamed into
    place, so a failure never leaves a partial file; the destination's lock is held meanwhile, so a file
    another process is writing is not replaced.
    """
    path = pathlib.Path(path)
    with FeatureFileLock(path):
        return _write_features_locked(path, splits, num_classes, dtype, overwrite, metadata)


def _write_features_locked(path, splits, num_classes, dtype, overwrite, metadata) -> pathlib.Path:
    if path.exists() and not overwrite:
        raise _error(path, "file exists; pass overwrite=True to replace it")
    if not splits:
        raise _error(path, "no splits given")
    arrays = {name: (np.asarray(x), np.asarray(y)) for name, (x, y) in splits.items()}
    first = next(iter(arrays.values()))[0]
    if "feature_dim" not in metadata:
        if first.ndim not in (2, 3):
            raise _error(path, f"features have shape {first.shape}, expected (n, D) or (n, views, D)")
        metadata["feature_dim"] = first.shape[-1]
    if num_classes is None:
        sizes = [int(y.max()) + 1 for _, y in arrays.values() if y.size]
        if not sizes:
            raise _error(path, "num_classes cannot be inferred from empty splits; pass it")
        num_classes = max(sizes)

    with written_whole(path) as tmp, FeatureWriter(tmp, num_classes=num_classes, overwrite=True, **metadata) as writer:
        for name, (x, y) in arrays.items():
            if x.ndim not in (2, 3) or y.shape != (x.shape[0],):
                raise _error(
                    path, f"split {name!r}: features {x.shape} and labels {y.shape} must be (n, D) or "
                    "(n, views, D), and (n,)"
                )
            n = x.shape[0]
            views = x.shape[1] if x.ndim == 3 else 1
            writer.create_split(name, n * views, dtype=dtype, views=views)
            step = max(1, _WRITE_BLOCK_ROWS // views)  # whole examples per append
            for s in range(0, n, step):
                e = min(s + step, n)
                rows = x[s:e].reshape(-1, x.shape[-1])  # example-major: views of one example adjacent
                examples = np.arange(s, e, dtype=np.int64)
                writer.append(name, rows, np.repeat(y[s:e], views), np.repeat(examples, views))
            writer.mark_complete(name)
    return path


@contextlib.contextmanager
def written_whole(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a temporary name beside `path` to write a file under, renamed onto `path` when the block ends
    and removed if it fails, so `path` appears whole or not at all. A FeatureFileError names `path`, not the
    temporary name the user never asked for; an OSError while writing becomes one. The caller holds `path`'s
    lock."""
    # Same directory, so the final rename is atomic; h5py creates the file, so the umask sets its mode.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _error(path, f"cannot write it: {exc.strerror}") from None
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, FeatureFileError):
            raise type(exc)(str(exc).replace(str(tmp), str(path))) from None
        if isinstance(exc, OSError):  # a full disk, a lost mount: the user's problem to fix, not a traceback
            raise _error(path, f"cannot write it: {str(exc).replace(str(tmp), str(path))}") from None
        raise


class Split:
    """One split of an open FeatureFile, read in row blocks as float32 features and int64 labels.

    `num_examples` counts rows; `views_per_example` (V, 1 unless the split holds augmented views) says how
    many consecutive rows make one example (module docstring, "Views"). Reads check that the rows of one
    example they hold share a label."""

    def __init__(self, path: pathlib.Path, name: str, group: h5py.Group, num_examples: int, num_classes: int,
                 views: int = 1):
        self.path = path
        self.name = name
        self.num_examples = num_examples
        self.views_per_example = int(views)
        self._features = group["features"]
        self._labels = group["labels"]
        self._index = group["index"]
        self.feature_dim = int(self._features.shape[1])
        self.num_classes = num_classes
        self.dtype = self._features.dtype
        self.complete = _bool_attr(path, group.attrs, "complete", f"split {name!r}")
        self.rows_done = _int_attr(path, group.attrs, "rows_done", f"split {name!r}")
        # The rows the split will hold once complete; `num_examples` is the rows it covers now (rows_done
        # while unfinished).
        self.declared_examples = _int_attr(path, group.attrs, "num_examples", f"split {name!r}")

    def __repr__(self) -> str:
        views = f", views_per_example={self.views_per_example}" if self.views_per_example > 1 else ""
        return (
            f"Split({self.name!r}, num_examples={self.num_examples}, feature_dim={self.feature_dim}, "
            f"dtype={self.dtype}{views})"
        )

    def nbytes_float32(self) -> int:
        """Bytes the whole split takes as float32, for deciding whether to load it into memory."""
        return self.num_examples * self.feature_dim * 4

    def _read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rows = stop - start
        # The stored rows, their float32 copy, and the labels; small reads are not worth the check.
        nbytes = rows * self.feature_dim * (self.dtype.itemsize + 4) + rows * 16
        if nbytes >= _CHECKED_READ_BYTES:
            check_allocation(
                nbytes, f"{self.path}: reading rows [{start}, {stop}) of split {self.name!r} "
                f"({rows} x {self.feature_dim} features)"
            )
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
        self._check_rows(start, features, labels)
        return features, labels

    def _label_before(self, start: int) -> np.ndarray | None:
        """The label of row start - 1 when it is a view of the same example as row `start` (a read that
        begins inside an example compares its first row with it), else None."""
        if start % self.views_per_example == 0:
            return None
        try:
            return self._labels[start - 1 : start].astype(np.int64)
        except OSError as exc:
            raise _error(self.path, f"split {self.name!r}, row {start - 1}: not a readable HDF5 feature file "
                                    f"(truncated or corrupt?): {exc}") from None

    def _check_rows(self, start: int, features: np.ndarray, labels: np.ndarray,
                    label_before: np.ndarray | None = None) -> None:
        """Validates rows start, start + 1, ...: finite features, labels in [0, K), and one label per
        example. `label_before`: row start - 1's label, as `_label_before` gives it (read when None)."""
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
        if self.views_per_example > 1:
            before = self._label_before(start) if label_before is None else label_before
            _check_groups(self.path, self.name, "label", labels, start, self.views_per_example, before)

    def blocks(self, block_rows: int = 32768) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields validated (features (b, D) float32, labels (b,) int64) blocks in row order."""
        if block_rows < 1:
            raise ValueError(f"block_rows={block_rows} must be >= 1")
        for start in range(0, self.num_examples, block_rows):
            yield self._read_rows(start, min(start + block_rows, self.num_examples))

    def read(self, block_rows: int = 32768) -> tuple[np.ndarray, np.ndarray]:
        """The whole split as (float32 (N, D), int64 (N,)), validated like blocks().

        Rows are read straight into the result, `block_rows` at a time (HDF5 converts float16 and int32 on
        the way, through its own small buffer), so nothing of the split's size is held beside the result."""
        n, d = self.num_examples, self.feature_dim
        nbytes = n * (4 * d + 8)
        if nbytes >= _CHECKED_READ_BYTES:
            check_allocation(nbytes, f"{self.path}: reading rows [0, {n}) of split {self.name!r} ({n} x {d} features)")
        features = np.empty((n, d), np.float32)
        labels = np.empty((n,), np.int64)
        for start in range(0, n, block_rows):
            rows = np.s_[start : min(start + block_rows, n)]
            try:
                self._features.read_direct(features, rows, rows)
                self._labels.read_direct(labels, rows, rows)
            except OSError as exc:
                raise _error(
                    self.path,
                    f"split {self.name!r}, rows [{rows.start}, {rows.stop}): not a readable HDF5 feature file "
                    f"(truncated or corrupt?): {exc}",
                ) from None
            # Rows are read in order, so the row before a block is already in `labels`.
            before = labels[start - 1 : start] if start % self.views_per_example else None
            self._check_rows(start, features[rows], labels[rows], before)
        return features, labels

    def read_index(self) -> np.ndarray:
        """Positions of the rows in the source dataset, int64 (N,); the rows of one example share one."""
        index = self._index[: self.num_examples].astype(np.int64, copy=False)
        _check_groups(self.path, self.name, "index", index, 0, self.views_per_example)
        return index

    def read_stored(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop) as stored (features in the file's dtype), labels and index as int64, not
        validated: what the checksums of a sharded file's parts cover (`featdp.featurefile_parts`)."""
        try:
            return (self._features[start:stop], self._labels[start:stop].astype(np.int64, copy=False),
                    self._index[start:stop].astype(np.int64, copy=False))
        except OSError as exc:
            raise _error(self.path, f"split {self.name!r}, rows [{start}, {stop}): not a readable HDF5 feature "
                                    f"file (truncated or corrupt?): {exc}") from None

    def rows(self, start: int, stop: int) -> RowRange:
        """Rows [start, stop) of the split, as a row source of their own (`RowRange`)."""
        return RowRange(self, start, stop)


class RowRange:
    """Rows [start, stop) of a split (`Split` or a sharded file's split), read like a split: one process's
    share of the rows in a distributed fit. `first_row` is `start`: global row first_row + i is row i here.
    In a split of V views per example both bounds must be multiples of V: a share holds whole examples."""

    def __init__(self, split, start: int, stop: int):
        if not 0 <= start <= stop <= split.num_examples:
            raise ValueError(f"rows [{start}, {stop}) are not within the split's {split.num_examples}")
        views = split.views_per_example
        if start % views or stop % views:
            raise ValueError(
                f"rows [{start}, {stop}) of split {split.name!r} split an example: it holds {views} views per "
                f"example, so a row range must start and stop at multiples of {views}"
            )
        self.split, self.first_row, self.stop = split, int(start), int(stop)
        self.num_examples = self.stop - self.first_row
        self.feature_dim, self.num_classes = split.feature_dim, split.num_classes
        self.views_per_example = views

    def __repr__(self) -> str:
        return f"RowRange({self.split!r}, [{self.first_row}, {self.stop}))"

    def blocks(self, block_rows: int = 32768) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Validated (features float32, labels int64) blocks in row order, like `Split.blocks`."""
        if block_rows < 1:
            raise ValueError(f"block_rows={block_rows} must be >= 1")
        for start in range(self.first_row, self.stop, block_rows):
            yield self.split._read_rows(start, min(start + block_rows, self.stop))


class FeatureFile:
    """Reads a feature file; a context manager. Opening checks the format, the attributes, and that
    everything is stored in the file itself (see the module docstring), not the data.

    FileInUseError while another process writes the file."""

    def __init__(self, path: os.PathLike | str):
        self.path = pathlib.Path(path)
        if self.path.exists():
            _check_not_being_written(self.path)
        self._h5 = _open_checked(self.path, "r")
        self._parts = None  # the parts of a sharded feature file (`featdp.featurefile_parts.Manifest`)
        try:
            self.metadata = _from_attrs(self.path, self._h5.attrs)
            self.split_names = tuple(_group_names(self._h5))
            from featdp import featurefile_parts

            if featurefile_parts.is_manifest(self._h5.attrs):
                self._parts = featurefile_parts.Manifest(self.path, self._h5, self.metadata)
                self.split_names = self._parts.split_names()
        except BaseException:
            self._h5.close()
            raise

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._parts is not None:
            self._parts.close()
        self._h5.close()

    @property
    def sharded(self) -> bool:
        """Whether this is the manifest of a sharded feature file (`featdp.featurefile_parts`)."""
        return self._parts is not None

    def split(self, name: str, *, require_complete: bool = True) -> Split:
        """Opens split `name` after checking its shapes and attributes.

        With require_complete=False an unfinished split is accepted and covers its rows_done rows. (A
        sharded file's splits are always complete: its manifest is written last.)
        """
        if self._parts is not None:
            return self._parts.split(name)
        group = _split_group(self.path, self._h5, name)
        where = f"split {name!r}"
        n, done, complete, views = _split_state(self.path, group, name, self.metadata.feature_dim)
        if not complete:
            if require_complete:
                raise _error(
                    self.path,
                    f"{where} is incomplete (rows_done={done} of num_examples={n}); re-run the "
                    f"extraction to finish it",
                )
            n = done
        return Split(self.path, name, group, n, self.metadata.num_classes, views)
