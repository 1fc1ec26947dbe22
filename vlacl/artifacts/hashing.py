"""Streaming sha256 of files and of in-memory buffers, and syncing files to disk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB reads: large enough for full disk speed, small enough to bound memory


def sha256_file_synced(path: Path, *, sync: bool = True) -> tuple[str, int]:
    """Hash a file, and by default flush it to disk, in one pass: its hex sha256 and size in bytes.

    The file is read once, in 1 MiB chunks, so memory stays flat; with ``sync``, ``os.fsync`` is
    called on the same descriptor, so an artifact's files are durable before the directory
    holding them is renamed into place.

    Raises:
        OSError: The file cannot be read or synced.
    """
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file (read only, nothing synced)."""
    return sha256_file_synced(path, sync=False)[0]


def sha256_buffers(pieces: Iterable[memoryview]) -> tuple[str, int]:
    """The hex sha256 and the size of the concatenation of ``pieces``, without joining them.

    A command that writes a file from buffers it holds hashes the same buffers beside the write
    (hashlib releases the GIL on large buffers), instead of reading the file back afterwards.
    """
    digest = hashlib.sha256()
    size = 0
    for piece in pieces:
        digest.update(piece)
        size += piece.nbytes
    return digest.hexdigest(), size


def sync_file(path: Path) -> None:
    """Flush a file's data to disk (``os.fsync``) without reading it.

    Raises:
        OSError: The file cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
