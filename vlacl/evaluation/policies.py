"""The checkpoints of a stream, in training order, and one base model their policies are swapped onto.

:func:`find_checkpoints` turns the paths a user gives (task checkpoints, merged policies, or a
directory holding a run's checkpoints) into checkpoint references in training order.
:class:`PolicyBank` loads the base model once and, for each checkpoint in turn, takes the previous
checkpoint's adapters off and puts the next one's on, with its head: nothing is merged to disk.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlacl.artifacts.manifest import read_manifest
from vlacl.artifacts.names import MANIFEST_NAME, STATS_NAME
from vlacl.artifacts.reader import open_artifact
from vlacl.errors import ArtifactError, ConfigError
from vlacl.training.policy_io import POLICY_KINDS, LoadedPolicy, model_source, policy_details

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointRef:
    """One policy to evaluate.

    Attributes:
        path: The artifact directory.
        kind: ``task_checkpoint`` or ``merged_model``.
        manifest_sha256: sha256 of its manifest (identifies exactly what was evaluated).
        details: The policy's manifest details (a merged model's ``policy`` entry).
        base_model: The base model its policy loads (a merged model is its own).
        prev_sha256: sha256 of the previous checkpoint's manifest (``--prev``), if any.
    """

    path: Path
    kind: str
    manifest_sha256: str
    details: Mapping[str, Any]
    base_model: str
    prev_sha256: str | None

    @property
    def task_index(self) -> int:
        """The trained task's position in its training stream."""
        return int(self.details.get("task_index", 0))

    @property
    def task_key(self) -> str:
        """The trained task's key in its training stream (a task_index as text, or a sub-dataset name)."""
        return str(self.details.get("task_key", ""))

    @property
    def task_name(self) -> str:
        """The trained task's instruction (or key)."""
        return str(self.details.get("task_name", ""))

    @property
    def stats_fingerprint(self) -> str:
        """Fingerprint of the stats the policy was trained with."""
        return str(self.details.get("stats_fingerprint", ""))

    @property
    def changes_backbone(self) -> bool:
        """Whether the checkpoint carries backbone weights of its own (full or last-N fine-tuning)."""
        return self.kind == "task_checkpoint" and self.details.get("finetune", "lora") in ("full", "last-n")


def _ref(path: Path) -> CheckpointRef:
    artifact = open_artifact(path, POLICY_KINDS)
    details = policy_details(dict(artifact.manifest.details), artifact.kind, path)
    prev = next((i.sha256 for i in artifact.manifest.inputs if i.role == "prev"), None)
    return CheckpointRef(
        path=path,
        kind=artifact.kind,
        manifest_sha256=artifact.manifest_sha256,
        details=details,
        base_model=model_source(details, artifact.kind, path),
        prev_sha256=prev,
    )


def _children(directory: Path) -> list[Path]:
    """The task checkpoints directly under ``directory``."""
    found: list[Path] = []
    for child in sorted(directory.iterdir()):
        manifest = child / MANIFEST_NAME
        if child.name.startswith("."):  # an interrupted write's temporary or backup sibling, never a result
            continue
        if child.is_dir() and manifest.is_file():
            try:
                kind = read_manifest(child).kind
            except ArtifactError:
                continue
            if kind == "task_checkpoint":
                found.append(child)
    return found


def find_checkpoints(paths: Sequence[Path]) -> list[CheckpointRef]:
    """The checkpoints to evaluate, in training order.

    A path is a task checkpoint, a merged model of one, or a directory holding a run's task
    checkpoints (ordered by their task index). Paths given one by one keep the order given.

    Raises:
        ConfigError: No checkpoint found, two checkpoints of one directory train the same task, or a
            path is neither.
        ArtifactError: An incomplete artifact.
    """
    if not paths:
        raise ConfigError("no checkpoint given: pass task checkpoints in training order, or a directory holding them")
    refs: list[CheckpointRef] = []
    for path in paths:
        if (path / MANIFEST_NAME).is_file():
            refs.append(_ref(path))
            continue
        if not path.is_dir():
            raise ConfigError(f"{path} is not a task checkpoint or a directory: check the path")
        children = [_ref(c) for c in _children(path)]
        if not children:
            raise ConfigError(
                f"{path} holds no task checkpoint (directories with a task_checkpoint manifest): pass the run "
                "directory that `vlacl train-task --out` wrote into, or the checkpoints themselves"
            )
        children.sort(key=lambda r: r.task_index)
        positions = [r.task_index for r in children]
        if len(set(positions)) != len(positions):
            twice = sorted({p for p in positions if positions.count(p) > 1})
            raise ConfigError(
                f"{path} holds several checkpoints of task position(s) {twice} (several runs?): pass the checkpoints "
                "of one run in training order"
            )
        refs.extend(children)
    seen: dict[Path, int] = {}
    for i, ref in enumerate(refs):
        resolved = ref.path.resolve()
        if resolved in seen:
            raise ConfigError(f"checkpoint {ref.path} is given twice (positions {seen[resolved]} and {i})")
        seen[resolved] = i
    for before, after in itertools.pairwise(refs):
        if after.task_index <= before.task_index:
            raise ConfigError(
                f"{after.path} trained task position {after.task_index}, {before.path} before it position "
                f"{before.task_index}: pass the checkpoints in training order (or the run directory)"
            )
        if after.prev_sha256 is not None and after.prev_sha256 != before.manifest_sha256:
            log.warning(
                "%s was not trained from %s (its --prev differs): the rows are not one training chain",
                after.path,
                before.path,
            )
    return refs


class PolicyBank:
    """Loads policies of checkpoints onto one base model, reused between checkpoints of the same base.

    Args:
        device: Where the policies run.
        stats_fingerprint: The fingerprint every checkpoint's stats must have (from ``--stats``), or
            ``None`` to use each checkpoint's own stats as they are.
    """

    def __init__(self, device: torch.device, stats_fingerprint: str | None = None) -> None:
        self.device = device
        self.stats_fingerprint = stats_fingerprint
        self._loaded: LoadedPolicy | None = None
        self._ref: CheckpointRef | None = None
        self._verified: set[Path] = set()
        self.base_loads = 0
        """How many times a base model was read from disk (for tests and logs)."""

    def get(self, ref: CheckpointRef) -> LoadedPolicy:
        """The policy of ``ref`` in eval mode on the device (the current one when it is already loaded).

        Raises:
            ArtifactError: The checkpoint's stats do not match its manifest or ``--stats``.
        """
        if self._ref is not None and self._ref.path == ref.path and self._loaded is not None:
            return self._loaded
        from vlacl.training.policy_io import load_policy, release_backbone

        verified = ref.path in self._verified  # groups run task by task: a checkpoint comes back once per task
        if not verified:
            check_stats(ref, self.stats_fingerprint)
        backbone = None
        previous, previous_ref = self._loaded, self._ref
        self._loaded, self._ref = None, None
        if previous is not None and previous_ref is not None and _shares_base(previous_ref, ref):
            backbone = release_backbone(previous)
        del previous
        if backbone is None:
            self.base_loads += 1
        loaded = load_policy(ref.path, device=self.device, backbone=backbone, verify=not verified)
        self._verified.add(ref.path)
        self._loaded, self._ref = loaded, ref
        log.debug("policy of %s loaded (%s base model)", ref.path, "a fresh" if backbone is None else "the same")
        return loaded


def _shares_base(before: CheckpointRef, after: CheckpointRef) -> bool:
    """Whether ``after`` can take over ``before``'s base model: LoRA (or frozen) checkpoints of the same base."""
    for ref in (before, after):
        if ref.kind != "task_checkpoint" or ref.changes_backbone:
            return False
    return (
        before.base_model == after.base_model or Path(before.base_model).resolve() == Path(after.base_model).resolve()
    )


def check_stats(ref: CheckpointRef, expected: str | None) -> None:
    """Refuse a checkpoint whose stats are not the ones it was trained with, or not ``expected``.

    Actions unnormalized with other statistics are wrong by a scale and offset: the rollouts would
    fail silently. A mismatch is an error.

    Raises:
        ArtifactError: The checkpoint's ``stats.json`` is not the stats its manifest records, or
            ``expected`` (from ``--stats``) differs from what the checkpoint was trained with.
    """
    from vlacl.data.normalize import load_stats

    recorded = ref.stats_fingerprint
    own = load_stats(ref.path / STATS_NAME).fingerprint
    if recorded and own != recorded:
        raise ArtifactError(
            f"{ref.path}: its {STATS_NAME} has fingerprint {own[:12]} but the checkpoint was trained with stats "
            f"{recorded[:12]}: the checkpoint was assembled by hand or damaged; recreate it with `vlacl train-task`"
        )
    if expected is not None and expected != (recorded or own):
        raise ArtifactError(
            f"--stats has fingerprint {expected[:12]} but {ref.path} was trained with stats {(recorded or own)[:12]}: "
            "its actions would be unnormalized with other statistics (a silent 0% success); pass the ds_stats artifact "
            "the stream was trained with (`vlacl inspect-ckpt` shows it), or leave --stats out"
        )
