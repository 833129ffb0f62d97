"""Read a PyTorch ``.pth`` state dict into numpy arrays without importing torch.

Both on-disk layouts written by ``torch.save`` are supported:

* zip (torch >= 1.6): ``<root>/data.pkl`` plus one raw record ``<root>/data/<key>``
  per storage;
* legacy pickle stream: magic number, protocol version, sys info, the pickled
  object, the sorted list of storage keys, then each storage as an int64 element
  count followed by its raw bytes.

Unpickling is restricted to a whitelist of globals, so a checkpoint can never run
arbitrary code; anything else raises :class:`UnsupportedCheckpointError`.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
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


def _materialise(t: _PendingTensor) -> np.ndarray:
    storage = t.storage
    base = storage.base if isinstance(storage, _StorageView) else storage
    if base.data is None:
        raise UnsupportedCheckpointError("a tensor's storage bytes are missing from the checkpoint")
    flat = base.data
    if isinstance(storage, _StorageView):
        flat = flat[storage.offset:storage.offset + storage.numel]
    if t.shape and min(t.shape) == 0:
        return np.zeros(t.shape, dtype=flat.dtype)
    # Bounds check before as_strided, which would otherwise read outside the buffer.
    last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
    if t.offset < 0 or any(s < 0 for s in t.stride) or last >= flat.size:
        raise UnsupportedCheckpointError("tensor view falls outside its storage")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.shape, strides=tuple(s * item for s in t.stride))
    # Copy so that every array owns contiguous, writable memory.
    return np.array(view, copy=True)


def _to_state_dict(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise UnsupportedCheckpointError(
            f"expected a state dict at the top level, got {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _PendingTensor):
            raise UnsupportedCheckpointError(f"entry {key!r} is not a tensor")
        out[key] = _materialise(value)
    return out


def _load_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise UnsupportedCheckpointError("zip checkpoint without a single <root>/data.pkl")
        root = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = zf.read(root + "byteorder").decode().strip()
        storages: dict[str, _Storage] = {}

        def load_storage(data: tuple) -> _Storage:
            storage_type, key, _location, numel = data[:4]
            key = str(key)
            if key not in storages:
                dtype = _storage_dtype(storage_type).newbyteorder(
                    "<" if byteorder == "little" else ">")
                raw = zf.read(f"{root}data/{key}")
                # Newer torch writes untyped (byte-count) storages; trust the bytes.
                arr = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
                storages[key] = _Storage(arr.dtype, arr.size, arr)
            return storages[key]

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()
    return _to_state_dict(obj)


def _load_legacy(f: IO[bytes]) -> dict[str, np.ndarray]:
    def header() -> Any:
        return _RestrictedUnpickler(f, _refuse_storage).load()

    if header() != _LEGACY_MAGIC:
        raise UnsupportedCheckpointError("not a torch checkpoint (bad magic number)")
    if header() != _LEGACY_PROTOCOL:
        raise UnsupportedCheckpointError("unsupported legacy torch protocol version")
    sys_info = header()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

    storages: dict[str, _Storage] = {}

    def load_storage(data: tuple) -> _Storage | _StorageView:
        storage_type, root_key, _location, numel, view_metadata = data
        root_key = str(root_key)
        if root_key not in storages:
            storages[root_key] = _Storage(_storage_dtype(storage_type), int(numel))
        base = storages[root_key]
        if view_metadata is None:
            return base
        _view_key, offset, view_numel = view_metadata
        return _StorageView(base, int(offset), int(view_numel))

    obj = _RestrictedUnpickler(f, load_storage).load()
    keys = _RestrictedUnpickler(f, _refuse_storage).load()
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
        raw = _read_exact(f, numel * dtype.itemsize)
        storage.data = np.frombuffer(raw, dtype=dtype).astype(storage.dtype)
    return _to_state_dict(obj)


def _refuse_storage(data: tuple) -> _Storage:
    raise UnsupportedCheckpointError("unexpected storage reference in checkpoint header")


def _read_exact(f: IO[bytes], n: int) -> bytes:
    raw = f.read(n)
    if len(raw) != n:
        raise UnsupportedCheckpointError("checkpoint is truncated")
    return raw


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``torch.save``-d state dict as ``{name: np.ndarray}`` (no torch needed)."""
    with open(path, "rb") as f:
        head = f.read(4)
        # Sniff the leading bytes like torch does; a trailing-directory check
        # (zipfile.is_zipfile) could be fooled by tensor bytes.
        if head == b"PK\x03\x04":
            f.close()
            return _load_zip(path)
        if head[:1] == b"\x80":  # pickle PROTO opcode starts the legacy stream
            f.seek(0)
            return _load_legacy(f)
    if tarfile.is_tarfile(path):
        # The pre-1.0 tar layout predates every checkpoint we read.
        raise UnsupportedCheckpointError(
            f"{path}: the old tar checkpoint layout is not supported")
    raise UnsupportedCheckpointError(f"{path} is not a torch checkpoint")
