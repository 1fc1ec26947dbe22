"""Settings of ``vlacl collect-demos``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlacl.config.core import invalid, setting

MAX_WORKERS = 256
"""More worker processes than this is a typo, not a machine."""


@dataclass(frozen=True)
class CollectDemosConfig:
    """Which tasks the scripted experts demonstrate, how often, and what is recorded."""

    stream: str = setting(
        "cw10",
        "Task stream: a preset (cw10, cw20, mt10, ...) or comma-separated task names of one simulator.",
        flag="--stream",
    )
    episodes_per_task: int = setting(10, "Episodes kept per task.", flag="--episodes-per-task")
    cameras: tuple[str, ...] = setting(
        (),
        "Cameras to render, comma-separated (e.g. corner); none records the state only, the fastest.",
        flag="--cameras",
    )
    image_size: int = setting(64, "Height and width of the camera frames, in pixels.", flag="--image-size")
    keep_failures: bool = setting(
        False,
        "Keep episodes whose expert failed too (every attempt is kept); by default only successful episodes are kept.",
        flag="--keep-failures",
    )
    action_noise: float = setting(
        0.0,
        "Standard deviation of Gaussian noise added to the expert's actions, clipped to [-action_bound, action_bound]; "
        "the noisy action is the one executed and recorded. 0 records the expert as it is.",
        flag="--action-noise",
    )
    action_bound: float = setting(
        1.0, "Noisy actions are clipped to [-action_bound, action_bound]: Meta-World's and LIBERO's action space."
    )
    max_attempts_factor: int = setting(
        3,
        "A task gives up after episodes_per_task x this many attempts; its success rate is reported either way.",
    )
    stop_on_success: bool = setting(
        True,
        "End an episode at the expert's first successful step (demonstrations without idle frames); false runs every "
        "episode for the task's whole step budget.",
    )
    seed: int = setting(
        0,
        "Master seed: every (task, attempt) reset seed and noise seed derive from it and the task's name.",
        flag="--seed",
    )
    workers: int = setting(
        1,
        "Worker processes, each collecting whole tasks (spawned); the dataset is the same whatever the number.",
        flag="--workers",
    )
    fps: int | None = setting(
        None,
        "Frames per second written to meta/info.json; none takes the simulator's control rate (Meta-World 80, "
        "LIBERO 20).",
        flag="--fps",
    )
    data_files_size_in_mb: int = setting(
        100, "A data parquet file takes episodes up to this size, then a new one starts (LeRobot's default)."
    )

    def __post_init__(self) -> None:
        if not self.stream.strip():
            raise invalid("stream", "is empty; name a preset such as cw10 or comma-separated tasks", CollectDemosConfig)
        if self.episodes_per_task < 1:
            raise invalid("episodes_per_task", f"must be >= 1, got {self.episodes_per_task}", CollectDemosConfig)
        if not 8 <= self.image_size <= 1024:
            raise invalid("image_size", f"must be in [8, 1024], got {self.image_size}", CollectDemosConfig)
        if len(set(self.cameras)) != len(self.cameras) or any(not c.strip() for c in self.cameras):
            raise invalid("cameras", f"must be distinct non-empty names, got {list(self.cameras)}", CollectDemosConfig)
        if not (math.isfinite(self.action_noise) and self.action_noise >= 0):
            raise invalid("action_noise", f"must be a finite number >= 0, got {self.action_noise}", CollectDemosConfig)
        if not (math.isfinite(self.action_bound) and self.action_bound > 0):
            raise invalid("action_bound", f"must be a finite number > 0, got {self.action_bound}", CollectDemosConfig)
        if self.max_attempts_factor < 1:
            raise invalid("max_attempts_factor", f"must be >= 1, got {self.max_attempts_factor}", CollectDemosConfig)
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", CollectDemosConfig)
        if not 1 <= self.workers <= MAX_WORKERS:
            raise invalid("workers", f"must be in [1, {MAX_WORKERS}], got {self.workers}", CollectDemosConfig)
        if self.fps is not None and self.fps < 1:
            raise invalid("fps", f"must be >= 1, got {self.fps}", CollectDemosConfig)
        if self.data_files_size_in_mb < 1:
            raise invalid(
                "data_files_size_in_mb", f"must be >= 1, got {self.data_files_size_in_mb}", CollectDemosConfig
            )

    @property
    def max_attempts(self) -> int:
        """Attempts per task at most."""
        return self.episodes_per_task * self.max_attempts_factor
