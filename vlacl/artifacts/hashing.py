"""Streaming sha256 of files and bytes, optionally syncing the file to disk in the same pass."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB reads: large enough for full disk speed, small enough to bound memory


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks so memory stays flat."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Return the hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file_synced(path: Path) -> tuple[str, int]:
    """Hash a file and flush it to disk in one pass: its hex sha256 and its size in bytes.

    The file is read once, in 1 MiB chunks, and ``os.fsync`` is called on the same descriptor, so
    an artifact's files are durable before the directory holding them is renamed into place.

    Raises:
        OSError: The file cannot be read or synced.
    """
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(fh.fileno())
    return digest.hexdigest(), size
