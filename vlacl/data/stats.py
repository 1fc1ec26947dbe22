"""Dataset statistics in one streaming pass with bounded memory, and the ``ds_stats`` artifact.

Numeric features (state, action, extras) are read in column batches
(:meth:`~vlacl.data.episode.EpisodeDataset.iter_columns`), globally and per task:

- ``count``, ``mean``, ``std`` (population, as LeRobot): float64 sums and sums of squared
  deviations per chunk, merged with Chan et al.'s parallel formula, so they are exact to float64
  rounding; ``min`` and ``max`` are exact.
- Quantiles ``q01, q10, q50, q90, q99`` (NumPy's ``linear`` method) from a histogram of
  :data:`HIST_BINS` bins per dimension on a dyadic grid: bin width ``w = 2**j`` with bins starting at
  multiples of ``w``, ``j`` the smallest that covers the data's range in :data:`HIST_BINS` bins. A
  value's bin is then exact (``floor(x * 2**-j)`` has no rounding), and when the range grows the
  width doubles and each new bin is the union of old ones, so no count is ever split. An order
  statistic is estimated as the middle of its bin clipped to ``[min, max]`` (the first and last
  are the exact min and max), so it is off by at most ``w / 2 < range / (HIST_BINS - 1)``, about
  9.8e-5 of the range; that bound is written per dimension (``quantile_error_bound``). A dimension
  with at most two distinct values (a gripper) has exact quantiles (bound 0). Every task shares
  the feature's grid, so the global histogram is the exact sum of the tasks'. (Float64 data whose
  spread is below about 1e-11 of its magnitude gets a coarser grid; its bound says so.)
- Binary dimensions, exactly two distinct values, are detected and get ``mask`` false: left out
  of normalization (``binary_dims`` / ``continuous_dims`` in the config override the detection).

Camera features get per-channel stats over ``image_frames`` frames drawn uniformly without
replacement (seeded) from all frames of the datasets, values scaled to ``[0, 1]``, shaped
``(C, 1, 1)`` as LeRobot's. For uint8 frames a 256-level histogram makes them exact for the sample.

Memory is bounded by the batch size and the histograms (``tasks x dims x 10240`` counters), never
by the number of frames. A NaN or infinite value is an error naming the feature, dimension and episode.

``stats.json`` (``vlacl_stats_version`` 1)::

    {"vlacl_stats_version": 1,
     "fingerprint": sha256 of the dataset fingerprints, the key map hash and "settings",
     "datasets": [{"path", "name", "format", "fingerprint", "num_episodes", "num_frames"}],
     "keymap_sha256": ..., "keymap_is_default": bool,
     "settings": {"norm_modes": {feature: mode}, "binary_dims", "continuous_dims", "image_frames",
                  "seed", "max_tasks", "quantiles": {"method", "bins"}},
     "quantiles": {"method": "dyadic_histogram", "bins": 10240, "levels": {"q01": 0.01, ...},
                   "interpolation": "linear", "relative_error_bound": max over dims of bound / range},
     "image_frames": frames actually sampled,
     "num_frames": ..., "num_episodes": ...,
     "features": {key: {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99",
                        "quantile_error_bound", "mask", "binary_dims", "norm_mode"}},
     "tasks": {task id: {"instruction", "num_frames", "features": {key: {same stats, no mask/norm_mode}}}},
     "tasks_omitted": null or why per-task stats were left out,
     "drift": {task id: {key: {"mean_shift", "mean_shift_dim", "range_ratio", "range_ratio_dim"}}}}

Arrays are JSON lists of float64 values (``count`` is ``[N]``; camera stats are ``(C, 1, 1)``).
A task id is the ``task_index`` as text for one dataset, ``<dataset name>/<task_index>`` for
several. ``drift`` compares each task with the whole, over the normalized dimensions:
``mean_shift`` is the largest ``|mean_task - mean| / std`` and ``range_ratio`` the task's
``q99 - q01`` over the global one that is farthest from 1 (by ratio), each with its dimension.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np

from vlacl.artifacts.names import KEYMAP_NAME, MANIFEST_NAME, STATS_NAME
from vlacl.config.ds_stats import DsStatsConfig
from vlacl.data.episode import (
    ColumnBatch,
    Episode,
    EpisodeDataset,
    as_2d,
    dataset_fingerprint,
    dataset_names,
    numeric_keys,
)
from vlacl.data.features import Feature
from vlacl.data.normalize import STATS_VERSION, NormMode, stats_fingerprint
from vlacl.errors import InputFormatError

log = logging.getLogger(__name__)

HIST_BINS: Final = 10240
"""Histogram bins per dimension: the quantile error is below ``range / (HIST_BINS - 1)``, 9.8e-5.

Fewer bins than a power of two keep the counters of a 32-dim feature (1.25 MiB) closer to the CPU
cache, which is where the histogram update spends its time; 10240 keeps the bound under 1e-4."""
QUANTILE_METHOD: Final = "dyadic_histogram"
QUANTILE_LEVELS: Final[tuple[tuple[str, float], ...]] = (
    ("q01", 0.01),
    ("q10", 0.10),
    ("q50", 0.50),
    ("q90", 0.90),
    ("q99", 0.99),
)
CHUNK_ROWS: Final = 8192
"""Rows processed at once: (dims x 8192) float64 scratch arrays stay in the CPU cache."""
MAX_SCALED: Final = 2.0**50
"""Largest ``|x| / w`` allowed, so bin numbers stay exact integers in float64."""
PREFETCH_BATCHES: Final = 2
"""Batches read ahead by a reader thread while the previous ones are reduced."""

ProgressFn = Callable[[str, int, int], None]
"""``progress(phase, done, total)``; phase is ``"frames"`` or ``"images"``."""

T = TypeVar("T")


def task_key(episode: Episode, dataset_name: str | None) -> str:
    """The id of an episode's task: ``"<task_index>"``, or ``"<dataset name>/<task_index>"`` with several datasets.

    Args:
        episode: The episode.
        dataset_name: Its dataset's name from :func:`dataset_names`, or ``None`` when there is one dataset.
    """
    return str(episode.task_index) if dataset_name is None else f"{dataset_name}/{episode.task_index}"


# ---------------------------------------------------------------------------------------------
# Accumulators


class _NonFiniteError(Exception):
    """A NaN or infinity at ``(dim, column)`` of the chunk being reduced."""

    def __init__(self, dim: int, column: int, value: float) -> None:
        super().__init__(dim, column, value)
        self.dim = dim
        self.column = column
        self.value = value


class _FeatureAccumulator:
    """Moments, extremes, distinct values and dyadic histograms of one ``(D,)`` feature, per group.

    Groups are tasks (or one group for the whole data). Every group shares the feature's grid:
    dimension ``d`` has bin width ``2**exp[d]`` and its bin 0 starts at ``start[d] * 2**exp[d]``.
    A dimension is *active* once the data has shown two different values in it; until then every
    value is the same constant and its histogram rows hold nothing meaningful.
    """

    def __init__(self, dims: int, groups: int, count_dtype: type[np.integer[Any]]) -> None:
        self.dims = dims
        self.count = np.zeros(groups, dtype=np.int64)  # (G,)
        self.mean = np.zeros((groups, dims))  # (G, D)
        self.m2 = np.zeros((groups, dims))  # (G, D)
        self.min = np.full((groups, dims), np.inf)  # (G, D)
        self.max = np.full((groups, dims), -np.inf)  # (G, D)
        # np.zeros maps zero pages: a group's counters take memory only where its values fall.
        self.hist = np.zeros((groups, dims, HIST_BINS), dtype=count_dtype)  # (G, D, B)
        self._one = count_dtype(1)  # np.add.at is fast only with a value of the array's own dtype
        self.seen_min = np.full(dims, np.inf)  # (D,) over all groups
        self.seen_max = np.full(dims, -np.inf)
        self.exp = np.zeros(dims, dtype=np.int64)  # (D,) bin width 2**exp
        self.start = np.zeros(dims, dtype=np.int64)  # (D,) absolute number of bin 0
        self.active = np.zeros(dims, dtype=bool)
        self.inv = np.zeros(dims)  # (D,) 2**-exp where active, 0 where not
        self.offset = -np.arange(dims, dtype=np.float64) * HIST_BINS  # (D,) start - d * B where active
        self.distinct = np.zeros((dims, 2))  # (D, 2) the first distinct values seen
        self.ndistinct = np.zeros(dims, dtype=np.int64)  # (D,) 0, 1, 2, or 3 for "more than two"
        self._x = np.empty((dims, CHUNK_ROWS))  # scratch (D, n) float64
        self._tmp = np.empty((dims, CHUNK_ROWS))
        self._idx = np.empty((dims, CHUNK_ROWS), dtype=np.intp)

    def update(self, values: np.ndarray, slots: np.ndarray) -> None:
        """Add ``values`` (``(n, D)``, any numeric dtype, ``n <= CHUNK_ROWS``) of the groups ``slots`` (``(n,)``).

        Raises:
            _NonFiniteError: A NaN or infinite value; nothing of this chunk was added.
        """
        n = len(values)
        if n == 0:
            return
        x = self._x[:, :n]
        np.copyto(x, values.T, casting="unsafe")  # (D, n) float64
        starts = np.flatnonzero(np.diff(slots)) + 1 if n > 1 else np.zeros(0, dtype=np.intp)
        flat = self.hist.reshape(len(self.count), -1)  # (G, D * B)
        if len(starts) == 0:
            lo, hi = x.min(axis=1), x.max(axis=1)  # (D,)
            self._check_finite(x, lo, hi)
            self._track_distinct(x, lo, hi)
            self._cover(lo, hi)
            self._add_run(int(slots[0]), x, lo, hi)
            np.add.at(flat[int(slots[0])], self._bins(x, n).reshape(-1), self._one)
            return
        bounds = np.concatenate([[0], starts])  # (R,) first column of each run
        run_lo = np.minimum.reduceat(x, bounds, axis=1)  # (D, R)
        run_hi = np.maximum.reduceat(x, bounds, axis=1)
        lo, hi = run_lo.min(axis=1), run_hi.max(axis=1)
        self._check_finite(x, lo, hi)
        self._track_distinct(x, lo, hi)
        self._cover(lo, hi)
        self._add_runs(x, slots, bounds, run_lo, run_hi)
        idx = self._bins(x, n)
        for a, b in zip(bounds.tolist(), [*starts.tolist(), n], strict=True):  # a group's block at a time: in cache
            np.add.at(flat[int(slots[a])], idx[:, a:b].reshape(-1), self._one)

    def _check_finite(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        if np.isfinite(lo).all() and np.isfinite(hi).all():
            return
        bad = ~np.isfinite(x)
        d, col = (int(v[0]) for v in np.nonzero(bad))
        raise _NonFiniteError(d, col, float(x[d, col]))

    def _track_distinct(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Keep up to two distinct values per dimension; mark 3 once a third appears."""
        open_dims = np.flatnonzero(self.ndistinct < 3)
        if not len(open_dims):
            return
        varied = open_dims[lo[open_dims] != hi[open_dims]]
        if len(varied):
            sub = x[varied]  # (k, n)
            two = ((sub == lo[varied, None]) | (sub == hi[varied, None])).all(axis=1)  # (k,)
            self.ndistinct[varied[~two]] = 3
        for d in open_dims:
            if self.ndistinct[d] == 3:
                continue
            known = {float(v) for v in self.distinct[d, : self.ndistinct[d]]}
            known.update({float(lo[d]), float(hi[d])})
            if len(known) > 2:
                self.ndistinct[d] = 3
            else:
                ordered = sorted(known)
                self.distinct[d, : len(ordered)] = ordered
                self.ndistinct[d] = len(ordered)

    def _cover(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Grow the grid of every dimension whose new values fall outside it (or that stops being constant)."""
        new_lo = np.minimum(self.seen_min, lo)
        new_hi = np.maximum(self.seen_max, hi)
        with np.errstate(invalid="ignore"):
            first = np.floor(new_lo * self.inv) - self.start
            last = np.floor(new_hi * self.inv) - self.start
        grow = np.where(self.active, (first < 0) | (last > HIST_BINS - 1), new_lo < new_hi)
        for d in np.flatnonzero(grow):
            self._regrid(int(d), float(new_lo[d]), float(new_hi[d]))
        self.seen_min, self.seen_max = new_lo, new_hi

    def _regrid(self, d: int, lo: float, hi: float) -> None:
        floor_exp = math.frexp(max(abs(lo), abs(hi)))[1] - int(math.log2(MAX_SCALED))
        if self.active[d]:
            floor_exp = max(floor_exp, int(self.exp[d]))
        exp = _smallest_exponent(lo, hi, floor_exp)
        first, last = math.floor(math.ldexp(lo, -exp)), math.floor(math.ldexp(hi, -exp))
        start = first - (HIST_BINS - 1 - (last - first)) // 2  # the data centred: room to grow both ways
        rows = self.hist[:, d, :]  # (G, B) view
        used = np.flatnonzero(self.count)
        if self.active[d] and len(used):
            inv, old = float(self.inv[d]), int(self.start[d])  # the data seen so far fills old bins [a, b]
            a = math.floor(float(self.seen_min[d]) * inv) - old
            b = math.floor(float(self.seen_max[d]) * inv) - old
            g, i = np.nonzero(rows[used, a : b + 1])  # (K,), (K,) the filled bins of every group
            i += a
            counts = rows[used[g], i]
            rows[used[g], i] = 0
            target = ((old + i) >> (exp - int(self.exp[d]))) - start  # new bins: unions of old ones
            np.add.at(rows, (used[g], target), counts)
        elif len(used):  # every value so far was the constant seen_min[d]: each group's count goes in its bin
            at = math.floor(math.ldexp(float(self.seen_min[d]), -exp)) - start
            rows[used] = 0
            rows[used, at] = self.count[used]
        self.exp[d], self.start[d], self.active[d] = exp, start, True
        self.inv[d] = math.ldexp(1.0, -exp)
        self.offset[d] = float(start - d * HIST_BINS)

    def _bins(self, x: np.ndarray, n: int) -> np.ndarray:
        """Index of every value in its group's ``(D * B,)`` counters: ``(D, n)`` intp (inactive dims: their bin 0)."""
        tmp = self._tmp[:, :n]
        idx = self._idx[:, :n]
        np.multiply(x, self.inv[:, None], out=tmp)  # exact: a power of two
        np.floor(tmp, out=tmp)
        np.subtract(tmp, self.offset[:, None], out=idx, casting="unsafe")  # exact integers
        return idx

    def _add_run(self, g: int, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        n = x.shape[1]
        mean = x.sum(axis=1) / n  # (D,)
        dev = self._tmp[:, :n]
        np.subtract(x, mean[:, None], out=dev)
        m2 = np.einsum("ij,ij->i", dev, dev)  # (D,)
        self._merge(np.array([g]), np.array([n]), mean[None], m2[None], lo[None], hi[None])

    def _add_runs(self, x: np.ndarray, slots: np.ndarray, bounds: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Moments of a chunk whose rows belong to several groups, combined per group first."""
        n = x.shape[1]
        run_n = np.diff(np.append(bounds, n))  # (R,)
        groups, local = np.unique(slots[bounds], return_inverse=True)  # (U,), (R,)
        count = np.bincount(local, weights=run_n).astype(np.int64)  # (U,)
        sums = np.zeros((len(groups), self.dims))
        np.add.at(sums, local, np.add.reduceat(x, bounds, axis=1).T)  # (U, D)
        mean = sums / count[:, None]
        row_group = np.repeat(local, run_n)  # (n,)
        dev = self._tmp[:, :n]
        np.subtract(x, mean.T[:, row_group], out=dev)  # (D, n) minus each row's group mean
        np.multiply(dev, dev, out=dev)
        m2 = np.zeros((len(groups), self.dims))
        np.add.at(m2, local, np.add.reduceat(dev, bounds, axis=1).T)  # (U, D)
        g_lo = np.full((len(groups), self.dims), np.inf)
        g_hi = np.full((len(groups), self.dims), -np.inf)
        np.minimum.at(g_lo, local, lo.T)
        np.maximum.at(g_hi, local, hi.T)
        self._merge(groups, count, mean, m2, g_lo, g_hi)

    def _merge(
        self, g: np.ndarray, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> None:
        """Chan et al.'s parallel update of the distinct groups ``g`` (``(U,)``) with ``(n_b, mean_b, m2_b)``."""
        n_a = self.count[g].astype(np.float64)[:, None]  # (U, 1)
        nb = n_b.astype(np.float64)[:, None]
        total = n_a + nb
        delta = mean_b - self.mean[g]
        self.mean[g] = self.mean[g] + delta * (nb / total)
        self.m2[g] = self.m2[g] + m2_b + delta * delta * (n_a * nb / total)
        self.count[g] += n_b
        self.min[g] = np.minimum(self.min[g], lo)
        self.max[g] = np.maximum(self.max[g], hi)

    def group_stats(self, g: int) -> dict[str, Any]:
        """Stats of group ``g`` as ``stats.json`` writes them."""
        return self._stats(
            int(self.count[g]), self.mean[g], self.m2[g], self.min[g], self.max[g], self.hist[g].astype(np.int64)
        )

    def global_stats(self) -> dict[str, Any]:
        """Stats over every group: moments merged exactly, histograms summed on the shared grid."""
        used = np.flatnonzero(self.count)
        count = 0
        mean = np.zeros(self.dims)
        m2 = np.zeros(self.dims)
        for g in used:
            n_b = float(self.count[g])
            total = count + n_b
            delta = self.mean[g] - mean
            mean = mean + delta * (n_b / total)
            m2 = m2 + self.m2[g] + delta * delta * (count * n_b / total)
            count = int(total)
        hist = np.zeros((self.dims, HIST_BINS), dtype=np.int64)  # (D, B)
        for g in used:  # group by group: no (G, D, B) temporary
            hist += self.hist[g]
        return self._stats(count, mean, m2, self.min[used].min(axis=0), self.max[used].max(axis=0), hist)

    def binary_dims(self) -> list[int]:
        """Dimensions that showed exactly two distinct values."""
        return [int(d) for d in np.flatnonzero(self.ndistinct == 2)]

    def _stats(
        self, count: int, mean: np.ndarray, m2: np.ndarray, lo: np.ndarray, hi: np.ndarray, hist: np.ndarray
    ) -> dict[str, Any]:
        quantiles, bound = self._quantiles(count, lo, hi, hist)
        out: dict[str, Any] = {
            "min": lo.tolist(),
            "max": hi.tolist(),
            "mean": mean.tolist(),
            "std": np.sqrt(np.maximum(m2 / count, 0.0)).tolist(),
            "count": [count],
        }
        for (name, _), values in zip(QUANTILE_LEVELS, quantiles, strict=True):
            out[name] = values.tolist()
        out["quantile_error_bound"] = bound.tolist()
        return out

    def _quantiles(self, n: int, lo: np.ndarray, hi: np.ndarray, hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Estimated quantiles ``(L, D)`` and the error bound ``(D,)`` from a ``(D, B)`` histogram."""
        levels = np.array([q for _, q in QUANTILE_LEVELS])
        h = (n - 1) * levels  # (L,) virtual indices of NumPy's linear method
        k0 = np.floor(h).astype(np.int64)
        k1 = np.minimum(k0 + 1, n - 1)
        t = h - k0
        ranks = np.concatenate([k0, k1])  # (2L,)
        cum = np.cumsum(hist, axis=1)  # (D, B)
        flat = (cum + (np.arange(self.dims) * (n + 1))[:, None]).ravel()  # increasing across rows
        targets = ranks[None, :] + (np.arange(self.dims) * (n + 1))[:, None]  # (D, 2L)
        bins = np.searchsorted(flat, targets, side="right") - (np.arange(self.dims) * HIST_BINS)[:, None]
        width = np.ldexp(1.0, self.exp)  # (D,)
        left = np.ldexp((self.start[:, None] + bins).astype(np.float64), self.exp[:, None])  # (D, 2L)
        est = (np.maximum(left, lo[:, None]) + np.minimum(left + width[:, None], hi[:, None])) / 2
        low_bin = np.floor(self.distinct[:, 0] * self.inv) - self.start  # (D,)
        high_bin = np.floor(self.distinct[:, 1] * self.inv) - self.start
        two = (self.ndistinct <= 2) & (low_bin != high_bin)  # each value is a known one, told apart by its bin
        if two.any():
            exact = np.where(bins == low_bin[:, None], self.distinct[:, :1], self.distinct[:, 1:2])
            est = np.where(two[:, None], exact, est)
        est = np.where(ranks[None, :] == 0, lo[:, None], est)
        est = np.where(ranks[None, :] == n - 1, hi[:, None], est)
        est = np.where((lo == hi)[:, None], lo[:, None], est)  # constant (or inactive) dimension
        a, b = est[:, : len(levels)].T, est[:, len(levels) :].T  # (L, D)
        diff = b - a
        tt = t[:, None]
        values = np.where(tt >= 0.5, b - diff * (1 - tt), a + diff * tt)  # NumPy's _lerp
        bound = np.where(two | (lo == hi) | ~self.active, 0.0, np.minimum(width / 2, (hi - lo) / 2))
        return values, bound


def _smallest_exponent(lo: float, hi: float, floor_exp: int) -> int:
    """Smallest ``j >= floor_exp`` whose grid of width ``2**j`` covers ``[lo, hi]`` in HIST_BINS bins."""

    def fits(j: int) -> bool:
        return math.floor(math.ldexp(hi, -j)) - math.floor(math.ldexp(lo, -j)) <= HIST_BINS - 1

    j = max(floor_exp, math.frexp((hi - lo) / (HIST_BINS - 1))[1] - 1)
    while not fits(j):
        j += 1
    while j - 1 >= floor_exp and fits(j - 1):
        j -= 1
    return j


class _ImageAccumulator:
    """Per-channel stats of camera frames scaled to [0, 1]: exact 256-level counts for uint8 frames."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.frames = 0
        self.levels = np.zeros((channels, 256), dtype=np.int64)  # (C, 256) uint8 frames
        self.other: _FeatureAccumulator | None = None  # frames of another dtype

    def update(self, frames: np.ndarray, key: str, where: str) -> None:
        """Add ``(T, H, W, C)`` frames of camera ``key`` read from ``where``.

        Raises:
            InputFormatError: Frames of another dtype family than the camera's earlier ones.
        """
        uint8 = frames.dtype == np.uint8
        if (uint8 and self.other is not None) or (not uint8 and self.levels.any()):
            raise InputFormatError(
                f"{key} has {frames.dtype} frames in {where} but other frames are "
                f"{'uint8' if self.levels.any() else 'not uint8'}: stats cannot combine them; convert the frames"
            )
        self.frames += len(frames)
        pixels = frames.reshape(-1, self.channels)  # (T*H*W, C)
        if uint8:
            shifted = pixels.astype(np.intp) + np.arange(self.channels) * 256  # (P, C)
            self.levels += np.bincount(shifted.ravel(), minlength=self.channels * 256).reshape(self.channels, 256)
            return
        scale = 1.0 / np.iinfo(frames.dtype).max if frames.dtype.kind in "iu" else 1.0
        if self.other is None:
            self.other = _FeatureAccumulator(self.channels, 1, np.int64)
        for lo in range(0, len(pixels), CHUNK_ROWS):
            part = pixels[lo : lo + CHUNK_ROWS].astype(np.float64) * scale  # (n, C)
            try:
                self.other.update(part, np.zeros(len(part), dtype=np.int64))
            except _NonFiniteError as bad:
                raise InputFormatError(
                    f"{key} channel {bad.dim} is {bad.value} in a frame of {where}: stats need finite numbers; "
                    "fix or drop that episode"
                ) from None

    def stats(self) -> dict[str, Any]:
        """Stats as ``(C, 1, 1)`` nested lists."""
        flat = self.other.global_stats() if self.other is not None else _level_stats(self.levels)
        out: dict[str, Any] = {}
        for name, values in flat.items():
            out[name] = values if name == "count" else [[[v]] for v in values]
        out["count"] = [self.frames]
        return out


def _level_stats(levels: np.ndarray) -> dict[str, Any]:
    """Exact stats of uint8 values from their ``(C, 256)`` counts, scaled to [0, 1]."""
    out: dict[str, list[float]] = {k: [] for k in ("min", "max", "mean", "std", *(q for q, _ in QUANTILE_LEVELS))}
    out["quantile_error_bound"] = []
    for row in levels:
        n = int(row.sum())
        used = np.flatnonzero(row)
        s1 = sum(int(v) * int(c) for v, c in zip(used, row[used], strict=True))
        s2 = sum(int(v) * int(v) * int(c) for v, c in zip(used, row[used], strict=True))
        out["min"].append(int(used[0]) / 255)
        out["max"].append(int(used[-1]) / 255)
        out["mean"].append(s1 / n / 255)
        out["std"].append(math.sqrt((s2 * n - s1 * s1) / (n * n)) / 255)  # exact integers, then one rounding
        cum = np.cumsum(row)
        for name, q in QUANTILE_LEVELS:
            h = (n - 1) * q
            k0 = math.floor(h)
            a = int(np.searchsorted(cum, k0, side="right"))
            b = int(np.searchsorted(cum, min(k0 + 1, n - 1), side="right"))
            t = h - k0
            value = b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t
            out[name].append(value / 255)
        out["quantile_error_bound"].append(0.0)
    return out


# ---------------------------------------------------------------------------------------------
# The pass over the data


@dataclass(frozen=True)
class _TaskInfo:
    key: str
    instruction: str
    frames: int


def _prefetch(items: Iterator[T], depth: int) -> Generator[T, None, None]:
    """Iterate ``items`` in a thread, ``depth`` items ahead, so reading overlaps the reduction.

    Parquet decoding and NumPy both release the GIL, so the two share the CPU cores. An exception
    in the reader is raised here; stopping early stops the reader after its current item.
    """
    slots: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[int, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((0, item)):
                    return
            put((1, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((2, exc))

    thread = threading.Thread(target=produce, name="vlacl-stats-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == 1:
                return
            if kind == 2:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def compute_stats(
    datasets: Sequence[EpisodeDataset], cfg: DsStatsConfig, *, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Compute the content of ``stats.json`` (see the module docstring) over ``datasets``.

    Args:
        datasets: One or more datasets opened with the same key map.
        cfg: Normalization modes and overrides, image sample size and seed, batch size.
        progress: Called with ``(phase, done, total)`` as frames are reduced.

    Raises:
        InputFormatError: No frames; a task without frames; a feature whose shape differs between
            datasets; a NaN or infinite value; a reader that yields another number of frames than
            its episodes have.
        ConfigError: A per-feature mode or override naming a feature or dimension the data lacks.
    """
    if not datasets:
        raise InputFormatError("no dataset given: pass at least one dataset path")
    names = dataset_names(datasets) if len(datasets) > 1 else [None]
    features = _merged_features(datasets)
    vector = {k: f for k, f in features.items() if not f.is_image}
    images = {k: f for k, f in features.items() if f.is_image}
    _check_settings(cfg, features)
    tasks, lookup = _tasks(datasets, names)
    total = sum(t.frames for t in tasks)
    if total == 0:
        raise InputFormatError(
            f"{', '.join(str(d.root) for d in datasets)} hold no frames: there is nothing to compute stats over"
        )
    per_task = len(tasks) <= cfg.max_tasks
    omitted = None
    if not per_task:
        omitted = f"{len(tasks)} tasks, more than max_tasks ({cfg.max_tasks})"
        log.warning("per-task stats left out: %s; raise --max-tasks to keep them", omitted)
    groups = len(tasks) if per_task else 1
    largest = max(t.frames for t in tasks) if per_task else total
    count_dtype: type[np.integer[Any]] = np.int32 if largest < 2**31 else np.int64
    accs = {k: _FeatureAccumulator(int(np.prod(f.shape)), groups, count_dtype) for k, f in vector.items()}
    log.info(
        "stats over %d dataset(s), %d frames, %d task(s); features: %s",
        len(datasets),
        total,
        len(tasks),
        ", ".join(features),
    )
    done = 0
    workers = min(len(accs), (os.cpu_count() or 1) - 1)  # one core stays with the reader thread
    with ThreadPoolExecutor(workers, thread_name_prefix="vlacl-stats") if workers > 1 else nullcontext() as pool:
        for position, ds in enumerate(datasets):
            keys = [k for k in numeric_keys(ds.features) if k in accs]
            if not keys:
                continue
            lut = lookup[position] if per_task else np.zeros_like(lookup[position])
            done = _reduce_dataset(ds, keys, accs, lut, cfg.rows_per_batch, done, total, progress, pool)
    image_stats, sampled = _image_stats(datasets, images, cfg, progress)
    return _assemble(datasets, names, cfg, features, accs, image_stats, sampled, tasks, per_task, omitted, total)


def _merged_features(datasets: Sequence[EpisodeDataset]) -> dict[str, Feature]:
    merged: dict[str, Feature] = {}
    where: dict[str, Path] = {}
    for ds in datasets:
        for key, feat in ds.features.items():
            if key in merged and merged[key].shape != feat.shape:
                raise InputFormatError(
                    f"{key} has shape {list(merged[key].shape)} in {where[key]} but {list(feat.shape)} in {ds.root}: "
                    "stats cannot combine them; use a key map that gives them the same layout, or compute "
                    "stats of each dataset separately"
                )
            merged.setdefault(key, feat)
            where.setdefault(key, ds.root)
    return merged


def _check_settings(cfg: DsStatsConfig, features: Mapping[str, Feature]) -> None:
    from vlacl.config.core import invalid

    for key in cfg.feature_norm_modes or {}:
        if key not in features:
            raise invalid("feature_norm_modes", f"names {key!r}, which the data lacks; features: {', '.join(features)}")
    dims = {k: int(np.prod(f.shape)) for k, f in features.items() if not f.is_image}
    cfg.overrides().check(dims)


def _tasks(datasets: Sequence[EpisodeDataset], names: Sequence[str | None]) -> tuple[list[_TaskInfo], list[np.ndarray]]:
    """Every task in order (dataset, then task_index) and, per dataset, task_index -> group slot."""
    infos: dict[str, _TaskInfo] = {}
    slot: dict[str, int] = {}
    lookup: list[np.ndarray] = []
    for ds, name in zip(datasets, names, strict=True):
        by_index: dict[int, Episode] = {}
        frames: dict[int, int] = {}
        for ep in ds.episodes:
            if ep.task_index < 0:
                raise InputFormatError(f"{ep.source} has task_index {ep.task_index}: task indices must be >= 0")
            by_index.setdefault(ep.task_index, ep)
            frames[ep.task_index] = frames.get(ep.task_index, 0) + ep.length
        table = np.full(max(by_index, default=-1) + 1, -1, dtype=np.int64)
        for index in sorted(by_index):
            ep = by_index[index]
            key = task_key(ep, name)
            if frames[index] == 0:
                raise InputFormatError(
                    f"task {key} ({ep.instruction or 'no instruction'}) of {ds.root} has no frames: its episodes "
                    "are all empty; drop them from the dataset, or leave the task out"
                )
            slot[key] = len(infos)
            infos[key] = _TaskInfo(key, ep.instruction, frames[index])
            table[index] = slot[key]
        lookup.append(table)
    return list(infos.values()), lookup


def _reduce_dataset(
    ds: EpisodeDataset,
    keys: Sequence[str],
    accs: Mapping[str, _FeatureAccumulator],
    lut: np.ndarray,
    rows_per_batch: int,
    done: int,
    total: int,
    progress: ProgressFn | None,
    pool: ThreadPoolExecutor | None,
) -> int:
    """Feed every batch of ``ds`` to the accumulators; return the frames done so far."""
    expected = sum(ep.length for ep in ds.episodes)
    ends = np.cumsum([ep.length for ep in ds.episodes])  # (E,) for naming the episode of a bad value
    row = 0
    batches = _prefetch(ds.iter_columns(keys, rows_per_batch=rows_per_batch), PREFETCH_BATCHES)
    with contextlib.closing(batches):
        for batch in batches:
            row = _reduce_batch(ds, batch, keys, accs, lut, row, expected, ends, pool)
            done += batch.num_rows
            if progress is not None:
                progress("frames", done, total)
    if row != expected:
        raise InputFormatError(
            f"{ds.root} yielded {row} frames of {', '.join(keys)}, but its episodes list {expected}: the data "
            "files and the metadata disagree; re-export the dataset"
        )
    return done


def _reduce_batch(
    ds: EpisodeDataset,
    batch: ColumnBatch,
    keys: Sequence[str],
    accs: Mapping[str, _FeatureAccumulator],
    lut: np.ndarray,
    row: int,
    expected: int,
    ends: np.ndarray,
    pool: ThreadPoolExecutor | None,
) -> int:
    """Feed one batch, its features in parallel; return the frames of ``ds`` done after it."""
    n = batch.num_rows
    if row + n > expected:
        raise InputFormatError(
            f"{ds.root} yielded more frames of {', '.join(keys)} than its episodes list ({expected}): the data "
            "files and the metadata disagree; re-export the dataset"
        )
    task_index = np.asarray(batch.task_index, dtype=np.int64)
    if n and (task_index.min() < 0 or task_index.max() >= len(lut) or (lut[task_index] < 0).any()):
        raise InputFormatError(f"{ds.root} has frames of a task_index no episode lists: the metadata is damaged")
    slots = lut[task_index]  # (n,)

    def feed(key: str) -> None:
        _feed(ds, key, accs[key], as_2d(np.asarray(batch.columns[key])), slots, row, ends)

    if pool is None or len(keys) == 1:
        for key in keys:
            feed(key)
    else:
        for future in [pool.submit(feed, key) for key in keys]:
            future.result()
    return row + n


def _feed(
    ds: EpisodeDataset,
    key: str,
    acc: _FeatureAccumulator,
    values: np.ndarray,
    slots: np.ndarray,
    row: int,
    ends: np.ndarray,
) -> None:
    """Feed one feature of a batch (``(n, D)``, its first frame ``row`` of ``ds``) chunk by chunk."""
    for lo in range(0, len(values), CHUNK_ROWS):
        try:
            acc.update(values[lo : lo + CHUNK_ROWS], slots[lo : lo + CHUNK_ROWS])
        except _NonFiniteError as bad:
            frame = row + lo + bad.column
            e = int(np.searchsorted(ends, frame, side="right"))
            ep = ds.episodes[e]
            first = int(ends[e - 1]) if e > 0 else 0
            raise InputFormatError(
                f"{key} dimension {bad.dim} is {bad.value} at frame {frame - first} of episode {ep.index} "
                f"({ep.source}): stats need finite numbers; fix or drop that episode"
            ) from None


def _image_stats(
    datasets: Sequence[EpisodeDataset],
    images: Mapping[str, Feature],
    cfg: DsStatsConfig,
    progress: ProgressFn | None,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Per-channel stats of each camera over a seeded uniform sample of frames."""
    if not images or cfg.image_frames == 0:
        return {}, 0
    episodes = [(ds, ep) for ds in datasets for ep in ds.episodes]
    ends = np.cumsum([ep.length for _, ep in episodes])  # (E,)
    total = int(ends[-1])
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(total, size=min(cfg.image_frames, total), replace=False))  # (S,)
    which = np.searchsorted(ends, picks, side="right")  # (S,) episode of each pick
    accs = {k: _ImageAccumulator(f.shape[-1]) for k, f in images.items()}
    done = 0
    for e in np.unique(which):
        ds, ep = episodes[int(e)]
        first = int(ends[e - 1]) if e > 0 else 0
        frames = picks[which == e] - first  # (k,) frame numbers in the episode
        runs = np.split(frames, np.flatnonzero(np.diff(frames) != 1) + 1)
        for key, acc in accs.items():
            if key not in ds.features:
                continue
            for run in runs:
                acc.update(np.asarray(ep.read(key, int(run[0]), int(run[-1]) + 1)), key, ep.source)  # (k, H, W, C)
        done += len(frames)
        if progress is not None:
            progress("images", done, len(picks))
    log.info("image stats over %d sampled frames of %d", len(picks), total)
    return {k: a.stats() for k, a in accs.items() if a.frames}, len(picks)


# ---------------------------------------------------------------------------------------------
# stats.json


def _assemble(
    datasets: Sequence[EpisodeDataset],
    names: Sequence[str | None],
    cfg: DsStatsConfig,
    features: Mapping[str, Feature],
    accs: Mapping[str, _FeatureAccumulator],
    image_stats: Mapping[str, dict[str, Any]],
    sampled: int,
    tasks: Sequence[_TaskInfo],
    per_task: bool,
    omitted: str | None,
    total: int,
) -> dict[str, Any]:
    overrides = cfg.overrides()
    modes: dict[str, NormMode] = {k: cfg.mode_of(k) for k in features}
    out_features: dict[str, dict[str, Any]] = {}
    worst_relative = 0.0
    for key, acc in accs.items():
        entry = acc.global_stats()
        detected = acc.binary_dims()
        mask = np.ones(acc.dims, dtype=bool)
        mask[detected] = False
        entry["mask"] = overrides.apply(key, mask).tolist()
        entry["binary_dims"] = detected
        entry["norm_mode"] = modes[key]
        span = np.asarray(entry["max"]) - np.asarray(entry["min"])
        bound = np.asarray(entry["quantile_error_bound"])
        if (span > 0).any():
            worst_relative = max(worst_relative, float((bound[span > 0] / span[span > 0]).max()))
        out_features[key] = entry
        if detected:
            log.info("%s: binary dimension(s) %s, left out of normalization", key, detected)
    for key, entry in image_stats.items():
        out_features[key] = {**entry, "norm_mode": modes[key]}
    out_tasks: dict[str, Any] = {}
    if per_task:
        for slot, info in enumerate(tasks):
            stats = {k: acc.group_stats(slot) for k, acc in accs.items() if acc.count[slot]}
            out_tasks[info.key] = {"instruction": info.instruction, "num_frames": info.frames, "features": stats}
    settings = {
        "norm_modes": dict(sorted(modes.items())),
        **overrides.to_dict(),
        "image_frames": cfg.image_frames,
        "seed": cfg.seed,
        "max_tasks": cfg.max_tasks,
        "quantiles": {"method": QUANTILE_METHOD, "bins": HIST_BINS},
    }
    fingerprints = [dataset_fingerprint(ds) for ds in datasets]
    keymap = datasets[0].keymap
    return {
        "vlacl_stats_version": STATS_VERSION,
        "fingerprint": stats_fingerprint(fingerprints, keymap.sha256(), settings),
        "datasets": [
            {
                "path": str(ds.root),
                "name": name if name is not None else (ds.episodes[0].subset if ds.episodes else ds.root.stem),
                "format": ds.format,
                "fingerprint": fp,
                "num_episodes": len(ds.episodes),
                "num_frames": sum(ep.length for ep in ds.episodes),
            }
            for ds, name, fp in zip(datasets, names, fingerprints, strict=True)
        ],
        "keymap_sha256": keymap.sha256(),
        "keymap_is_default": keymap.is_default,
        "settings": settings,
        "quantiles": {
            "method": QUANTILE_METHOD,
            "bins": HIST_BINS,
            "levels": dict(QUANTILE_LEVELS),
            "interpolation": "linear",
            "relative_error_bound": worst_relative,
        },
        "image_frames": sampled,
        "num_frames": total,
        "num_episodes": sum(len(ds.episodes) for ds in datasets),
        "features": out_features,
        "tasks": out_tasks,
        "tasks_omitted": omitted,
        "drift": drift(out_features, out_tasks),
    }


def drift(features: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """How far each task's stats sit from the global ones, per feature, over the normalized dimensions.

    Returns:
        Task id -> feature -> ``mean_shift`` (largest ``|mean_task - mean| / std``), ``range_ratio``
        (the task's ``q99 - q01`` over the global one, the one farthest from 1 by ratio) and the
        dimension of each; ``None`` where no dimension qualifies (constant, or all binary).
    """
    out: dict[str, dict[str, Any]] = {}
    for task, entry in tasks.items():
        per_feature: dict[str, Any] = {}
        for key, stats in entry["features"].items():
            glob = features[key]
            mask = np.asarray(glob["mask"], dtype=bool)
            std = np.asarray(glob["std"])
            span = np.asarray(glob["q99"]) - np.asarray(glob["q01"])
            shift = np.abs(np.asarray(stats["mean"]) - np.asarray(glob["mean"]))
            ok = mask & (std > 0)
            z = np.where(ok, shift / np.where(ok, std, 1.0), -1.0)
            ratio_ok = mask & (span > 0)
            ratio = (np.asarray(stats["q99"]) - np.asarray(stats["q01"])) / np.where(ratio_ok, span, 1.0)
            with np.errstate(divide="ignore"):
                far = np.where(ratio_ok, np.abs(np.log(np.maximum(ratio, 0.0))), -1.0)
            per_feature[key] = {
                "mean_shift": float(z.max()) if ok.any() else None,
                "mean_shift_dim": int(z.argmax()) if ok.any() else None,
                "range_ratio": float(ratio[far.argmax()]) if ratio_ok.any() else None,
                "range_ratio_dim": int(far.argmax()) if ratio_ok.any() else None,
            }
        out[task] = per_feature
    return out


# ---------------------------------------------------------------------------------------------
# The command as a library call


def run_ds_stats(
    paths: Sequence[Path],
    cfg: DsStatsConfig,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    command: Sequence[str] = (),
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Open ``paths``, compute their stats and, with ``out``, write a ``ds_stats`` artifact.

    The artifact holds ``stats.json``, ``keymap.yaml`` (when a key map other than the default was
    used) and ``config.yaml``; its manifest records each dataset as an input (an artifact's
    manifest, or the dataset's main metadata file) and, in ``details``, the stats fingerprint,
    the number of frames and the task ids.

    Raises:
        VlaclError: Unreadable or malformed datasets, a bad setting, or an ``out`` that may not be
            written. Nothing is written then.
    """
    from vlacl.artifacts.writer import ArtifactWriter, check_output_dir
    from vlacl.config.core import dump_config
    from vlacl.data.keymap import load_keymap
    from vlacl.data.open import open_datasets

    if out is not None:
        check_output_dir(out, overwrite, kind="ds_stats")
    keymap = load_keymap(cfg.keymap)
    datasets = open_datasets(list(paths), keymap)
    stats = compute_stats(datasets, cfg, progress=progress)
    if out is None:
        return stats
    with ArtifactWriter(
        out, "ds_stats", command=command, config_yaml=dump_config(cfg), seed=cfg.seed, overwrite=overwrite
    ) as writer:
        text = json.dumps(stats, indent=2, allow_nan=False) + "\n"
        (writer.path / STATS_NAME).write_text(text, encoding="utf-8")
        if not keymap.is_default:
            (writer.path / KEYMAP_NAME).write_text(keymap.to_yaml(), encoding="utf-8")
        for i, ds in enumerate(datasets):
            _record_input(writer, "dataset" if len(datasets) == 1 else f"dataset:{i}", ds.root)
        writer.details["stats_fingerprint"] = stats["fingerprint"]
        writer.details["num_frames"] = stats["num_frames"]
        writer.details["tasks"] = list(stats["tasks"])
    return stats


def _record_input(writer: Any, role: str, root: Path) -> None:
    """An artifact dataset by its manifest, a LeRobot directory by ``meta/info.json``, an HDF5 file itself."""
    from vlacl.artifacts.reader import open_artifact

    if (root / MANIFEST_NAME).is_file():
        writer.add_input(role, open_artifact(root))
    elif (root / "meta" / "info.json").is_file():
        writer.add_file_input(role, root / "meta" / "info.json")
    elif root.is_file():
        writer.add_file_input(role, root)
    else:
        log.debug("dataset %s has no single metadata file to record; its fingerprint is in stats.json", root)
