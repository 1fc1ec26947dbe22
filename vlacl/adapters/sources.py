"""What a user may pass as an adapter: a PEFT directory, a composed adapter, or a task checkpoint's stack.

- A plain PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), for
  example ``runs/task3/adapters/task3`` or one saved by any PEFT training script.
- A ``composed_adapter`` artifact: a PEFT directory with a vlacl manifest.
- A ``task_checkpoint`` artifact: its whole adapter stack, ``adapters/<name>/`` in the order of
  the manifest's ``details["adapter_stack"]``, with the action head, the stats and the key map the
  policy was trained with. In ``per-task`` mode (``details["adapter_mode"]``) only the adapter of
  the checkpoint's own task counts (``details["active_adapter"]``, else the last of the stack):
  the others belong to earlier tasks and are never active together with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlacl.artifacts.hashing import sha256_file
from vlacl.artifacts.names import (
    ACTION_HEAD_NAME,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    BACKBONE_WEIGHTS_NAME,
    FILE_KIND,
    KEYMAP_NAME,
    MANIFEST_NAME,
    STATS_NAME,
    producer_of,
)
from vlacl.artifacts.reader import Artifact, open_artifact
from vlacl.errors import ArtifactError, InputFormatError

from .peft_files import AdapterLayout, read_layout

if TYPE_CHECKING:
    from vlacl.artifacts.writer import ArtifactWriter

ADAPTER_KINDS = ("task_checkpoint", "composed_adapter")
"""Artifact kinds that hold adapters."""

PER_TASK_MODE = "per-task"
"""Adapter mode whose stack holds one adapter per task with only the checkpoint's own task's active."""

POLICY_FILES = (ACTION_HEAD_NAME, STATS_NAME, KEYMAP_NAME)
"""Files of a task checkpoint that, with merged weights, make a complete policy (the key map is optional)."""


@dataclass(frozen=True)
class AdapterSource:
    """One adapter argument, opened and validated.

    Attributes:
        label: Its name in reports and input roles: the artifact's or the directory's name.
        path: The path as given.
        artifact: The artifact, for a task checkpoint or a composed adapter; ``None`` for a plain
            PEFT directory.
        stack: The adapters it contributes, in stacking order (one, except for a task checkpoint).
    """

    label: str
    path: Path
    artifact: Artifact | None
    stack: tuple[AdapterLayout, ...]

    @property
    def is_checkpoint(self) -> bool:
        """Whether it is a task checkpoint (which carries a policy's action head and stats)."""
        return self.artifact is not None and self.artifact.kind == "task_checkpoint"

    def policy_files(self) -> dict[str, Path]:
        """The action head, stats and key map of a task checkpoint (those it has); empty otherwise."""
        if self.artifact is None or not self.is_checkpoint:
            return {}
        return {name: self.artifact.file(name) for name in POLICY_FILES if self.artifact.has_file(name)}

    def input_records(self) -> list[tuple[str, str, Path]]:
        """``(role, kind, path)`` of what the source is recorded as: the artifact, or the PEFT files."""
        role = f"adapter:{self.label}"
        if self.artifact is not None:
            return [(role, self.artifact.kind, self.artifact.path)]
        layout = self.stack[0]
        return [(role, FILE_KIND, layout.config_file), (role, FILE_KIND, layout.weights_file)]

    def expected_hashes(self) -> list[tuple[str, str, str]]:
        """``(role, kind, sha256)`` as :meth:`record` would write them into a manifest."""
        if self.artifact is not None:
            return [(f"adapter:{self.label}", self.artifact.kind, self.artifact.manifest_sha256)]
        return [(role, kind, sha256_file(path)) for role, kind, path in self.input_records()]

    def record(self, writer: ArtifactWriter) -> None:
        """Record the source as an input of the artifact ``writer`` builds."""
        if self.artifact is not None:
            writer.add_input(f"adapter:{self.label}", self.artifact)
            return
        for role, _, path in self.input_records():
            writer.add_file_input(role, path)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: what it is and its adapters."""
        return {
            "label": self.label,
            "path": str(self.path),
            "kind": self.artifact.kind if self.artifact is not None else "peft_adapter",
            "adapters": [layout.summary() for layout in self.stack],
        }


def open_source(path: Path | str) -> AdapterSource:
    """Open one adapter argument.

    Raises:
        InputFormatError: Neither a PEFT adapter directory nor an adapter artifact, or an adapter
            vlacl cannot merge (see :func:`~vlacl.adapters.peft_files.read_layout`).
        ArtifactError: An artifact of another kind, or a task checkpoint without a valid stack.
    """
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file"
        raise InputFormatError(
            f"adapter {path} {what}: pass a PEFT adapter directory, a task_checkpoint or a composed_adapter artifact"
        )
    label = path.resolve().name or "adapter"
    if (path / MANIFEST_NAME).exists():
        artifact = open_artifact(path, ADAPTER_KINDS)
        if artifact.kind == "composed_adapter":
            artifact.file(ADAPTER_CONFIG_NAME)
            artifact.file(ADAPTER_WEIGHTS_NAME)
            return AdapterSource(label, path, artifact, (read_layout(path, label),))
        return AdapterSource(label, path, artifact, _checkpoint_stack(artifact))
    if not (path / ADAPTER_CONFIG_NAME).exists():
        raise InputFormatError(
            f"adapter {path} is neither a PEFT adapter directory (no {ADAPTER_CONFIG_NAME}) nor a vlacl artifact "
            f"(no {MANIFEST_NAME}): pass a directory written by PEFT's save_pretrained, a task_checkpoint or a "
            "composed_adapter artifact"
        )
    return AdapterSource(label, path, None, (read_layout(path, label),))


def _checkpoint_stack(artifact: Artifact) -> tuple[AdapterLayout, ...]:
    """The adapters of a task checkpoint, in the order of ``details["adapter_stack"]``."""
    names = artifact.manifest.details.get("adapter_stack")
    finetune = artifact.manifest.details.get("finetune", "lora")
    if finetune != "lora" and not names:
        raise InputFormatError(
            f"{artifact.path} is a task_checkpoint trained with --finetune {finetune}: it has no LoRA adapter "
            f"(its changed backbone weights are in {BACKBONE_WEIGHTS_NAME}), so there is nothing to merge or compose; "
            "evaluate it as it is, or train with --finetune lora"
        )
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ArtifactError(
            f"{artifact.path} is a task_checkpoint whose manifest has no adapter stack (details.adapter_stack "
            f"should list adapter names, got {names!r}): the artifact is damaged; recreate it with "
            f"`{producer_of('task_checkpoint')}`"
        )
    if len(set(names)) != len(names):
        raise ArtifactError(f"{artifact.path}: details.adapter_stack names an adapter twice ({names}): recreate it")
    if artifact.manifest.details.get("adapter_mode") == PER_TASK_MODE:
        names = [_active_adapter(artifact, names)]
    stack = []
    for name in names:
        rel = f"{ADAPTERS_DIR}/{name}"
        artifact.file(f"{rel}/{ADAPTER_CONFIG_NAME}")
        artifact.file(f"{rel}/{ADAPTER_WEIGHTS_NAME}")
        stack.append(read_layout(artifact.path / rel, name))
    return tuple(stack)


def _active_adapter(artifact: Artifact, names: list[str]) -> str:
    """The adapter of the checkpoint's own task in a per-task stack: ``details["active_adapter"]``, else the last."""
    active = artifact.manifest.details.get("active_adapter", names[-1])
    if active not in names:
        raise ArtifactError(
            f"{artifact.path}: details.active_adapter {active!r} is not in the adapter stack {names}: the artifact "
            f"is damaged; recreate it with `{producer_of('task_checkpoint')}`"
        )
    return str(active)


def open_sources(paths: Sequence[Path | str]) -> list[AdapterSource]:
    """Open every adapter argument; a label met twice gets a ``-2``, ``-3``, ... suffix.

    Raises:
        InputFormatError: No adapter, or one that cannot be read or merged.
    """
    if not paths:
        raise InputFormatError("no adapters given: pass one or more PEFT adapter directories or task checkpoints")
    sources = []
    seen: set[str] = set()
    for path in paths:
        source = open_source(path)
        label, n = source.label, 1
        while label in seen:
            n += 1
            label = f"{source.label}-{n}"
        seen.add(label)
        sources.append(dataclasses.replace(source, label=label))
    return sources
