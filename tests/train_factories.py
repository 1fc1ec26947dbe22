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
    keymap: Path | None = None

    def config(self, **changes: Any) -> TrainTaskConfig:
        """A fast config over the stream: micro backbone, small head, batch 8, no periodic validation."""
        from vlacl.config.lora import AdapterConfig
        from vlacl.config.policy import PolicyConfig

        base = TrainTaskConfig(
            model_path=str(self.model),
            datasets=(self.data,),
            stats=self.stats,
            keymap=self.keymap,
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


def make_stream(
    root: Path,
    *,
    episodes: int = 8,
    length: int = 12,
    seed: int = 0,
    image_size: int = 16,
    force_dim: int = 0,
    model: Path | None = None,
) -> Stream:
    """Two tasks (pick / open), ``episodes`` episodes of ``length`` frames, one square camera.

    The action of a frame is a fixed function of its state (``tanh`` of a linear map), so a policy
    that sees the state can learn it. With ``force_dim``, each frame also has an
    ``observation.force`` column of that width (values around 50, so that normalization shows),
    read through a key map's ``extra`` (``Stream.keymap``) and normalized with mean/std by ds-stats.
    ``model`` replaces the micro tiny backbone.
    """
    truth = make_episodes(
        [length] * episodes,
        ["pick the cube", "open the drawer"],
        cameras=["front"],
        image_size=(image_size, image_size),
        seed=seed,
    )
    mix = np.random.default_rng(seed).normal(size=(truth[0].state.shape[1], truth[0].action.shape[1]))  # (S, A)
    for ep in truth:
        ep.action = np.tanh(ep.state @ mix).astype(np.float32)  # (T, A)
    data = write_lerobot(root / "data", truth, images="embedded")
    keymap = None
    cfg = DsStatsConfig(image_frames=16)
    if force_dim:
        add_force_column(data, force_dim, seed=seed)
        keymap = root / "keymap.yaml"
        keymap.write_text(f"extra:\n  {FORCE}: {FORCE}\n", encoding="utf-8")
        cfg = DsStatsConfig(image_frames=16, keymap=keymap, feature_norm_modes={FORCE: "mean_std"})
    stats = root / "stats"
    run_ds_stats([data], cfg, out=stats)
    if model is None:
        model = save_tiny_model(root / "model", MICRO, seed=0)
    return Stream(data, stats, model, keymap)


FORCE = "observation.force"
"""The extra sensor stream of ``make_stream(force_dim=...)``."""


def add_force_column(data: Path, dim: int, *, seed: int = 0) -> None:
    """Add an ``observation.force`` float32 ``(dim,)`` column to every data file of a LeRobot v3 dataset."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed + 1)
    for file in sorted((data / "data").rglob("*.parquet")):
        table = pq.read_table(file)
        values = (50.0 + 5.0 * rng.normal(size=(table.num_rows, dim))).astype(np.float32)  # (N, dim)
        column = pa.array(list(values), type=pa.list_(pa.float32()))
        pq.write_table(table.append_column(FORCE, column), file)
    info_file = data / "meta" / "info.json"
    info = json.loads(info_file.read_text())
    info["features"][FORCE] = {"dtype": "float32", "shape": [dim], "names": None}
    info_file.write_text(json.dumps(info, indent=2))
