"""Streaming sha256 of files and of in-memory buffers, a cache of large inputs' hashes, and syncing files to disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

CACHE_DIR_ENV: Final = "VLACL_CACHE_DIR"
"""Where vlacl keeps what it can recompute (default ``$XDG_CACHE_HOME/vlacl``, else ``~/.cache/vlacl``)."""
HASH_CACHE_ENV: Final = "VLACL_HASH_CACHE"
"""``off`` hashes every input file each time, keeping no cache."""
RACY_NS: Final = 2_000_000_000
"""A cache entry is trusted only when the file's status-change time is this long before its hashing began.

File times advance in clock ticks (up to 10 ms on older kernels): a file changed again within the
tick of its last change keeps its times, and a hash taken in that tick may be of the earlier
content. Such an entry is hashed again at its next use (git's index treats "racy" entries alike)."""

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


def cache_dir() -> Path:
    """Vlacl's cache directory: ``$VLACL_CACHE_DIR``, else ``$XDG_CACHE_HOME/vlacl``, else ``~/.cache/vlacl``."""
    named = os.environ.get(CACHE_DIR_ENV)
    if named:
        return Path(named)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vlacl"


def _file_identity(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def sha256_file_cached(path: Path) -> str:
    """The hex sha256 of a large input file, from the hash cache when the file is unchanged since it was hashed.

    A model's shards are inputs of every merge onto that model; hashing them (gigabytes) again each
    time would cost more than the merge. The cache keeps, per file, its sha256 with what ``stat``
    says of it: device, inode, size, modification and status-change times in nanoseconds. Any write
    to the file changes its status-change time, which no tool can set back, so an entry that still
    matches is the file as it was hashed (git's index trusts the same fields), provided the file had
    not changed within :data:`RACY_NS` before the hashing began (else it is hashed again). Entries are small
    JSON files under ``<cache_dir>/sha256``; a cache that cannot be read or written only costs the
    hashing. ``VLACL_HASH_CACHE=off`` hashes every time. Artifact verification never uses it.

    Raises:
        OSError: The file cannot be read.
    """
    path = Path(path)
    if os.environ.get(HASH_CACHE_ENV, "").lower() in ("off", "0", "false", "no"):
        return sha256_file(path)
    try:
        root = cache_dir()
    except (RuntimeError, KeyError):  # no home directory to put it in (HOME unset, no passwd entry)
        return sha256_file(path)
    identity = _file_identity(path)
    key = hashlib.sha256(f"{identity['path']}\0{identity['dev']}\0{identity['ino']}".encode()).hexdigest()[:40]
    entry = root / "sha256" / f"{key}.json"
    try:
        cached = json.loads(entry.read_text(encoding="utf-8"))
        if (
            isinstance(cached, dict)
            and {k: cached.get(k) for k in identity} == identity
            and isinstance(cached.get("hashed_ns"), int)
            and cached["hashed_ns"] - int(identity["ctime_ns"]) > RACY_NS
        ):
            digest = cached.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                return digest
    except (OSError, ValueError):
        pass
    started = time.time_ns()
    digest = sha256_file(path)
    if _file_identity(path) != identity:  # changed while being hashed: nothing to keep
        return digest
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{key}.", suffix=".tmp")
    except OSError as exc:
        log.debug("hash cache %s not written: %s", entry, exc)
        return digest
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**identity, "hashed_ns": started, "sha256": digest}, fh)
        Path(tmp).replace(entry)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        log.debug("hash cache %s not written: %s", entry, exc)
    return digest
