"""IDX files (the MNIST family's format), raw or gzip-compressed.

Layout: 2 zero bytes, a type code, the number of dimensions n, then n big-endian uint32 sizes, then the
values in C order, big-endian. Everything is checked against the header, so a truncated or padded file
is an error rather than a silently shifted array.
"""

from __future__ import annotations

import gzip
import pathlib
import zlib

import numpy as np

from featdp.extraction.datasets.base import DatasetError

_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: pathlib.Path):
    # Decide by content, not by name: Debian ships .gz, other mirrors ship the same files unpacked.
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _parse_header(path: pathlib.Path, head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length) from the first bytes of the file."""
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {head[:4].hex() or 'none'})")
    ndim = head[3]
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise DatasetError(f"{path}: truncated IDX header ({len(head)} of {header_len} bytes)")
    shape = tuple(int(n) for n in np.frombuffer(head, ">u4", count=ndim, offset=4))
    return np.dtype(_DTYPES[head[2]]), shape, header_len


def read_header(path) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape an IDX file declares, reading only its first bytes."""
    path = pathlib.Path(path)
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * 255)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read IDX header: {e}") from e
    dtype, shape, _ = _parse_header(path, head)
    return dtype, shape


def read_idx(path) -> np.ndarray:
    """The whole array, in native byte order."""
    path = pathlib.Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        # gzip reports a cut-off stream as EOFError ("Compressed file ended before the end-of-stream ...").
        raise DatasetError(f"{path}: cannot read IDX file (truncated or corrupt?): {e}") from e
    dtype, shape, header_len = _parse_header(path, data)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DatasetError(f"{path}: IDX file {what}: shape {shape} needs {expected} data bytes, found {found}")
    array = np.frombuffer(data, dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes an array as IDX (the inverse of `read_idx`; used to write test fixtures)."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX has no type code for dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
