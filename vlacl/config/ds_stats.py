"""Settings of ``vlacl ds-stats``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vlacl.config.core import invalid, setting
from vlacl.data.features import role_of
from vlacl.data.normalize import DimOverrides, NormMode
from vlacl.errors import ConfigError

MAX_ROWS_PER_BATCH = 1 << 22
"""Beyond this a batch costs memory (rows x dims x 8 bytes per float64 copy) without reading faster."""


@dataclass(frozen=True)
class DsStatsConfig:
    """What ``ds-stats`` computes and how the stats normalize the data."""

    norm_mode: NormMode = setting(
        "q99",
        "Normalization of the state and the action: q99 (q01/q99 to [-1, 1], clipped; robust to outliers), "
        "min_max (clipped), mean_std or none.",
        flag="--norm-mode",
    )
    feature_norm_modes: Mapping[str, NormMode] | None = setting(
        None,
        "Per-feature modes replacing the default, e.g. --set 'feature_norm_modes={action: min_max}'; features "
        "other than the state and the action (extra keys, cameras) default to none.",
    )
    binary_dims: Mapping[str, tuple[int, ...]] | None = setting(
        None,
        "Dimensions to treat as binary (left unnormalized) whatever the data shows, per feature, "
        "e.g. --set 'binary_dims={action: [6]}'.",
    )
    continuous_dims: Mapping[str, tuple[int, ...]] | None = setting(
        None,
        "Dimensions to normalize even though they hold only two values (binary detection off for them), per feature.",
    )
    image_frames: int = setting(
        1000,
        "Camera frames sampled (seeded, uniformly over all frames) for the per-channel image stats; 0 skips "
        "them. 1000 frames put the standard error of a channel mean far below one 8-bit level.",
        flag="--image-frames",
    )
    seed: int = setting(0, "Seed of the image frame sample.", flag="--seed")
    max_tasks: int = setting(
        256,
        "Per-task stats are written when the data has at most this many tasks (each task keeps a 10240-bin "
        "histogram per dimension); above it only global stats are written.",
        flag="--max-tasks",
    )
    rows_per_batch: int = setting(
        65536, "Frames read per batch; memory is bounded by it, not by the dataset size (set it with --set)."
    )
    keymap: Path | None = setting(
        None, "Key map YAML naming the state, action and camera keys; none keeps the format's own.", flag="--keymap"
    )

    def __post_init__(self) -> None:
        if self.image_frames < 0:
            raise invalid("image_frames", f"must be >= 0, got {self.image_frames}", DsStatsConfig)
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", DsStatsConfig)
        if self.max_tasks < 1:
            raise invalid("max_tasks", f"must be >= 1, got {self.max_tasks}", DsStatsConfig)
        if not 1 <= self.rows_per_batch <= MAX_ROWS_PER_BATCH:
            raise invalid(
                "rows_per_batch", f"must be in [1, {MAX_ROWS_PER_BATCH}], got {self.rows_per_batch}", DsStatsConfig
            )
        for name, table in (("binary_dims", self.binary_dims), ("continuous_dims", self.continuous_dims)):
            for key, dims in (table or {}).items():
                if any(d < 0 for d in dims):
                    raise invalid(name, f"dimension indices of {key} must be >= 0, got {list(dims)}", DsStatsConfig)
        try:
            self.overrides()
        except ConfigError as exc:
            raise invalid("binary_dims", str(exc), DsStatsConfig) from None

    def overrides(self) -> DimOverrides:
        """The per-dimension mask overrides."""
        return DimOverrides.of(self.binary_dims, self.continuous_dims)

    def mode_of(self, key: str) -> NormMode:
        """The mode of feature ``key``: its own, else ``norm_mode`` for the state and the action, else none."""
        modes = self.feature_norm_modes or {}
        if key in modes:
            return modes[key]
        return self.norm_mode if role_of(key) in ("state", "action") else "none"
