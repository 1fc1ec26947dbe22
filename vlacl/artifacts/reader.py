"""Opening artifacts: refuse what is missing, incomplete or of the wrong kind; verify; walk lineage."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlacl.artifacts.hashing import sha256_file
from vlacl.artifacts.manifest import Manifest, read_manifest
from vlacl.artifacts.names import FILE_KIND, MANIFEST_NAME, describe_kinds, producer_of
from vlacl.errors import ArtifactError


@dataclass(frozen=True)
class Artifact:
    """An opened artifact directory and its manifest."""

    path: Path
    manifest: Manifest
    manifest_sha256: str

    @property
    def kind(self) -> str:
        """The artifact kind from the manifest."""
        return self.manifest.kind

    def file(self, name: str) -> Path:
        """Return the path of the artifact's file ``name``; it must be listed in the manifest and exist.

        Raises:
            ArtifactError: The manifest does not list it, or it was deleted since.
        """
        path = self.path / name
        if name not in self.manifest.outputs:
            raise ArtifactError(
                f"{self.path} ({self.kind}) has no file {name}: it is not part of this artifact; "
                f"recreate it with `{producer_of(self.kind)}`"
            )
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing: the artifact was damaged; recreate it")
        return path

    def has_file(self, name: str) -> bool:
        """Whether the manifest lists ``name`` among the artifact's files."""
        return name in self.manifest.outputs


def open_artifact(path: Path | str, kind: str | Sequence[str] | None = None, *, verify: bool = False) -> Artifact:
    """Open the artifact at ``path`` and check its kind.

    Args:
        path: The artifact directory.
        kind: The kind (or kinds) the caller accepts; ``None`` accepts any.
        verify: Also check every output file's size and sha256 against the manifest.

    Raises:
        ArtifactError: ``path`` is missing or not a directory, has no manifest (incomplete), is of
            another kind, or fails verification. Each message names the command that writes the
            expected kind.
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind or ())
    wanted = describe_kinds(kinds)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist: expected {wanted}")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file, not an artifact directory: expected {wanted}")
    manifest = read_manifest(path, kinds)
    if kinds and manifest.kind not in kinds:
        raise ArtifactError(
            f"{path} is a {manifest.kind} artifact (written by `{producer_of(manifest.kind)}`), but this needs {wanted}"
        )
    artifact = Artifact(path=path, manifest=manifest, manifest_sha256=sha256_file(path / MANIFEST_NAME))
    if verify:
        problems = verify_outputs(artifact)
        if problems:
            raise ArtifactError(
                f"{path} failed verification ({len(problems)} problem(s), first: {problems[0]}): "
                f"the artifact changed after it was written; recreate it with `{producer_of(manifest.kind)}`"
            )
    return artifact


def verify_outputs(artifact: Artifact) -> list[str]:
    """Compare every file listed in the manifest with its recorded size and sha256.

    Returns:
        One line per problem (missing file, size or hash mismatch, unlisted file); empty if intact.
    """
    problems: list[str] = []
    for name, entry in sorted(artifact.manifest.outputs.items()):
        file = artifact.path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != entry.bytes:
            problems.append(f"{name}: {file.stat().st_size} bytes, manifest says {entry.bytes}")
        elif sha256_file(file) != entry.sha256:
            problems.append(f"{name}: sha256 differs from the manifest")
    listed = set(artifact.manifest.outputs) | {MANIFEST_NAME}
    for file in sorted(p for p in artifact.path.rglob("*") if p.is_file()):
        rel = file.relative_to(artifact.path).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


LineageStatus = Literal["ok", "missing", "changed", "incomplete"]


@dataclass(frozen=True)
class LineageNode:
    """One input met while walking an artifact's lineage.

    Attributes:
        depth: 1 for a direct input, 2 for an input of an input, ...
        role: The role under which the parent recorded it.
        kind: The recorded kind.
        path: The resolved path (relative paths are taken from the parent's directory).
        status: ``ok`` if it exists and its manifest (or file) hash matches the record, ``changed``
            if the hash differs, ``missing`` if nothing is there, ``incomplete`` if a directory
            lacks its manifest.
    """

    depth: int
    role: str
    kind: str
    path: Path
    status: LineageStatus


def lineage(artifact: Artifact, max_depth: int = 32) -> list[LineageNode]:
    """Walk ``inputs`` recursively, depth first, and report where each input is and whether it changed."""
    return list(_walk(artifact, 1, max_depth, seen=set()))


def _walk(artifact: Artifact, depth: int, max_depth: int, seen: set[Path]) -> Iterator[LineageNode]:
    if depth > max_depth:
        return
    for ref in artifact.manifest.inputs:
        target = Path(ref.path)
        if not target.is_absolute():
            target = (artifact.path / target).resolve()
        if ref.kind == FILE_KIND:
            if not target.is_file():
                yield LineageNode(depth, ref.role, ref.kind, target, "missing")
            else:
                status: LineageStatus = "ok" if sha256_file(target) == ref.sha256 else "changed"
                yield LineageNode(depth, ref.role, ref.kind, target, status)
            continue
        if not target.is_dir():
            yield LineageNode(depth, ref.role, ref.kind, target, "missing")
            continue
        try:
            child = open_artifact(target)
        except ArtifactError:
            yield LineageNode(depth, ref.role, ref.kind, target, "incomplete")
            continue
        status = "ok" if child.manifest_sha256 == ref.sha256 else "changed"
        yield LineageNode(depth, ref.role, ref.kind, target, status)
        if target not in seen:
            seen.add(target)
            yield from _walk(child, depth + 1, max_depth, seen)
