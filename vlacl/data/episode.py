"""The one interface every dataset reader implements: lazy episodes and their dataset.

An :class:`Episode` knows its length, task and instruction from metadata alone; arrays are read
only when :meth:`Episode.read` asks for a range of frames. Episodes and datasets hold paths and
indices, never open file handles (handles are opened lazily per process and dropped on pickling),
so they cross into DataLoader worker processes, which then open their own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vlacl.data.features import Feature
from vlacl.data.keymap import KeyMap


@runtime_checkable
class Episode(Protocol):
    """One recorded episode, read lazily."""

    @property
    def index(self) -> int:
        """Episode index, unique within its dataset."""
        ...

    @property
    def length(self) -> int:
        """Number of frames."""
        ...

    @property
    def task_index(self) -> int:
        """Task of the episode within its dataset (0 when the dataset names no tasks)."""
        ...

    @property
    def instruction(self) -> str:
        """The language instruction ("" when the dataset has none)."""
        ...

    @property
    def subset(self) -> str:
        """Name of the sub-dataset (a file or dataset directory) the episode comes from."""
        ...

    @property
    def source(self) -> str:
        """Where the episode lives, for messages: a file path and, where it applies, a group."""
        ...

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` of the canonical feature ``key``: ``(T, *feature.shape)``."""
        ...


@runtime_checkable
class EpisodeDataset(Protocol):
    """A dataset on disk: its features, its episodes and the identity that stats are tied to."""

    @property
    def root(self) -> Path:
        """The path the dataset was opened from."""
        ...

    @property
    def format(self) -> str:
        """``lerobot_v3.0``, ``lerobot_v2.1``, ``hdf5_robomimic`` or ``hdf5_flat``."""
        ...

    @property
    def features(self) -> Mapping[str, Feature]:
        """Canonical feature key -> per-frame description."""
        ...

    @property
    def keymap(self) -> KeyMap:
        """The key map the dataset was opened with."""
        ...

    @property
    def fps(self) -> float | None:
        """Frames per second, when the dataset records it."""
        ...

    @property
    def episodes(self) -> Sequence[Episode]:
        """All episodes, in the dataset's order."""
        ...

    def identity(self) -> dict[str, Any]:
        """What identifies the data, from metadata only; :func:`dataset_fingerprint` hashes it.

        Format, features, episode lengths and tasks, and per file its name and size.
        """
        ...

    def iter_columns(self, keys: Sequence[str], *, rows_per_batch: int = 65536) -> Iterator[ColumnBatch]:
        """Numeric features in bulk, in episode order, for one-pass statistics."""
        ...


@dataclass(frozen=True)
class ColumnBatch:
    """A run of consecutive frames of one or more episodes, numeric features only.

    Attributes:
        columns: Canonical key -> ``(N, D)`` array.
        task_index: ``(N,)`` task of each frame.
    """

    columns: Mapping[str, np.ndarray]
    task_index: np.ndarray

    @property
    def num_rows(self) -> int:
        """Number of frames in the batch."""
        return len(self.task_index)


def iter_columns_by_episode(
    episodes: Sequence[Episode], keys: Sequence[str], *, rows_per_batch: int = 65536
) -> Iterator[ColumnBatch]:
    """Generic :meth:`EpisodeDataset.iter_columns`: read episode by episode, batch up to ``rows_per_batch``."""
    pending: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    tasks: list[np.ndarray] = []
    rows = 0
    for ep in episodes:
        for k in keys:
            pending[k].append(as_2d(ep.read(k)))
        tasks.append(np.full(ep.length, ep.task_index, dtype=np.int64))
        rows += ep.length
        if rows >= rows_per_batch:
            yield ColumnBatch({k: np.concatenate(v) for k, v in pending.items()}, np.concatenate(tasks))
            pending = {k: [] for k in keys}
            tasks = []
            rows = 0
    if rows:
        yield ColumnBatch({k: np.concatenate(v) for k, v in pending.items()}, np.concatenate(tasks))


def as_2d(values: np.ndarray) -> np.ndarray:
    """``(T,)`` -> ``(T, 1)``; ``(T, D)`` unchanged; ``(T, ...)`` flattened to ``(T, prod(...))``."""
    if values.ndim == 1:
        return values[:, None]  # (T, 1)
    if values.ndim > 2:
        return values.reshape(len(values), -1)  # (T, D)
    return values


def dataset_fingerprint(dataset: EpisodeDataset) -> str:
    """sha256 of the dataset's identity and key map: stats and replay buffers are tied to it."""
    ident = {"identity": dataset.identity(), "keymap": dataset.keymap.sha256()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def dataset_names(datasets: Sequence[EpisodeDataset]) -> list[str]:
    """One distinct name per dataset: its path's stem, ``#<position>`` appended while the name is taken.

    Task streams key their ``dataset`` partition by these names and per-task stats prefix their
    task ids with them, so both name a sub-dataset alike.
    """
    names: list[str] = []
    for position, ds in enumerate(datasets):
        name = ds.root.stem
        while name in names:
            name = f"{name}#{position}"
        names.append(name)
    return names


def numeric_keys(features: Mapping[str, Feature]) -> list[str]:
    """Keys of the non-image features, state first, then action, then the rest in order."""
    order = {"state": 0, "action": 1, "other": 2}
    keys = [k for k, f in features.items() if not f.is_image]
    return sorted(keys, key=lambda k: (order[features[k].role], list(features).index(k)))


def task_instructions(episodes: Sequence[Episode]) -> dict[int, str]:
    """task_index -> instruction, from the first episode of each task."""
    out: dict[int, str] = {}
    for ep in episodes:
        out.setdefault(ep.task_index, ep.instruction)
    return dict(sorted(out.items()))
