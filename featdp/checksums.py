"""File checksums recorded as provenance (feature files, checkpoints)."""

from __future__ import annotations

import functools
import hashlib
import os


def file_sha256(path: os.PathLike | str, chunk_bytes: int = 1 << 24) -> str:
    """SHA-256 of the file's bytes, hex, read in chunks.

    Remembered per (file, size, modification time): a pinned checkpoint is hashed for the pin check and
    again by its loader for provenance, seconds for a multi-GB ViT. A rewrite changes the key through its
    new modification time (or inode, for a replaced file).
    """
    info = os.stat(path)
    return _sha256_of_version(os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                              chunk_bytes)


@functools.lru_cache(maxsize=64)
def _sha256_of_version(path: str, device: int, inode: int, size: int, mtime_ns: int, chunk_bytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class ChecksumMismatchError(ValueError):
    """A file's SHA-256 is not the one the user pinned."""


def normalized_sha256(expected: str) -> str:
    """`expected` as 64 lowercase hex digits, or a ValueError naming it."""
    digest = expected.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"a SHA-256 is 64 hex digits, got {expected!r}")
    return digest


def verify_sha256(path: os.PathLike | str, expected: str) -> str:
    """Checks the file against a pinned digest; returns the digest or raises ChecksumMismatchError."""
    expected = normalized_sha256(expected)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumMismatchError(f"{path} has sha256 {actual}, expected {expected}")
    return actual
