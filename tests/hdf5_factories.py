"""Tiny HDF5 datasets (robomimic/LIBERO files, flat one-episode files) written from known arrays.

:class:`Hdf5Factory` writes into one directory; tests get it from a fixture (``h5``) and read the
files back through :func:`vlacl.data.open.open_datasets` or ``inspect-h5``. Every array is a pure
function of the episode and frame numbers, so tests compute what they expect with the same helpers
(:func:`upright_frames`, :func:`actions_of`, :func:`lowdim_of`). Breaking a file: pass ``mutate``
(called with the file open for writing) or use :func:`truncate` and :func:`garbage`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

Mutate = Callable[[h5py.File], None]

LIBERO_CAMERAS = ("agentview_rgb", "eye_in_hand_rgb")
LIBERO_STATE = (("ee_pos", 3), ("gripper_states", 2), ("joint_states", 7))
"""Default low-dimensional obs keys and widths; the reader's default state is them in sorted order."""
MODEL_FILE = "<mujoco model='tabletop'>" + "<body name='b'/>" * 200 + "</mujoco>"
"""A long attribute, like robomimic's per-demo MJCF ``model_file``."""


def upright_frames(length: int, shape: tuple[int, int, int], episode: int, camera: int) -> np.ndarray:
    """Camera frames the right way up: bright at the top, dark at the bottom, changing over time.

    Returns:
        ``(T, H, W, C)`` uint8.
    """
    h, w, c = shape
    rows = np.linspace(220, 20, h)[:, None]  # (H, 1): top bright
    cols = np.linspace(0, 30, w)[None, :]  # (1, W)
    base = rows + cols  # (H, W)
    t = np.arange(length)[:, None, None]  # (T, 1, 1)
    frames = (base[None] + 3 * t + 7 * episode + 11 * camera) % 256  # (T, H, W)
    return np.repeat(frames[..., None], c, axis=-1).astype(np.uint8)  # (T, H, W, C)


def actions_of(length: int, dim: int, episode: int, scale: float = 0.9) -> np.ndarray:
    """Smooth actions in ``[-scale, scale]``, different in every dimension: ``(T, D)`` float64."""
    t = np.arange(length)[:, None]  # (T, 1)
    d = np.arange(dim)[None, :]  # (1, D)
    return np.asarray(scale * np.sin(0.5 * t + d + episode))  # (T, D)


def lowdim_of(length: int, dim: int, episode: int, key: str) -> np.ndarray:
    """A low-dimensional observation: ``(T, D)`` float64, distinct per key."""
    t = np.arange(length)[:, None]  # (T, 1)
    d = np.arange(dim)[None, :]  # (1, D)
    return 0.01 * t + d + 0.1 * episode + (sum(map(ord, key)) % 97)  # (T, D)


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to the given fraction of its bytes, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def garbage(path: Path, size: int = 4096) -> Path:
    """Write bytes that are not HDF5 to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def replace(f: h5py.File, path: str, data: np.ndarray) -> None:
    """Replace the dataset at ``path`` by ``data`` (a ``mutate`` helper)."""
    del f[path]
    f.create_dataset(path, data=data)


class Hdf5Factory:
    """Writes tiny HDF5 datasets under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def robomimic(
        self,
        name: str = "open_the_drawer_demo.hdf5",
        *,
        lengths: Sequence[int] = (12, 15, 10),
        libero: bool = True,
        instruction: str = "open the top drawer of the cabinet",
        instructions: Sequence[str] | None = None,
        cameras: Sequence[str] = LIBERO_CAMERAS,
        image_shape: tuple[int, int, int] = (8, 8, 3),
        state: Sequence[tuple[str, int]] = LIBERO_STATE,
        action_dim: int = 7,
        action_scale: float = 0.9,
        compression: str | None = None,
        mutate: Mutate | None = None,
    ) -> Path:
        """A robomimic file (LIBERO's when ``libero``): ``data/demo_N/{actions, dones, rewards, states, obs/*}``.

        LIBERO files carry ``problem_info`` (with ``instruction``), ``bddl_file_name`` and
        ``env_args`` on ``data`` and store frames upside down; plain robomimic files carry
        ``env_args`` only, and ``instructions[i]`` (if given) as ``language_instruction`` on demo i.
        """
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            data = f.create_group("data")
            env_kwargs: dict[str, object] = {"control_freq": 20, "camera_heights": image_shape[0]}
            if libero:
                bddl = f"libero/bddl_files/{Path(name).stem}.bddl"
                env_kwargs["bddl_file_name"] = bddl
                data.attrs["problem_info"] = json.dumps(
                    {"problem_name": "libero_kitchen_tabletop_manipulation", "language_instruction": instruction}
                )
                data.attrs["bddl_file_name"] = bddl
                data.attrs["env_name"] = "Libero_Kitchen_Tabletop_Manipulation"
                data.attrs["tag"] = "libero-v1"
            env = "Libero_Kitchen_Tabletop_Manipulation" if libero else "Lift"
            data.attrs["env_args"] = json.dumps({"type": 1, "env_name": env, "env_kwargs": env_kwargs})
            data.attrs["total"] = int(sum(lengths))
            data.attrs["num_demos"] = len(lengths)
            for i, length in enumerate(lengths):
                demo = data.create_group(f"demo_{i}")
                demo.attrs["num_samples"] = length
                demo.attrs["model_file"] = MODEL_FILE
                if instructions is not None:
                    demo.attrs["language_instruction"] = instructions[i]
                demo.create_dataset("actions", data=actions_of(length, action_dim, i, action_scale))
                demo.create_dataset("dones", data=(np.arange(length) == length - 1).astype(np.uint8))
                demo.create_dataset("rewards", data=(np.arange(length) == length - 1).astype(np.float64))
                demo.create_dataset("states", data=lowdim_of(length, 10, i, "states"))
                obs = demo.create_group("obs")
                for key, dim in state:
                    obs.create_dataset(key, data=lowdim_of(length, dim, i, key))
                for c, key in enumerate(cameras):
                    frames = upright_frames(length, image_shape, i, c)
                    if libero:
                        frames = frames[:, ::-1, ::-1]  # (T, H, W, C), stored upside down as LIBERO does
                    obs.create_dataset(
                        key,
                        data=frames,
                        chunks=(1, *image_shape) if compression else None,
                        compression=compression,
                    )
            if mutate is not None:
                mutate(f)
        return path

    def libero_suite(self, name: str, instructions: Sequence[str], *, lengths: Sequence[int] = (12, 15)) -> Path:
        """A directory with one LIBERO file per task, as LIBERO ships a suite."""
        for instruction in instructions:
            stem = instruction.replace(" ", "_")
            self.robomimic(f"{name}/{stem}_demo.hdf5", instruction=instruction, lengths=lengths)
        return self.root / name

    def flat(
        self,
        name: str = "episode_000.h5",
        *,
        length: int = 12,
        episode: int = 0,
        instruction: str | None = "drive to the charging dock",
        image_shape: tuple[int, int, int] = (8, 8, 3),
        state_dim: int = 3,
        action_dim: int = 2,
        action_scale: float = 0.9,
        mutate: Mutate | None = None,
    ) -> Path:
        """A flat one-episode file: ``images``, ``actions``, ``action_event_types``, ``timestamps``, ``velocity``.

        ``velocity (T, state_dim)`` float32 is the state (left out when ``state_dim`` is 0); the
        instruction is the file's ``language_instruction`` attribute.
        """
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            if instruction is not None:
                f.attrs["language_instruction"] = instruction
            f.attrs["fps"] = 10.0
            f.create_dataset("images", data=upright_frames(length, image_shape, episode, 0), chunks=(1, *image_shape))
            f.create_dataset("actions", data=actions_of(length, action_dim, episode, action_scale).astype(np.float32))
            f.create_dataset("action_event_types", data=(np.arange(length) % 3).astype(np.int32))
            f.create_dataset("timestamps", data=0.1 * np.arange(length))
            if state_dim:
                f.create_dataset("velocity", data=lowdim_of(length, state_dim, episode, "velocity").astype(np.float32))
            if mutate is not None:
                mutate(f)
        return path

    def flat_dir(
        self,
        name: str = "mobile",
        *,
        lengths: Sequence[int] = (12, 9, 14),
        instructions: Sequence[str | None] = ("drive to the dock", "follow the hallway", "drive to the dock"),
        state_dim: int = 3,
        action_scale: float = 0.9,
    ) -> Path:
        """A directory of flat files ``episode_000.h5`` ...; episode ``i`` has ``instructions[i % n]``."""
        for i, length in enumerate(lengths):
            self.flat(
                f"{name}/episode_{i:03d}.h5",
                length=length,
                episode=i,
                instruction=instructions[i % len(instructions)],
                state_dim=state_dim,
                action_scale=action_scale,
            )
        return self.root / name


def count_dataset_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every h5py dataset read from now on (the returned list fills as they happen)."""
    reads: list[str] = []
    original = h5py.Dataset.__getitem__

    def counting(self: h5py.Dataset, key: Any) -> Any:
        reads.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    return reads
