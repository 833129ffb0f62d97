"""File checksums recorded as provenance (feature files, checkpoints)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: os.PathLike | str, chunk_bytes: int = 1 << 24) -> str:
    """SHA-256 of the file's bytes, hex, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
