"""Write LeRobot v3.0 datasets, episode by episode, with bounded memory and byte-identical output for equal input.

The layout follows LeRobot's own (``lerobot.datasets.utils``):

- ``meta/info.json``: ``codebase_version`` ``v3.0``, totals, ``chunks_size``, file size limits, ``fps``,
  ``splits``, the path templates and every feature with ``dtype``, ``shape`` and ``names``.
- ``data/chunk-XXX/file-XXX.parquet``: one row per frame, many episodes per file; a new file starts
  when the next episode would take the current one past ``data_files_size_in_mb`` (in-memory Arrow
  size, as LeRobot measures it); ``chunks_size`` files per chunk directory.
- ``meta/tasks.parquet``: the task strings as the (pandas) index named ``task``, with ``task_index``.
- ``meta/episodes/chunk-000/file-000.parquet``: ``episode_index``, ``tasks``, ``length``,
  ``data/chunk_index``, ``data/file_index``, ``dataset_from_index``, ``dataset_to_index``,
  ``meta/episodes/chunk_index``, ``meta/episodes/file_index``, per-episode ``stats/<feature>/<stat>``
  and any extra columns the caller gives (vlacl's are prefixed ``vlacl_``).
- ``meta/stats.json``: ``min``, ``max``, ``mean``, ``std``, ``count`` and the quantiles ``q01``, ``q10``,
  ``q50``, ``q90``, ``q99`` per feature, aggregated from the episodes' stats as LeRobot aggregates them
  (count-weighted means and quantiles, pooled variances); ``min`` and ``max`` keep an integer or bool
  feature's dtype, as LeRobot's do.
- ``data/`` files carry the ``huggingface`` schema metadata (the ``datasets`` features), so a plain
  ``datasets`` reader decodes the image columns as images.

Vectors are fixed-size lists (LeRobot's ``Sequence(length=D)``), one-value features plain scalars,
camera frames ``image`` features embedded as ``{bytes, path}`` PNG structs (lossless, so a replay
sees the exact pixels). Frames are encoded as they arrive (:class:`EpisodeBuilder`), so an episode
in memory holds its PNG bytes and numeric columns only; the writer keeps one data file open and
the episodes' metadata rows.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlacl.data.features import EPISODE_INDEX, FRAME_INDEX, INDEX, TASK_INDEX, TIMESTAMP

CODEBASE_VERSION: Final = "v3.0"
DEFAULT_CHUNK_SIZE: Final = 1000
DEFAULT_DATA_FILE_SIZE_IN_MB: Final = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB: Final = 200
INFO_PATH: Final = "meta/info.json"
STATS_PATH: Final = "meta/stats.json"
TASKS_PATH: Final = "meta/tasks.parquet"
DATA_PATH: Final = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH: Final = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
IMAGE_NAMES: Final = ("height", "width", "channels")
QUANTILES: Final[Mapping[str, float]] = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
"""LeRobot's quantile statistics (for its QUANTILES normalization) and their levels."""
STAT_KEYS: Final = ("min", "max", "mean", "std", "count", *QUANTILES)
PARQUET_OPTIONS: Final[Mapping[str, Any]] = {
    "compression": "snappy",
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
}
"""Fixed writer settings: equal tables give equal bytes (the footer names only the pyarrow version)."""
PNG_COMPRESS_LEVEL: Final = 6
DEFAULT_FEATURES: Final[Mapping[str, Mapping[str, Any]]] = {
    TIMESTAMP: {"dtype": "float32", "shape": [1], "names": None},
    FRAME_INDEX: {"dtype": "int64", "shape": [1], "names": None},
    EPISODE_INDEX: {"dtype": "int64", "shape": [1], "names": None},
    INDEX: {"dtype": "int64", "shape": [1], "names": None},
    TASK_INDEX: {"dtype": "int64", "shape": [1], "names": None},
}
"""LeRobot's bookkeeping columns, in its order, after the dataset's own features."""
_NUMERIC_KINDS: Final = "biuf"
_IMAGE_TYPE: Final = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

Stats = dict[str, np.ndarray]
"""One feature's statistics: ``min``, ``max`` (the feature's dtype if integer or bool, else float64), ``mean``,
``std`` and the quantiles of :data:`QUANTILES` as float64 arrays, ``count`` ``(1,)`` int64."""


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of the dataset as ``meta/info.json`` declares it.

    Attributes:
        key: LeRobot name, e.g. ``observation.state``, ``observation.images.corner``, ``action``.
        dtype: A numpy dtype name (``float32``, ``bool``, ...) or ``image``.
        shape: ``(D,)`` for a vector, ``(1,)`` for one value, ``(H, W, C)`` for an image.
        names: Names of a vector's dimensions; ``height, width, channels`` for an image.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    names: tuple[str, ...] | None = None

    @property
    def is_image(self) -> bool:
        """Whether frames are images (PNG in the parquet files)."""
        return self.dtype == "image"

    def to_info(self) -> dict[str, Any]:
        """The entry of ``info.json``'s ``features``."""
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "names": None if self.names is None else list(self.names),
        }

    def arrow_type(self) -> pa.DataType:
        """The column's Arrow type: a scalar, a fixed-size list, or the ``{bytes, path}`` image struct."""
        if self.is_image:
            return _IMAGE_TYPE
        scalar = pa.from_numpy_dtype(np.dtype(self.dtype))
        return scalar if self.shape == (1,) else pa.list_(scalar, self.shape[0])

    def hf_feature(self) -> dict[str, Any]:
        """The column's ``datasets`` feature (as ``datasets`` 4 serializes it in the ``huggingface`` metadata)."""
        if self.is_image:
            return {"_type": "Image"}
        value = {"dtype": self.dtype, "_type": "Value"}
        return value if self.shape == (1,) else {"feature": value, "length": self.shape[0], "_type": "List"}

    @classmethod
    def infer(cls, key: str, value: np.ndarray) -> FeatureSpec:
        """The spec of a feature from one frame's value: ``(H, W, C)`` uint8 with C in 1, 3 is an image."""
        arr = np.asarray(value)
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] in (1, 3):
            return cls(key, "image", tuple(int(x) for x in arr.shape), IMAGE_NAMES)
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"feature {key!r} has dtype {arr.dtype}; a dataset holds numbers, bools and images")
        if arr.ndim > 1:
            raise ValueError(f"feature {key!r} has shape {arr.shape}; numeric features are scalars or vectors")
        return cls(key, arr.dtype.name, (1,) if arr.ndim == 0 else (int(arr.shape[0]),))


@dataclass(frozen=True)
class EncodedEpisode:
    """One episode in the data files' column layout, without the dataset-wide columns.

    Attributes:
        features: The episode's features, in column order.
        table: The feature columns plus ``timestamp`` and ``frame_index``.
        stats: Per-feature statistics (images per channel ``(C, 1, 1)`` in [0, 1], as LeRobot keeps them).
    """

    features: tuple[FeatureSpec, ...]
    table: pa.Table
    stats: Mapping[str, Stats]

    @property
    def length(self) -> int:
        """Number of frames."""
        return int(self.table.num_rows)


class EpisodeBuilder:
    """Collect one episode frame by frame; images are PNG-encoded as they arrive.

    The first frame fixes the features (their keys, dtypes and shapes), unless they are given.
    """

    def __init__(self, fps: float, features: Sequence[FeatureSpec] | None = None) -> None:
        self._fps = fps
        self._features: tuple[FeatureSpec, ...] | None = tuple(features) if features is not None else None
        self._columns: dict[str, list[Any]] = {}
        self._image_sums: dict[str, _ChannelStats] = {}
        self._length = 0

    def add_frame(self, frame: Mapping[str, np.ndarray | float | bool]) -> None:
        """Append one frame: every feature's value, ``(D,)`` vectors, scalars, ``(H, W, C)`` uint8 images."""
        if self._features is None:
            self._features = tuple(FeatureSpec.infer(k, np.asarray(v)) for k, v in frame.items())
        if set(frame) != {f.key for f in self._features}:
            raise ValueError(
                f"frame {self._length} has features {sorted(frame)}, the episode has {[f.key for f in self._features]}"
            )
        for spec in self._features:
            value = np.asarray(frame[spec.key])
            if spec.is_image:
                if value.dtype != np.uint8 or value.shape != spec.shape:
                    raise ValueError(
                        f"frame {self._length}: {spec.key} is {value.dtype} {value.shape}, expected uint8 {spec.shape}"
                    )
                self._columns.setdefault(spec.key, []).append({"bytes": encode_png(value), "path": None})
                self._image_sums.setdefault(spec.key, _ChannelStats(spec.shape[2])).add(value)
            else:
                if value.size != math.prod(spec.shape) or value.dtype != np.dtype(spec.dtype):
                    raise ValueError(
                        f"frame {self._length}: {spec.key} is {value.dtype} {value.shape}, expected {spec.dtype} "
                        f"{spec.shape}"
                    )
                self._columns.setdefault(spec.key, []).append(value.reshape(-1).copy())
        self._length += 1

    def finish(self) -> EncodedEpisode:
        """The episode's columns and statistics; the builder is then empty."""
        if self._features is None or self._length == 0:
            raise ValueError("an episode needs at least one frame")
        arrays: dict[str, pa.Array] = {}
        stats: dict[str, Stats] = {}
        for spec in self._features:
            values = self._columns[spec.key]
            if spec.is_image:
                arrays[spec.key] = pa.array(values, type=_IMAGE_TYPE)
                stats[spec.key] = self._image_sums[spec.key].stats()
                continue
            stacked = np.stack(values)  # (T, D)
            arrays[spec.key] = _numeric_array(stacked, spec)
            stats[spec.key] = numeric_stats(stacked)
        frame_index = np.arange(self._length, dtype=np.int64)
        timestamp = (frame_index / self._fps).astype(np.float32)
        arrays[TIMESTAMP] = pa.array(timestamp)
        arrays[FRAME_INDEX] = pa.array(frame_index)
        stats[TIMESTAMP] = numeric_stats(timestamp[:, None])
        stats[FRAME_INDEX] = numeric_stats(frame_index[:, None])
        episode = EncodedEpisode(self._features, pa.table(arrays), stats)
        self._columns = {}
        self._image_sums = {}
        self._length = 0
        return episode


class _ChannelStats:
    """Running per-channel min, max, sum and sum of squares of uint8 frames."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.low = np.full(channels, 255, dtype=np.int64)
        self.high = np.zeros(channels, dtype=np.int64)
        self.total = np.zeros(channels, dtype=np.int64)
        self.squares = np.zeros(channels, dtype=np.int64)
        self.histogram = np.zeros((channels, 256), dtype=np.int64)  # (C, 256) pixel counts per value
        self.frames = 0
        self.pixels = 0

    def add(self, image: np.ndarray) -> None:
        pixels = image.reshape(-1, self.channels).astype(np.int64)  # (H * W, C)
        self.low = np.minimum(self.low, pixels.min(axis=0))
        self.high = np.maximum(self.high, pixels.max(axis=0))
        self.total += pixels.sum(axis=0)
        self.squares += (pixels * pixels).sum(axis=0)
        for c in range(self.channels):
            self.histogram[c] += np.bincount(pixels[:, c], minlength=256)
        self.frames += 1
        self.pixels += len(pixels)

    def stats(self) -> Stats:
        """LeRobot's image stats: ``(C, 1, 1)`` in [0, 1]; ``count`` is the number of frames.

        Integer sums and histograms keep them exact whatever the order frames came in; the quantiles
        are those of every pixel (``numpy.quantile``'s linear interpolation).
        """
        mean = self.total / self.pixels
        var = np.maximum(self.squares / self.pixels - mean * mean, 0.0)
        shape = (self.channels, 1, 1)
        stats: Stats = {
            "min": (self.low / 255.0).reshape(shape),
            "max": (self.high / 255.0).reshape(shape),
            "mean": (mean / 255.0).reshape(shape),
            "std": (np.sqrt(var) / 255.0).reshape(shape),
            "count": np.array([self.frames], dtype=np.int64),
        }
        for name, level in QUANTILES.items():
            values = [_histogram_quantile(self.histogram[c], level) for c in range(self.channels)]
            stats[name] = (np.array(values) / 255.0).reshape(shape)
        return stats


def _histogram_quantile(counts: np.ndarray, level: float) -> float:
    """The ``level`` quantile of the values ``0..len(counts)-1`` repeated ``counts`` times (linear interpolation)."""
    ends = np.cumsum(counts)  # (V,) sorted position after each value's run
    position = level * (int(ends[-1]) - 1)
    below = math.floor(position)
    low = int(np.searchsorted(ends, below, side="right"))
    high = int(np.searchsorted(ends, min(below + 1, int(ends[-1]) - 1), side="right"))
    return low + (position - below) * (high - low)


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an ``(H, W, C)`` uint8 frame (C = 1 or 3), the same bytes for the same frame."""
    from PIL import Image

    pixels = image[..., 0] if image.shape[2] == 1 else image  # (H, W) or (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def numeric_stats(values: np.ndarray) -> Stats:
    """``min``, ``max``, ``mean``, ``std`` (population), the quantiles, per dimension of ``(T, D)`` values; ``count``.

    ``min`` and ``max`` of integer or bool values keep their dtype (LeRobot's do); the rest is float64.
    """
    values = np.asarray(values)
    x = values.astype(np.float64)  # (T, D)
    exact = values.dtype.kind in "biu"
    stats: Stats = {
        "min": values.min(axis=0) if exact else x.min(axis=0),
        "max": values.max(axis=0) if exact else x.max(axis=0),
        "mean": x.mean(axis=0),
        "std": x.std(axis=0),
        "count": np.array([len(x)], dtype=np.int64),
    }
    levels = np.quantile(x, list(QUANTILES.values()), axis=0)  # (Q, D)
    for name, row in zip(QUANTILES, levels, strict=True):
        stats[name] = row
    return stats


def aggregate_stats(parts: Sequence[Stats]) -> Stats:
    """Combine statistics of disjoint parts, as LeRobot's ``aggregate_feature_stats`` does.

    Means weighted by count, variances pooled with the parallel algorithm, min of mins, max of maxes,
    quantiles weighted by count (LeRobot's approximation; exact for one part).
    """
    counts = np.array([float(p["count"][0]) for p in parts])  # (P,)
    means = np.stack([p["mean"] for p in parts])  # (P, ...)
    variances = np.stack([p["std"] ** 2 for p in parts])  # (P, ...)
    total = counts.sum()
    weights = counts.reshape(-1, *([1] * (means.ndim - 1)))  # (P, 1, ...)
    mean = (means * weights).sum(axis=0) / total
    variance = ((variances + (means - mean) ** 2) * weights).sum(axis=0) / total
    aggregated: Stats = {
        "min": np.min(np.stack([p["min"] for p in parts]), axis=0),
        "max": np.max(np.stack([p["max"] for p in parts]), axis=0),
        "mean": mean,
        "std": np.sqrt(variance),
        "count": np.array([int(total)], dtype=np.int64),
    }
    for name in QUANTILES:
        if all(name in p for p in parts):
            aggregated[name] = (np.stack([p[name] for p in parts]) * weights).sum(axis=0) / total
    return aggregated


def _numeric_array(values: np.ndarray, spec: FeatureSpec) -> pa.Array:
    """``(T, D)`` values as the column of ``spec``: scalars for ``(1,)``, fixed-size lists otherwise."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1).astype(np.dtype(spec.dtype), copy=False))
    if spec.shape == (1,):
        return flat
    return pa.FixedSizeListArray.from_arrays(flat, spec.shape[0])


@dataclass(frozen=True)
class EpisodeRecord:
    """Where an episode was written.

    Attributes:
        episode_index: Its ``episode_index``.
        task_index: Its ``task_index``.
        length: Number of frames.
        dataset_from_index: Its first frame's global ``index``.
        chunk_index: Chunk of its data file.
        file_index: Its data file within the chunk.
    """

    episode_index: int
    task_index: int
    length: int
    dataset_from_index: int
    chunk_index: int
    file_index: int


@dataclass(frozen=True)
class DatasetSummary:
    """What :meth:`LeRobotWriter.close` wrote."""

    root: Path
    episodes: int
    frames: int
    tasks: tuple[str, ...]
    data_files: tuple[str, ...]
    features: tuple[FeatureSpec, ...]


class LeRobotWriter:
    """Write a LeRobot v3.0 dataset into an empty directory, episode by episode.

    Example:
        >>> writer = LeRobotWriter(root, fps=80, robot_type="sawyer")
        >>> writer.add_episode({"observation.state": states, "action": actions}, "reach the goal")
        >>> summary = writer.close()
    """

    def __init__(
        self,
        root: Path,
        *,
        fps: int,
        robot_type: str | None = None,
        chunks_size: int = DEFAULT_CHUNK_SIZE,
        data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
        extra_episode_columns: Mapping[str, pa.DataType] | None = None,
    ) -> None:
        """Prepare ``root`` (created if missing, must hold no dataset).

        Args:
            root: The dataset directory.
            fps: Frames per second; timestamps are ``frame_index / fps``.
            robot_type: ``info.json``'s ``robot_type``.
            chunks_size: Data files per chunk directory.
            data_files_size_in_mb: A data file takes episodes until the next would take it past this
                size (Arrow in-memory bytes, as LeRobot counts them); one episode per file at least.
            extra_episode_columns: Extra columns of ``meta/episodes`` and their types; every episode gives
                a value for each.
        """
        if fps <= 0 or chunks_size <= 0 or data_files_size_in_mb <= 0:
            raise ValueError(
                f"fps, chunks_size and data_files_size_in_mb must be > 0: {fps}, {chunks_size}, {data_files_size_in_mb}"
            )
        self.root = Path(root)
        if (self.root / INFO_PATH).exists():
            raise FileExistsError(f"{self.root} already holds a dataset ({INFO_PATH})")
        self.fps = fps
        self.robot_type = robot_type
        self.chunks_size = chunks_size
        self.data_files_size_in_mb = data_files_size_in_mb
        self._extra_types = dict(extra_episode_columns or {})
        self._features: tuple[FeatureSpec, ...] | None = None
        self._schema: pa.Schema | None = None
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict[str, Any]] = []
        self._episode_stats: list[Mapping[str, Stats]] = []
        self._frames = 0
        self._chunk = 0
        self._file = 0
        self._file_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._data_files: list[str] = []
        self._closed = False

    @property
    def features(self) -> tuple[FeatureSpec, ...] | None:
        """The dataset's own features, once the first episode fixed them."""
        return self._features

    def add_episode(
        self, frames: Mapping[str, np.ndarray], task: str, *, extra: Mapping[str, Any] | None = None
    ) -> EpisodeRecord:
        """Append an episode given as ``(T, ...)`` arrays per feature (images ``(T, H, W, C)`` uint8)."""
        lengths = {k: len(v) for k, v in frames.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"features of one episode must have equal lengths, got {lengths}")
        builder = EpisodeBuilder(self.fps, self._features)
        for t in range(next(iter(lengths.values()))):
            builder.add_frame({k: np.asarray(v[t]) for k, v in frames.items()})
        return self.add_encoded(builder.finish(), task, extra=extra)

    def add_encoded(
        self, episode: EncodedEpisode, task: str, *, extra: Mapping[str, Any] | None = None
    ) -> EpisodeRecord:
        """Append an episode encoded by :class:`EpisodeBuilder` (in this process or another)."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        if self._features is None:
            self._features = episode.features
            self._schema = self._data_schema(episode.features)
        elif episode.features != self._features:
            raise ValueError(
                f"episode {len(self._episodes)} ({task!r}) has features {_describe(episode.features)}, the dataset "
                f"has {_describe(self._features)}: every episode must have the same features"
            )
        extra = dict(extra or {})
        if set(extra) != set(self._extra_types):
            raise ValueError(f"extra episode columns {sorted(extra)}, expected {sorted(self._extra_types)}")
        task_index = self._tasks.setdefault(task, len(self._tasks))
        episode_index = len(self._episodes)
        length = episode.length
        start = self._frames
        table = self._with_indices(episode.table, episode_index, task_index, start)
        size = int(table.nbytes)
        limit = self.data_files_size_in_mb * 1024 * 1024
        if self._writer is not None and self._file_bytes > 0 and self._file_bytes + size > limit:
            self._close_data_file()
            self._file += 1
            if self._file == self.chunks_size:
                self._chunk, self._file = self._chunk + 1, 0
        if self._writer is None:
            rel = DATA_PATH.format(chunk_index=self._chunk, file_index=self._file)
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            assert self._schema is not None
            self._writer = pq.ParquetWriter(path, self._schema, **PARQUET_OPTIONS)
            self._data_files.append(rel)
            self._file_bytes = 0
        self._writer.write_table(table, row_group_size=max(1, length))
        self._file_bytes += size
        stats = dict(episode.stats)
        for key, value in ((EPISODE_INDEX, episode_index), (TASK_INDEX, task_index)):
            stats[key] = numeric_stats(np.full((length, 1), value, dtype=np.int64))
        stats[INDEX] = numeric_stats(np.arange(start, start + length, dtype=np.int64)[:, None])
        self._episode_stats.append(stats)
        self._episodes.append(
            {
                "episode_index": episode_index,
                "tasks": [task],
                "length": length,
                "data/chunk_index": self._chunk,
                "data/file_index": self._file,
                "dataset_from_index": start,
                "dataset_to_index": start + length,
                **extra,
            }
        )
        self._frames += length
        return EpisodeRecord(episode_index, task_index, length, start, self._chunk, self._file)

    def close(self) -> DatasetSummary:
        """Close the last data file and write ``meta/``: info, tasks, episodes and stats."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        if not self._episodes or self._features is None:
            raise ValueError(f"no episode was added to {self.root}: a dataset needs at least one")
        self._close_data_file()
        self._closed = True
        meta = self.root / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        all_keys = [f.key for f in self._features] + list(DEFAULT_FEATURES)
        self._write_episodes(all_keys)
        self._write_tasks()
        stats = {k: aggregate_stats([s[k] for s in self._episode_stats]) for k in all_keys}
        _write_json(self.root / STATS_PATH, {k: {s: v.tolist() for s, v in st.items()} for k, st in stats.items()})
        _write_json(self.root / INFO_PATH, self.info())
        return DatasetSummary(
            root=self.root,
            episodes=len(self._episodes),
            frames=self._frames,
            tasks=tuple(self._tasks),
            data_files=tuple(self._data_files),
            features=self._features,
        )

    def info(self) -> dict[str, Any]:
        """``meta/info.json`` as it stands."""
        features = {f.key: f.to_info() for f in self._features or ()}
        features.update({k: dict(v) for k, v in DEFAULT_FEATURES.items()})
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self._episodes),
            "total_frames": self._frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_files_size_in_mb,
            "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self._episodes)}"},
            "data_path": DATA_PATH,
            "video_path": None,
            "features": features,
        }

    def abort(self) -> None:
        """Close an open data file without writing ``meta/`` (the caller discards the directory)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True

    def _data_schema(self, features: Sequence[FeatureSpec]) -> pa.Schema:
        """The data files' columns, with ``datasets``' ``huggingface`` metadata (features, no fingerprint)."""
        specs = [*features, *(FeatureSpec(k, v["dtype"], tuple(v["shape"])) for k, v in DEFAULT_FEATURES.items())]
        hf = {"info": {"features": {f.key: f.hf_feature() for f in specs}}}
        return pa.schema([pa.field(f.key, f.arrow_type()) for f in specs], metadata={"huggingface": json.dumps(hf)})

    def _with_indices(self, table: pa.Table, episode_index: int, task_index: int, start: int) -> pa.Table:
        n = table.num_rows
        assert self._schema is not None
        columns = {name: table.column(name) for name in table.column_names}
        columns[EPISODE_INDEX] = pa.chunked_array([pa.array(np.full(n, episode_index, dtype=np.int64))])
        columns[INDEX] = pa.chunked_array([pa.array(np.arange(start, start + n, dtype=np.int64))])
        columns[TASK_INDEX] = pa.chunked_array([pa.array(np.full(n, task_index, dtype=np.int64))])
        try:
            return pa.table([columns[f.name] for f in self._schema], schema=self._schema)
        except (KeyError, pa.ArrowException) as exc:
            raise ValueError(f"episode {episode_index} does not fit the dataset's columns ({exc})") from exc

    def _close_data_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_episodes(self, keys: Sequence[str]) -> None:
        columns: dict[str, pa.Array] = {}
        rows = self._episodes
        ints = ("episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index")
        for name in (*ints[:1], "tasks", *ints[1:], "dataset_to_index"):
            values = [r[name] for r in rows]
            columns[name] = pa.array(values, pa.list_(pa.string()) if name == "tasks" else pa.int64())
        for key in keys:
            for stat in STAT_KEYS:
                values = [s[key][stat].tolist() for s in self._episode_stats]
                columns[f"stats/{key}/{stat}"] = pa.array(values, _stat_type(key, stat, self._episode_stats[0]))
        columns["meta/episodes/chunk_index"] = pa.array([0] * len(rows), pa.int64())
        columns["meta/episodes/file_index"] = pa.array([0] * len(rows), pa.int64())
        for name, typ in self._extra_types.items():
            columns[name] = pa.array([r[name] for r in rows], typ)
        path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), path, **PARQUET_OPTIONS)

    def _write_tasks(self) -> None:
        import pandas as pd

        tasks = list(self._tasks)
        frame = pd.DataFrame(
            {"task_index": np.arange(len(tasks), dtype=np.int64)}, index=pd.Index(tasks, name="task", dtype=object)
        )
        table = pa.Table.from_pandas(frame, preserve_index=True)  # the task text as pandas' index, like LeRobot's
        pq.write_table(table, self.root / TASKS_PATH, **PARQUET_OPTIONS)


def _stat_type(key: str, stat: str, sample: Mapping[str, Stats]) -> pa.DataType:
    if stat == "count":
        return pa.list_(pa.int64())
    value = sample[key][stat]
    typ: pa.DataType = pa.from_numpy_dtype(value.dtype) if value.dtype.kind in "biu" else pa.float64()
    for _ in range(value.ndim):
        typ = pa.list_(typ)
    return typ


def _describe(features: Sequence[FeatureSpec]) -> str:
    return ", ".join(f"{f.key} {f.dtype} {list(f.shape)}" for f in features)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
