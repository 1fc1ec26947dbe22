"""Streaming sha256 of files and bytes."""

from __future__ import annotations

import hashlib
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
