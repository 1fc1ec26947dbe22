"""Task streams: the ordered tasks of a continual-learning run, each with its train and validation episodes.

Partition modes:
- ``task_index``: one task per ``task_index`` across all datasets (LeRobot datasets that name
  several tasks; datasets given together share one task table).
- ``dataset``: one task per dataset (sub-dataset), e.g. LIBERO's one HDF5 file per task.
- ``auto``: ``task_index`` when it gives at least two tasks, otherwise ``dataset``.

The split into train and validation episodes is seeded per task by the seed and the task's key, so a
task's split does not change when the stream is reordered or other tasks are added.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vlacl.data.episode import Episode, EpisodeDataset, dataset_names
from vlacl.errors import ConfigError, InputFormatError

log = logging.getLogger(__name__)

PartitionMode = Literal["task_index", "dataset", "auto"]
PARTITION_MODES: tuple[PartitionMode, ...] = ("task_index", "dataset", "auto")


@dataclass(frozen=True)
class EpisodeRef:
    """An episode by position: ``datasets[dataset].episodes[episode]``; cheap to store and to pickle."""

    dataset: int
    episode: int


@dataclass(frozen=True)
class StreamTask:
    """One task of a stream.

    Attributes:
        position: 0-based position in the stream.
        key: Stable identifier: the ``task_index`` as text, or the sub-dataset's name.
        instruction: The language instruction (of its first episode).
        train: Training episodes.
        val: Validation episodes (held out by episode, never by frame).
    """

    position: int
    key: str
    instruction: str
    train: tuple[EpisodeRef, ...]
    val: tuple[EpisodeRef, ...]

    @property
    def name(self) -> str:
        """The instruction, or the key when there is none."""
        return self.instruction or self.key


@dataclass(frozen=True)
class TaskStream:
    """The ordered tasks over ``datasets``."""

    datasets: tuple[EpisodeDataset, ...]
    partition: PartitionMode
    tasks: tuple[StreamTask, ...]

    def episode(self, ref: EpisodeRef) -> Episode:
        """Resolve a reference."""
        return self.datasets[ref.dataset].episodes[ref.episode]

    def episodes(self, refs: Sequence[EpisodeRef]) -> list[Episode]:
        """Resolve several references."""
        return [self.episode(r) for r in refs]

    def task(self, selector: str | int) -> StreamTask:
        """A task by position (int, or digits with ``#``, e.g. ``#0``), key or instruction."""
        if isinstance(selector, int):
            if not 0 <= selector < len(self.tasks):
                raise ConfigError(f"task position {selector} is out of range: the stream has {len(self.tasks)} tasks")
            return self.tasks[selector]
        if selector.startswith("#") and selector[1:].isdigit():
            return self.task(int(selector[1:]))
        for t in self.tasks:
            if selector == t.key:
                return t
        named = [t for t in self.tasks if t.instruction == selector]
        if len(named) == 1:
            return named[0]
        if named:
            keys = ", ".join(repr(t.key) for t in named)
            raise ConfigError(f"several tasks have the instruction {selector!r} (keys {keys}): select one by key")
        known = ", ".join(f"{t.key!r}" for t in self.tasks)
        raise ConfigError(f"no task {selector!r} in the stream; tasks (by key): {known}")


def build_stream(
    datasets: Sequence[EpisodeDataset],
    *,
    partition: PartitionMode = "auto",
    order: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TaskStream:
    """Partition ``datasets`` into tasks, order them and split each into train and validation episodes.

    Args:
        datasets: The datasets, in the order they were given.
        partition: ``task_index``, ``dataset`` or ``auto`` (see the module docstring).
        order: Task keys or instructions in training order; tasks not named are left out. ``None``
            keeps the natural order (task index, or the order of the datasets).
        val_fraction: Fraction of each task's episodes held out for validation, in [0, 1).
        seed: Seed of the split.

    Raises:
        ConfigError: An unknown partition mode; an empty order, or one naming a task twice, a task that does not
            exist or an instruction that several tasks share.
        InputFormatError: A task without episodes, or a stream with no tasks.
    """
    if partition not in PARTITION_MODES:
        raise ConfigError(f"unknown partition {partition!r}: use one of {', '.join(PARTITION_MODES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if order is not None and not order:
        raise ConfigError("the task order is empty: name at least one task, or leave the order out for every task")
    by_index = _group_by_task_index(datasets)
    conflict = _task_table_conflict(datasets)
    if partition == "task_index" and conflict:
        raise ConfigError(
            f"the datasets disagree on what task_index means ({conflict}): partition by dataset instead "
            "(partition: dataset), or give datasets that share one task table"
        )
    used: PartitionMode
    if partition == "task_index" or (partition == "auto" and len(by_index) >= 2 and not conflict):
        groups, used = by_index, "task_index"
    else:
        groups, used = _group_by_dataset(datasets), "dataset"
    if partition == "auto":
        why = f" (the datasets disagree on task_index: {conflict})" if conflict and len(by_index) >= 2 else ""
        log.info("partition auto: %s gives %d tasks%s", used, len(groups), why)
    keys = list(groups)
    if order is not None:
        keys = _apply_order(keys, order, groups, datasets)
    tasks = []
    for position, key in enumerate(keys):
        refs = groups[key]
        if not refs:
            raise InputFormatError(f"task {key!r} has no episodes: check the datasets and the task order")
        train, val = _split(refs, key, val_fraction, seed)
        first = datasets[refs[0].dataset].episodes[refs[0].episode]
        tasks.append(StreamTask(position, key, first.instruction, train, val))
    if not tasks:
        raise InputFormatError("the stream has no tasks: the datasets hold no episodes")
    return TaskStream(tuple(datasets), used, tuple(tasks))


def _group_by_task_index(datasets: Sequence[EpisodeDataset]) -> dict[str, list[EpisodeRef]]:
    groups: dict[int, list[EpisodeRef]] = {}
    for d, ds in enumerate(datasets):
        for e, ep in enumerate(ds.episodes):
            groups.setdefault(ep.task_index, []).append(EpisodeRef(d, e))
    return {str(k): v for k, v in sorted(groups.items())}


def _task_table_conflict(datasets: Sequence[EpisodeDataset]) -> str:
    """The first task_index whose instruction differs between datasets, described; "" when none does."""
    seen: dict[int, tuple[str, str]] = {}
    for ds in datasets:
        for ep in ds.episodes:
            if not ep.instruction:
                continue
            first = seen.setdefault(ep.task_index, (ep.instruction, ds.root.name))
            if first[0] != ep.instruction:
                return (
                    f"task_index {ep.task_index} is {first[0]!r} in {first[1]} but {ep.instruction!r} in {ds.root.name}"
                )
    return ""


def _group_by_dataset(datasets: Sequence[EpisodeDataset]) -> dict[str, list[EpisodeRef]]:
    return {
        name: [EpisodeRef(d, e) for e in range(len(ds.episodes))]
        for d, (name, ds) in enumerate(zip(dataset_names(datasets), datasets, strict=True))
    }


def _apply_order(
    keys: list[str], order: Sequence[str], groups: dict[str, list[EpisodeRef]], datasets: Sequence[EpisodeDataset]
) -> list[str]:
    tasks_of: dict[str, list[str]] = {}
    for k in keys:
        ref = groups[k][0] if groups[k] else None
        if ref is not None:
            tasks_of.setdefault(datasets[ref.dataset].episodes[ref.episode].instruction, []).append(k)
    out: list[str] = []
    for item in order:
        owners = [item] if item in groups else tasks_of.get(item, [])
        if len(owners) > 1:
            raise ConfigError(
                f"task order names {item!r}, the instruction of several tasks ({', '.join(owners)}): name them by key"
            )
        key = owners[0] if owners else None
        if key is None:
            raise ConfigError(f"task order names {item!r}, which is not a task of the stream; tasks: {', '.join(keys)}")
        if key in out:
            raise ConfigError(f"task order names task {key!r} twice")
        out.append(key)
    return out


def _split(
    refs: Sequence[EpisodeRef], key: str, val_fraction: float, seed: int
) -> tuple[tuple[EpisodeRef, ...], tuple[EpisodeRef, ...]]:
    n = len(refs)
    n_val = min(max(round(val_fraction * n), 1), n - 1) if val_fraction > 0 and n >= 2 else 0
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    perm = rng.permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = tuple(r for i, r in enumerate(refs) if i not in val_idx)
    val = tuple(r for i, r in enumerate(refs) if i in val_idx)
    return train, val
