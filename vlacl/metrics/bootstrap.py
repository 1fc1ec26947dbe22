"""Bootstrap confidence intervals for CL metrics from per-episode results.

Each replicate resamples, with replacement, the episodes of every (stage, task) cell
independently, keeping each cell's episode count. For binary success this is exactly a draw of
``Binomial(n, k / n) / n`` per cell, which is what is sampled here: the same distribution as
resampling episode rows, without materializing them. The interval is the percentile interval of
the metric over the replicates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from vlacl.metrics.matrix import EpisodeCounts

CHUNK_CELLS = 4_000_000
"""Cells (replicates x stages x tasks) drawn at once: 32 MB of float64 per chunk."""


def resample(counts: EpisodeCounts, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw bootstrap replicates of the success rates.

    All cells of one replicate (the stages, then the ``init`` row) are drawn together, replicate
    after replicate, so drawing B replicates in chunks gives exactly the draws of one call.

    Returns:
        ``(values, init)``: ``values`` has shape (B, S, T) and ``init`` (B, T) or ``None``; cells
        with no episodes are ``NaN``.
    """
    k_parts, n_parts = [counts.successes.ravel()], [counts.episodes.ravel()]
    if counts.init_successes is not None and counts.init_episodes is not None:
        k_parts.append(counts.init_successes)
        n_parts.append(counts.init_episodes)
    has_init = len(k_parts) == 2
    k, n = np.concatenate(k_parts), np.concatenate(n_parts)
    p = np.divide(k, n, out=np.zeros(k.shape, dtype=np.float64), where=n > 0)
    hits = rng.binomial(n=np.broadcast_to(n, (n_boot, n.size)), p=np.broadcast_to(p, (n_boot, p.size)))
    rates = hits / np.maximum(n, 1)  # (B, C): C = S*T stage cells, then T init cells
    rates[:, n == 0] = np.nan
    stage_cells = counts.successes.size
    values = rates[:, :stage_cells].reshape(n_boot, *counts.successes.shape)  # (B, S, T)
    init = rates[:, stage_cells:] if has_init else None  # (B, T)
    return values, init


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of 1-D ``replicates``."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_intervals(
    counts: EpisodeCounts,
    order: Sequence[int],
    metrics: Mapping[str, Callable[[np.ndarray, np.ndarray | None], np.ndarray]],
    n_boot: int,
    confidence: float,
    rng: np.random.Generator,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of several metrics over the same bootstrap replicates.

    Args:
        counts: Episode counts of the run.
        order: Column of the task trained at each stage, to align replicates as (B, T, T).
        metrics: Name -> vectorized metric function of :mod:`vlacl.metrics.cl`.
        n_boot: Number of replicates.
        confidence: Coverage of the intervals.
        rng: Source of randomness; the same seed gives the same intervals.

    Replicates are drawn in chunks of at most :data:`CHUNK_CELLS` cells, so memory stays bounded
    however many replicates are asked for.
    """
    cells = counts.episodes.size + (0 if counts.init_episodes is None else counts.init_episodes.size)
    chunk = max(1, CHUNK_CELLS // max(cells, 1))
    collected: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        values, init = resample(counts, size, rng)
        aligned = values[:, :, list(order)]  # (b, T, T): column k = task trained at stage k
        aligned_init = None if init is None else init[:, list(order)]  # (b, T)
        for name, fn in metrics.items():
            collected[name].append(fn(aligned, aligned_init))
        done += size
    return {name: percentile_interval(np.concatenate(parts), confidence) for name, parts in collected.items()}
