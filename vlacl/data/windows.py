"""Training samples: ``W`` frames of observation history and the next ``K`` actions (an action chunk).

A sample at frame ``t`` of an episode of length ``T`` holds the observations of frames
``t-W+1 .. t`` and the actions of frames ``t .. t+K-1``. History before the first frame repeats the
first frame (``observation_is_pad`` marks it); actions after the last frame repeat the last action
and ``action_is_pad`` marks them, so the loss leaves padded steps out (LeRobot's ``*_is_pad``
convention: True means padded).

An episode shorter than ``W + K`` frames gives no full-length sample. With ``short="error"`` it is
an :class:`InputFormatError` naming the episode; with ``short="skip"`` it is left out, a warning
says how many, and :attr:`WindowedDataset.skipped` lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from vlacl.data.episode import Episode
from vlacl.data.features import ACTION, role_of
from vlacl.errors import ConfigError, InputFormatError

log = logging.getLogger(__name__)

ShortEpisodes = Literal["error", "skip"]


class Normalizes(Protocol):
    """What a sample needs of a normalizer (see :mod:`vlacl.data.normalize`)."""

    def normalize(self, key: str, values: np.ndarray) -> np.ndarray:
        """Normalize the values of feature ``key``."""
        ...


@dataclass(frozen=True)
class WindowSpec:
    """Observation history and action chunk lengths.

    Attributes:
        history: ``W``, observation frames per sample (1 = the current frame only).
        chunk: ``K``, actions per sample (1 = the next action only).
    """

    history: int = 1
    chunk: int = 1

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ConfigError(f"the observation history must be >= 1 frame, got {self.history}")
        if self.chunk < 1:
            raise ConfigError(f"the action chunk must be >= 1 action, got {self.chunk}")

    @property
    def min_length(self) -> int:
        """The shortest episode kept: ``W + K`` frames."""
        return self.history + self.chunk


class WindowedDataset(Dataset[dict[str, torch.Tensor | str | int]]):
    """Samples of every frame of ``episodes``, as a map-style torch dataset.

    Picklable (episodes hold paths, not handles), so DataLoader workers open their own files.
    """

    def __init__(
        self,
        episodes: Sequence[Episode],
        spec: WindowSpec,
        *,
        observation_keys: Sequence[str],
        normalizer: Normalizes | None = None,
        short: ShortEpisodes = "error",
    ) -> None:
        """Index the frames of every episode long enough for ``spec``."""
        if short not in ("error", "skip"):
            raise ConfigError(f"short episodes must be 'error' or 'skip', got {short!r}")
        self.spec = spec
        self.observation_keys = tuple(observation_keys)
        self.normalizer = normalizer
        self.skipped: list[str] = []
        kept: list[Episode] = []
        for ep in episodes:
            if ep.length >= spec.min_length:
                kept.append(ep)
            elif short == "error":
                raise InputFormatError(
                    f"episode {ep.source} has {ep.length} frames, fewer than history {spec.history} + chunk "
                    f"{spec.chunk} = {spec.min_length}: shorten --history/--chunk, or skip short episodes "
                    "(--short-episodes skip)"
                )
            else:
                self.skipped.append(ep.source)
        if self.skipped:
            log.warning(
                "skipped %d of %d episodes shorter than %d frames", len(self.skipped), len(episodes), spec.min_length
            )
        if not kept:
            raise InputFormatError(
                f"no episode is at least {spec.min_length} frames long (history {spec.history} + chunk "
                f"{spec.chunk}): nothing to train on; shorten --history/--chunk"
            )
        self.episodes = kept
        self._ends = np.cumsum([ep.length for ep in kept])  # (E,)

    def __len__(self) -> int:
        """One sample per frame of the kept episodes."""
        return int(self._ends[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(episode position, frame)`` of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        e = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[e - 1]) if e else 0
        return e, index - start

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        """The sample: observations ``(W, ...)``, ``action`` ``(K, A)``, pad masks, task and instruction."""
        e, t = self.locate(index)
        ep = self.episodes[e]
        w, k = self.spec.history, self.spec.chunk
        lo = max(0, t - w + 1)
        obs_pad = np.arange(t - w + 1, t + 1) < 0  # (W,)
        src_obs = np.clip(np.arange(t - w + 1, t + 1), 0, None) - lo  # (W,) rows of the read block
        sample: dict[str, torch.Tensor | str | int] = {}
        for key in self.observation_keys:
            block = ep.read(key, lo, t + 1)[src_obs]  # (W, ...)
            sample[key] = torch.from_numpy(self._norm(key, block))
        hi = min(ep.length, t + k)
        act_pad = np.arange(t, t + k) >= ep.length  # (K,)
        src_act = np.minimum(np.arange(t, t + k), ep.length - 1) - t  # (K,)
        actions = ep.read(ACTION, t, hi)[src_act]  # (K, A)
        sample[ACTION] = torch.from_numpy(self._norm(ACTION, actions))
        sample["action_is_pad"] = torch.from_numpy(act_pad)
        sample["observation_is_pad"] = torch.from_numpy(obs_pad)
        sample["task_index"] = ep.task_index
        sample["episode_index"] = ep.index
        sample["frame_index"] = t
        sample["instruction"] = ep.instruction
        return sample

    def _norm(self, key: str, values: np.ndarray) -> np.ndarray:
        if values.dtype == np.uint8 and role_of(key) == "image":  # frames stay uint8; a uint8 vector is numbers
            return np.ascontiguousarray(values)
        values = values.astype(np.float32, copy=False)
        if self.normalizer is not None:
            values = self.normalizer.normalize(key, values).astype(np.float32, copy=False)
        return np.ascontiguousarray(values)
