"""LeRobot datasets, format v3.0 and v2.1, read lazily through the :class:`~vlacl.data.episode.Episode` interface.

v3.0 (``meta/info.json`` says ``"codebase_version": "v3.0"``): many episodes per data file
(``data/chunk-XXX/file-XXX.parquet``), episode metadata in ``meta/episodes/chunk-XXX/file-XXX.parquet``
(``episode_index``, ``tasks``, ``length``, ``dataset_from_index``, ``data/chunk_index``,
``data/file_index``, ``videos/<key>/{chunk_index,file_index,from_timestamp}``), tasks in
``meta/tasks.parquet``. v2.1: one data file per episode (``data/chunk-XXX/episode_XXXXXX.parquet``),
``meta/episodes.jsonl`` and ``meta/tasks.jsonl``. Both keep their path templates in ``info.json``.

Features keep LeRobot's names. Defaults without a key map: the state is ``observation.state`` (or, when
absent, every other numeric ``observation.*`` feature concatenated in name order), the action is
``action``, every ``image`` or ``video`` feature ``observation.images.<cam>`` is a camera ``<cam>``
(``observation.image`` is the camera ``image``). Images embedded in the parquet files (PNG/JPEG
bytes), stored as image files next to them, or in mp4 videos (decoded with PyAV, frames matched to
their timestamps) all read as ``(T, H, W, C)`` uint8.

Rows are checked against the metadata, so that a mismatch is an error rather than frames of another
episode: when opening, the episodes placed in each v3.0 data file must fill its rows one after the
other (from the file footers); when reading, a v2.1 file must hold its episode's length in rows, and
the ``episode_index`` column of the rows read must name the episode.

Objects hold paths and row ranges only; parquet files and video containers are opened when a frame
is read, in the process that reads it, and small per-process caches keep recently read data files
(keyed by path, process and the file's inode, size and modification time, so a rewritten file is
read again).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlacl.data.episode import ColumnBatch, Episode, as_2d, iter_columns_by_episode
from vlacl.data.features import (
    ACTION,
    EPISODE_INDEX,
    FRAME_INDEX,
    IMAGE_PREFIX,
    INDEX,
    STATE,
    TASK_INDEX,
    TIMESTAMP,
    Feature,
    image_key,
)
from vlacl.data.keymap import KeyMap
from vlacl.errors import InputFormatError

log = logging.getLogger(__name__)

V3: Final = "v3.0"
V21: Final = "v2.1"
SUPPORTED_VERSIONS: Final = (V3, V21)
META_KEYS: Final = frozenset({TIMESTAMP, FRAME_INDEX, EPISODE_INDEX, INDEX, TASK_INDEX})
"""Per-frame bookkeeping columns: not features of the policy."""
VISUAL_DTYPES: Final = frozenset({"image", "video"})
NUMERIC_DTYPES: Final = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})
DATA_CACHE_FILES: Final = 4
"""Data files kept open per process: enough for a DataLoader worker that walks a few files at once."""


@dataclass(frozen=True)
class _Source:
    """Where a canonical feature comes from: the LeRobot keys, and how they are stored."""

    keys: tuple[str, ...]
    storage: str  # "column", "image" (parquet bytes or image files) or "video"


@dataclass(frozen=True)
class _EpisodeMeta:
    index: int
    length: int
    task_index: int
    instruction: str
    data_file: str  # relative to the dataset root
    row_offset: int  # first row of the episode within data_file
    videos: Mapping[str, tuple[str, float]]  # LeRobot video key -> (file relative to root, from_timestamp)


class LeRobotEpisode:
    """One episode of a LeRobot dataset; arrays are read only by :meth:`read`."""

    def __init__(self, dataset: LeRobotDataset, meta: _EpisodeMeta) -> None:
        """Bind the episode's metadata to its dataset."""
        self._dataset = dataset
        self._meta = meta

    @property
    def index(self) -> int:
        """LeRobot ``episode_index``."""
        return self._meta.index

    @property
    def length(self) -> int:
        """Number of frames."""
        return self._meta.length

    @property
    def task_index(self) -> int:
        """LeRobot ``task_index`` of the episode's (first) task."""
        return self._meta.task_index

    @property
    def instruction(self) -> str:
        """The task's text."""
        return self._meta.instruction

    @property
    def subset(self) -> str:
        """The dataset directory's name."""
        return self._dataset.root.name

    @property
    def source(self) -> str:
        """Data file and episode index, for messages."""
        return f"{self._dataset.root / self._meta.data_file} (episode {self._meta.index})"

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` of ``key``: ``(T, *shape)``."""
        stop = self.length if stop is None else stop
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"frames [{start}, {stop}) out of range for {self.source} of length {self.length}")
        return self._dataset.read_frames(self._meta, key, start, stop)

    def __repr__(self) -> str:
        """Short form for logs."""
        return f"LeRobotEpisode({self.source}, length={self.length}, task={self.task_index})"


class LeRobotDataset:
    """A LeRobot v3.0 or v2.1 dataset directory, opened from its metadata only."""

    def __init__(self, root: Path, keymap: KeyMap) -> None:
        """Read ``meta/``; raise :class:`InputFormatError` for anything vlacl cannot read."""
        self._root = root
        self._keymap = keymap
        self.info = _read_info(root)
        self.version: str = self.info["codebase_version"]
        self._lerobot_features: dict[str, dict[str, Any]] = self.info["features"]
        self._fps = float(self.info["fps"]) if self.info.get("fps") else None
        self.task_table = _read_tasks(root, self.version)
        self._sources, self._features = _resolve_features(self._lerobot_features, keymap, root)
        metas = _read_episodes_v3(self) if self.version == V3 else _read_episodes_v21(self)
        self._episodes = [LeRobotEpisode(self, m) for m in metas]
        self._check_data_columns()

    @property
    def root(self) -> Path:
        """The dataset directory."""
        return self._root

    @property
    def format(self) -> str:
        """``lerobot_v3.0`` or ``lerobot_v2.1``."""
        return f"lerobot_{self.version}"

    @property
    def features(self) -> Mapping[str, Feature]:
        """Canonical features."""
        return self._features

    @property
    def keymap(self) -> KeyMap:
        """The key map in use."""
        return self._keymap

    @property
    def fps(self) -> float | None:
        """``info.json``'s ``fps``."""
        return self._fps

    @property
    def episodes(self) -> Sequence[Episode]:
        """Episodes in ``episode_index`` order."""
        return self._episodes

    def identity(self) -> dict[str, Any]:
        """Format, features, lengths, tasks and the data and video files with their sizes."""
        files = sorted({e._meta.data_file for e in self._episodes})
        files += sorted({f for e in self._episodes for f, _ in e._meta.videos.values()})
        return {
            "format": self.format,
            "fps": self._fps,
            "features": {k: f.to_dict() for k, f in self._features.items()},
            "episodes": [[e.index, e.length, e.task_index] for e in self._episodes],
            "tasks": {str(k): v for k, v in sorted(self.task_table.items())},
            "files": [[f, _size(self._root / f)] for f in files],
        }

    def iter_columns(self, keys: Sequence[str], *, rows_per_batch: int = 65536) -> Iterator[ColumnBatch]:
        """Numeric features in episode order, file by file in row batches: the fast path of one-pass statistics.

        Episodes whose rows are not in episode order across and within the data files are read episode by
        episode instead, so that the frames still come in episode order.
        """
        for key in keys:
            if key not in self._features:
                raise InputFormatError(
                    f"{self._root} has no feature {key!r}; features: {', '.join(self._features)}: "
                    "check the key map (--keymap)"
                )
            if self._features[key].is_image:
                raise ValueError(f"iter_columns reads numeric features only, not {key}")
        by_file: dict[str, list[_EpisodeMeta]] = {}
        for ep in self._episodes:
            by_file.setdefault(ep._meta.data_file, []).append(ep._meta)
        in_order = [m for metas in by_file.values() for m in metas] == [e._meta for e in self._episodes]
        if not in_order or any(_by_row(metas, in_order=True) is None for metas in by_file.values()):
            yield from iter_columns_by_episode(self._episodes, keys, rows_per_batch=rows_per_batch)
            return
        source_cols = sorted({c for k in keys for c in self._sources[k].keys})
        for rel, metas in by_file.items():
            self._check_rows(rel, metas)
            path = self._root / rel
            check_episodes = EPISODE_INDEX in _column_names(path)
            episode_of_row = _episode_rows(metas)
            task_of_row = _task_rows(metas)
            columns_read = [*source_cols, EPISODE_INDEX] if check_episodes else source_cols
            # A fresh handle per pass, closed after it: a cached one would keep every buffer it read.
            try:
                with pq.ParquetFile(path) as pf:
                    offset = 0
                    for batch in pf.iter_batches(batch_size=rows_per_batch, columns=columns_read, use_threads=True):
                        n = batch.num_rows
                        rows = slice(offset, offset + n)
                        offset += n
                        table = pa.Table.from_batches([batch])
                        if check_episodes:
                            where = f"{path}:{EPISODE_INDEX}"
                            found = column_to_numpy(table.column(EPISODE_INDEX), where)
                            self._check_episodes(found, episode_of_row[rows], rel, offset - n)
                        columns = {k: self._columns_to_numpy(table, k, rel) for k in keys}
                        yield ColumnBatch(columns, task_of_row[rows])
            except (OSError, pa.ArrowException) as exc:
                raise InputFormatError(f"cannot read {path} ({exc}): the file is damaged; re-export it") from exc

    def read_frames(self, meta: _EpisodeMeta, key: str, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` of ``key`` for one episode."""
        if key not in self._features:
            raise InputFormatError(
                f"{self._root} has no feature {key!r}; features: {', '.join(self._features)}: "
                "check the key map (--keymap)"
            )
        source = self._sources[key]
        feature = self._features[key]
        if source.storage == "video":
            file, t0 = meta.videos[source.keys[0]]
            stamps = t0 + np.arange(start, stop) / self._require_fps()
            frames = decode_video_frames(self._root / file, stamps, fps=self._require_fps())
            return _maybe_flip(_check_frames(frames, feature, self._root / file), self._keymap)
        if self.version == V21:
            self._check_rows(meta.data_file, [meta])
        path = self._root / meta.data_file
        stamp = _stamp(path)
        episodes = _episode_column_cached(str(path), os.getpid(), stamp)
        if episodes is not None and stop > start:
            found = episodes[meta.row_offset + start : meta.row_offset + stop]
            self._check_episodes(found, np.full(stop - start, meta.index), meta.data_file, meta.row_offset + start)
        table = _read_table(path, source.keys, stamp)
        table = table.slice(meta.row_offset + start, stop - start)
        if source.storage == "image":
            frames = _decode_images(table.column(source.keys[0]), self._root, meta.data_file, feature.shape[-1])
            return _maybe_flip(_check_frames(frames, feature, path), self._keymap)
        values = self._columns_to_numpy(table, key, meta.data_file)
        return values.reshape(len(values), *feature.shape)

    def _require_fps(self) -> float:
        if not self._fps:
            raise InputFormatError(f"{self._root / 'meta/info.json'} gives no fps, needed to decode its videos")
        return self._fps

    def _columns_to_numpy(self, table: pa.Table, key: str, rel: str) -> np.ndarray:
        source = self._sources[key]
        feature = self._features[key]
        parts = []
        for col in source.keys:
            if col not in table.column_names:
                raise InputFormatError(
                    f"{self._root / rel} has no column {col!r} (needed for {key}): the data files do not match "
                    "meta/info.json; re-export the dataset"
                )
            parts.append(as_2d(column_to_numpy(table.column(col), f"{self._root / rel}:{col}")))
        values = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)  # (N, D)
        width = math.prod(feature.shape)
        if values.shape[1] != width:
            raise InputFormatError(
                f"{self._root / rel}: column(s) {', '.join(source.keys)} hold {values.shape[1]} values per frame, but "
                f"meta/info.json declares {width} for {key}: fix the shapes in meta/info.json, or re-export the dataset"
            )
        dtype = np.dtype(feature.dtype)
        if dtype.kind not in "iu" or np.can_cast(values.dtype, dtype):
            return values.astype(dtype, copy=False)
        with np.errstate(invalid="ignore", over="ignore"):
            cast = values.astype(dtype)
        if not np.array_equal(cast, values):
            raise InputFormatError(
                f"{self._root / rel}: column(s) {', '.join(source.keys)} hold {values.dtype} values that "
                f"{feature.dtype}, the dtype meta/info.json declares for {key}, cannot hold: fix the dtype in "
                "meta/info.json"
            )
        return cast

    def _check_rows(self, rel: str, metas: Sequence[_EpisodeMeta]) -> None:
        """The episodes placed in data file ``rel`` must fill its rows exactly (its footer only)."""
        rows = _parquet_file(self._root / rel).metadata.num_rows
        listed = sum(m.length for m in metas)
        if _by_row(metas, in_order=False) is not None and listed == rows:
            return
        episodes = ", ".join(f"{m.index} at rows [{m.row_offset}, {m.row_offset + m.length})" for m in metas[:8])
        raise InputFormatError(
            f"{self._root / rel} holds {rows} rows, but the episode metadata places {listed} frames in it "
            f"(episode {episodes}{', ...' if len(metas) > 8 else ''}): the metadata does not match the data "
            "(a file of meta/ missing or stale, or wrong lengths or dataset_from_index); re-export or re-download "
            "the dataset"
        )

    def _check_episodes(self, found: np.ndarray, expected: np.ndarray, rel: str, first_row: int) -> None:
        """The ``episode_index`` values of rows from ``first_row`` on must name the episodes the metadata puts there."""
        if found.shape != expected.shape:
            raise InputFormatError(
                f"{self._root / rel}:{EPISODE_INDEX} is not one episode index per row: the file is damaged; "
                "re-export it"
            )
        if len(wrong := np.flatnonzero(found != expected)):
            i = int(wrong[0])
            raise InputFormatError(
                f"row {first_row + i} of {self._root / rel} belongs to episode {found[i]}, but the episode metadata "
                f"puts episode {expected[i]} there: dataset_from_index or the rows' order disagree with meta/; "
                "re-export the dataset"
            )

    def _check_data_columns(self) -> None:
        """Every numeric and embedded-image column must be in the data files, their rows filled by the episodes.

        Footers only. v3.0 files are all checked; v2.1's per-episode files only the first (the rest when read).
        """
        needed = {c for s in self._sources.values() if s.storage != "video" for c in s.keys}
        by_file: dict[str, list[_EpisodeMeta]] = {}
        for e in self._episodes:
            by_file.setdefault(e._meta.data_file, []).append(e._meta)
        files = sorted(by_file)
        if self.version == V21:
            files = files[:1]  # thousands of per-episode files: check one here, the rest when read
        for rel in files:
            names = set(_parquet_file(self._root / rel).schema_arrow.names)
            if missing := sorted(needed - names):
                raise InputFormatError(
                    f"{self._root / rel} lacks column(s) {', '.join(missing)} that meta/info.json declares: "
                    "the dataset is incomplete; re-export it, or leave the feature out with a key map"
                )
            self._check_rows(rel, by_file[rel])


def open_lerobot(root: Path, keymap: KeyMap) -> LeRobotDataset:
    """Open a LeRobot v3.0 or v2.1 dataset directory."""
    return LeRobotDataset(root, keymap)


def column_to_numpy(column: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """A parquet column of scalars, or of (nested) lists of equal length, as ``(N,)`` or ``(N, D)``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr
    width = 1
    listed = False
    while True:
        if values.null_count:
            raise InputFormatError(f"{where} has {values.null_count} missing values: fill or drop those frames")
        typ = values.type
        if pa.types.is_fixed_size_list(typ):
            width *= typ.list_size
        elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
            widths = np.diff(np.asarray(values.offsets.to_numpy()))
            if len(widths) and (widths != widths[0]).any():
                raise InputFormatError(
                    f"{where} holds lists of different lengths; every frame must have the same width"
                )
            width *= int(widths[0]) if len(widths) else 0
        else:
            break
        listed = True
        values = values.flatten()
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
        raise InputFormatError(f"{where} has type {arr.type}, not numbers or lists of numbers")
    out = np.asarray(values.to_numpy(zero_copy_only=False))
    return out.reshape(len(arr), width) if listed else out  # (N, D) or (N,)


def decode_video_frames(path: Path, timestamps: np.ndarray, *, fps: float) -> np.ndarray:
    """Frames of an mp4 at ``timestamps`` (seconds), matched to the nearest decoded frame: ``(N, H, W, 3)`` uint8.

    A frame further than half a frame period from its timestamp is an error: the video and the
    parquet timestamps disagree.
    """
    import av

    if not path.is_file():
        raise InputFormatError(f"video {path} is missing: the dataset is incomplete")
    if len(timestamps) == 0:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    tolerance = 0.5 / fps
    out: list[np.ndarray | None] = [None] * len(timestamps)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputFormatError(f"{path} holds no video stream: re-encode the episode's video")
            stream = container.streams.video[0]
            base = stream.time_base
            first = float(timestamps.min()) if len(timestamps) else 0.0
            last = float(timestamps.max()) if len(timestamps) else 0.0
            if base is not None:
                container.seek(int(max(first - tolerance, 0.0) / base), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None or base is None:
                    continue
                t = float(frame.pts * base)
                near = np.abs(timestamps - t) <= tolerance
                if near.any():
                    image = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                    for i in np.flatnonzero(near):
                        out[i] = image
                if t > last + tolerance:
                    break
    except av.FFmpegError as exc:
        raise InputFormatError(f"cannot decode video {path}: {exc}") from exc
    missing = [float(timestamps[i]) for i, f in enumerate(out) if f is None]
    if missing:
        raise InputFormatError(
            f"video {path} has no frame within {tolerance:.4f} s of timestamp(s) {missing[:3]}: the video is "
            "shorter than the data or its timestamps disagree with fps; re-encode the episode's video"
        )
    return np.stack([f for f in out if f is not None])  # (N, H, W, 3)


def _read_info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFormatError(f"cannot read {path}: {exc}; fix it, or re-download the dataset's meta/") from exc
    if not isinstance(info, dict):
        raise InputFormatError(f"{path} is not a JSON object; fix it, or re-download the dataset's meta/")
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise InputFormatError(
            f"{path} has codebase_version {version!r}; vlacl reads {' and '.join(SUPPORTED_VERSIONS)}: convert the "
            "dataset with LeRobot's converter (lerobot.datasets.v30.convert_dataset_v21_to_v30)"
        )
    for key in ("features", "data_path"):
        if key not in info:
            raise InputFormatError(f"{path} lacks {key!r}, which every LeRobot {version} dataset has")
    if not isinstance(info["features"], dict):
        raise InputFormatError(f"{path}: 'features' must be an object of feature name -> description")
    for name, spec in info["features"].items():
        if not isinstance(spec, dict):
            raise InputFormatError(
                f"{path}: feature {name!r} is {spec!r}, not an object with dtype and shape: fix meta/info.json"
            )
    for key, required in (("data_path", True), ("video_path", False)):
        value = info.get(key)
        if not isinstance(value, str) and (required or value is not None):
            raise InputFormatError(f"{path}: {key!r} is {value!r}, not a path template: fix meta/info.json")
    fps = info.get("fps")
    if fps is not None and not (_is_number(fps) and math.isfinite(fps) and fps > 0):
        raise InputFormatError(f"{path}: 'fps' is {fps!r}, not a positive number: fix meta/info.json")
    chunks = info.get("chunks_size")
    if chunks is not None and not (_is_int(chunks) and chunks > 0):
        raise InputFormatError(f"{path}: 'chunks_size' is {chunks!r}, not a positive integer: fix meta/info.json")
    return info


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


def _whole(value: Any, what: str, where: str) -> int:
    """A non-negative integer field of the metadata, or a clear error naming it."""
    if not (_is_int(value) and value >= 0):
        raise InputFormatError(
            f"{where}: {what} is {value!r}, not a non-negative integer: the metadata is damaged; re-export the dataset"
        )
    return int(value)


def _dtype_of(spec: Mapping[str, Any]) -> str | None:
    dtype = spec.get("dtype")
    return dtype if isinstance(dtype, str) else None


def _shape_of(spec: Mapping[str, Any], key: str, where: Path, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = spec.get("shape")
    if raw is None:
        return default
    if not isinstance(raw, list | tuple) or not all(_is_int(x) and x > 0 for x in raw):
        raise InputFormatError(f"{where}: {key!r} has shape {raw!r}, not a list of positive sizes: fix meta/info.json")
    return tuple(int(x) for x in raw) or default


def _read_tasks(root: Path, version: str) -> dict[int, str]:
    if version == V3:
        path = root / "meta" / "tasks.parquet"
        table = _read_meta_parquet(path)
        names = table.column_names
        if TASK_INDEX not in names:
            raise InputFormatError(f"{path} has no task_index column")
        text_col = "task" if "task" in names else next((c for c in names if c.startswith("__index_level")), None)
        if text_col is None:
            raise InputFormatError(f"{path} has no task column (nor a task index)")
        indices = table.column(TASK_INDEX).to_pylist()
        texts = table.column(text_col).to_pylist()
        pairs = list(zip(indices, texts, strict=True))
    else:
        path = root / "meta" / "tasks.jsonl"
        pairs = [(r.get("task_index"), r.get("task")) for r in _read_jsonl(path)]
    out: dict[int, str] = {}
    for n, (index, text) in enumerate(pairs):
        if not isinstance(text, str):
            raise InputFormatError(
                f"{path} (task {n}): the task is {text!r}, not a text; every task needs task_index and task"
            )
        out[_whole(index, "task_index", f"{path} (task {text!r})")] = text
    return out


def _resolve_features(
    lerobot: Mapping[str, Mapping[str, Any]], keymap: KeyMap, root: Path
) -> tuple[dict[str, _Source], dict[str, Feature]]:
    where = root / "meta" / "info.json"

    def spec(key: str) -> Mapping[str, Any]:
        if key not in lerobot:
            raise InputFormatError(
                f"the key map names {key!r}, which {where} does not declare; features there: {', '.join(lerobot)}"
            )
        return lerobot[key]

    def vector(keys: Sequence[str]) -> tuple[str, tuple[int, ...], tuple[str, ...] | None]:
        width = 0
        names: list[str] = []
        dtypes = set()
        for k in keys:
            s = spec(k)
            if _dtype_of(s) not in NUMERIC_DTYPES:
                known = ", ".join(sorted(NUMERIC_DTYPES))
                raise InputFormatError(f"{where}: {k!r} has dtype {s.get('dtype')!r}, not a number type ({known})")
            shape = _shape_of(s, k, where, (1,))
            size = int(np.prod(shape))
            width += size
            dtypes.add(s["dtype"])
            raw = s.get("names")
            flat = _flat_names(raw)
            names.extend(flat if flat and len(flat) == size else [f"{k}[{i}]" for i in range(size)])
        dtype = next(iter(dtypes)) if len(dtypes) == 1 else "float32"
        if dtype == "bool":
            dtype = "float32"
        return dtype, (width,), tuple(names)

    sources: dict[str, _Source] = {}
    features: dict[str, Feature] = {}
    if keymap.state is not None:
        state_keys: tuple[str, ...] = keymap.state
    elif STATE in lerobot:
        state_keys = (STATE,)
    else:
        state_keys = tuple(
            sorted(
                k
                for k, s in lerobot.items()
                if k.startswith("observation.") and _dtype_of(s) in NUMERIC_DTYPES and not k.startswith(IMAGE_PREFIX)
            )
        )
    if state_keys:
        dtype, shape, names = vector(state_keys)
        sources[STATE] = _Source(state_keys, "column")
        features[STATE] = Feature(STATE, dtype, shape, names)
    action_key = keymap.action or ACTION
    if keymap.action is not None or ACTION in lerobot:
        dtype, shape, names = vector((action_key,))
        sources[ACTION] = _Source((action_key,), "column")
        features[ACTION] = Feature(ACTION, dtype, shape, names)
    if keymap.cameras is not None:
        cameras = dict(keymap.cameras)
    else:
        cameras = {}
        for k, s in lerobot.items():
            if _dtype_of(s) in VISUAL_DTYPES:
                cam = k[len(IMAGE_PREFIX) :] if k.startswith(IMAGE_PREFIX) else k.rsplit(".", 1)[-1]
                cameras[cam] = k
    for cam, k in cameras.items():
        s = spec(k)
        if _dtype_of(s) not in VISUAL_DTYPES:
            raise InputFormatError(
                f"{where}: camera {cam!r} maps to {k!r} of dtype {s.get('dtype')!r}, not image/video"
            )
        shape = _shape_of(s, k, where, ())
        if len(shape) != 3:
            raise InputFormatError(f"{where}: {k!r} has shape {list(shape)}, expected [height, width, channels]")
        if shape[0] in (1, 3) and shape[2] not in (1, 3):
            shape = (shape[1], shape[2], shape[0])  # declared (C, H, W): frames decode as (H, W, C)
        sources[image_key(cam)] = _Source((k,), "video" if s["dtype"] == "video" else "image")
        features[image_key(cam)] = Feature(image_key(cam), "uint8", shape)
    for canonical, k in (keymap.extra or {}).items():
        if canonical in (STATE, ACTION, *features, *META_KEYS) or canonical.startswith(IMAGE_PREFIX):
            raise InputFormatError(
                f"key map extra name {canonical!r} is a canonical feature name: choose another name for {k!r}"
            )
        dtype, shape, names = vector((k,))
        sources[canonical] = _Source((k,), "column")
        features[canonical] = Feature(canonical, dtype, shape, names)
    if ACTION not in features:
        raise InputFormatError(f"{where} declares no 'action' feature: name the action key in a key map (action: ...)")
    return sources, features


def _flat_names(raw: Any) -> list[str]:
    if isinstance(raw, list):
        return [str(x) for x in raw]
    if isinstance(raw, dict):
        return [str(x) for v in raw.values() if isinstance(v, list) for x in v]
    return []


def _read_episodes_v3(ds: LeRobotDataset) -> list[_EpisodeMeta]:
    meta_dir = ds.root / "meta" / "episodes"
    files = sorted(meta_dir.glob("chunk-*/file-*.parquet"))
    if not files:
        raise InputFormatError(f"{meta_dir} holds no chunk-XXX/file-XXX.parquet: the dataset has no episode metadata")
    video_keys = [k for k, s in ds._lerobot_features.items() if s.get("dtype") == "video"]
    wanted = ["episode_index", "tasks", "length", "dataset_from_index", "data/chunk_index", "data/file_index"]
    for vk in video_keys:
        wanted += [f"videos/{vk}/chunk_index", f"videos/{vk}/file_index", f"videos/{vk}/from_timestamp"]
    rows: list[dict[str, Any]] = []
    for f in files:
        table = _read_meta_parquet(f)
        if missing := [c for c in wanted if c not in table.column_names]:
            raise InputFormatError(f"{f} lacks column(s) {', '.join(missing)} of LeRobot v3.0 episode metadata")
        for n, r in enumerate(table.select(wanted).to_pylist()):
            where = f"{f} row {n}"
            for c in ("episode_index", "length", "dataset_from_index"):
                r[c] = _whole(r[c], c, where)
            r["where"] = where
            rows.append(r)
    rows.sort(key=lambda r: r["episode_index"])
    _check_unique(rows, meta_dir)
    data_tmpl: str = ds.info["data_path"]
    video_tmpl: str | None = ds.info.get("video_path")
    file_start: dict[str, int] = {}
    for r in rows:
        rel = _format_path(data_tmpl, ds, chunk_index=r["data/chunk_index"], file_index=r["data/file_index"])
        file_start[rel] = min(file_start.get(rel, r["dataset_from_index"]), r["dataset_from_index"])
    metas = []
    for r in rows:
        rel = _format_path(data_tmpl, ds, chunk_index=r["data/chunk_index"], file_index=r["data/file_index"])
        videos = {}
        for vk in video_keys:
            if video_tmpl is None:
                raise InputFormatError(f"{ds.root / 'meta/info.json'} declares video features but no video_path")
            vrel = _format_path(
                video_tmpl,
                ds,
                video_key=vk,
                chunk_index=r[f"videos/{vk}/chunk_index"],
                file_index=r[f"videos/{vk}/file_index"],
            )
            t0 = r[f"videos/{vk}/from_timestamp"]
            if not (_is_number(t0) and math.isfinite(t0) and t0 >= 0):
                raise InputFormatError(
                    f"{r['where']}: videos/{vk}/from_timestamp is {t0!r}, not a time in seconds: the metadata is "
                    "damaged; re-export the dataset"
                )
            videos[vk] = (vrel, float(t0))
        task_index, text = _episode_task(ds, r.get("tasks"), r["episode_index"])
        metas.append(
            _EpisodeMeta(
                index=r["episode_index"],
                length=r["length"],
                task_index=task_index,
                instruction=text,
                data_file=rel,
                row_offset=r["dataset_from_index"] - file_start[rel],
                videos=videos,
            )
        )
    return metas


def _check_unique(rows: Sequence[Mapping[str, Any]], where: Path) -> None:
    """Refuse an episode listed twice (rows sorted by episode_index)."""
    for a, b in itertools.pairwise(rows):
        if a["episode_index"] == b["episode_index"]:
            raise InputFormatError(
                f"{where} lists episode {a['episode_index']} twice: the metadata is damaged; re-export the dataset"
            )


def _read_episodes_v21(ds: LeRobotDataset) -> list[_EpisodeMeta]:
    path = ds.root / "meta" / "episodes.jsonl"
    rows = _read_jsonl(path)
    for n, r in enumerate(rows, 1):
        for c in ("episode_index", "length"):
            r[c] = _whole(r.get(c), c, f"{path}:{n}")
    rows.sort(key=lambda r: r["episode_index"])
    _check_unique(rows, path)
    chunks_size = int(ds.info.get("chunks_size") or 1000)
    data_tmpl: str = ds.info["data_path"]
    video_tmpl: str | None = ds.info.get("video_path")
    video_keys = [k for k, s in ds._lerobot_features.items() if s.get("dtype") == "video"]
    metas = []
    for r in rows:
        index, length = r["episode_index"], r["length"]
        chunk = index // chunks_size
        rel = _format_path(data_tmpl, ds, episode_chunk=chunk, episode_index=index)
        videos = {}
        for vk in video_keys:
            if video_tmpl is None:
                raise InputFormatError(f"{ds.root / 'meta/info.json'} declares video features but no video_path")
            videos[vk] = (_format_path(video_tmpl, ds, episode_chunk=chunk, video_key=vk, episode_index=index), 0.0)
        task_index, text = _episode_task(ds, r.get("tasks"), index)
        metas.append(_EpisodeMeta(index, length, task_index, text, rel, 0, videos))
    return metas


def _episode_task(ds: LeRobotDataset, tasks: Any, episode: int) -> tuple[int, str]:
    if not ds.task_table:
        return 0, ""
    by_text = {t: i for i, t in ds.task_table.items()}
    first = tasks[0] if isinstance(tasks, list) and tasks else None
    if not isinstance(first, str) or first not in by_text:
        raise InputFormatError(
            f"episode {episode} of {ds.root} names task {first!r}, which the task table does not list: "
            "the dataset's metadata is inconsistent"
        )
    return by_text[first], str(first)


def _format_path(template: str, ds: LeRobotDataset, **fields: Any) -> str:
    for name, value in fields.items():
        if name != "video_key" and not (_is_int(value) and value >= 0):
            raise InputFormatError(
                f"{ds.root / 'meta'}: an episode's {name} is {value!r}, not a non-negative integer: the metadata is "
                "damaged; re-export the dataset"
            )
    try:
        return template.format(**{k: int(v) if k != "video_key" else v for k, v in fields.items()})
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise InputFormatError(
            f"{ds.root / 'meta/info.json'}: path template {template!r} does not fit LeRobot {ds.version} ({exc})"
        ) from exc


def _read_meta_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except FileNotFoundError as exc:
        raise InputFormatError(f"{path} is missing: the dataset's metadata is incomplete") from exc
    except (OSError, pa.ArrowException) as exc:
        raise InputFormatError(f"cannot read {path} ({exc}): the file is damaged; re-download or re-export it") from exc


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFormatError(f"cannot read {path}: {exc}; re-download or re-export the dataset's meta/") from exc
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFormatError(f"{path}:{n} is not JSON ({exc}): fix the line, or re-export the dataset") from exc
        if not isinstance(row, dict):
            raise InputFormatError(f"{path}:{n} is {row!r}, not a JSON object: fix the line, or re-export the dataset")
        rows.append(row)
    return rows


def _by_row(metas: Sequence[_EpisodeMeta], *, in_order: bool) -> list[_EpisodeMeta] | None:
    """The episodes of one file by row, or ``None`` when their rows do not follow one another from row 0.

    With ``in_order``, also ``None`` unless ``metas`` are in row order already.
    """
    by_row = sorted(metas, key=lambda m: m.row_offset)
    if in_order and by_row != list(metas):
        return None
    end = 0
    for m in by_row:
        if m.row_offset != end:
            return None
        end += m.length
    return by_row


def _episode_rows(metas: Sequence[_EpisodeMeta]) -> np.ndarray:
    return np.concatenate([np.full(m.length, m.index, dtype=np.int64) for m in metas]) if metas else np.zeros(0)


def _task_rows(metas: Sequence[_EpisodeMeta]) -> np.ndarray:
    return np.concatenate([np.full(m.length, m.task_index, dtype=np.int64) for m in metas]) if metas else np.zeros(0)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _stamp(path: Path) -> tuple[int, int, int]:
    """What tells a rewritten file from the one cached: inode, size and modification time."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise InputFormatError(f"data file {path} is missing: the dataset is incomplete") from exc
    except OSError as exc:
        raise InputFormatError(f"cannot read {path} ({exc}): check its permissions") from exc
    return st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _parquet_file_cached(path: str, pid: int, stamp: tuple[int, int, int]) -> pq.ParquetFile:
    return pq.ParquetFile(path)


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return _parquet_file_cached(str(path), os.getpid(), _stamp(path))
    except FileNotFoundError as exc:
        raise InputFormatError(f"data file {path} is missing: the dataset is incomplete") from exc
    except (OSError, pa.ArrowException) as exc:
        raise InputFormatError(f"cannot read {path} as parquet ({exc}): the file is damaged; re-export it") from exc


@functools.lru_cache(maxsize=DATA_CACHE_FILES * 4)
def _read_table_cached(path: str, columns: tuple[str, ...], pid: int, stamp: tuple[int, int, int]) -> pa.Table:
    return _parquet_file(Path(path)).read(columns=list(columns), use_threads=False)


@functools.lru_cache(maxsize=64)
def _column_names_cached(path: str, pid: int, stamp: tuple[int, int, int]) -> frozenset[str]:
    return frozenset(_parquet_file(Path(path)).schema_arrow.names)


def _column_names(path: Path) -> frozenset[str]:
    """The columns of a data file, from its footer."""
    return _column_names_cached(str(path), os.getpid(), _stamp(path))


@functools.lru_cache(maxsize=DATA_CACHE_FILES)
def _episode_column_cached(path: str, pid: int, stamp: tuple[int, int, int]) -> np.ndarray | None:
    """The ``episode_index`` of every row of a data file (``None`` when it has none), to check rows against meta/."""
    if EPISODE_INDEX not in _column_names(Path(path)):
        return None
    try:  # read apart from _read_table, whose few slots hold the data columns
        table = _parquet_file(Path(path)).read(columns=[EPISODE_INDEX], use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise InputFormatError(f"cannot read {path} ({exc}): the file is damaged; re-export it") from exc
    return column_to_numpy(table.column(EPISODE_INDEX), f"{path}:{EPISODE_INDEX}")


def _read_table(path: Path, columns: Sequence[str], stamp: tuple[int, int, int] | None = None) -> pa.Table:
    try:
        return _read_table_cached(str(path), tuple(columns), os.getpid(), stamp or _stamp(path))
    except (KeyError, pa.ArrowInvalid) as exc:
        raise InputFormatError(f"{path} lacks column(s) {', '.join(columns)}: {exc}") from exc
    except (OSError, pa.ArrowException) as exc:
        raise InputFormatError(f"cannot read {path} ({exc}): the file is damaged; re-export it") from exc


def _decode_images(column: pa.ChunkedArray, root: Path, rel: str, channels: int) -> np.ndarray:
    """LeRobot ``image`` features: a struct {bytes, path} per frame, PNG/JPEG bytes or a file path.

    Frames decode as RGB, or as grey levels for a feature of one channel: ``(T, H, W, channels)``.
    """
    from PIL import Image

    frames = []
    for i, item in enumerate(column.to_pylist()):
        where = f"{root / rel} row {i}"
        data = item.get("bytes") if isinstance(item, dict) else item if isinstance(item, bytes) else None
        path = item.get("path") if isinstance(item, dict) else None
        try:
            if data and isinstance(data, bytes):
                image = Image.open(io.BytesIO(data))
            elif path and isinstance(path, str):
                image = Image.open(root / path)
            else:
                raise InputFormatError(f"{where}: an image frame with neither bytes nor a path; re-export the dataset")
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))  # (H, W) or (H, W, 3)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputFormatError(f"{where}: cannot decode the image ({exc}); re-export the dataset") from exc
        frames.append(pixels[..., None] if pixels.ndim == 2 else pixels)  # (H, W, C)
        if frames[-1].shape != frames[0].shape:
            raise InputFormatError(f"{where}: a frame of {frames[-1].shape}, other frames are {frames[0].shape}")
    return np.stack(frames) if frames else np.zeros((0, 0, 0, channels), dtype=np.uint8)


def _check_frames(frames: np.ndarray, feature: Feature, where: Path) -> np.ndarray:
    """Decoded ``(T, H, W, C)`` frames as the feature declares them; ``(0, H, W, C)`` when there are none."""
    if len(frames) == 0:
        return np.zeros((0, *feature.shape), dtype=np.uint8)
    if frames.shape[1:] != feature.shape:
        raise InputFormatError(
            f"{where}: frames of {feature.key} decode as {list(frames.shape[1:])}, but meta/info.json declares "
            f"{list(feature.shape)}: fix the shape in meta/info.json, or re-export the dataset"
        )
    return frames


def _maybe_flip(frames: np.ndarray, keymap: KeyMap) -> np.ndarray:
    if keymap.flip_images:
        return np.ascontiguousarray(frames[:, ::-1, ::-1])  # rotate (T, H, W, C) by 180 degrees
    return frames
