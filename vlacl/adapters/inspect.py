"""``inspect-ckpt`` as a library call: what an artifact is, where it came from and what it holds.

Works on any vlacl artifact, and on a plain PEFT adapter directory. Reads manifests, configs and
safetensors headers only, never weights, so it answers at once for a checkpoint of any size; the
lineage walk hashes plain-file inputs (a base model's shards) to tell whether they changed, and
``verify`` hashes the artifact's own files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from vlacl.artifacts.names import ADAPTER_CONFIG_NAME, MANIFEST_NAME, producer_of
from vlacl.artifacts.reader import lineage, open_artifact, verify_outputs

from .peft_files import read_layout
from .sources import open_source

TRAINING_KEYS: Final = ("steps", "final_loss", "val_loss")
"""Training summary fields of a task checkpoint's manifest details."""


@dataclass(frozen=True)
class InspectReport:
    """Everything ``inspect-ckpt`` reports about one directory.

    Attributes:
        path: The directory.
        kind: The artifact kind, or ``peft_adapter`` for a plain PEFT directory.
        manifest: The manifest's general fields (version, time, command, seed, libraries); empty
            for a plain PEFT directory.
        lineage: The inputs, walked recursively: depth, role, kind, path and status.
        adapters: The adapter stack (in order) with ranks, alpha, targets and parameter counts.
        stats_fingerprint: The fingerprint of the normalization stats, where the artifact has one.
        training: Steps, final and validation loss of a task checkpoint.
        files: File name -> bytes.
        details: The manifest's kind-specific fields, as recorded.
        problems: With verification: every file that is missing, changed or unlisted.
    """

    path: Path
    kind: str
    manifest: dict[str, Any]
    lineage: list[dict[str, Any]]
    adapters: list[dict[str, Any]]
    stats_fingerprint: str | None
    training: dict[str, Any] | None
    files: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes of all files."""
        return sum(self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``--json``."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "manifest": self.manifest,
            "lineage": self.lineage,
            "adapters": self.adapters,
            "stats_fingerprint": self.stats_fingerprint,
            "training": self.training,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "details": self.details,
            "verified": None if self.problems is None else not self.problems,
            "problems": self.problems,
        }


def inspect_artifact(path: Path | str, *, verify: bool = False, walk_lineage: bool = True) -> InspectReport:
    """Report on an artifact directory (or a plain PEFT adapter directory).

    Args:
        path: The directory.
        verify: Also hash every file and compare with the manifest.
        walk_lineage: Walk the inputs' manifests (and hash plain-file inputs).

    Raises:
        ArtifactError: ``path`` is missing, neither an artifact nor a PEFT adapter directory, or its
            manifest is damaged.
        InputFormatError: Its adapters cannot be read.
    """
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file() and (path / ADAPTER_CONFIG_NAME).is_file():
        layout = read_layout(path)
        files = {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
        return InspectReport(
            path=path,
            kind="peft_adapter",
            manifest={},
            lineage=[],
            adapters=[layout.summary()],
            stats_fingerprint=None,
            training=None,
            files=files,
        )
    artifact = open_artifact(path)
    manifest = artifact.manifest
    details = dict(manifest.details)
    if artifact.kind in ("task_checkpoint", "composed_adapter"):
        adapters = open_source(path).describe()["adapters"]
    elif artifact.kind == "merged_model":
        adapters = [
            {"source": source.get("label"), **adapter}
            for source in details.get("adapters", [])
            if isinstance(source, dict)
            for adapter in source.get("adapters", [])
            if isinstance(adapter, dict)
        ]
    else:
        adapters = []
    training: dict[str, Any] | None = {k: details[k] for k in TRAINING_KEYS if k in details} or None
    fingerprint = details.get("stats_fingerprint")
    nodes = lineage(artifact) if walk_lineage else []
    problems = verify_outputs(artifact) if verify else None
    return InspectReport(
        path=path,
        kind=artifact.kind,
        manifest={
            "schema_version": manifest.schema_version,
            "vlacl_version": manifest.vlacl_version,
            "created_utc": manifest.created_utc,
            "producer": producer_of(artifact.kind),
            "command": list(manifest.command),
            "seed": manifest.seed,
            "config_sha256": manifest.config_sha256,
            "libraries": dict(manifest.libraries),
        },
        lineage=[
            {"depth": n.depth, "role": n.role, "kind": n.kind, "path": str(n.path), "status": n.status} for n in nodes
        ],
        adapters=adapters,
        stats_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
        training=training,
        files={name: entry.bytes for name, entry in sorted(manifest.outputs.items())},
        details=details,
        problems=problems,
    )
