"""Atomic creation of an artifact directory.

An artifact is built in a hidden temporary sibling of ``--out`` and renamed into place only when
everything, the manifest last, is written. A crash leaves at most a hidden ``.<name>.tmp-*``
directory without a manifest, never a directory that looks complete. An existing ``--out`` is
replaced only with ``overwrite`` and only when it is itself a vlacl artifact (or empty), so a
mistyped ``--out`` never deletes a user's files.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from vlacl.artifacts.hashing import sha256_bytes, sha256_file
from vlacl.artifacts.manifest import InputRef, Manifest, OutputEntry, library_versions, utc_now
from vlacl.artifacts.names import CONFIG_NAME, FILE_KIND, MANIFEST_NAME
from vlacl.artifacts.reader import Artifact
from vlacl.errors import ArtifactError, OutputExistsError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that exists and may not be replaced; call it before doing the work.

    Raises:
        OutputExistsError: ``out`` is a file; or a non-empty directory without ``overwrite``; or a
            non-empty directory that is not a vlacl artifact (never replaced, even with ``overwrite``).
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"--out {out} is an existing file: choose a directory path that does not exist")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST_NAME).is_file():
        raise OutputExistsError(
            f"--out {out} is a non-empty directory that is not a vlacl artifact (no {MANIFEST_NAME}); "
            "vlacl never replaces it, even with --overwrite: choose another --out or empty it yourself"
        )
    if not overwrite:
        raise OutputExistsError(
            f"--out {out} already holds an artifact: pass --overwrite to replace it, or choose another --out"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
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
    are written and the directory is renamed to ``out``; on an exception the temporary directory
    is removed and ``out`` is left as it was.

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
        self._tmp: Path | None = None
        check_output_dir(self.out, overwrite)

    @property
    def path(self) -> Path:
        """The temporary directory to write the artifact's files into."""
        if self._tmp is None:
            raise RuntimeError("ArtifactWriter.path is only available inside the `with` block")
        return self._tmp

    def __enter__(self) -> ArtifactWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._tmp.mkdir()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tmp = self.path
        self._tmp = None
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            self._commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _relative(self, target: Path) -> str:
        """``target`` relative to ``out`` when they share a directory below the filesystem root, else absolute.

        A relative path survives moving the whole tree (a run directory with its inputs); a path
        that would climb to ``/`` would not, so it stays absolute.
        """
        target = Path(target).absolute()
        common = Path(os.path.commonpath([target, self.out]))
        if common == Path(common.anchor):
            return str(target)
        return os.path.relpath(target, self.out)

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

    def add_file_input(self, role: str, path: Path) -> None:
        """Record a plain-file input with the sha256 of its content."""
        self._check_not_out(path)
        self._inputs.append(InputRef(role=role, kind=FILE_KIND, path=self._relative(path), sha256=sha256_file(path)))

    def _commit(self, tmp: Path) -> None:
        config_sha = None
        if self.config_yaml is not None:
            if (tmp / CONFIG_NAME).exists():
                raise ArtifactError(
                    f"{CONFIG_NAME} is reserved for the resolved config; a command tried to write it itself"
                )
            data = self.config_yaml.encode("utf-8")
            _write_synced(tmp / CONFIG_NAME, data)
            config_sha = sha256_bytes(data)
        outputs: dict[str, OutputEntry] = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = file.relative_to(tmp).as_posix()
            if rel == MANIFEST_NAME:
                raise ArtifactError(f"{MANIFEST_NAME} is reserved for the manifest; a command tried to write it itself")
            outputs[rel] = OutputEntry(sha256=sha256_file(file), bytes=file.stat().st_size)
        from vlacl import __version__

        manifest = Manifest(
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
        partial = tmp / (MANIFEST_NAME + ".partial")
        _write_synced(partial, manifest.to_json().encode("utf-8"))
        partial.replace(tmp / MANIFEST_NAME)
        _fsync_dir(tmp)
        self._move_into_place(tmp)

    def _move_into_place(self, tmp: Path) -> None:
        check_output_dir(self.out, self.overwrite)
        old: Path | None = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            self.out.rename(old)
        try:
            tmp.rename(self.out)
        except OSError:
            if old is not None:
                old.rename(self.out)
            raise
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
