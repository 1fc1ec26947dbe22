"""A tiny task stream (LeRobot dataset + ds-stats artifact + micro tiny backbone) for train-task tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.lerobot_factories import make_episodes, write_lerobot
from vlacl.config.ds_stats import DsStatsConfig
from vlacl.config.train_task import TrainTaskConfig
from vlacl.data.stats import run_ds_stats
from vlacl.models.tiny import TinyConfig, save_tiny_model

MICRO = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, mlp_ratio=2, image_size=16, patch_size=8, max_text_len=8)
"""A backbone small enough for a training step in milliseconds on a loaded CPU."""


@dataclass(frozen=True)
class Stream:
    """Paths of a two-task stream: the dataset, its stats and a micro tiny model."""

    data: Path
    stats: Path
    model: Path

    def config(self, **changes: Any) -> TrainTaskConfig:
        """A fast config over the stream: micro backbone, small head, batch 8, no periodic validation."""
        from vlacl.config.lora import AdapterConfig
        from vlacl.config.policy import PolicyConfig

        base = TrainTaskConfig(
            model_path=str(self.model),
            datasets=(self.data,),
            stats=self.stats,
            model=PolicyConfig(hidden_sizes=(64,)),
            adapter=AdapterConfig(rank=4, dropout=0.0),
            steps=4,
            batch_size=8,
            log_every=2,
            val_every=0,
            save_every=0,
        )
        return dataclasses.replace(base, **changes)

    def args(self, *extra: str) -> list[str]:
        """Command-line arguments of the same fast config."""
        return [
            "train-task",
            "--dataset",
            str(self.data),
            "--stats",
            str(self.stats),
            "--model",
            str(self.model),
            "--lora-rank",
            "4",
            "--set",
            "model.hidden_sizes=[64]",
            "--set",
            "adapter.dropout=0.0",
            "--batch-size",
            "8",
            "--log-every",
            "2",
            "--val-every",
            "0",
            *extra,
        ]


def make_stream(root: Path, *, episodes: int = 8, length: int = 12, seed: int = 0) -> Stream:
    """Two tasks (pick / open), ``episodes`` episodes of ``length`` frames, one 16x16 camera.

    The action of a frame is a fixed function of its state (``tanh`` of a linear map), so a policy
    that sees the state can learn it.
    """
    truth = make_episodes(
        [length] * episodes, ["pick the cube", "open the drawer"], cameras=["front"], image_size=(16, 16), seed=seed
    )
    mix = np.random.default_rng(seed).normal(size=(truth[0].state.shape[1], truth[0].action.shape[1]))  # (S, A)
    for ep in truth:
        ep.action = np.tanh(ep.state @ mix).astype(np.float32)  # (T, A)
    data = write_lerobot(root / "data", truth, images="embedded")
    stats = root / "stats"
    run_ds_stats([data], DsStatsConfig(image_frames=16), out=stats)
    model = save_tiny_model(root / "model", MICRO, seed=0)
    return Stream(data, stats, model)
