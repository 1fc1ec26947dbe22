"""The manifest, ``vlacl_manifest.json``: what an artifact is, how it was made and what it holds.

It is written last into an artifact directory; a directory without it is incomplete. The layout
is versioned by ``schema_version``: a newer version than this vlacl knows is refused, keys this
version does not know are kept out and logged, so an older vlacl can still read a newer manifest
of the same schema.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from vlacl.artifacts.names import MANIFEST_NAME, SCHEMA_VERSION, describe_kinds
from vlacl.errors import ArtifactError

log = logging.getLogger(__name__)

TRACKED_LIBRARIES: tuple[str, ...] = ("torch", "transformers", "peft", "accelerate")
"""Libraries whose versions every manifest records (a simulator is added by the commands that use one)."""


@dataclass(frozen=True)
class InputRef:
    """One input of an artifact: enough to find it again and to tell whether it changed.

    Attributes:
        role: What the input was for, e.g. ``run:seq``, ``prev``, ``stats``.
        kind: The input's artifact kind, or ``file`` for a plain file.
        path: Path to the input, relative to the artifact directory where possible.
        sha256: sha256 of the input's manifest (an artifact) or of the file itself (kind ``file``).
    """

    role: str
    kind: str
    path: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        """Return the JSON form."""
        return {"role": self.role, "kind": self.kind, "path": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class OutputEntry:
    """A file of an artifact with its sha256 and size in bytes."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """The parsed content of ``vlacl_manifest.json``."""

    kind: str
    vlacl_version: str
    created_utc: str
    command: tuple[str, ...]
    config_sha256: str | None
    seed: int | None
    inputs: tuple[InputRef, ...] = ()
    outputs: Mapping[str, OutputEntry] = field(default_factory=dict)
    libraries: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (keys are sorted when written)."""
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "vlacl_version": self.vlacl_version,
            "created_utc": self.created_utc,
            "command": list(self.command),
            "config_sha256": self.config_sha256,
            "seed": self.seed,
            "inputs": [i.to_dict() for i in self.inputs],
            "outputs": {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in self.outputs.items()},
            "libraries": dict(self.libraries),
            "details": dict(self.details),
        }

    def to_json(self) -> str:
        """Serialize as the manifest file's text: ``indent=2, sort_keys=True`` and a final newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path) -> Manifest:
        """Parse a manifest; ``source`` names the file in error messages.

        Raises:
            ArtifactError: A newer schema version, or a missing or malformed required key.
        """
        schema = data.get("schema_version")
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise ArtifactError(f"{source} has no valid schema_version (got {schema!r}): it is not a vlacl manifest")
        if schema > SCHEMA_VERSION:
            raise ArtifactError(
                f"{source} uses manifest schema {schema}, written by vlacl {data.get('vlacl_version', '?')}; "
                f"this vlacl reads schema {SCHEMA_VERSION} and older: upgrade vlacl"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("%s has keys this vlacl does not know (ignored): %s", source, ", ".join(unknown))
        try:
            return cls(
                schema_version=schema,
                kind=_req(data, "kind", str, source),
                vlacl_version=_req(data, "vlacl_version", str, source),
                created_utc=_req(data, "created_utc", str, source),
                command=tuple(_req(data, "command", list, source)),
                config_sha256=data.get("config_sha256"),
                seed=data.get("seed"),
                inputs=tuple(
                    InputRef(role=str(i["role"]), kind=str(i["kind"]), path=str(i["path"]), sha256=str(i["sha256"]))
                    for i in _req(data, "inputs", list, source)
                ),
                outputs={
                    str(k): OutputEntry(sha256=str(v["sha256"]), bytes=int(v["bytes"]))
                    for k, v in _req(data, "outputs", dict, source).items()
                },
                libraries={str(k): str(v) for k, v in data.get("libraries", {}).items()},
                details=dict(data.get("details", {})),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{source} is malformed ({exc!r}): the artifact is damaged; recreate it") from None


def _req(data: Mapping[str, Any], key: str, tp: type, source: Path) -> Any:
    if key not in data:
        raise ArtifactError(f"{source} lacks the required key `{key}`: the artifact is damaged; recreate it")
    value = data[key]
    if not isinstance(value, tp):
        raise ArtifactError(
            f"{source}: key `{key}` should be a {tp.__name__}, got {type(value).__name__}: "
            "the artifact is damaged; recreate it"
        )
    return value


def load_json(path: Path) -> Any:
    """Parse the UTF-8 JSON file ``path``; the one way vlacl reads a manifest.

    Raises:
        OSError: The file cannot be read (``FileNotFoundError`` if it does not exist).
        ValueError: The file is not UTF-8 text, not valid JSON, nested too deeply for Python's
            parser, or holds an integer too long to convert. The message completes
            "``path`` is ...", e.g. ``not valid JSON (line 3)``.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON (line {exc.lineno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    except ValueError:  # an integer literal longer than sys.get_int_max_str_digits()
        raise ValueError("JSON holding an integer too long to read") from None


def read_manifest(directory: Path, expected_kinds: tuple[str, ...] = ()) -> Manifest:
    """Read and parse ``<directory>/vlacl_manifest.json``.

    Raises:
        ArtifactError: The file is missing, unreadable, not JSON or not a valid manifest. The
            message names the commands that write artifacts of ``expected_kinds``.
    """
    path = Path(directory) / MANIFEST_NAME
    make = f"; expected {describe_kinds(expected_kinds)}" if expected_kinds else ""
    try:
        data = load_json(path)
    except FileNotFoundError:
        raise ArtifactError(
            f"{directory} is not a complete vlacl artifact: {MANIFEST_NAME} is missing (the command that "
            f"wrote it crashed or is still running, or this is not an artifact directory){make}"
        ) from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ArtifactError(f"{path} is {exc}: the artifact is damaged{make}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object: the artifact is damaged{make}")
    return Manifest.from_dict(data, path)


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the tracked libraries plus ``extra`` ones; absent libraries are left out.

    Reads package metadata only, so nothing heavy is imported.
    """
    found: dict[str, str] = {}
    for name in (*TRACKED_LIBRARIES, *extra):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a ``Z`` suffix, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
