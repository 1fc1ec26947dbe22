"""Open datasets by path, whatever their format: the entry point of every command that reads data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlacl.data.episode import EpisodeDataset
from vlacl.data.keymap import KeyMap
from vlacl.errors import InputFormatError

HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")
LEROBOT_INFO = Path("meta") / "info.json"


def open_datasets(paths: Sequence[Path], keymap: KeyMap | None = None) -> list[EpisodeDataset]:
    """Open every dataset under ``paths``, in order.

    A path is a LeRobot dataset directory (``meta/info.json``), a directory holding several of them
    (one per sub-dataset), an HDF5 file, or a directory of HDF5 files (robomimic/LIBERO files are one
    sub-dataset each; flat one-episode files together make one dataset).

    Raises:
        InputFormatError: A path that does not exist or holds no dataset vlacl can read.
    """
    keymap = keymap or KeyMap()
    if not paths:
        raise InputFormatError("no dataset given: pass at least one dataset path")
    out: list[EpisodeDataset] = []
    for path in paths:
        if not path.exists():
            raise InputFormatError(f"dataset path {path} does not exist: check the path")
        if path.is_dir() and (path / LEROBOT_INFO).is_file():
            out.append(_open_lerobot(path, keymap))
        elif (path.is_file() and path.suffix.lower() in HDF5_SUFFIXES) or (path.is_dir() and _hdf5_files(path)):
            out.extend(_open_hdf5(path, keymap))
        elif path.is_dir() and (subs := sorted(p for p in path.iterdir() if (p / LEROBOT_INFO).is_file())):
            out.extend(_open_lerobot(p, keymap) for p in subs)
        else:
            raise InputFormatError(
                f"{path} is not a dataset vlacl reads: expected a LeRobot dataset directory (with "
                f"meta/info.json), an HDF5 file ({', '.join(HDF5_SUFFIXES)}) or a directory of them"
            )
    return out


def _hdf5_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES)


def _open_lerobot(path: Path, keymap: KeyMap) -> EpisodeDataset:
    from vlacl.data.lerobot import open_lerobot

    return open_lerobot(path, keymap)


def _open_hdf5(path: Path, keymap: KeyMap) -> list[EpisodeDataset]:
    from vlacl.data.hdf5 import open_hdf5

    return open_hdf5(path, keymap)
