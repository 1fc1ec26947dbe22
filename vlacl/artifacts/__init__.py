"""The artifact contract: file names, manifests, atomic directory commits, reading and lineage."""

from vlacl.artifacts.manifest import InputRef, Manifest, OutputEntry, read_manifest
from vlacl.artifacts.names import MANIFEST_NAME, PRODUCERS, SCHEMA_VERSION, producer_of
from vlacl.artifacts.reader import Artifact, LineageNode, lineage, open_artifact, verify_outputs
from vlacl.artifacts.writer import ArtifactWriter, check_output_dir

__all__ = [
    "MANIFEST_NAME",
    "PRODUCERS",
    "SCHEMA_VERSION",
    "Artifact",
    "ArtifactWriter",
    "InputRef",
    "LineageNode",
    "Manifest",
    "OutputEntry",
    "check_output_dir",
    "lineage",
    "open_artifact",
    "producer_of",
    "read_manifest",
    "verify_outputs",
]
