"""HDF5 datasets: robomimic/LIBERO files and flat one-episode files, behind the lazy episode interface.

Two layouts are read, each with its own ``format``:

``hdf5_robomimic``: robomimic's layout, which LIBERO uses too (one file per task)::

    data/                      attrs: env_args (JSON), LIBERO: problem_info (JSON), bddl_file_name
      demo_0/                  attrs: num_samples
        actions   (T, D)
        dones     (T,)
        rewards   (T,)
        obs/<key> (T, ...)     e.g. agentview_rgb (T, H, W, 3) uint8, joint_states (T, 7)

A file is one dataset; its episodes are the groups under ``data`` in natural order (``demo_2``
before ``demo_10``).

``hdf5_flat``: one episode per file, datasets at any depth, e.g. ``images (T, H, W, 3) uint8``,
``actions (T, D)``, ``action_event_types (T,)``, as mobile-robot teams record them. A directory of
such files is one dataset whose episodes are the files, sorted by name. A directory mixing the two
layouts is refused.

Defaults, where the key map (:class:`~vlacl.data.keymap.KeyMap`) leaves an entry unset:

- action: ``actions`` (robomimic: in the episode group; flat: ``actions``, else ``action``).
- cameras: uint8 datasets of shape ``(T, H, W, 3)`` or ``(T, H, W, 1)`` (robomimic: under ``obs``;
  flat: anywhere). The camera name is the last path component with a trailing ``_rgb``,
  ``_image`` or ``_images`` stripped, and ``images`` itself becomes ``image``: LIBERO's
  ``agentview_rgb`` and ``eye_in_hand_rgb`` become cameras ``agentview`` and ``eye_in_hand``.
- state: robomimic: every other numeric ``obs`` dataset of shape ``(T,)`` or ``(T, D)``; flat: every
  other float dataset of that shape whose first dimension is the episode length, leaving out the
  action and the known per-frame metadata (:data:`METADATA_KEYS`). Keys are concatenated in sorted
  order along the last axis and cast to float32.
- extra: the known per-frame metadata present (robomimic: ``rewards``, ``dones``; flat:
  ``action_event_types``, ``timestamps``, ...), each under its own name (its path in the group).

Key-map keys name datasets relative to the episode group; for robomimic a bare key is looked up
under ``obs`` first (``joint_states`` means ``obs/joint_states``), then in the group itself.

Instruction, first that applies: the key map's ``instruction`` (literal); the key map's
``instruction_key`` (an attribute of the episode group, of ``data`` or of the file, or a dataset
of strings in the episode); LIBERO's ``problem_info`` JSON attribute of ``data``
(``language_instruction``); an attribute ``language_instruction``, ``instruction`` or ``task`` of
the episode group, of ``data`` or of the file (or a string dataset of that name in the episode);
otherwise "". Within a dataset, ``task_index`` numbers the distinct instructions in order of first
appearance (0 when there are none).

Flip: LIBERO renders with OpenGL's bottom-left origin, so its frames are stored upside down.
Frames are rotated by 180 degrees when the key map says ``flip_images: true``; without it, when an
attribute ``macros_image_convention`` says ``opengl`` (``opencv`` turns it off), or when the file
is LIBERO's (``problem_info`` or ``bddl_file_name`` attributes, or ``env_args`` naming LIBERO or a
BDDL file).

Arrays are read only in :meth:`Hdf5Episode.read`. File handles are opened on first read and
cached per process (keyed by path and pid, reopened when the file changes, at most
:data:`MAX_OPEN_FILES`); the cache is emptied in a forked child, so DataLoader workers open their
own handles, and episodes and datasets pickle as plain paths and indices.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import h5py
import numpy as np

from vlacl.data.episode import ColumnBatch, EpisodeDataset, iter_columns_by_episode, task_instructions
from vlacl.data.features import (
    ACTION,
    EPISODE_INDEX,
    FRAME_INDEX,
    IMAGE_PREFIX,
    INDEX,
    STATE,
    TASK_INDEX,
    Feature,
    image_key,
)
from vlacl.data.keymap import KeyMap
from vlacl.data.open import HDF5_SUFFIXES
from vlacl.errors import InputFormatError

log = logging.getLogger(__name__)

FORMAT_ROBOMIMIC: Final = "hdf5_robomimic"
FORMAT_FLAT: Final = "hdf5_flat"
ROBOMIMIC_DATA: Final = "data"
ROBOMIMIC_OBS: Final = "obs"
ACTION_KEYS: Final = ("actions", "action")
METADATA_KEYS: Final = frozenset(
    {
        "action_event_types",
        "event_types",
        "rewards",
        "reward",
        "dones",
        "done",
        "terminals",
        "is_terminal",
        "is_first",
        "is_last",
        "timestamps",
        "timestamp",
    }
)
"""Per-frame metadata: never state; read as ``extra`` features under their own name."""
INSTRUCTION_KEYS: Final = ("language_instruction", "instruction", "task")
CAMERA_SUFFIXES: Final = ("_rgb", "_images", "_image")
RESERVED_KEYS: Final = frozenset({STATE, ACTION, TASK_INDEX, EPISODE_INDEX, FRAME_INDEX, INDEX})
MAX_OPEN_FILES: Final = 64
"""Cached read handles per process; enough for a stream of LIBERO files without running out of descriptors."""

H5_ERRORS: Final = (OSError, KeyError, ValueError, TypeError, RuntimeError)
"""What h5py raises on a damaged or unexpected file; converted to InputFormatError at every boundary."""

Layout = Literal["robomimic", "flat"]
SourceKind = Literal["state", "action", "image", "extra"]


@dataclass(frozen=True)
class Source:
    """Where a canonical feature lives in an episode group.

    Attributes:
        kind: State (concatenated, float32), action (float32), image (uint8) or extra (as stored).
        paths: Dataset paths relative to the episode group, in concatenation order.
        names: The same keys as the key map names them, for messages and dimension names.
    """

    kind: SourceKind
    paths: tuple[str, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class Hdf5Episode:
    """One episode of an HDF5 dataset: a ``data/demo_N`` group, or a whole flat file.

    Attributes:
        index: Position in the dataset (0-based, in the dataset's episode order).
        length: Number of frames (the length of the action dataset).
        task_index: Task within the dataset: the rank of the instruction by first appearance.
        instruction: The language instruction ("" when the file has none).
        subset: The file's stem (robomimic) or the directory's name (flat files).
        file: The HDF5 file.
        group: The episode group inside the file (``data/demo_0``; ``/`` for a flat file).
        sources: Canonical key -> where its datasets are, shared by the episodes of a dataset.
        flip_images: Rotate camera frames by 180 degrees when read.
    """

    index: int
    length: int
    task_index: int
    instruction: str
    subset: str
    file: Path
    group: str
    sources: Mapping[str, Source]
    flip_images: bool

    @property
    def source(self) -> str:
        """``file`` for a flat file, ``file:group`` for a robomimic episode."""
        return str(self.file) if self.group == "/" else f"{self.file}:{self.group}"

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` of the canonical feature ``key``: ``(T, *feature.shape)``.

        Raises:
            InputFormatError: ``key`` is not a feature of the episode, or the file cannot be read.
            IndexError: ``start``/``stop`` outside ``[0, length]`` or ``start > stop``.
        """
        src = self.sources.get(key)
        if src is None:
            raise InputFormatError(f"{self.source} has no feature {key!r}: its features are {', '.join(self.sources)}")
        stop = self.length if stop is None else stop
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"frames [{start}, {stop}) are outside episode {self.source} of {self.length} frames")
        with h5_errors(f"{key!r} ({', '.join(src.paths)}) of {self.source}"):
            group = _cached_file(self.file)[self.group]
            parts = [np.asarray(group[path][start:stop]) for path in src.paths]
        return _assemble(src, parts, self.flip_images)


def _assemble(src: Source, parts: list[np.ndarray], flip: bool) -> np.ndarray:
    if src.kind == "image":
        frames = parts[0]
        if frames.ndim == 3:
            frames = frames[..., None]  # (T, H, W) -> (T, H, W, 1)
        if flip:
            frames = frames[:, ::-1, ::-1, :]  # (T, H, W, C), rotated by 180 degrees
        return np.ascontiguousarray(frames, dtype=np.uint8)
    if src.kind == "extra":
        values = parts[0].astype(parts[0].dtype.newbyteorder("="), copy=False)
        return values[:, None] if values.ndim == 1 else values  # (T,) -> (T, 1)
    columns = [np.asarray(p, dtype=np.float32) for p in parts]
    columns = [c[:, None] if c.ndim == 1 else c for c in columns]  # (T,) -> (T, 1)
    if len(columns) == 1:
        return columns[0]
    return np.concatenate(columns, axis=1)  # (T, sum of D)


@dataclass(frozen=True)
class Hdf5Dataset:
    """An HDF5 dataset: one robomimic/LIBERO file, or a directory (or file) of flat episodes.

    Attributes:
        root: The path it was opened from: the robomimic file, the flat directory or flat file.
        format: ``hdf5_robomimic`` or ``hdf5_flat``.
        features: Canonical key -> per-frame description.
        keymap: The key map it was opened with.
        fps: Frames per second when the file records it (``fps`` attribute, or robosuite's
            ``control_freq`` in ``env_args``).
        episodes: The episodes in order.
        files: The HDF5 files, in episode order for flat datasets.
        flip_images: Whether camera frames are rotated by 180 degrees when read.
    """

    root: Path
    format: str
    features: Mapping[str, Feature]
    keymap: KeyMap
    fps: float | None
    episodes: tuple[Hdf5Episode, ...]
    files: tuple[Path, ...]
    flip_images: bool

    def identity(self) -> dict[str, Any]:
        """Format, features, episode lengths, tasks, flip, and per file its name (relative to root) and size."""
        files = []
        for path in self.files:
            name = path.name if path == self.root else path.relative_to(self.root).as_posix()
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise InputFormatError(f"cannot read {path}: {exc.strerror}; check that it still exists") from None
            files.append({"name": name, "bytes": size})
        return {
            "format": self.format,
            "features": {key: feature.to_dict() for key, feature in self.features.items()},
            "episode_lengths": [ep.length for ep in self.episodes],
            "tasks": {str(k): v for k, v in task_instructions(self.episodes).items()},
            "flip_images": self.flip_images,
            "files": files,
        }

    def iter_columns(self, keys: Sequence[str], *, rows_per_batch: int = 65536) -> Iterator[ColumnBatch]:
        """Numeric features in bulk, episode by episode."""
        for key in keys:
            if key not in self.features:
                raise InputFormatError(
                    f"{self.root} has no feature {key!r}: its features are {', '.join(self.features)}"
                )
        return iter_columns_by_episode(self.episodes, keys, rows_per_batch=rows_per_batch)


def open_hdf5(path: Path, keymap: KeyMap) -> list[EpisodeDataset]:
    """Open an HDF5 file, or a directory of them, as datasets.

    A robomimic/LIBERO file is one dataset; a directory of them gives one dataset per file, in name
    order. A flat one-episode file is a dataset of one episode; a directory of them is one dataset.

    Raises:
        InputFormatError: A file that is not HDF5 or is truncated, a directory with no HDF5 file or
            mixing layouts, a missing or malformed key, an empty ``data`` group.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES)
        if not files:
            raise InputFormatError(f"{path} holds no HDF5 file ({', '.join(HDF5_SUFFIXES)}): check the directory")
    elif path.is_file():
        files = [path]
    else:
        raise InputFormatError(f"dataset path {path} does not exist: check the path")
    robomimic: list[Hdf5Dataset] = []
    flat: list[tuple[Path, _FlatScan]] = []
    flat_sources: dict[str, Source] | None = None
    for file in files:
        with open_h5(file) as f, h5_errors(str(file)):
            if file_layout(f) == "robomimic":
                robomimic.append(_open_robomimic(file, f, keymap))
                continue
            where = _rel(file, path)
            if flat_sources is None:
                _warn_bad_json(f, file)
                flat_sources = _sources(f, keymap, "flat", where)
            flat.append((file, _scan_flat(f, flat_sources, keymap, where)))
    if robomimic and flat:
        raise InputFormatError(
            f"{path} mixes robomimic/LIBERO files ({robomimic[0].root.name}, with a data group) and flat "
            f"one-episode files ({flat[0][0].name}): put each layout in its own directory"
        )
    if robomimic:
        return list(robomimic)
    if flat_sources is None:
        raise InputFormatError(f"{path} holds no HDF5 file: check the path")
    return [_flat_dataset(path, flat, flat_sources, keymap)]


def file_layout(f: h5py.File) -> Layout:
    """``robomimic`` when the file has a ``data`` group, else ``flat``."""
    return "robomimic" if isinstance(f.get(ROBOMIMIC_DATA), h5py.Group) else "flat"


@contextmanager
def open_h5(path: Path) -> Iterator[h5py.File]:
    """Open an HDF5 file for reading, turning every failure into one clear :class:`InputFormatError`."""
    f = _open_file(path)
    try:
        yield f
    finally:
        f.close()


def _open_file(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise InputFormatError(f"{path} does not exist: check the path") from None
    except PermissionError:
        raise InputFormatError(f"{path} cannot be read (permission denied): check its permissions") from None
    except H5_ERRORS as exc:
        raise InputFormatError(
            f"{path} is not an HDF5 file (or is truncated): {one_line(exc)}; check the file, e.g. with `h5dump -H`"
        ) from None


@contextmanager
def h5_errors(where: str) -> Iterator[None]:
    """Turn an exception from h5py while reading ``where`` into an :class:`InputFormatError`."""
    try:
        yield
    except H5_ERRORS as exc:
        raise InputFormatError(f"cannot read {where}: {one_line(exc)}; the file may be damaged") from None


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (h5py's own messages, without the traceback)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.strip("'\"")


_HANDLES: OrderedDict[tuple[str, int], tuple[h5py.File, tuple[int, int, int]]] = OrderedDict()
_HANDLES_LOCK = threading.Lock()


def _cached_file(path: Path) -> h5py.File:
    """A read handle on ``path`` for this process, opened on first use and reopened if the file changed."""
    try:
        st = path.stat()
    except OSError as exc:
        raise InputFormatError(f"cannot read {path}: {exc.strerror}; check that it still exists") from None
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = (str(path), os.getpid())
    with _HANDLES_LOCK:
        entry = _HANDLES.get(key)
        if entry is not None and entry[1] == stamp and entry[0].id.valid:
            _HANDLES.move_to_end(key)
            return entry[0]
        if entry is not None:
            _HANDLES.pop(key)[0].close()
        handle = _open_file(path)
        _HANDLES[key] = (handle, stamp)
        while len(_HANDLES) > MAX_OPEN_FILES:
            (_, pid), (old, _) = _HANDLES.popitem(last=False)
            if pid == os.getpid():
                old.close()
        return handle


def close_cached_files() -> None:
    """Close this process's cached read handles (they reopen on the next read)."""
    with _HANDLES_LOCK:
        for (_, pid), (handle, _) in list(_HANDLES.items()):
            if pid == os.getpid():
                handle.close()
        _HANDLES.clear()


def _forget_inherited_handles() -> None:
    """In a forked child, drop the parent's handles so the child opens its own.

    The lock is new too: a parent thread may have held it at the fork, and the child's copy would stay held.
    """
    global _HANDLES_LOCK
    _HANDLES_LOCK = threading.Lock()
    _HANDLES.clear()


os.register_at_fork(after_in_child=_forget_inherited_handles)


def text_value(value: Any) -> str | None:
    """An attribute or dataset value as text, or ``None`` when it is not text."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()  # (1,) or () -> scalar
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return str(value)
    return None


def attr_text(obj: h5py.Group | h5py.Dataset, name: str) -> str | None:
    """The attribute ``name`` of ``obj`` as text; ``None`` when absent, unreadable or not text."""
    try:
        if name not in obj.attrs:
            return None
        return text_value(obj.attrs[name])
    except H5_ERRORS:
        log.debug("attribute %s of %s is unreadable", name, obj.name)
        return None


def dataset_text(group: h5py.Group, name: str) -> str | None:
    """The first string of a string dataset ``name`` in ``group``; ``None`` when there is none."""
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset) or ds.shape is None or h5py.check_string_dtype(ds.dtype) is None:
        return None
    if ds.ndim > 1 or (ds.ndim == 1 and ds.shape[0] == 0):
        return None
    return text_value(ds[()] if ds.ndim == 0 else ds[0])


def json_attr(obj: h5py.Group, name: str) -> dict[str, Any] | None:
    """A JSON attribute (``env_args``, ``problem_info``) parsed to a dict; ``None`` when absent or invalid."""
    text = attr_text(obj, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


JSON_ATTRS: Final = ("problem_info", "env_args")


def bad_json_attrs(f: h5py.File) -> list[str]:
    """``problem_info``/``env_args`` attributes (as ``/data@problem_info``) that are text but not a JSON object."""
    bad = []
    for scope in (f.get(ROBOMIMIC_DATA), f):
        if not isinstance(scope, h5py.Group):
            continue
        for name in JSON_ATTRS:
            if attr_text(scope, name) is not None and json_attr(scope, name) is None:
                bad.append(f"{scope.name}@{name}")
    return bad


def _warn_bad_json(f: h5py.File, path: Path) -> None:
    for where in bad_json_attrs(f):
        log.warning("attribute %s in %s is not a JSON object; ignored (no instruction or fps from it)", where, path)


def instruction_of(f: h5py.File, group: h5py.Group, keymap: KeyMap, where: str) -> str:
    """The episode's language instruction, by the rules in the module docstring."""
    if keymap.instruction is not None:
        return keymap.instruction
    data = f.get(ROBOMIMIC_DATA) if group != f else None
    scopes = [g for g in (group, data, f) if isinstance(g, h5py.Group)]
    if keymap.instruction_key is not None:
        name = keymap.instruction_key
        for scope in scopes:
            if (text := attr_text(scope, name)) is not None:
                return text
        for candidate in (name, f"{ROBOMIMIC_OBS}/{name}"):
            if (text := dataset_text(group, candidate)) is not None:
                return text
        raise InputFormatError(
            f"key map names instruction_key {name!r} which {where} lacks (no text attribute or string dataset "
            f"of that name): fix instruction_key or set instruction"
        )
    if isinstance(data, h5py.Group):
        problem = json_attr(data, "problem_info")
        if problem is not None and isinstance(problem.get("language_instruction"), str):
            return str(problem["language_instruction"])
    for scope in scopes:
        for name in INSTRUCTION_KEYS:
            if (text := attr_text(scope, name)) is not None:
                return text
    for name in INSTRUCTION_KEYS:
        if (text := dataset_text(group, name)) is not None:
            return text
    return ""


def libero_marker(f: h5py.File) -> str | None:
    """Why the file is LIBERO's (which attribute says so), or ``None``."""
    holder = f.get(ROBOMIMIC_DATA)
    scopes = [g for g in (holder, f) if isinstance(g, h5py.Group)]
    for scope in scopes:
        for name in ("problem_info", "bddl_file_name"):
            if name in scope.attrs:
                return f"{name} attribute"
        env_args = attr_text(scope, "env_args")
        if env_args is not None and ("libero" in env_args.lower() or "bddl" in env_args.lower()):
            return "env_args naming LIBERO"
    return None


def image_convention(f: h5py.File) -> str | None:
    """The ``macros_image_convention`` attribute (``opengl`` or ``opencv``), lower-cased, if any."""
    for scope in (f.get(ROBOMIMIC_DATA), f):
        if isinstance(scope, h5py.Group) and (text := attr_text(scope, "macros_image_convention")) is not None:
            return text.strip().lower()
    return None


def default_flip(f: h5py.File) -> bool:
    """Whether the file's frames are upside down: ``macros_image_convention``, else LIBERO's files are."""
    convention = image_convention(f)
    if convention in ("opengl", "opencv"):
        return convention == "opengl"
    return libero_marker(f) is not None


def _fps(f: h5py.File) -> float | None:
    for scope in (f, f.get(ROBOMIMIC_DATA)):
        if not isinstance(scope, h5py.Group):
            continue
        try:
            value = scope.attrs.get("fps")
        except H5_ERRORS:
            value = None
        is_number = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        if is_number and np.isfinite(value) and float(value) > 0:
            return float(value)
        env_args = json_attr(scope, "env_args")
        kwargs = env_args.get("env_kwargs") if env_args else None
        freq = kwargs.get("control_freq") if isinstance(kwargs, dict) else None
        if isinstance(freq, int | float) and not isinstance(freq, bool) and np.isfinite(freq) and freq > 0:
            return float(freq)
    return None


def natural_key(name: str) -> list[tuple[int, str]]:
    """Sort key putting ``demo_2`` before ``demo_10``: digit runs compare as numbers."""
    return [(int(part), "") if i % 2 else (0, part) for i, part in enumerate(re.split(r"(\d+)", name))]


def camera_name(key: str) -> str:
    """Camera name of a dataset: the last path component, ``_rgb``/``_image(s)`` stripped; ``images`` -> ``image``.

    Dots become underscores, as camera names go after ``observation.images.``.
    """
    name = key.rsplit("/", 1)[-1].replace(".", "_")
    if name == "images":
        return "image"
    for suffix in CAMERA_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def is_numeric(ds: h5py.Dataset) -> bool:
    """Booleans, integers and floats (not strings, compounds or complex numbers)."""
    return ds.dtype.kind in "biuf"


def is_camera(ds: h5py.Dataset) -> bool:
    """A uint8 ``(T, H, W, 3)`` or ``(T, H, W, 1)`` dataset."""
    return ds.shape is not None and ds.dtype == np.uint8 and ds.ndim == 4 and ds.shape[-1] in (1, 3)


def is_lowdim(ds: h5py.Dataset) -> bool:
    """A numeric ``(T,)`` or ``(T, D)`` dataset."""
    return ds.shape is not None and ds.ndim in (1, 2) and is_numeric(ds)


def walk(group: h5py.Group) -> list[tuple[str, object]]:
    """Every object under ``group`` reached by hard links, depth first in name order, with its relative path.

    It visits links (HDF5's ``H5Lvisit``, which skips soft and external links and never loops),
    then opens each object. ``visititems`` would ask HDF5 for each object's full info, which walks
    the chunk index of every chunked dataset: its cost grows with the episode length.
    """
    names: list[str] = []

    def visit(name: bytes, info: Any) -> None:
        if info.type == h5py.h5l.TYPE_HARD:
            names.append(name.decode("utf-8", errors="replace"))

    group.id.links.visit(visit, info=True)
    out: list[tuple[str, object]] = []
    for name in names:
        obj = group.get(name)
        if obj is not None:
            out.append((name, obj))
    return out


def _datasets(group: h5py.Group) -> dict[str, h5py.Dataset]:
    """Every dataset under ``group`` (recursively), by path relative to it."""
    return {name: obj for name, obj in walk(group) if isinstance(obj, h5py.Dataset)}


def _listing(group: h5py.Group) -> str:
    names = sorted(_datasets(group), key=natural_key)
    if not names:
        return "none"
    shown = ", ".join(names[:20])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def _resolve(group: h5py.Group, key: str, layout: Layout, *, what: str, where: str) -> str:
    """The path of the dataset the key map calls ``key`` (see the module docstring)."""
    candidates = [key] if "/" in key or layout == "flat" else [f"{ROBOMIMIC_OBS}/{key}", key]
    if what == "action" and layout == "robomimic" and "/" not in key:
        candidates.reverse()
    for path in candidates:
        if isinstance(group.get(path), h5py.Dataset):
            return path
    raise InputFormatError(f"key map names {what} key {key!r} which {where} lacks; datasets there: {_listing(group)}")


def _sources(group: h5py.Group, keymap: KeyMap, layout: Layout, where: str) -> dict[str, Source]:
    """Canonical key -> source, from the key map and the first episode's structure."""
    all_ds = _datasets(group)
    if keymap.action is not None:
        action = _resolve(group, keymap.action, layout, what="action", where=where)
    else:
        found = [k for k in ACTION_KEYS if isinstance(group.get(k), h5py.Dataset)]
        if not found:
            raise InputFormatError(
                f"{where} has no action dataset ({' or '.join(ACTION_KEYS)}): name it in a key map "
                f"(action: <key>); datasets there: {_listing(group)}"
            )
        action = found[0]
    length = _length(group[action], action, where)
    obs_prefix = f"{ROBOMIMIC_OBS}/" if layout == "robomimic" else ""
    candidates = {k: ds for k, ds in all_ds.items() if k.startswith(obs_prefix) and k != action}

    cameras: dict[str, str] = {}
    if keymap.cameras is not None:
        for name, key in keymap.cameras.items():
            cameras[name] = _resolve(group, key, layout, what=f"camera {name!r}", where=where)
    else:
        for path in sorted(candidates, key=natural_key):
            ds = candidates[path]
            if is_camera(ds):  # a camera of another length is an error below, not left out
                name = camera_name(path)
                if name in cameras:
                    raise InputFormatError(
                        f"{where} has two cameras named {name!r} ({cameras[name]} and {path}): name the cameras "
                        f"in a key map (cameras: {{name: key}})"
                    )
                cameras[name] = path

    extra: dict[str, str] = {}
    if keymap.extra is not None:
        for name, key in keymap.extra.items():
            if name in RESERVED_KEYS or name.startswith(IMAGE_PREFIX):
                raise InputFormatError(
                    f"key map extra name {name!r} is a canonical feature name: choose another name for {key!r}"
                )
            extra[name] = _resolve(group, key, layout, what=f"extra {name!r}", where=where)
    else:
        for path in sorted(all_ds, key=natural_key):
            ds = all_ds[path]
            is_meta = path.rsplit("/", 1)[-1] in METADATA_KEYS and path != action
            if layout == "robomimic":
                is_meta = is_meta and "/" not in path
            if is_meta and is_lowdim(ds) and ds.shape[0] == length:
                extra[path] = path

    used = {action, *cameras.values(), *extra.values()}
    if keymap.state is not None:
        state = [_resolve(group, key, layout, what="state", where=where) for key in keymap.state]
        state_names = list(keymap.state)
    else:
        state = []
        for path in sorted(candidates, key=natural_key):
            ds = candidates[path]
            if path in used or path.rsplit("/", 1)[-1] in METADATA_KEYS or not is_lowdim(ds):
                continue
            if layout == "flat" and (ds.dtype.kind != "f" or ds.shape[0] != length):
                continue
            state.append(path)
        state_names = [p[len(obs_prefix) :] for p in state]
    if not state and not cameras:
        raise InputFormatError(
            f"{where} has no observations vlacl recognizes (no uint8 (T, H, W, 3) camera, no numeric (T, D) "
            f"state): name them in a key map (state: [...], cameras: {{...}}); datasets there: {_listing(group)}"
        )

    sources: dict[str, Source] = {}
    if state:
        sources[STATE] = Source("state", tuple(state), tuple(state_names))
    for name, path in cameras.items():
        sources[image_key(name)] = Source("image", (path,), (path,))
    sources[ACTION] = Source("action", (action,), (keymap.action or action,))
    for name, path in extra.items():
        sources[name] = Source("extra", (path,), (path,))
    return sources


def _length(ds: h5py.Dataset, path: str, where: str) -> int:
    if ds.shape is None or ds.ndim == 0:
        raise InputFormatError(f"{path} in {where} has no frames (shape {ds.shape}): it must be (T, ...)")
    return int(ds.shape[0])


def _describe(group: h5py.Group, sources: Mapping[str, Source], where: str) -> tuple[int, dict[str, Feature]]:
    """The episode's length and per-frame features, checking every source against the action's length."""
    datasets: dict[str, list[h5py.Dataset]] = {}
    for key, src in sources.items():
        found = []
        for path in src.paths:
            ds = group.get(path)
            if not isinstance(ds, h5py.Dataset):
                raise InputFormatError(
                    f"{where} lacks {path}, which {key} reads (as in the first episode): "
                    f"every episode needs the same keys; datasets there: {_listing(group)}"
                )
            found.append(ds)
        datasets[key] = found
    action_path = sources[ACTION].paths[0]
    length = _length(datasets[ACTION][0], action_path, where)
    features: dict[str, Feature] = {}
    for key, src in sources.items():
        for path, ds in zip(src.paths, datasets[key], strict=True):
            if _length(ds, path, where) != length:
                raise InputFormatError(
                    f"{path} in {where} has {ds.shape[0]} frames but {action_path} has {length}: fix the file, "
                    f"or leave {path} out with a key map"
                )
        features[key] = _feature(key, src, datasets[key], where)
    return length, features


def _feature(key: str, src: Source, datasets: list[h5py.Dataset], where: str) -> Feature:
    if src.kind == "image":
        ds = datasets[0]
        if ds.dtype != np.uint8 or ds.ndim not in (3, 4):
            raise InputFormatError(
                f"camera {key} reads {src.paths[0]} in {where}, which is {ds.dtype} {ds.shape}: cameras must be "
                f"uint8 (T, H, W, C) frames"
            )
        shape = tuple(int(d) for d in ds.shape[1:]) + ((1,) if ds.ndim == 3 else ())
        return Feature(key, "uint8", shape)
    for path, ds in zip(src.paths, datasets, strict=True):
        if not is_lowdim(ds):
            raise InputFormatError(
                f"{key} reads {path} in {where}, which is {ds.dtype} {ds.shape}: it must be numeric (T,) or (T, D)"
            )
    if src.kind == "extra":
        ds = datasets[0]
        dim = 1 if ds.ndim == 1 else int(ds.shape[1])
        return Feature(key, ds.dtype.name, (dim,))
    names: list[str] = []
    for name, ds in zip(src.names, datasets, strict=True):
        short = name.rsplit("/", 1)[-1]
        names.extend([short] if ds.ndim == 1 else [f"{short}_{i}" for i in range(int(ds.shape[1]))])
    return Feature(key, "float32", (len(names),), tuple(names) if src.kind == "state" else None)


def _check_same(features: Mapping[str, Feature], first: Mapping[str, Feature], where: str, first_where: str) -> None:
    for key, feature in features.items():
        ref = first[key]
        if (feature.dtype, feature.shape) != (ref.dtype, ref.shape):
            raise InputFormatError(
                f"{key} in {where} is {feature.dtype} {feature.shape} per frame but {ref.dtype} {ref.shape} in "
                f"{first_where}: every episode of a dataset needs the same shapes"
            )


def _tasks(instructions: Sequence[str]) -> list[int]:
    order: dict[str, int] = {}
    return [order.setdefault(text, len(order)) for text in instructions]


def _open_robomimic(path: Path, f: h5py.File, keymap: KeyMap) -> Hdf5Dataset:
    data = f[ROBOMIMIC_DATA]
    names = sorted((n for n in data if isinstance(data.get(n), h5py.Group)), key=natural_key)
    if not names:
        raise InputFormatError(
            f"{path} holds no episodes: its data group has no demo_N groups; check that the file was written completely"
        )
    first_where = f"{names[0]} in {path.name}"
    _warn_bad_json(f, path)
    sources = _sources(data[names[0]], keymap, "robomimic", first_where)
    flip = keymap.flip_images if keymap.flip_images is not None else default_flip(f)
    features: dict[str, Feature] = {}
    lengths: list[int] = []
    instructions: list[str] = []
    for name in names:
        where = f"{name} in {path.name}"
        group = data[name]
        length, feats = _describe(group, sources, where)
        if features:
            _check_same(feats, features, where, first_where)
        else:
            features = feats
        lengths.append(length)
        instructions.append(instruction_of(f, group, keymap, where))
    tasks = _tasks(instructions)
    episodes = tuple(
        Hdf5Episode(
            index=i,
            length=lengths[i],
            task_index=tasks[i],
            instruction=instructions[i],
            subset=path.stem,
            file=path,
            group=f"{ROBOMIMIC_DATA}/{name}",
            sources=sources,
            flip_images=flip,
        )
        for i, name in enumerate(names)
    )
    log.debug(
        "opened %s %s: %d episodes, %d frames, flip_images=%s", FORMAT_ROBOMIMIC, path, len(names), sum(lengths), flip
    )
    return Hdf5Dataset(path, FORMAT_ROBOMIMIC, features, keymap, _fps(f), episodes, (path,), flip)


@dataclass(frozen=True)
class _FlatScan:
    """What the opening pass learned about one flat file."""

    where: str
    length: int
    features: dict[str, Feature]
    instruction: str
    flip: bool
    fps: float | None


def _scan_flat(f: h5py.File, sources: Mapping[str, Source], keymap: KeyMap, where: str) -> _FlatScan:
    length, features = _describe(f, sources, where)
    flip = keymap.flip_images if keymap.flip_images is not None else default_flip(f)
    return _FlatScan(where, length, features, instruction_of(f, f, keymap, where), flip, _fps(f))


def _flat_dataset(
    root: Path, scans: list[tuple[Path, _FlatScan]], sources: Mapping[str, Source], keymap: KeyMap
) -> Hdf5Dataset:
    first = scans[0][1]
    for _, scan in scans[1:]:
        _check_same(scan.features, first.features, scan.where, first.where)
        if scan.flip != first.flip:
            raise InputFormatError(
                f"{scan.where} and {first.where} disagree on whether frames are upside down: set flip_images in "
                f"a key map"
            )
    tasks = _tasks([scan.instruction for _, scan in scans])
    subset = root.name if root.is_dir() else root.stem
    episodes = tuple(
        Hdf5Episode(
            index=i,
            length=scan.length,
            task_index=tasks[i],
            instruction=scan.instruction,
            subset=subset,
            file=file,
            group="/",
            sources=sources,
            flip_images=first.flip,
        )
        for i, (file, scan) in enumerate(scans)
    )
    log.debug("opened %s %s: %d episodes, flip_images=%s", FORMAT_FLAT, root, len(episodes), first.flip)
    files = tuple(file for file, _ in scans)
    return Hdf5Dataset(root, FORMAT_FLAT, first.features, keymap, first.fps, episodes, files, first.flip)


def _rel(file: Path, root: Path) -> str:
    return file.name if file == root else file.relative_to(root).as_posix()
