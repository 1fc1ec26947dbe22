"""Bootstrap confidence intervals for CL metrics from per-episode results.

Each replicate resamples, with replacement, the episodes of every (stage, task) cell
independently, keeping each cell's episode count. For binary success this is exactly a draw of
``Binomial(n, k / n) / n`` per cell, which is what is sampled here: the same distribution as
resampling episode rows, without materializing them. The interval is the percentile interval of
the metric over the replicates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vlacl.metrics.matrix import EpisodeCounts


def resample(counts: EpisodeCounts, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw bootstrap replicates of the success rates.

    Returns:
        ``(values, init)``: ``values`` has shape (B, S, T) and ``init`` (B, T) or ``None``; cells
        with no episodes are ``NaN``.
    """

    def draw(k: np.ndarray, n: np.ndarray) -> np.ndarray:
        p = np.divide(k, n, out=np.zeros(k.shape, dtype=np.float64), where=n > 0)
        hits = rng.binomial(n=np.broadcast_to(n, (n_boot, *n.shape)), p=np.broadcast_to(p, (n_boot, *p.shape)))
        rates = hits / np.maximum(n, 1)  # (B, ...) success rates per replicate
        rates[:, n == 0] = np.nan
        return np.asarray(rates)

    values = draw(counts.successes, counts.episodes)
    init = None
    if counts.init_successes is not None and counts.init_episodes is not None:
        init = draw(counts.init_successes, counts.init_episodes)
    return values, init


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of 1-D ``replicates``."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def metric_interval(
    fn: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    values: np.ndarray,
    init: np.ndarray | None,
    confidence: float,
) -> tuple[float, float]:
    """Percentile interval of metric ``fn`` over aligned replicates ``values`` (B, T, T), ``init`` (B, T)."""
    return percentile_interval(fn(values, init), confidence)
