"""Read a PyTorch ``.pth`` state dict into numpy arrays without importing torch.

Both on-disk layouts written by ``torch.save`` are supported:

* zip (torch >= 1.6): ``<root>/data.pkl`` plus one raw record ``<root>/data/<key>``
  per storage;
* legacy pickle stream: magic number, protocol version, sys info, the pickled
  object, the sorted list of storage keys, then each storage as an int64 element
  count followed by its raw bytes.

Unpickling is restricted to a whitelist of globals, so a checkpoint can never run
arbitrary code; anything else raises :class:`UnsupportedCheckpointError`.

Nor can a checkpoint make the reader allocate much more than the file holds: every
length, element count, shape and stride in it is checked against the bytes actually
stored before anything of that size is read, decompressed or copied (see the limits
below). Every refusal is an :class:`UnsupportedCheckpointError` naming the tensor,
storage or zip member at fault.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import stat
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from typing import IO, Any, Callable

import ml_dtypes
import numpy as np

__all__ = ["UnsupportedCheckpointError", "load_torch_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Bounds on what an untrusted checkpoint may make the reader allocate.
_MAX_DIMS = 64  # numpy's own limit on ndim
_MAX_TENSOR_ELEMENTS = 2**40  # sanity cap on a shape's product, before the storage bound
_MAX_PICKLE_BYTES = 256 << 20  # a state dict's pickle is ~100 bytes a tensor
_MAX_SMALL_MEMBER_BYTES = 16  # byteorder and the like
# torch.save stores zip members uncompressed; a deflated member may expand at most this
# much (deflate's own ceiling is ~1032x, which only long runs of one byte reach) ...
_MAX_COMPRESSION_RATIO = 100
_RATIO_EXEMPT_BYTES = 1 << 20  # ... unless it is this small anyway.
# All tensors together may hold at most this multiple of the stored bytes, plus the
# slack (tied weights and views share storages; nothing legitimate comes close).
_MAX_SHARING = 4
_SHARING_SLACK_BYTES = 64 << 20

# torch storage class name -> numpy dtype; the class itself is never needed.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class UnsupportedCheckpointError(ValueError):
    """The file is not a plain tensor state dict this reader can safely load."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass
class _Storage:
    """A storage whose bytes may only arrive after the pickle (legacy format)."""

    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _StorageView:
    """Pre-1.0 checkpoints may reference a slice of another storage."""

    base: _Storage
    offset: int
    numel: int

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype


@dataclass(frozen=True)
class _PendingTensor:
    storage: _Storage | _StorageView
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _pending(storage, storage_offset, size, stride) -> _PendingTensor:
    # Arguments come from the (untrusted) pickle, so check their types here.
    ok = (isinstance(storage, (_Storage, _StorageView))
          and isinstance(size, tuple) and isinstance(stride, tuple)
          and len(size) == len(stride)
          and all(isinstance(v, int) for v in (storage_offset, *size, *stride)))
    if not ok:
        raise UnsupportedCheckpointError("malformed tensor record in checkpoint")
    return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _pending(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _pending(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    # A Parameter is just its tensor for our purposes.
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only whitelisted globals; storages come from ``load_storage``."""

    def __init__(self, file: IO[bytes],
                 load_storage: Callable[[tuple], _Storage | _StorageView]):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsupportedCheckpointError(
                f"checkpoint references {module}.{name}, which is not allowed; "
                "only plain tensor state dicts can be loaded") from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsupportedCheckpointError(f"unsupported persistent id {pid!r}")
        return self._load_storage(pid[1:])


def _storage_dtype(storage_type: Any) -> np.dtype:
    if not isinstance(storage_type, _StorageType):
        raise UnsupportedCheckpointError(f"unknown storage type {storage_type!r}")
    return storage_type.dtype


def _numel(name: str, t: _PendingTensor) -> int:
    if len(t.shape) > _MAX_DIMS:
        raise UnsupportedCheckpointError(f"tensor {name!r} has {len(t.shape)} dimensions")
    if any(n < 0 for n in t.shape) or any(s < 0 for s in t.stride) or t.offset < 0:
        # torch itself has no negative sizes, strides or offsets.
        raise UnsupportedCheckpointError(
            f"tensor {name!r}: negative size, stride or offset (shape {t.shape}, "
            f"stride {t.stride}, offset {t.offset})")
    numel = 1
    for n in t.shape:
        numel *= n
        if numel > _MAX_TENSOR_ELEMENTS or n > _MAX_TENSOR_ELEMENTS:
            raise UnsupportedCheckpointError(
                f"tensor {name!r}: shape {t.shape} exceeds {_MAX_TENSOR_ELEMENTS} elements")
    return numel


def _materialise(name: str, t: _PendingTensor) -> np.ndarray:
    storage = t.storage
    base = storage.base if isinstance(storage, _StorageView) else storage
    if base.data is None:
        raise UnsupportedCheckpointError(
            f"tensor {name!r}: its storage bytes are missing from the checkpoint")
    flat = base.data
    if isinstance(storage, _StorageView):  # offset and numel were checked against base
        flat = flat[storage.offset:storage.offset + storage.numel]
    numel = _numel(name, t)
    if numel == 0:
        return np.zeros(t.shape, dtype=flat.dtype)
    # Bounds check before as_strided, which would otherwise read outside the buffer:
    # the view's extent must lie inside the storage ...
    extent = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) + 1
    if extent > flat.size:
        raise UnsupportedCheckpointError(
            f"tensor {name!r} (offset {t.offset}, shape {t.shape}, stride {t.stride}) "
            f"reaches element {extent - 1} of a storage of {flat.size} elements")
    # ... and, since zero or overlapping strides could expand a small storage into a
    # huge array, the copy may not hold more elements than the storage stores.
    if numel > flat.size:
        raise UnsupportedCheckpointError(
            f"tensor {name!r}: shape {t.shape} with stride {t.stride} expands a storage "
            f"of {flat.size} elements into {numel}; refusing")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.shape, strides=tuple(s * item for s in t.stride))
    # Copy so that every array owns contiguous, writable memory.
    return np.array(view, copy=True)


def _to_state_dict(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise UnsupportedCheckpointError(
            f"expected a state dict at the top level, got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _PendingTensor):
            raise UnsupportedCheckpointError(f"entry {key!r} is not a tensor")
    # Each tensor is bounded by its storage, but many tensors may share one storage.
    bases = {id(b): b for b in (v.storage.base if isinstance(v.storage, _StorageView)
                                else v.storage for v in obj.values())}
    stored = sum(b.data.nbytes for b in bases.values() if b.data is not None)
    budget = left = _MAX_SHARING * stored + _SHARING_SLACK_BYTES
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        left -= _numel(key, value) * value.storage.dtype.itemsize
        if left < 0:
            raise UnsupportedCheckpointError(
                f"tensor {key!r}: the tensors up to this one would take more than {budget} "
                f"bytes, {_MAX_SHARING}x the {stored} bytes of storage in the checkpoint "
                f"plus {_SHARING_SLACK_BYTES}; refusing")
        out[key] = _materialise(key, value)
    return out


def _scan_pickle(f: IO[bytes]) -> None:
    """Walk one pickle's opcodes without building anything, so that a declared length
    (BINBYTES8, LONG4, ...) longer than the data left is refused before the unpickler
    allocates it. ``f`` must never return more bytes than it holds (a BytesIO or a
    :class:`_BoundedReader`); it is left just past the STOP opcode."""
    try:
        for _ in pickletools.genops(f):
            pass
    except ValueError as err:  # also what genops raises on a truncated stream
        raise UnsupportedCheckpointError(f"malformed pickle: {err}") from None


class _BoundedReader:
    """Reads of a file clamped to the bytes it holds: ``read(n)`` of a buffered file
    allocates ``n`` bytes before reading, so an untrusted ``n`` must not reach it."""

    def __init__(self, f: IO[bytes], size: int):
        self._f, self._size = f, size

    def _left(self) -> int:
        return max(0, self._size - self._f.tell())

    def read(self, n: int | None = -1) -> bytes:
        left = self._left()
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self, n: int | None = -1) -> bytes:
        left = self._left()
        return self._f.readline(left if n is None or n < 0 else min(n, left))


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int,
                 max_size: int, exact: bool = False) -> bytes:
    """A zip member's bytes, read only once its declared sizes are plausible: at most
    ``max_size`` (exactly, if ``exact``) and not a decompression bomb."""
    name = info.filename
    if exact and info.file_size != max_size:
        raise UnsupportedCheckpointError(
            f"zip member {name!r} holds {info.file_size} bytes, expected {max_size}")
    if info.file_size > max_size:
        raise UnsupportedCheckpointError(
            f"zip member {name!r} declares {info.file_size} bytes, more than the "
            f"{max_size} allowed")
    if info.header_offset + info.compress_size > archive_size:
        raise UnsupportedCheckpointError(f"zip member {name!r} extends past the end of the file")
    if info.compress_type != zipfile.ZIP_STORED:
        if info.compress_type != zipfile.ZIP_DEFLATED:
            # zipfile decompresses bzip2 and lzma without an output limit.
            raise UnsupportedCheckpointError(
                f"zip member {name!r} uses compression method {info.compress_type}; "
                "only stored or deflated members are read")
        if (info.file_size > _RATIO_EXEMPT_BYTES
                and info.file_size > _MAX_COMPRESSION_RATIO * info.compress_size):
            raise UnsupportedCheckpointError(
                f"zip member {name!r} would expand {info.compress_size} compressed bytes "
                f"into {info.file_size}; refusing a likely decompression bomb")
    with zf.open(info) as member:
        # ZipExtFile stops at the declared size; ask for one byte more to notice if not.
        raw = member.read(info.file_size + 1)
    if len(raw) != info.file_size:
        raise UnsupportedCheckpointError(
            f"zip member {name!r} holds {len(raw)} bytes, its header says {info.file_size}")
    return raw


def _load_zip(path: str | os.PathLike, archive_size: int) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        pkl = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise UnsupportedCheckpointError("zip checkpoint without a single <root>/data.pkl")
        root = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in infos:
            byteorder = _read_member(zf, infos[root + "byteorder"], archive_size,
                                     _MAX_SMALL_MEMBER_BYTES).decode().strip()
            if byteorder not in ("little", "big"):
                raise UnsupportedCheckpointError(f"unknown byteorder {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def load_storage(data: tuple) -> _Storage:
            if len(data) < 4:
                raise UnsupportedCheckpointError(f"malformed storage reference {data!r}")
            storage_type, key, _location, numel = data[:4]
            key = str(key)
            if key not in storages:
                dtype = _storage_dtype(storage_type).newbyteorder(
                    "<" if byteorder == "little" else ">")
                if type(numel) is not int or numel < 0:
                    raise UnsupportedCheckpointError(
                        f"storage {key!r}: malformed element count {numel!r}")
                member = f"{root}data/{key}"
                if member not in infos:
                    raise UnsupportedCheckpointError(
                        f"storage {key!r}: zip member {member!r} is missing")
                # The declared element count must match the bytes stored, exactly.
                raw = _read_member(zf, infos[member], archive_size,
                                   numel * dtype.itemsize, exact=True)
                arr = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
                storages[key] = _Storage(arr.dtype, arr.size, arr)
            return storages[key]

        pickled = io.BytesIO(_read_member(zf, infos[pkl[0]], archive_size, _MAX_PICKLE_BYTES))
        _scan_pickle(pickled)
        pickled.seek(0)
        obj = _RestrictedUnpickler(pickled, load_storage).load()
    return _to_state_dict(obj)


def _load_legacy(f: IO[bytes], file_size: int) -> dict[str, np.ndarray]:
    bounded = _BoundedReader(f, file_size)

    def next_pickle(load_storage: Callable[[tuple], _Storage | _StorageView]) -> Any:
        start = f.tell()
        _scan_pickle(bounded)
        length = f.tell() - start
        f.seek(start)
        return _RestrictedUnpickler(io.BytesIO(_read_exact(f, length)), load_storage).load()

    def header() -> Any:
        return next_pickle(_refuse_storage)

    if header() != _LEGACY_MAGIC:
        raise UnsupportedCheckpointError("not a torch checkpoint (bad magic number)")
    if header() != _LEGACY_PROTOCOL:
        raise UnsupportedCheckpointError("unsupported legacy torch protocol version")
    sys_info = header()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

    storages: dict[str, _Storage] = {}

    def load_storage(data: tuple) -> _Storage | _StorageView:
        if len(data) != 5:
            raise UnsupportedCheckpointError(f"malformed storage reference {data!r}")
        storage_type, root_key, _location, numel, view_metadata = data
        root_key = str(root_key)
        if root_key not in storages:
            if type(numel) is not int or numel < 0:
                raise UnsupportedCheckpointError(
                    f"storage {root_key!r}: malformed element count {numel!r}")
            storages[root_key] = _Storage(_storage_dtype(storage_type), numel)
        base = storages[root_key]
        if view_metadata is None:
            return base
        if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3):
            raise UnsupportedCheckpointError(
                f"storage {root_key!r}: malformed view {view_metadata!r}")
        _view_key, offset, view_numel = view_metadata
        if not (type(offset) is int and type(view_numel) is int
                and 0 <= offset and 0 <= view_numel and offset + view_numel <= base.numel):
            raise UnsupportedCheckpointError(
                f"storage {root_key!r}: view of {view_numel!r} elements at offset "
                f"{offset!r} falls outside its {base.numel} elements")
        return _StorageView(base, offset, view_numel)

    obj = next_pickle(load_storage)
    keys = header()
    if not isinstance(keys, list):
        raise UnsupportedCheckpointError("malformed legacy checkpoint: no storage key list")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise UnsupportedCheckpointError(f"storage {key!r} listed but never referenced")
        (numel,) = struct.unpack("<q" if little else ">q", _read_exact(f, 8))
        if numel != storage.numel:
            raise UnsupportedCheckpointError(
                f"storage {key!r}: header says {storage.numel} elements, data has {numel}")
        dtype = storage.dtype.newbyteorder("<" if little else ">")
        nbytes = numel * dtype.itemsize
        if nbytes > file_size - f.tell():
            raise UnsupportedCheckpointError(
                f"storage {key!r} declares {numel} elements ({nbytes} bytes), more than "
                f"the {max(0, file_size - f.tell())} bytes left in the file")
        storage.data = np.frombuffer(_read_exact(f, nbytes), dtype=dtype).astype(storage.dtype)
    return _to_state_dict(obj)


def _refuse_storage(data: tuple) -> _Storage:
    raise UnsupportedCheckpointError("unexpected storage reference in checkpoint header")


def _read_exact(f: IO[bytes], n: int) -> bytes:
    raw = f.read(n)
    if len(raw) != n:
        raise UnsupportedCheckpointError("checkpoint is truncated")
    return raw


# What a malformed file makes zipfile, pickle or the rebuild functions raise.
_MALFORMED = (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, struct.error,
              NotImplementedError, UnicodeDecodeError, ValueError, TypeError, KeyError,
              IndexError, AttributeError, OverflowError)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``torch.save``-d state dict as ``{name: np.ndarray}`` (no torch needed)."""
    # Checked before opening: open() on a FIFO would block, on a directory it raises.
    if os.path.isdir(path):
        raise UnsupportedCheckpointError(f"{path} is a directory, not a checkpoint file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UnsupportedCheckpointError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(4)
        try:
            # Sniff the leading bytes like torch does; a trailing-directory check
            # (zipfile.is_zipfile) could be fooled by tensor bytes.
            if head == b"PK\x03\x04":
                f.close()
                return _load_zip(path, st.st_size)
            if head[:1] == b"\x80":  # pickle PROTO opcode starts the legacy stream
                f.seek(0)
                return _load_legacy(f, st.st_size)
        except UnsupportedCheckpointError:
            raise
        except _MALFORMED as err:
            raise UnsupportedCheckpointError(
                f"{path} is not a readable torch checkpoint: {type(err).__name__}: {err}") from err
    if tarfile.is_tarfile(path):
        # The pre-1.0 tar layout predates every checkpoint we read.
        raise UnsupportedCheckpointError(
            f"{path}: the old tar checkpoint layout is not supported")
    raise UnsupportedCheckpointError(f"{path} is not a torch checkpoint")
