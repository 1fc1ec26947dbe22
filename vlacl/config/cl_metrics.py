"""Settings of ``vlacl cl-metrics``."""

from __future__ import annotations

from dataclasses import dataclass

from vlacl.config.core import invalid, setting

MAX_BOOTSTRAP = 100_000
"""Beyond this the Monte Carlo error of the interval ends is far below the sampling error of the episodes."""


@dataclass(frozen=True)
class ClMetricsConfig:
    """How ``cl-metrics`` computes metrics and confidence intervals from result matrices."""

    n_bootstrap: int = setting(
        1000,
        "Bootstrap resamples for the confidence intervals (0 turns them off). 1000 keeps the "
        "Monte Carlo error of a 95% interval's ends well below the width of the interval.",
        flag="--bootstrap",
    )
    confidence: float = setting(0.95, "Coverage of the bootstrap confidence intervals, in (0, 1).", flag="--confidence")
    seed: int = setting(0, "Seed of the bootstrap resampling; the same seed gives the same intervals.", flag="--seed")
    plot: bool = setting(True, "Write matrix.png, an annotated heatmap of each matrix.", flag="--plot/--no-plot")

    def __post_init__(self) -> None:
        if not 0 <= self.n_bootstrap <= MAX_BOOTSTRAP:
            raise invalid("n_bootstrap", f"must be in [0, {MAX_BOOTSTRAP}], got {self.n_bootstrap}", ClMetricsConfig)
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", ClMetricsConfig)
        if not 0.0 < self.confidence < 1.0:
            raise invalid("confidence", f"must be in (0, 1), got {self.confidence}", ClMetricsConfig)
