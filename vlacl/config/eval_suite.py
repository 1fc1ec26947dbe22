"""Settings of ``vlacl eval-suite``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlacl.config.core import invalid, setting

MAX_WORKERS = 256
"""More worker processes than this is a typo, not a machine."""

_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``.

    Raises:
        ConfigError: Not of the form ``i/n`` or ``i`` out of range.
    """
    match = _SHARD_RE.match(text.strip())
    if match is None:
        raise invalid("shard", f"must be INDEX/COUNT such as 0/4, got {text!r}", EvalSuiteConfig)
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise invalid("shard", f"index must be in [0, COUNT) and COUNT >= 1, got {text!r}", EvalSuiteConfig)
    return index, count


@dataclass(frozen=True)
class EvalSuiteConfig:
    """What ``eval-suite`` evaluates, how many episodes, and how the work is spread."""

    suite: str = setting(
        "auto",
        "What to evaluate on: metaworld:<stream> (a preset such as cw10 or comma-separated tasks), libero:<suite>, "
        "offline (action errors on held-out episodes of --dataset), or auto: the simulator and stream the "
        "checkpoints' dataset was collected from (collect-demos).",
        flag="--suite",
    )
    trials: int = setting(10, "Episodes per (checkpoint, task) cell of a rollout suite.", flag="--trials")
    seed: int = setting(
        0,
        "Seed of the episodes' initial states: trial t of a task gets the same initial state for every checkpoint "
        "(paired comparisons); another seed gives other states.",
        flag="--seed",
    )
    max_steps: int | None = setting(
        None,
        "Step budget of an episode, at most the task's own (an episode also ends where the simulator ends it); "
        "none takes the task's own (Meta-World 500).",
        flag="--max-steps",
    )
    last_only: bool = setting(
        False,
        "Evaluate only the last checkpoint (the final row); by default every checkpoint on every task of the "
        "stream, tasks not trained yet included (forward-transfer data).",
        flag="--last-only",
    )
    execute: int | None = setting(
        None,
        "Actions of each predicted chunk executed before the policy is asked again (at most the chunk); none "
        "executes the whole chunk.",
        flag="--execute",
    )
    envs: int = setting(
        10,
        "Environments a worker steps together, with one batched policy call per step; a cell's trials are split "
        "into groups of this many.",
        flag="--envs",
    )
    workers: int = setting(1, "Worker processes, each with its own policy and environments.", flag="--workers")
    device: str = setting(
        "cpu", "Where the policy runs: cpu, cuda, cuda:N, or auto (cuda when available).", flag="--device"
    )
    shard: str = setting(
        "0/1",
        "INDEX/COUNT: evaluate only this share of the cells, for array jobs; cl-metrics joins the shards' outputs.",
        flag="--shard",
    )
    image_size: int | None = setting(
        None,
        "Height and width of rendered camera frames; none takes the training dataset's frame size (from its "
        "meta/info.json), else 64.",
        flag="--image-size",
    )
    videos: int = setting(0, "Record the first N episodes of every cell as mp4 under videos/.", flag="--videos")
    video_camera: str | None = setting(
        None,
        "Camera of the videos; none takes the policy's first camera, or the simulator's first camera for a "
        "state-only policy.",
        flag="--video-camera",
    )
    video_fps: int = setting(30, "Frame rate of the videos.")
    stats: Path | None = setting(
        None,
        "ds_stats artifact the actions are unnormalized with; it must be the stats the checkpoints were trained "
        "with (fingerprints are compared). None uses each checkpoint's own copy.",
        flag="--stats",
    )
    datasets: tuple[Path, ...] = setting(
        (), "Datasets of the offline suite; none takes the checkpoints' training datasets.", flag="--dataset"
    )
    split: Literal["val", "all"] = setting(
        "val",
        "Offline suite episodes: val (the held-out episodes train-task set aside, with its split settings) or all.",
        flag="--split",
    )
    batch_size: int = setting(64, "Samples per policy call of the offline suite.", flag="--batch-size")

    def __post_init__(self) -> None:
        if not self.suite.strip():
            raise invalid(
                "suite", "is empty: give metaworld:<stream>, libero:<suite>, offline or auto", EvalSuiteConfig
            )
        if self.trials < 1:
            raise invalid("trials", f"must be >= 1, got {self.trials}", EvalSuiteConfig)
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", EvalSuiteConfig)
        if self.max_steps is not None and self.max_steps < 1:
            raise invalid("max_steps", f"must be >= 1, got {self.max_steps}", EvalSuiteConfig)
        if self.execute is not None and self.execute < 1:
            raise invalid("execute", f"must be >= 1, got {self.execute}", EvalSuiteConfig)
        if self.envs < 1:
            raise invalid("envs", f"must be >= 1, got {self.envs}", EvalSuiteConfig)
        if not 1 <= self.workers <= MAX_WORKERS:
            raise invalid("workers", f"must be in [1, {MAX_WORKERS}], got {self.workers}", EvalSuiteConfig)
        parse_shard(self.shard)
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise invalid("image_size", f"must be in [8, 1024], got {self.image_size}", EvalSuiteConfig)
        if self.videos < 0:
            raise invalid("videos", f"must be >= 0, got {self.videos}", EvalSuiteConfig)
        if self.video_fps < 1:
            raise invalid("video_fps", f"must be >= 1, got {self.video_fps}", EvalSuiteConfig)
        if self.batch_size < 1:
            raise invalid("batch_size", f"must be >= 1, got {self.batch_size}", EvalSuiteConfig)

    @property
    def shard_index(self) -> tuple[int, int]:
        """``(index, count)`` of :attr:`shard`."""
        return parse_shard(self.shard)
