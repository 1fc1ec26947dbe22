"""Atomic creation of an artifact directory.

An artifact is built in a hidden temporary sibling of ``--out``, ``.<name>.tmp-<host>-<pid>-<hex>``,
and renamed into place only when everything, the manifest last, is written and synced to disk.
When ``--out`` is replaced, the previous artifact is first renamed to
``.<name>.old-<host>-<pid>-<hex>`` and removed once the new one is in place; if the process fails
or is interrupted between the two renames, it renames the previous artifact back before it stops.
A process killed in between leaves at most these hidden siblings, never a directory that looks
complete; the next writer for the same ``--out`` on the same host removes them, or renames the
previous artifact back, once the process that made them no longer runs. Siblings made on another
host are never touched, since whether their process runs cannot be told from here.

An existing ``--out`` is replaced only with ``overwrite``, only when it is itself a vlacl artifact
of the same kind (or empty) and not a symbolic link, so a mistyped ``--out`` never deletes a
user's files or another command's results; and no ``--out`` may lie inside another artifact, whose
manifest would then not list every file in it. Filesystem failures surface as
:class:`~vlacl.errors.ArtifactError` naming the path and what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from vlacl.artifacts.hashing import sha256_file, sha256_file_synced
from vlacl.artifacts.manifest import InputRef, Manifest, OutputEntry, library_versions, load_json, utc_now
from vlacl.artifacts.names import CONFIG_NAME, FILE_KIND, MANIFEST_NAME, describe_kinds
from vlacl.artifacts.reader import Artifact
from vlacl.errors import ArtifactError, OutputExistsError

log = logging.getLogger(__name__)

SiblingRole = Literal["tmp", "old"]

_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
"""Errors of the disk rather than of the code: raised while a command writes its files, they
become an ArtifactError saying what to do, whatever file they name."""

_ADVICE: Mapping[int | None, str] = {
    errno.EACCES: "check the permissions of {where}, or choose another --out",
    errno.EPERM: "check the permissions of {where}, or choose another --out",
    errno.EROFS: "{where} is on a read-only filesystem: choose another --out",
    errno.ENOSPC: "free space on the disk of {where}, or choose another --out",
    errno.EDQUOT: "free space on the disk of {where}, or choose another --out",
    errno.EFBIG: "a file is larger than the filesystem of {where} allows: choose another --out",
    errno.ENOTDIR: "a parent of --out is a file, not a directory: choose another --out",
    errno.EIO: "the disk holding {where} reported an error: check it, or choose another --out",
}
"""What to do about a filesystem error, by errno; ``{where}`` is the directory being written."""


def _fs_error(out: Path, action: str, exc: OSError, where: Path | None = None) -> ArtifactError:
    """The error for a failed filesystem step: the path, the reason and what to do.

    Args:
        out: The ``--out`` directory.
        action: What was being done, naming the path, e.g. ``creating the directory /a/b``.
        exc: The error.
        where: The directory the advice names; the parent of ``out`` by default.
    """
    template = _ADVICE.get(exc.errno, "check that {where} is a writable directory, or choose another --out")
    advice = template.format(where=out.parent if where is None else where)
    return ArtifactError(f"cannot write --out {out}: {action} failed ({exc.strerror or exc}); {advice}")


def check_output_dir(out: Path, overwrite: bool, *, kind: str | None = None) -> None:
    """Refuse an ``--out`` that may not be written; call it before doing the work.

    Args:
        out: The ``--out`` directory.
        overwrite: Whether an existing artifact at ``out`` may be replaced.
        kind: The kind of artifact that will be written; an existing artifact of another kind is
            never replaced. ``None`` skips that check.

    Raises:
        OutputExistsError: A parent of ``out`` is a file; or ``out`` lies inside another artifact;
            or ``out`` is a symbolic link; or a file; or a non-empty directory that is not a vlacl
            artifact (never replaced, even with ``overwrite``); or an artifact of another kind than
            ``kind`` (never replaced either); or an artifact, without ``overwrite``.
        ArtifactError: ``out`` or one of its parents cannot be inspected.
    """
    out = Path(out)
    absolute = Path(os.path.abspath(out))  # noqa: PTH100  # normalized: no `..`
    for parent in absolute.parents:
        found = _stat(parent, out)
        if found is None:
            continue
        if not stat.S_ISDIR(found.st_mode):
            raise OutputExistsError(
                f"--out {out} cannot be created: {parent} is a file, not a directory; "
                "choose an --out whose parents are directories"
            )
        break
    _refuse_nested(out, absolute)
    if absolute.is_symlink():  # renaming it aside would move the link, not the artifact it points to
        raise OutputExistsError(
            f"--out {out} is a symbolic link: vlacl does not write through it; "
            f"pass the real directory path instead, --out {os.path.realpath(absolute)}"
        )
    found = _stat(absolute, out)
    if found is None:
        return
    if not stat.S_ISDIR(found.st_mode):
        raise OutputExistsError(f"--out {out} is an existing file: choose a directory path that does not exist")
    try:
        empty = not any(absolute.iterdir())
    except OSError as exc:
        raise _fs_error(out, f"listing {out}", exc, where=absolute) from exc
    if empty:
        return
    if _stat(absolute / MANIFEST_NAME, out) is None:
        raise OutputExistsError(
            f"--out {out} is a non-empty directory that is not a vlacl artifact (no {MANIFEST_NAME}); "
            "vlacl never replaces it, even with --overwrite: choose another --out or empty it yourself"
        )
    if kind is not None:
        existing = _manifest_kind(absolute)
        if existing is None:
            raise OutputExistsError(
                f"--out {out} holds a {MANIFEST_NAME} that cannot be read, so vlacl cannot tell what it would "
                "replace; it never replaces it, even with --overwrite: choose another --out or remove it yourself"
            )
        if existing != kind:
            raise OutputExistsError(
                f"--out {out} holds {describe_kinds((existing,))}, but this command writes "
                f"{describe_kinds((kind,))}; vlacl never replaces an artifact of another kind, even with "
                "--overwrite: choose another --out"
            )
    if not overwrite:
        raise OutputExistsError(
            f"--out {out} already holds an artifact: pass --overwrite to replace it, or choose another --out"
        )


def _stat(path: Path, out: Path) -> os.stat_result | None:
    """``os.stat`` of ``path``, or ``None`` if nothing is there.

    Raises:
        ArtifactError: ``path`` cannot be inspected (e.g. a parent is not searchable).
    """
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _fs_error(out, f"inspecting {path}", exc, where=path.parent) from exc


def _manifest_kind(directory: Path) -> str | None:
    """The ``kind`` recorded in ``directory``'s manifest, or ``None`` if it cannot be read.

    Only the JSON and its ``kind`` are read, so an artifact of a newer schema is still recognized.
    """
    try:
        data = load_json(directory / MANIFEST_NAME)
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def _refuse_nested(out: Path, absolute: Path) -> None:
    """Refuse an ``out`` below a directory holding a manifest, following symlinks too."""
    resolved = Path(os.path.realpath(absolute))  # realpath never raises for a missing path
    for parent in dict.fromkeys([*absolute.parents, *resolved.parents]):
        manifest = parent / MANIFEST_NAME
        try:
            is_manifest = manifest.is_file()
        except OSError:
            continue
        if is_manifest:
            kind = _manifest_kind(parent)
            what = describe_kinds((kind,)) if kind is not None else "a vlacl artifact"
            raise OutputExistsError(
                f"--out {out} lies inside {parent}, which is {what}: writing there would add files its "
                "manifest does not list; choose an --out outside every artifact directory"
            )


def _host() -> str:
    """This machine's name as sibling names carry it: only ``[A-Za-z0-9_.-]``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "unknown"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still run; when in doubt, ``True``, so its files are left alone."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs under another user
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # filesystems that cannot sync a directory
            raise
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class ArtifactWriter:
    """Build one artifact directory and commit it atomically.

    Use as a context manager: write files under :attr:`path` (the temporary directory), record
    inputs with :meth:`add_input` / :meth:`add_file_input` and kind-specific fields in
    :attr:`details`. On a clean exit the resolved config, the output hashes and the manifest (last)
    are written, every file is synced to disk and the directory is renamed to ``out``; on an
    exception the temporary directory (and any parent directory the writer created) is removed
    and ``out`` is left as it was.

    Entering the writer first removes what killed vlacl processes of this host left next to
    ``out`` (see the module docstring), restoring a previous artifact whose replacement never
    arrived, then checks ``out`` with :func:`check_output_dir`. Constructing it checks nothing:
    commands call :func:`check_output_dir` themselves before their work.

    Example:
        >>> with ArtifactWriter(out, "cl_metrics", command=argv, config_yaml=text, seed=0) as w:
        ...     (w.path / "metrics.json").write_text("{}")
    """

    def __init__(
        self,
        out: Path,
        kind: str,
        *,
        command: Sequence[str],
        config_yaml: str | None,
        seed: int | None,
        overwrite: bool = False,
        extra_libraries: tuple[str, ...] = (),
    ) -> None:
        self.out = Path(os.path.abspath(out))  # noqa: PTH100  # absolute and normalized: no `..`
        self.kind = kind
        self.command = tuple(command)
        self.config_yaml = config_yaml
        self.seed = seed
        self.overwrite = overwrite
        self.extra_libraries = extra_libraries
        self.details: dict[str, Any] = {}
        self._inputs: list[InputRef] = []
        self._synced: dict[str, OutputEntry] = {}
        self._tmp: Path | None = None
        self._created: list[Path] = []

    @property
    def path(self) -> Path:
        """The temporary directory to write the artifact's files into."""
        if self._tmp is None:
            raise RuntimeError("ArtifactWriter.path is only available inside the `with` block")
        return self._tmp

    def __enter__(self) -> ArtifactWriter:
        self._recover()
        check_output_dir(self.out, self.overwrite, kind=self.kind)  # a restored artifact may now be in the way
        self._created = []
        tmp = self._sibling("tmp")
        try:
            self._make_parents()
            try:
                tmp.mkdir()
            except OSError as exc:
                raise _fs_error(self.out, f"creating the temporary directory {tmp}", exc) from exc
        except BaseException:
            self._remove_created_parents()
            raise
        self._tmp = tmp
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tmp = self.path
        self._tmp = None
        if exc is not None:
            self._discard(tmp)
            if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
                name = exc.filename2 or exc.filename  # a copy names its source first, its target second
                what = name if isinstance(name, (str, os.PathLike)) else f"into {tmp}"
                raise _fs_error(self.out, f"writing {os.fspath(what)}", exc) from exc
            return
        try:
            self._commit(tmp)
        except BaseException:
            self._discard(tmp)
            raise

    def _sibling(self, role: SiblingRole) -> Path:
        return self.out.parent / f".{self.out.name}.{role}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"

    def _make_parents(self) -> None:
        """Create the missing parents of ``out``, remembering them so a failed run removes them."""
        missing: list[Path] = []
        parent = self.out.parent
        while not os.path.lexists(parent) and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except OSError as exc:
                if isinstance(exc, FileExistsError) and directory.is_dir():
                    continue  # another process made it meanwhile
                raise _fs_error(self.out, f"creating the directory {directory}", exc, where=directory.parent) from exc
            self._created.append(directory)

    def _remove_created_parents(self) -> None:
        for directory in reversed(self._created):
            try:
                directory.rmdir()
            except OSError:
                break  # not empty: someone else wrote there meanwhile
        self._created = []

    def _discard(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(tmp):
            log.warning("could not remove %s; the next vlacl run writing --out %s removes it", tmp, self.out)
        self._remove_created_parents()

    def _recover(self) -> None:
        """Clean up after vlacl processes of this host that were killed while writing ``out``.

        A ``.tmp`` sibling of a process that no longer runs is an unfinished artifact: removed. An
        ``.old`` sibling is a complete previous artifact: renamed back to ``out`` if nothing took
        its place (the newest one, if there are several), removed otherwise. Siblings of processes
        that still run, or may, and siblings made on other hosts are left alone.
        """
        pattern = re.compile(rf"\.{re.escape(self.out.name)}\.(tmp|old)-{re.escape(_host())}-(\d+)-[0-9a-f]+")
        stale: list[tuple[bool, float, Path, int]] = []
        try:
            with os.scandir(self.out.parent) as listing:
                for entry in listing:
                    match = pattern.fullmatch(entry.name)
                    if match is None or not entry.is_dir(follow_symlinks=False):
                        continue
                    pid = int(match.group(2))
                    if not _pid_alive(pid):
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                        stale.append((match.group(1) == "old", -mtime, Path(entry.path), pid))
        except OSError:
            return  # no parent yet (nothing to clean), or unreadable: creating the artifact reports it
        for is_old, _, path, pid in sorted(stale):  # unfinished ones first, then previous ones newest first
            if is_old and not os.path.lexists(self.out):
                try:
                    path.rename(self.out)
                except OSError as exc:
                    log.warning("could not restore %s from %s (%s)", self.out, path, exc.strerror or exc)
                    continue
                log.warning("restored %s from %s: vlacl process %d was stopped while replacing it", self.out, path, pid)
                continue
            shutil.rmtree(path, ignore_errors=True)
            if os.path.lexists(path):
                log.warning("could not remove %s, left by vlacl process %d that no longer runs", path, pid)
            else:
                log.warning("removed %s, left by vlacl process %d that no longer runs", path, pid)

    def _relative(self, target: Path) -> str:
        """``target`` relative to ``out`` when they share a directory below the filesystem root, else absolute.

        Both are taken as real paths, symlinks resolved, as :func:`~vlacl.artifacts.reader.lineage`
        resolves them when it follows the record. A relative path survives moving the whole tree
        (a run directory with its inputs); a path that would climb to ``/`` would not, so it stays
        absolute.
        """
        real = os.path.realpath(target)
        out = Path(os.path.realpath(self.out.parent)) / self.out.name
        common = Path(os.path.commonpath([real, out]))
        if common == Path(common.anchor):
            return real
        return os.path.relpath(real, out)

    def _check_not_out(self, target: Path) -> None:
        target = Path(target).resolve()
        out = self.out.resolve()
        if target == out or out in target.parents or target in out.parents:
            raise OutputExistsError(
                f"--out {self.out} overlaps the input {target}: writing there would change or destroy the input; "
                "choose an --out outside every input"
            )

    def add_input(self, role: str, artifact: Artifact) -> None:
        """Record an artifact input: its kind, its path relative to ``out`` and its manifest's sha256."""
        self._check_not_out(artifact.path)
        self._inputs.append(
            InputRef(
                role=role,
                kind=artifact.manifest.kind,
                path=self._relative(artifact.path),
                sha256=artifact.manifest_sha256,
            )
        )

    def add_file_input(self, role: str, path: Path, *, sha256: str | None = None) -> None:
        """Record a plain-file input with the sha256 of its content (computed here unless given)."""
        self._check_not_out(path)
        digest = sha256 if sha256 is not None else sha256_file(path)
        self._inputs.append(InputRef(role=role, kind=FILE_KIND, path=self._relative(path), sha256=digest))

    def add_synced_output(self, path: Path, sha256: str, size: int) -> None:
        """Record a file the command wrote under :attr:`path` and has already hashed and synced itself.

        The commit then takes the given sha256 instead of reading the file again (it still checks
        the size); a command that writes large files can hash and sync each one in the background
        while it writes the next.
        """
        rel = Path(path).resolve().relative_to(self.path.resolve()).as_posix()
        self._synced[rel] = OutputEntry(sha256=sha256, bytes=size)

    def _commit(self, tmp: Path) -> None:
        config = tmp / CONFIG_NAME
        if self.config_yaml is not None and config.exists():
            raise ArtifactError(
                f"{CONFIG_NAME} is reserved for the resolved config; a command tried to write it itself"
            )
        if (tmp / MANIFEST_NAME).exists():
            raise ArtifactError(f"{MANIFEST_NAME} is reserved for the manifest; a command tried to write it itself")
        step = f"writing {config}"
        try:
            if self.config_yaml is not None:
                config.write_text(self.config_yaml, encoding="utf-8")  # hashed and synced with the other files
            step = f"listing {tmp}"
            paths = sorted(tmp.rglob("*"))
            files = [p for p in paths if p.is_file()]
            outputs: dict[str, OutputEntry] = {}
            known = {
                f: self._synced[rel]
                for f in files
                if (rel := f.relative_to(tmp).as_posix()) in self._synced
                and f.stat().st_size == self._synced[rel].bytes
            }
            todo = [f for f in files if f not in known]
            # hashlib and file reads release the GIL: large files hash in parallel, one per core.
            with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
                futures = {file: pool.submit(sha256_file_synced, file) for file in todo}
                for file in files:
                    step = f"reading and syncing {file}"
                    if file in known:
                        outputs[file.relative_to(tmp).as_posix()] = known[file]
                        continue
                    digest, size = futures[file].result()
                    outputs[file.relative_to(tmp).as_posix()] = OutputEntry(sha256=digest, bytes=size)
            step = f"writing {tmp / MANIFEST_NAME}"
            config_sha = outputs[CONFIG_NAME].sha256 if self.config_yaml is not None else None
            _write_synced(tmp / MANIFEST_NAME, self._manifest(config_sha, outputs).to_json().encode("utf-8"))
            for directory in [*(p for p in paths if p.is_dir()), tmp]:
                step = f"syncing the directory {directory}"
                _fsync_dir(directory)
        except OSError as exc:
            raise _fs_error(self.out, step, exc) from exc
        self._move_into_place(tmp)

    def _manifest(self, config_sha: str | None, outputs: dict[str, OutputEntry]) -> Manifest:
        from vlacl import __version__

        return Manifest(
            kind=self.kind,
            vlacl_version=__version__,
            created_utc=utc_now(),
            command=self.command,
            config_sha256=config_sha,
            seed=self.seed,
            inputs=tuple(self._inputs),
            outputs=outputs,
            libraries=library_versions(self.extra_libraries),
            details=self.details,
        )

    def _move_into_place(self, tmp: Path) -> None:
        """Rename ``tmp`` to ``out``, moving a previous artifact aside first and back on any failure."""
        check_output_dir(self.out, self.overwrite, kind=self.kind)
        old = self._sibling("old") if os.path.lexists(self.out) else None
        step = f"renaming {tmp} to {self.out}"
        try:
            if old is not None:
                step = f"moving the previous {self.out} aside to {old}"
                self.out.rename(old)
                step = f"renaming {tmp} to {self.out}"
            tmp.rename(self.out)
        except BaseException as exc:  # an OSError, or Terminated / KeyboardInterrupt between the renames
            if old is not None and os.path.lexists(old) and os.path.lexists(tmp):  # moved aside, not replaced
                try:
                    old.rename(self.out)
                except OSError:
                    reason = (exc.strerror or exc) if isinstance(exc, OSError) else (str(exc) or type(exc).__name__)
                    raise ArtifactError(
                        f"cannot write --out {self.out}: renaming {tmp} to it failed ({reason}), and so did "
                        f"putting the previous artifact back; it is kept at {old}: rename it to {self.out} "
                        "(the next vlacl run writing this --out does it itself)"
                    ) from exc
            if isinstance(exc, OSError):
                raise _fs_error(self.out, step, exc) from exc
            raise
        try:
            _fsync_dir(self.out.parent)
        except OSError as exc:
            log.warning(
                "%s is complete, but syncing %s failed (%s): it may not survive a power loss",
                self.out,
                self.out.parent,
                exc.strerror or exc,
            )
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            if os.path.lexists(old):
                log.warning("could not remove %s, the replaced artifact; the next vlacl run writing there does", old)
