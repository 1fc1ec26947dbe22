"""An in-memory :class:`~vlacl.data.episode.EpisodeDataset` built from arrays, for stats tests."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlacl.data.episode import ColumnBatch, Episode, iter_columns_by_episode
from vlacl.data.features import Feature, role_of
from vlacl.data.keymap import KeyMap


@dataclass(frozen=True)
class FakeEpisode:
    """One episode: canonical key -> ``(T, ...)`` array."""

    index: int
    task_index: int
    instruction: str
    subset: str
    arrays: Mapping[str, np.ndarray]

    @property
    def length(self) -> int:
        """Frames of the first array."""
        return len(next(iter(self.arrays.values())))

    @property
    def source(self) -> str:
        """For messages."""
        return f"{self.subset}:episode_{self.index}"

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` of ``key``."""
        return self.arrays[key][start : self.length if stop is None else stop]


@dataclass
class FakeDataset:
    """Episodes held in memory; ``iter_columns`` batches them as the generic readers do."""

    name: str
    episode_list: list[FakeEpisode]
    feature_map: dict[str, Feature]
    keymap_value: KeyMap = field(default_factory=KeyMap)
    reads: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        """A path that does not exist: the data lives in memory."""
        return Path("/memory") / self.name

    @property
    def format(self) -> str:
        """Fixed format name."""
        return "fake"

    @property
    def features(self) -> Mapping[str, Feature]:
        """Canonical features."""
        return self.feature_map

    @property
    def keymap(self) -> KeyMap:
        """The key map."""
        return self.keymap_value

    @property
    def fps(self) -> float | None:
        """Frames per second."""
        return 10.0

    @property
    def episodes(self) -> Sequence[Episode]:
        """The episodes."""
        return self.episode_list

    def identity(self) -> dict[str, Any]:
        """Name, lengths, tasks and a hash of the arrays."""
        digest = [float(np.asarray(a, dtype=np.float64).sum()) for e in self.episode_list for a in e.arrays.values()]
        return {
            "name": self.name,
            "episodes": [[e.index, e.length, e.task_index] for e in self.episode_list],
            "sums": digest,
        }

    def iter_columns(self, keys: Sequence[str], *, rows_per_batch: int = 65536) -> Iterator[ColumnBatch]:
        """Episode by episode, ``rows_per_batch`` at a time."""
        return iter_columns_by_episode(self.episode_list, keys, rows_per_batch=rows_per_batch)


def make_dataset(
    name: str,
    episodes: Sequence[Mapping[str, np.ndarray]],
    tasks: Sequence[int],
    *,
    instructions: Mapping[int, str] | None = None,
) -> FakeDataset:
    """A dataset whose episode ``i`` holds ``episodes[i]`` and has task ``tasks[i]``."""
    first = episodes[0]
    features = {k: Feature(k, str(v.dtype), tuple(v.shape[1:]) if v.ndim > 1 else (1,)) for k, v in first.items()}
    for key, feat in features.items():
        assert role_of(key) == feat.role
    eps = [
        FakeEpisode(i, int(t), (instructions or {}).get(int(t), f"task {t}"), name, dict(arrays))
        for i, (arrays, t) in enumerate(zip(episodes, tasks, strict=True))
    ]
    return FakeDataset(name, eps, features)


def split_rows(values: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    """Cut ``(N, ...)`` into consecutive pieces of ``lengths``."""
    return np.split(values, np.cumsum(lengths)[:-1])
