"""Offline evaluation: a trained policy's predicted action chunks scored against recorded episodes.

For robots without a simulator, the held-out episodes of a dataset stand in for rollouts: every
frame of every episode is one sample, built exactly as in training (:class:`~vlacl.data.windows.WindowedDataset`:
``W`` observation frames, history before the first frame repeating it; the next ``K`` actions),
the policy predicts its chunk and the prediction is compared with the recorded actions.

What counts, per sample, is every action value of a chunk step that is not padding (steps past
the episode's last frame repeat its last action in training; here they are left out) in every
action dimension the policy's ``dim_mask`` keeps, i.e. the values its training loss counts.
Dimensions that ``model.masked_action_dims`` leaves out do not count: their per-dimension entries
are NaN and their count 0. Binary (gripper) dimensions count like the others, in both units (the
normalizer passes them through, so their two units agree).

Two units:

- normalized: the prediction against the target as training sees it (normalized with the
  checkpoint's stats, clipped where the mode clips);
- raw: the unnormalized prediction against the recorded action, in dataset units (so an action
  outside the stats' range is compared with what was recorded, not with its clipped value).

Every mean is over the counted values: per dimension, over that dimension's counted values; overall,
over all counted values of all dimensions. :func:`pool` recovers per-dimension sums from means and
counts, so pooled means over any set of episodes are those of one direct computation.

Generative heads (flow, diffusion) draw their noise from one CPU :class:`torch.Generator` seeded
with ``seed`` and drawn from batch after batch, so a result is reproducible for a given ``seed`` and
``batch_size``; regression heads do not draw and give the same numbers for any batch size.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlacl.data.episode import Episode
from vlacl.data.features import ACTION
from vlacl.data.windows import ShortEpisodes, WindowedDataset
from vlacl.errors import ConfigError, InputFormatError
from vlacl.models.policy import ACTION_IS_PAD
from vlacl.training.data import move_batch
from vlacl.training.policy_io import LoadedPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActionErrors:
    """Action errors over some counted values (see the module docstring for what counts).

    Attributes:
        frames: Samples (frames) scored.
        values: Counted action values (non-pad steps times counted dimensions).
        seconds: Wall time of the batches that scored the frames (an episode's share of a batch is in
            proportion to its frames in it).
        mse: Mean squared error in normalized units, over the counted values.
        mae: Mean absolute error in normalized units.
        mse_raw: Mean squared error in dataset units (unnormalized prediction vs recorded action).
        mae_raw: Mean absolute error in dataset units.
        mse_per_dim: Normalized MSE of each action dimension ``(A,)``; NaN where nothing counts.
        mae_per_dim: Normalized MAE of each action dimension.
        mse_raw_per_dim: Raw MSE of each action dimension.
        mae_raw_per_dim: Raw MAE of each action dimension.
        count_per_dim: Counted values of each action dimension (0 for a masked dimension).
    """

    frames: int
    values: int
    seconds: float
    mse: float
    mae: float
    mse_raw: float
    mae_raw: float
    mse_per_dim: tuple[float, ...]
    mae_per_dim: tuple[float, ...]
    mse_raw_per_dim: tuple[float, ...]
    mae_raw_per_dim: tuple[float, ...]
    count_per_dim: tuple[int, ...]


@dataclass(frozen=True)
class OfflineEpisodeResult(ActionErrors):
    """The action errors of one episode.

    Attributes:
        episode: The episode's index within its dataset.
    """

    episode: int


@dataclass(frozen=True)
class OfflineSummary(ActionErrors):
    """Action errors pooled over episodes: per-dimension sums over all their counted values, divided by the counts.

    Attributes:
        episodes: Episodes pooled.
    """

    episodes: int


_ERRORS = ("mse", "mae", "mse_raw", "mae_raw")
"""The four error kinds, in the order of :class:`_Sums`' rows."""


class _Sums:
    """Running per-dimension error sums ``(4, A)`` (rows: :data:`_ERRORS`) and counts ``(A,)`` of one episode."""

    def __init__(self, action_dim: int) -> None:
        self.sums = np.zeros((len(_ERRORS), action_dim), dtype=np.float64)  # (4, A)
        self.counts = np.zeros(action_dim, dtype=np.int64)  # (A,)
        self.frames = 0
        self.seconds = 0.0

    def add(self, errors: np.ndarray, counts: np.ndarray, frames: int, seconds: float) -> None:
        self.sums += errors
        self.counts += counts
        self.frames += frames
        self.seconds += seconds


def _means(sums: np.ndarray, counts: np.ndarray) -> tuple[list[tuple[float, ...]], list[float]]:
    """Per-dimension means ``(4, A)`` (NaN where a count is 0) and overall means ``(4,)`` of error sums."""
    with np.errstate(invalid="ignore", divide="ignore"):
        per_dim = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)  # (4, A)
    total = int(counts.sum())
    overall = [float(row.sum() / total) if total > 0 else math.nan for row in sums]
    return [tuple(float(v) for v in row) for row in per_dim], overall


def _error_fields(sums: np.ndarray, counts: np.ndarray, frames: int, seconds: float) -> dict[str, Any]:
    """:class:`ActionErrors`' fields from per-dimension error sums ``(4, A)`` and counts ``(A,)``."""
    per_dim, overall = _means(sums, counts)
    return {
        "frames": frames,
        "values": int(counts.sum()),
        "seconds": seconds,
        **dict(zip(_ERRORS, overall, strict=True)),
        **{f"{name}_per_dim": values for name, values in zip(_ERRORS, per_dim, strict=True)},
        "count_per_dim": tuple(int(c) for c in counts),
    }


def _episode_result(index: int, acc: _Sums) -> OfflineEpisodeResult:
    return OfflineEpisodeResult(episode=index, **_error_fields(acc.sums, acc.counts, acc.frames, acc.seconds))


def _check_device(loaded: LoadedPolicy, device: torch.device) -> None:
    """Refuse a ``device`` other than the one the policy's head is on."""
    try:
        on = next(loaded.policy.head.parameters()).device
    except StopIteration:  # a head without parameters: nothing to check
        return
    if on.type != device.type or (device.index is not None and on.index is not None and on.index != device.index):
        raise ConfigError(
            f"the policy is on {on} but the evaluation was asked to run on {device}: load it there "
            f"(load_policy(..., device={str(device)!r})) or pass device={str(on)!r}"
        )


def evaluate_offline(
    loaded: LoadedPolicy,
    episodes: Sequence[Episode],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    short: ShortEpisodes = "skip",
) -> list[OfflineEpisodeResult]:
    """Score the policy's predicted chunks of every frame of ``episodes`` against their recorded actions.

    Every frame is one sample, windowed as in training (history padded at the start, chunk steps
    past the end are pads and do not count). Batches of ``batch_size`` samples run without
    gradients and may span episodes. Masked action dimensions (``model.masked_action_dims``) do
    not count; see the module docstring for what the numbers mean.

    Args:
        loaded: The policy and what feeds it (:func:`~vlacl.training.policy_io.load_policy`).
        episodes: The held-out episodes, each with the policy's observation keys and the action.
        batch_size: Samples per forward pass.
        device: Where the batches go; the policy must already be there.
        seed: Seed of the generator that generative heads draw their noise from.
        short: Episodes shorter than history + chunk frames: ``"skip"`` leaves them out with a
            warning (as training does), ``"error"`` refuses them.

    Returns:
        One result per scored episode, in the order given.

    Raises:
        ConfigError: ``batch_size`` below 1, or a ``device`` the policy is not on.
        InputFormatError: No episodes, none long enough, or episodes lacking a key the policy needs.
    """
    if batch_size < 1:
        raise ConfigError(f"the batch size must be >= 1, got {batch_size}")
    if not episodes:
        raise InputFormatError("no episodes to evaluate: pass the held-out episodes of a dataset")
    spec = loaded.spec
    if not any(ep.length >= spec.min_length for ep in episodes):
        raise InputFormatError(
            f"none of the {len(episodes)} episodes is at least {spec.min_length} frames long (history "
            f"{spec.history} + chunk {spec.chunk} of the checkpoint {loaded.path}): nothing to evaluate offline"
        )
    target_device = torch.device(device)
    _check_device(loaded, target_device)
    policy = loaded.policy
    dataset = WindowedDataset(
        episodes, spec, observation_keys=loaded.observation_keys, normalizer=loaded.normalizer, short=short
    )
    action_dim = policy.action_dim
    dim_mask = policy.dim_mask.detach().cpu().numpy().astype(bool)  # (A,)
    k = spec.chunk
    generator = torch.Generator().manual_seed(seed)
    sums = [_Sums(action_dim) for _ in dataset.episodes]
    raw_actions: dict[int, np.ndarray] = {}  # episode position -> (T, A) recorded actions
    log.info(
        "offline evaluation: %d episodes, %d frames, batch %d, on %s",
        len(dataset.episodes),
        len(dataset),
        batch_size,
        target_device,
    )
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            began = time.perf_counter()
            stop = min(start + batch_size, len(dataset))
            where = [dataset.locate(i) for i in range(start, stop)]
            samples = [dataset[i] for i in range(start, stop)]
            batch = move_batch(policy.collate(samples), target_device)
            pred = policy.predict(batch, generator=generator).float().cpu().numpy().astype(np.float64)  # (B, K, A)
            if pred.shape[1:] != (k, action_dim):
                raise InputFormatError(
                    f"the policy predicted chunks of shape {pred.shape[1:]}, expected ({k}, {action_dim}): "
                    f"the checkpoint {loaded.path} is inconsistent"
                )
            target = batch[ACTION].float().cpu().numpy().astype(np.float64)  # (B, K, A) normalized
            pad = batch[ACTION_IS_PAD].cpu().numpy().astype(bool)  # (B, K)
            raw_pred = np.asarray(loaded.normalizer.unnormalize(ACTION, pred), dtype=np.float64)  # (B, K, A)
            raw_target = np.stack([_recorded_chunk(dataset, raw_actions, e, t, k) for e, t in where])  # (B, K, A)
            counted = (~pad)[:, :, None] & dim_mask[None, None, :]  # (B, K, A)
            diff = np.where(counted, pred - target, 0.0)  # (B, K, A)
            diff_raw = np.where(counted, raw_pred - raw_target, 0.0)  # (B, K, A)
            per_sample = np.stack(
                [
                    (diff**2).sum(axis=1),
                    np.abs(diff).sum(axis=1),
                    (diff_raw**2).sum(axis=1),
                    np.abs(diff_raw).sum(axis=1),
                ],
                axis=1,
            )  # (B, 4, A)
            counts = counted.sum(axis=1)  # (B, A)
            elapsed = time.perf_counter() - began
            positions = np.array([e for e, _ in where])  # (B,)
            for e in np.unique(positions):
                rows = positions == e
                frames = int(rows.sum())
                sums[int(e)].add(
                    per_sample[rows].sum(axis=0), counts[rows].sum(axis=0), frames, elapsed * frames / len(where)
                )
            for e in list(raw_actions):
                if e < int(positions[-1]):
                    del raw_actions[e]  # episodes are visited in order: earlier ones are done
    return [_episode_result(ep.index, acc) for ep, acc in zip(dataset.episodes, sums, strict=True)]


def _recorded_chunk(dataset: WindowedDataset, cache: dict[int, np.ndarray], e: int, t: int, k: int) -> np.ndarray:
    """The recorded actions ``(K, A)`` of frames ``t .. t+K-1`` of episode position ``e`` (past the end: the last)."""
    actions = cache.get(e)
    if actions is None:
        ep = dataset.episodes[e]
        actions = np.asarray(ep.read(ACTION, 0, ep.length), dtype=np.float64).reshape(ep.length, -1)  # (T, A)
        cache[e] = actions
    rows = np.minimum(np.arange(t, t + k), len(actions) - 1)  # (K,)
    return actions[rows]


def pool(results: Sequence[OfflineEpisodeResult]) -> OfflineSummary:
    """Pool episode results exactly: per-dimension error sums over all episodes divided by the summed counts.

    Raises:
        InputFormatError: No results, or results with different numbers of action dimensions.
    """
    if not results:
        raise InputFormatError("no offline episode results to pool: evaluate at least one episode")
    dims = {len(r.count_per_dim) for r in results}
    if len(dims) > 1:
        raise InputFormatError(
            f"cannot pool offline results of different action widths {sorted(dims)}: pool one policy's results"
        )
    counts = np.array([r.count_per_dim for r in results], dtype=np.int64)  # (E, A)
    sums = np.zeros((len(_ERRORS), counts.shape[1]), dtype=np.float64)  # (4, A)
    for i, name in enumerate(_ERRORS):
        means = np.array([getattr(r, f"{name}_per_dim") for r in results], dtype=np.float64)  # (E, A)
        sums[i] = (np.where(counts > 0, means, 0.0) * counts).sum(axis=0)
    total = counts.sum(axis=0)  # (A,)
    frames, seconds = sum(r.frames for r in results), float(sum(r.seconds for r in results))
    return OfflineSummary(episodes=len(results), **_error_fields(sums, total, frames, seconds))


__all__ = ["ActionErrors", "OfflineEpisodeResult", "OfflineSummary", "evaluate_offline", "pool"]
