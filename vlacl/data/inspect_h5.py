"""``inspect-h5``: a read-only report on HDF5 files, from their structure and low-dimensional data.

The report walks each file's tree itself (:func:`vlacl.data.hdf5.walk`), so it also describes files the
readers of :mod:`vlacl.data.hdf5` refuse: a missing ``actions`` dataset is a finding, not a crash.
Only files that are not HDF5 at all (or are truncated) stop it, with one clear error.

Per file: the tree (groups and datasets with shape, dtype, chunks, compression and attributes,
long attribute values shortened) and one row per episode (length, per-dimension action minimum and
maximum over the finite values, instruction). An episode is a ``data/demo_N`` group of a
robomimic/LIBERO file, or a whole flat file.

What is read: attributes, string datasets that may hold an instruction, the action dataset, and
float datasets of shape ``(T,)`` or ``(T, D)`` (for NaN and Inf). Camera frames and every other
dataset of three or more dimensions are never read, unless ``sample_images`` asks for that many
evenly spaced frames per camera and episode; so the cost per episode does not grow with the size of
its images.

Findings (severity, code):

- error ``missing_key``: no ``actions``/``action`` dataset, a robomimic episode without ``obs``, no
  observation the readers recognize, or keys present in the first episode of a dataset but not in
  another (or the other way round). ``shape_mismatch``: a key whose per-frame shape or dtype
  differs between episodes. ``length_mismatch``: a per-frame dataset (robomimic: every dataset of
  the episode; flat: cameras and per-frame metadata) whose first dimension is not the action's.
  ``nonfinite``: NaN or Inf in a float dataset. ``bad_action``: actions that are not numeric
  ``(T,)``/``(T, D)``. ``no_episodes``: an empty ``data`` group. ``unreadable``: a dataset h5py
  cannot read (damaged chunks).
- warning ``length_mismatch``: ``num_samples`` disagreeing with the actions, or a flat file's float
  dataset of another length (the readers leave it out of the state). ``action_out_of_range``:
  actions outside [-1, 1]. ``too_short``: fewer frames than ``window + chunk``, so no full training
  sample. ``constant_action_dim``: an action dimension with one value in every episode of a dataset
  (zero standard deviation). ``bad_attribute``: ``problem_info``/``env_args`` that are not JSON.
  ``blank_images``: sampled frames of a single colour.
- info ``upside_down_images``: the file follows LIBERO's upside-down convention (its attributes
  say so; see :func:`vlacl.data.hdf5.default_flip`), which the readers undo by default.
  ``no_instruction``: no language instruction found.

Upside-down statistic: with sampled frames, the report gives per camera the mean brightness of the
top and bottom thirds of the frames as stored. It is a measurement for a person to judge (a
tabletop view usually has the table and robot in its lower part), not a detector: the
``upside_down_images`` finding rests on the file's attributes alone.
"""

from __future__ import annotations

import glob
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import h5py
import numpy as np

from vlacl.config.core import config_to_dict
from vlacl.config.inspect_h5 import InspectH5Config
from vlacl.data.hdf5 import (
    ACTION_KEYS,
    FORMAT_FLAT,
    FORMAT_ROBOMIMIC,
    H5_ERRORS,
    METADATA_KEYS,
    ROBOMIMIC_DATA,
    ROBOMIMIC_OBS,
    bad_json_attrs,
    default_flip,
    instruction_of,
    is_camera,
    is_lowdim,
    libero_marker,
    natural_key,
    one_line,
    open_h5,
    text_value,
    walk,
)
from vlacl.data.keymap import KeyMap
from vlacl.data.open import HDF5_SUFFIXES
from vlacl.errors import InputFormatError

log = logging.getLogger(__name__)

Severity = Literal["error", "warning", "info"]
SEVERITIES: Final[tuple[Severity, ...]] = ("error", "warning", "info")
ATTR_CHARS: Final = 120
"""Attribute values longer than this are shortened in the tree (robomimic's model_file is pages of XML)."""
BLOCK_ELEMENTS: Final = 1 << 22
"""Values read at a time from a low-dimensional dataset: bounded memory whatever the episode length."""
RANGE_TOLERANCE: Final = 1e-6


@dataclass(frozen=True)
class Finding:
    """One problem or remark about a file or an episode.

    Attributes:
        severity: ``error`` (the readers refuse it or training would be wrong), ``warning`` (likely a
            problem) or ``info``.
        code: Stable identifier, e.g. ``length_mismatch`` (listed in the module docstring).
        file: The file, as given or found.
        episode: The episode (``demo_3``; a flat file's name), or ``None`` for the whole file.
        message: What was found, with the values, and what to do.
    """

    severity: Severity
    code: str
    file: str
    episode: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "severity": self.severity,
            "code": self.code,
            "file": self.file,
            "episode": self.episode,
            "message": self.message,
        }


@dataclass(frozen=True)
class Node:
    """A group or dataset of a file's tree.

    Attributes:
        path: Path inside the file (``/`` for the root group).
        kind: ``group``, ``dataset`` or ``datatype``.
        shape: Dataset shape (``None`` for groups and empty datasets).
        dtype: Dataset dtype.
        chunks: Chunk shape of a chunked dataset.
        compression: Filter name and level, e.g. ``gzip 4``.
        attrs: Attribute name -> value as text (shortened past :data:`ATTR_CHARS`).
    """

    path: str
    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    chunks: tuple[int, ...] | None = None
    compression: str | None = None
    attrs: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out: dict[str, Any] = {"path": self.path, "kind": self.kind}
        if self.kind == "dataset":
            out.update(
                shape=None if self.shape is None else list(self.shape),
                dtype=self.dtype,
                chunks=None if self.chunks is None else list(self.chunks),
                compression=self.compression,
            )
        out["attrs"] = dict(self.attrs)
        return out


@dataclass(frozen=True)
class EpisodeRow:
    """One row of the episode table.

    Attributes:
        episode: ``demo_N`` or a flat file's name.
        length: Frames (the action's length, else ``num_samples``), ``None`` when unknown.
        action_min: Per action dimension, the minimum over finite values (``None``: none finite).
        action_max: Per action dimension, the maximum over finite values.
        instruction: The language instruction, "" when none.
    """

    episode: str
    length: int | None
    action_min: tuple[float | None, ...]
    action_max: tuple[float | None, ...]
    instruction: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "episode": self.episode,
            "length": self.length,
            "action_min": list(self.action_min),
            "action_max": list(self.action_max),
            "instruction": self.instruction,
        }


@dataclass(frozen=True)
class CameraSample:
    """Statistics of the frames sampled from one camera of one episode (only with ``sample_images``).

    Attributes:
        episode: The episode.
        dataset: The camera's dataset, relative to the episode.
        frames: Frames read.
        top_mean: Mean pixel value of the top third of the frames, as stored.
        bottom_mean: Mean pixel value of the bottom third.
        blank_frames: Sampled frames of a single colour.
    """

    episode: str
    dataset: str
    frames: int
    top_mean: float
    bottom_mean: float
    blank_frames: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "episode": self.episode,
            "dataset": self.dataset,
            "frames": self.frames,
            "top_mean": round(self.top_mean, 2),
            "bottom_mean": round(self.bottom_mean, 2),
            "blank_frames": self.blank_frames,
        }


@dataclass(frozen=True)
class FileReport:
    """What ``inspect-h5`` found in one file.

    Attributes:
        path: The file.
        format: ``hdf5_robomimic`` (a ``data`` group) or ``hdf5_flat``.
        bytes: File size.
        libero: Why the file counts as LIBERO's (the attribute that says so), or ``None``.
        flip_images: Whether the readers rotate its frames by default.
        tree: Groups and datasets (empty with ``tree`` off).
        episodes: The episode table.
        image_samples: Sampled camera statistics.
    """

    path: str
    format: str
    bytes: int
    libero: str | None
    flip_images: bool
    tree: tuple[Node, ...]
    episodes: tuple[EpisodeRow, ...]
    image_samples: tuple[CameraSample, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "path": self.path,
            "format": self.format,
            "bytes": self.bytes,
            "libero": self.libero,
            "flip_images": self.flip_images,
            "num_episodes": len(self.episodes),
            "num_frames": sum(row.length or 0 for row in self.episodes),
            "tree": [node.to_dict() for node in self.tree],
            "episodes": [row.to_dict() for row in self.episodes],
            "image_samples": [sample.to_dict() for sample in self.image_samples],
        }


@dataclass(frozen=True)
class InspectH5Report:
    """The whole report: settings, one entry per file, and the findings."""

    config: InspectH5Config
    files: tuple[FileReport, ...]
    findings: tuple[Finding, ...]

    def count(self, severity: Severity) -> int:
        """Number of findings of ``severity``."""
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def has_errors(self) -> bool:
        """True when any finding has severity error."""
        return self.count("error") > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``--json``)."""
        return {
            "config": config_to_dict(self.config),
            "summary": {
                "files": len(self.files),
                "episodes": sum(len(f.episodes) for f in self.files),
                "frames": sum(row.length or 0 for f in self.files for row in f.episodes),
                **{f"{s}s": self.count(s) for s in SEVERITIES},
            },
            "files": [f.to_dict() for f in self.files],
            "findings": [f.to_dict() for f in self.findings],
        }


def expand_paths(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by ``patterns``: a file, a directory (its HDF5 files) or a glob (``**`` recurses).

    Raises:
        InputFormatError: A path that does not exist, or a directory or glob without HDF5 files.
    """
    if not patterns:
        raise InputFormatError("no file given: pass an HDF5 file, a directory or a quoted glob")
    out: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            # glob.glob, unlike Path.glob, takes absolute patterns as users type them
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]  # noqa: PTH207
            found = []
            for match in matches:
                if match.is_dir():
                    found.extend(_hdf5_in(match))
                elif match.is_file() and match.suffix.lower() in HDF5_SUFFIXES:
                    found.append(match)
            if not found:
                raise InputFormatError(f"{text!r} matches no HDF5 file ({', '.join(HDF5_SUFFIXES)}): check the pattern")
            out.extend(found)
        elif (path := Path(text)).is_dir():
            files = _hdf5_in(path)
            if not files:
                raise InputFormatError(
                    f"{path} holds no HDF5 file ({', '.join(HDF5_SUFFIXES)}); for subdirectories pass a quoted "
                    f"glob such as '{path}/**/*.hdf5'"
                )
            out.extend(files)
        elif path.is_file():
            out.append(path)
        else:
            raise InputFormatError(f"{path} does not exist: check the path")
    return list(dict.fromkeys(out))


def _hdf5_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES)


def run_inspect_h5(paths: Sequence[str | Path], cfg: InspectH5Config) -> InspectH5Report:
    """Inspect HDF5 files: tree, episode table and findings.

    Args:
        paths: Files, directories or glob patterns (see :func:`expand_paths`).
        cfg: What to check and include.

    Raises:
        InputFormatError: A path that names no file, or a file that is not HDF5 or is truncated.
    """
    files = expand_paths(paths)
    reports: list[FileReport] = []
    findings: list[Finding] = []
    groups: dict[str, list[_EpisodeScan]] = {}
    for path in files:
        scan = _FileScan(path, cfg)
        reports.append(scan.run())
        findings.extend(scan.findings)
        key = str(path) if scan.format == FORMAT_ROBOMIMIC else f"{path.parent}/*"
        groups.setdefault(key, []).extend(scan.episodes)
        log.debug("inspected %s: %d episodes, %d findings", path, len(scan.episodes), len(scan.findings))
    for episodes in groups.values():
        findings.extend(_consistency(episodes))
        findings.extend(_constant_dims(episodes))
    order = {str(p): i for i, p in enumerate(files)}
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    findings.sort(key=lambda f: (order[f.file], f.episode is not None, natural_key(f.episode or ""), rank[f.severity]))
    log.info(
        "inspected HDF5 files: %d (%d errors, %d warnings)",
        len(files),
        sum(f.severity == "error" for f in findings),
        sum(f.severity == "warning" for f in findings),
    )
    return InspectH5Report(cfg, tuple(reports), tuple(findings))


@dataclass
class _EpisodeScan:
    """What cross-episode checks need of one episode."""

    file: str
    name: str
    signature: dict[str, tuple[tuple[int, ...], str]]
    action_min: np.ndarray | None
    action_max: np.ndarray | None
    frames: int
    reported: tuple[str, ...] = ()
    """Keys (or prefixes ending in ``/``) whose absence an episode finding already reports."""


class _FileScan:
    """One pass over one file; collects its report, findings and episode scans."""

    def __init__(self, path: Path, cfg: InspectH5Config) -> None:
        self.path = path
        self.file = str(path)
        self.cfg = cfg
        self.format = FORMAT_FLAT
        self.findings: list[Finding] = []
        self.episodes: list[_EpisodeScan] = []
        self.samples: list[CameraSample] = []

    def add(self, severity: Severity, code: str, episode: str | None, message: str) -> None:
        self.findings.append(Finding(severity, code, self.file, episode, message))

    def run(self) -> FileReport:
        with open_h5(self.path) as f:
            try:
                return self._run(f)
            except H5_ERRORS as exc:
                raise InputFormatError(
                    f"cannot read the structure of {self.path}: {one_line(exc)}; the file may be damaged"
                ) from None

    def _run(self, f: h5py.File) -> FileReport:
        data = f.get(ROBOMIMIC_DATA)
        self.format = FORMAT_ROBOMIMIC if isinstance(data, h5py.Group) else FORMAT_FLAT
        tree = tuple(_tree(f)) if self.cfg.tree else ()
        for where in bad_json_attrs(f):
            scope, name = where.split("@")
            self.add(
                "warning",
                "bad_attribute",
                None,
                f"attribute {name} of {scope} is not a JSON object: the readers ignore it",
            )
        if isinstance(data, h5py.Group):
            names = sorted((n for n in data if isinstance(data.get(n), h5py.Group)), key=natural_key)
            if not names:
                self.add(
                    "error", "no_episodes", None, "the data group holds no demo_N groups: the file has no episodes"
                )
            episodes = [(name, data[name]) for name in names]
        else:
            episodes = [(self.path.name, f)]
        rows = [self._episode(f, group, name) for name, group in episodes]
        if rows and all(not row.instruction for row in rows):
            self.add(
                "info",
                "no_instruction",
                None,
                "no language instruction (problem_info, or a language_instruction/instruction/task attribute): "
                "give one with a key map (instruction: ...)",
            )
        marker = libero_marker(f)
        flip = default_flip(f)
        if flip:
            why = f"LIBERO's convention, from its {marker}" if marker else "macros_image_convention says opengl"
            self.add(
                "info",
                "upside_down_images",
                None,
                f"camera frames are stored upside down ({why}); vlacl's readers rotate them by 180 degrees "
                f"unless a key map sets flip_images: false" + _sample_summary(self.samples),
            )
        return FileReport(
            path=self.file,
            format=self.format,
            bytes=self.path.stat().st_size,
            libero=marker,
            flip_images=flip,
            tree=tree,
            episodes=tuple(rows),
            image_samples=tuple(self.samples),
        )

    def _episode(self, f: h5py.File, group: h5py.Group, name: str) -> EpisodeRow:
        try:
            return self._episode_checks(f, group, name)
        except H5_ERRORS as exc:
            self.add("error", "unreadable", name, f"h5py cannot read this episode: {one_line(exc)}")
            return EpisodeRow(name, None, (), (), "")

    def _episode_checks(self, f: h5py.File, group: h5py.Group, name: str) -> EpisodeRow:
        robomimic = self.format == FORMAT_ROBOMIMIC
        datasets = _datasets(group)
        action_path = next((k for k in ACTION_KEYS if isinstance(group.get(k), h5py.Dataset)), None)
        action = group.get(action_path) if action_path else None
        length: int | None = None
        reported: list[str] = []
        if action is None:
            reported.extend(ACTION_KEYS)
            self.add(
                "error",
                "missing_key",
                name,
                f"no action dataset ({' or '.join(ACTION_KEYS)}); name the action in a key map (action: <key>)",
            )
        elif not is_lowdim(action):
            self.add(
                "error", "bad_action", name, f"{action_path} is {action.dtype} {action.shape}: expected numeric (T, D)"
            )
        else:
            length = int(action.shape[0])
        if robomimic and not isinstance(group.get(ROBOMIMIC_OBS), h5py.Group):
            reported.append(f"{ROBOMIMIC_OBS}/")
            self.add("error", "missing_key", name, "no obs group: a robomimic episode keeps its observations in obs/")
        elif not _has_observation(datasets, robomimic):
            self.add(
                "error",
                "missing_key",
                name,
                "no observation the readers recognize (a uint8 (T, H, W, 3) camera or a numeric (T, D) state): "
                "name them in a key map",
            )
        num_samples = group.attrs.get("num_samples") if robomimic else None
        if isinstance(num_samples, int | np.integer):
            if length is not None and int(num_samples) != length:
                self.add(
                    "warning",
                    "length_mismatch",
                    name,
                    f"attribute num_samples says {int(num_samples)} frames but {action_path} has {length}",
                )
            elif length is None:
                length = int(num_samples)
        if length is not None:
            self._lengths(datasets, name, length, action_path or "", robomimic)
            if length < self.cfg.window + self.cfg.chunk:
                self.add(
                    "warning",
                    "too_short",
                    name,
                    f"{length} frames, fewer than window + chunk = {self.cfg.window} + {self.cfg.chunk}: "
                    f"no full training sample",
                )
        for path, ds in datasets.items():
            if ds.dtype.kind == "f" and ds.shape is not None and ds.ndim in (1, 2):
                self._nonfinite(ds, path, name)
        low = high = None
        if action is not None and length is not None and action_path:
            low, high = self._action_range(action, action_path, name)
        if self.cfg.sample_images:
            for path, ds in datasets.items():
                if ds.dtype == np.uint8 and ds.shape is not None and ds.ndim == 4 and ds.shape[0] > 0:
                    self._sample(ds, path, name)
        self.episodes.append(
            _EpisodeScan(
                file=self.file,
                name=name,
                signature={p: (tuple(ds.shape[1:]) if ds.shape else (), ds.dtype.str) for p, ds in datasets.items()},
                action_min=low,
                action_max=high,
                frames=length or 0,
                reported=tuple(reported),
            )
        )
        return EpisodeRow(
            episode=name,
            length=length,
            action_min=_floats(low),
            action_max=_floats(high),
            instruction=instruction_of(f, group, KeyMap(), name),
        )

    def _lengths(self, datasets: dict[str, h5py.Dataset], name: str, length: int, action_path: str, rm: bool) -> None:
        for path, ds in datasets.items():
            if ds.shape is None or ds.ndim == 0 or ds.shape[0] == length:
                continue
            per_frame = rm or (ds.dtype == np.uint8 and ds.ndim == 4) or path.rsplit("/", 1)[-1] in METADATA_KEYS
            if per_frame:
                self.add(
                    "error",
                    "length_mismatch",
                    name,
                    f"{path} has {ds.shape[0]} frames but {action_path} has {length}",
                )
            elif ds.dtype.kind == "f" and ds.ndim in (1, 2):
                self.add(
                    "warning",
                    "length_mismatch",
                    name,
                    f"{path} has {ds.shape[0]} rows but {action_path} has {length} frames: the readers leave it "
                    f"out of the state",
                )

    def _nonfinite(self, ds: h5py.Dataset, path: str, name: str) -> None:
        bad = 0
        first: int | None = None
        try:
            for start, block in _blocks(ds):
                mask = ~np.isfinite(block)
                if mask.any():
                    rows = np.flatnonzero(mask.reshape(len(block), -1).any(axis=1))  # (rows with NaN/Inf,)
                    first = start + int(rows[0]) if first is None else first
                    bad += int(mask.sum())
        except H5_ERRORS as exc:
            self.add("error", "unreadable", name, f"{path} cannot be read: {one_line(exc)}")
            return
        if bad:
            self.add("error", "nonfinite", name, f"{path} has {bad} NaN or Inf values, the first in frame {first}")

    def _action_range(self, ds: h5py.Dataset, path: str, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        dim = 1 if ds.ndim == 1 else int(ds.shape[1])
        low = np.full(dim, np.inf)
        high = np.full(dim, -np.inf)
        try:
            for _, block in _blocks(ds):
                values = block.astype(np.float64).reshape(len(block), dim)  # (rows, D)
                finite = np.isfinite(values)
                low = np.minimum(low, np.where(finite, values, np.inf).min(axis=0, initial=np.inf))
                high = np.maximum(high, np.where(finite, values, -np.inf).max(axis=0, initial=-np.inf))
        except H5_ERRORS as exc:
            self.add("error", "unreadable", name, f"{path} cannot be read: {one_line(exc)}")
            return None, None
        outside = []
        for d in range(dim):
            ends = [f"min {low[d]:.4g}"] if low[d] < -1 - RANGE_TOLERANCE else []
            ends += [f"max {high[d]:.4g}"] if high[d] > 1 + RANGE_TOLERANCE else []
            if ends:
                outside.append(f"{d} ({', '.join(ends)})")
        if outside:
            self.add(
                "warning",
                "action_out_of_range",
                name,
                f"{path} leaves [-1, 1] in dimension{'s' if len(outside) > 1 else ''} {', '.join(outside)}: fine when "
                f"ds-stats normalizes them for training; otherwise check their units",
            )
        return low, high

    def _sample(self, ds: h5py.Dataset, path: str, name: str) -> None:
        count = int(ds.shape[0])
        index = np.unique(np.linspace(0, count - 1, min(self.cfg.sample_images, count)).round().astype(np.int64))
        try:
            frames = np.asarray(ds[index.tolist()], dtype=np.float32)  # (N, H, W, C)
        except H5_ERRORS as exc:
            self.add("error", "unreadable", name, f"{path} cannot be read: {one_line(exc)}")
            return
        third = max(1, frames.shape[1] // 3)
        flat = frames.reshape(len(frames), -1)  # (N, H * W * C)
        blank = int((flat.max(axis=1) == flat.min(axis=1)).sum())
        sample = CameraSample(
            episode=name,
            dataset=path,
            frames=len(frames),
            top_mean=float(frames[:, :third].mean()),
            bottom_mean=float(frames[:, -third:].mean()),
            blank_frames=blank,
        )
        self.samples.append(sample)
        if blank:
            self.add(
                "warning",
                "blank_images",
                name,
                f"{blank} of {len(frames)} sampled frames of {path} are a single colour: check the camera",
            )


def _datasets(group: h5py.Group) -> dict[str, h5py.Dataset]:
    found = {name: obj for name, obj in walk(group) if isinstance(obj, h5py.Dataset)}
    return dict(sorted(found.items(), key=lambda item: natural_key(item[0])))


def _has_observation(datasets: dict[str, h5py.Dataset], robomimic: bool) -> bool:
    """Whether a camera or a state the readers take by default is there (its length is checked apart)."""
    for path, ds in datasets.items():
        if robomimic and not path.startswith(f"{ROBOMIMIC_OBS}/"):
            continue
        if path in ACTION_KEYS or path.rsplit("/", 1)[-1] in METADATA_KEYS:
            continue
        if is_camera(ds) or (is_lowdim(ds) and (robomimic or ds.dtype.kind == "f")):
            return True
    return False


def _blocks(ds: h5py.Dataset) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` blocks of a ``(T,)``/``(T, D)`` dataset, a bounded number of values at a time."""
    width = 1 if ds.ndim == 1 else max(1, int(ds.shape[1]))
    step = max(1, BLOCK_ELEMENTS // width)
    for start in range(0, int(ds.shape[0]), step):
        yield start, np.asarray(ds[start : start + step])


def _floats(values: np.ndarray | None) -> tuple[float | None, ...]:
    if values is None:
        return ()
    return tuple(float(v) if np.isfinite(v) else None for v in values)


def _sample_summary(samples: Sequence[CameraSample]) -> str:
    if not samples:
        return ""
    parts = []
    for dataset in dict.fromkeys(s.dataset for s in samples):
        mine = [s for s in samples if s.dataset == dataset]
        frames = sum(s.frames for s in mine)
        top = sum(s.top_mean * s.frames for s in mine) / frames
        bottom = sum(s.bottom_mean * s.frames for s in mine) / frames
        parts.append(f"{dataset} top third {top:.1f}, bottom third {bottom:.1f} over {frames} frames")
    return "; mean brightness as stored: " + "; ".join(parts)


def _tree(f: h5py.File) -> Iterator[Node]:
    yield Node("/", "group", attrs=_attrs(f))
    for name, obj in sorted(walk(f), key=lambda item: natural_key(item[0])):
        if isinstance(obj, h5py.Dataset):
            yield Node(
                path=f"/{name}",
                kind="dataset",
                shape=None if obj.shape is None else tuple(int(d) for d in obj.shape),
                dtype=str(obj.dtype),
                chunks=obj.chunks,
                compression=_compression(obj),
                attrs=_attrs(obj),
            )
        elif isinstance(obj, h5py.Group):
            yield Node(f"/{name}", "group", attrs=_attrs(obj))
        else:
            yield Node(f"/{name}", "datatype")


def _compression(ds: h5py.Dataset) -> str | None:
    if ds.compression is None:
        return None
    opts = ds.compression_opts
    return ds.compression if opts is None else f"{ds.compression} {opts}"


def _attrs(obj: h5py.Group | h5py.Dataset) -> tuple[tuple[str, str], ...]:
    out = []
    for name in obj.attrs:
        try:
            value = obj.attrs[name]
        except H5_ERRORS as exc:
            out.append((name, f"<unreadable: {one_line(exc)}>"))
            continue
        out.append((name, _shorten(_attr_text(value))))
    return tuple(out)


def _attr_text(value: Any) -> str:
    text = text_value(value)
    if text is not None:
        return text
    if isinstance(value, np.ndarray):
        if value.size > 8:
            return f"array {value.shape} {value.dtype}"
        return np.array2string(value, separator=", ")
    return str(value)


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= ATTR_CHARS:
        return text
    return f"{text[:ATTR_CHARS]}... ({len(text):,} chars)"


def _consistency(episodes: Sequence[_EpisodeScan]) -> Iterator[Finding]:
    """Every episode of a dataset has the first episode's keys, with the same per-frame shapes and dtypes."""
    if len(episodes) < 2:
        return
    ref = episodes[0]
    for ep in episodes[1:]:
        missing = [
            k
            for k in ref.signature
            if k not in ep.signature and not any(k == r or (r.endswith("/") and k.startswith(r)) for r in ep.reported)
        ]
        added = [k for k in ep.signature if k not in ref.signature]
        where = ref.name if ep.file == ref.file else f"{ref.name} ({ref.file})"
        if missing:
            yield Finding("error", "missing_key", ep.file, ep.name, f"lacks {', '.join(missing)}, which {where} has")
        if added:
            yield Finding("error", "missing_key", ep.file, ep.name, f"has {', '.join(added)}, which {where} lacks")
        for key in ref.signature:
            if key in ep.signature and ep.signature[key] != ref.signature[key]:
                (shape, dtype), (ref_shape, ref_dtype) = ep.signature[key], ref.signature[key]
                yield Finding(
                    "error",
                    "shape_mismatch",
                    ep.file,
                    ep.name,
                    f"{key} is {np.dtype(dtype)} {shape} per frame but {np.dtype(ref_dtype)} {ref_shape} in {where}",
                )


def _constant_dims(episodes: Sequence[_EpisodeScan]) -> Iterator[Finding]:
    """Action dimensions with one value in every frame of every episode of a dataset."""
    ranges = [(ep.action_min, ep.action_max) for ep in episodes if ep.action_min is not None and ep.frames > 0]
    if not ranges or sum(ep.frames for ep in episodes) < 2:
        return
    dims = {len(low) for low, _ in ranges if low is not None}
    if len(dims) != 1:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.min(np.stack([r[0] for r in ranges if r[0] is not None]), axis=0)
        high = np.max(np.stack([r[1] for r in ranges if r[1] is not None]), axis=0)
    constant = [d for d in range(len(low)) if np.isfinite(low[d]) and low[d] == high[d]]
    if constant:
        first = episodes[0]
        scope = f"all {len(ranges)} episodes" if len(ranges) > 1 else "the episode"
        values = ", ".join(f"{d} (= {low[d]:.4g})" for d in constant)
        yield Finding(
            "warning",
            "constant_action_dim",
            first.file,
            None,
            f"action dimension {values} never changes in {scope}: it carries no information and has zero "
            f"standard deviation",
        )
