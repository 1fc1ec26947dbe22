"""The LeRobot v3.0 writer: what it writes reads back exactly, and its metadata is what LeRobot's reader expects."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.lerobot_factories import EpisodeTruth, make_episodes
from vlacl.data.lerobot_writer import (
    DATA_PATH,
    DEFAULT_FEATURES,
    EpisodeBuilder,
    LeRobotWriter,
    aggregate_stats,
    numeric_stats,
)
from vlacl.data.open import open_datasets

TASKS = ["pick up the cube", "open the drawer", "push the button"]


def frames_of(e: EpisodeTruth) -> dict[str, np.ndarray]:
    frames: dict[str, np.ndarray] = {"observation.state": e.state}
    frames.update({f"observation.images.{cam}": images for cam, images in e.images.items()})
    frames["action"] = e.action
    frames["next.reward"] = e.action[:, 0].copy()
    frames["next.success"] = np.arange(e.length) == e.length - 1
    return frames


def write(root: Path, episodes: Sequence[EpisodeTruth], **kwargs: object) -> LeRobotWriter:
    writer = LeRobotWriter(root, fps=10, robot_type="test", extra_episode_columns={"vlacl_seed": pa.int64()}, **kwargs)  # type: ignore[arg-type]
    for e in episodes:
        writer.add_episode(frames_of(e), e.task, extra={"vlacl_seed": 100 + e.index})
    writer.close()
    return writer


@pytest.fixture
def truth() -> list[EpisodeTruth]:
    return make_episodes([7, 12, 5, 9, 11], TASKS, cameras=["corner", "wrist"], image_size=(12, 10))


def test_round_trip_through_vlacl_reader_is_exact(tmp_path: Path, truth: list[EpisodeTruth]) -> None:
    root = tmp_path / "ds"
    write(root, truth)
    (ds,) = open_datasets([root])
    assert ds.format == "lerobot_v3.0"
    assert ds.fps == 10
    assert [e.length for e in ds.episodes] == [e.length for e in truth]
    assert [e.instruction for e in ds.episodes] == [e.task for e in truth]
    assert [e.task_index for e in ds.episodes] == [e.task_index for e in truth]
    for got, want in zip(ds.episodes, truth, strict=True):
        np.testing.assert_array_equal(got.read("observation.state"), want.state)
        np.testing.assert_array_equal(got.read("action"), want.action)
        for cam in ("corner", "wrist"):
            np.testing.assert_array_equal(got.read(f"observation.images.{cam}"), want.images[cam])
        np.testing.assert_array_equal(got.read("action", 2, 4), want.action[2:4])


def test_metadata_has_what_lerobot_requires_and_is_consistent(tmp_path: Path, truth: list[EpisodeTruth]) -> None:
    root = tmp_path / "ds"
    write(root, truth)
    info = json.loads((root / "meta/info.json").read_text())
    total = sum(e.length for e in truth)
    assert info["codebase_version"] == "v3.0"
    assert info["robot_type"] == "test"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (5, total, 3)
    assert info["chunks_size"] == 1000
    assert info["data_files_size_in_mb"] == 100
    assert info["video_files_size_in_mb"] == 200  # LeRobot 0.4 default
    assert info["splits"] == {"train": "0:5"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] is None
    features = info["features"]
    assert list(features)[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    assert features["observation.state"] == {"dtype": "float32", "shape": [4], "names": None}
    assert features["observation.images.corner"] == {
        "dtype": "image",
        "shape": [12, 10, 3],
        "names": ["height", "width", "channels"],
    }
    assert features["next.success"] == {"dtype": "bool", "shape": [1], "names": None}
    for key, spec in DEFAULT_FEATURES.items():
        assert features[key] == spec

    # The data file: exactly the declared features as columns (LeRobot casts to them), LeRobot's Arrow types.
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert data.column_names == list(features)
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), 4)
    assert data.schema.field("next.reward").type == pa.float32()
    assert data.schema.field("observation.images.corner").type == pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())]
    )
    assert data.column("index").to_pylist() == list(range(total))
    frame_index = np.concatenate([np.arange(e.length) for e in truth])
    np.testing.assert_array_equal(data.column("frame_index").to_numpy(), frame_index)
    np.testing.assert_array_equal(data.column("timestamp").to_numpy(), (frame_index / 10).astype(np.float32))
    png = data.column("observation.images.corner")[0].as_py()["bytes"]
    assert png.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), truth[0].images["corner"][0])

    # Tasks: LeRobot reads them with pandas, the text as the index.
    tasks = pd.read_parquet(root / "meta/tasks.parquet")
    assert tasks.index.name == "task"
    assert list(tasks.index) == TASKS
    assert tasks["task_index"].tolist() == [0, 1, 2]

    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r["episode_index"] for r in episodes] == [0, 1, 2, 3, 4]
    assert [r["tasks"] for r in episodes] == [[e.task] for e in truth]
    assert [r["length"] for r in episodes] == [e.length for e in truth]
    start = 0
    for r, e in zip(episodes, truth, strict=True):
        assert (r["dataset_from_index"], r["dataset_to_index"]) == (start, start + e.length)
        assert (r["data/chunk_index"], r["data/file_index"]) == (0, 0)
        assert (r["meta/episodes/chunk_index"], r["meta/episodes/file_index"]) == (0, 0)
        assert r["vlacl_seed"] == 100 + e.index
        np.testing.assert_array_equal(r["stats/action/max"], e.action.max(axis=0).astype(np.float64))
        assert r["stats/action/count"] == [e.length]
        assert r["stats/index/min"] == [start]
        assert np.asarray(r["stats/observation.images.wrist/mean"]).shape == (3, 1, 1)
        start += e.length

    stats = json.loads((root / "meta/stats.json").read_text())
    state = np.concatenate([e.state for e in truth]).astype(np.float64)
    np.testing.assert_array_equal(stats["observation.state"]["min"], state.min(axis=0))
    np.testing.assert_array_equal(stats["observation.state"]["max"], state.max(axis=0))
    np.testing.assert_allclose(stats["observation.state"]["mean"], state.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats["observation.state"]["std"], state.std(axis=0), rtol=1e-10)
    assert stats["observation.state"]["count"] == [total]
    pixels = np.concatenate([e.images["corner"] for e in truth]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(np.ravel(stats["observation.images.corner"]["mean"]), pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.ravel(stats["observation.images.corner"]["std"]), pixels.std(axis=0), rtol=1e-9)
    assert set(stats) == set(features)


def test_data_files_rotate_by_size_and_chunks_fill_up(tmp_path: Path, truth: list[EpisodeTruth]) -> None:
    root = tmp_path / "ds"
    write(root, truth, data_files_size_in_mb=0.004, chunks_size=2)  # about one episode per file
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    places = [(r["data/chunk_index"], r["data/file_index"]) for r in episodes]
    assert len(set(places)) >= 3
    assert places == sorted(places)
    for chunk, file in set(places):
        assert file < 2
        rows = pq.read_metadata(root / DATA_PATH.format(chunk_index=chunk, file_index=file)).num_rows
        assert rows == sum(
            r["length"] for r in episodes if (r["data/chunk_index"], r["data/file_index"]) == (chunk, file)
        )
    assert (root / "data/chunk-001").is_dir()
    (ds,) = open_datasets([root])
    for got, want in zip(ds.episodes, truth, strict=True):
        np.testing.assert_array_equal(got.read("observation.state"), want.state)
        np.testing.assert_array_equal(got.read("observation.images.wrist"), want.images["wrist"])


def test_same_episodes_give_identical_bytes(tmp_path: Path, truth: list[EpisodeTruth]) -> None:
    write(tmp_path / "a", truth)
    write(tmp_path / "b", truth)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert Path("data/chunk-000/file-000.parquet") in files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_episodes_with_other_features_are_refused(tmp_path: Path, truth: list[EpisodeTruth]) -> None:
    writer = LeRobotWriter(tmp_path / "ds", fps=10)
    writer.add_episode(frames_of(truth[0]), "a")
    other = frames_of(truth[1])
    other["observation.state"] = other["observation.state"][:, :3]
    with pytest.raises(ValueError, match=r"observation\.state"):
        writer.add_episode(other, "a")
    with pytest.raises(ValueError, match="no episode"):
        LeRobotWriter(tmp_path / "empty", fps=10).close()


def test_builder_refuses_a_frame_of_another_shape() -> None:
    builder = EpisodeBuilder(fps=10)
    builder.add_frame({"observation.state": np.zeros(3, np.float32), "action": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="action"):
        builder.add_frame({"observation.state": np.zeros(3, np.float32), "action": np.zeros(3, np.float32)})


def test_aggregated_stats_equal_stats_of_the_whole() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(n, 4)) * (i + 1) for i, n in enumerate([5, 17, 1, 30])]
    whole = numeric_stats(np.concatenate(parts))
    merged = aggregate_stats([numeric_stats(p) for p in parts])
    for key in ("min", "max", "count"):
        np.testing.assert_array_equal(merged[key], whole[key])
    np.testing.assert_allclose(merged["mean"], whole["mean"], rtol=1e-12)
    np.testing.assert_allclose(merged["std"], whole["std"], rtol=1e-12)


def test_stats_have_lerobot_quantiles_and_typed_extremes(tmp_path: Path, truth: list[EpisodeTruth]) -> None:
    root = tmp_path / "ds"
    write(root, truth[:1])  # one episode: the aggregate is that episode's exact stats
    stats = json.loads((root / "meta/stats.json").read_text())
    levels = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
    state = truth[0].state.astype(np.float64)
    pixels = truth[0].images["corner"].reshape(-1, 3).astype(np.float64) / 255.0
    for name, level in levels.items():
        np.testing.assert_allclose(stats["observation.state"][name], np.quantile(state, level, axis=0), rtol=1e-12)
        np.testing.assert_allclose(
            np.ravel(stats["observation.images.corner"][name]), np.quantile(pixels, level, axis=0), rtol=1e-12
        )
        assert np.asarray(stats["observation.images.corner"][name]).shape == (3, 1, 1)
    # Integer and bool features keep their dtype in min and max, as LeRobot writes them.
    assert stats["frame_index"]["max"] == [truth[0].length - 1]
    assert stats["next.success"]["min"] == [False]
    assert stats["next.success"]["max"] == [True]
    episodes = pq.read_schema(root / "meta/episodes/chunk-000/file-000.parquet")
    assert episodes.field("stats/index/min").type == pa.list_(pa.int64())
    assert episodes.field("stats/next.success/max").type == pa.list_(pa.bool_())
    assert episodes.field("stats/action/q99").type == pa.list_(pa.float64())


def test_data_files_carry_the_datasets_features(tmp_path: Path, truth: list[EpisodeTruth]) -> None:
    root = tmp_path / "ds"
    write(root, truth[:2])
    meta = pq.read_schema(root / "data/chunk-000/file-000.parquet").metadata
    features = json.loads(meta[b"huggingface"])["info"]["features"]
    assert features["observation.images.corner"] == {"_type": "Image"}
    assert features["observation.state"] == {
        "feature": {"dtype": "float32", "_type": "Value"},
        "length": 4,
        "_type": "List",
    }
    assert features["next.success"] == {"dtype": "bool", "_type": "Value"}
    assert list(features)[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]


def test_aggregated_quantiles_are_count_weighted_like_lerobot() -> None:
    rng = np.random.default_rng(4)
    parts = [rng.normal(size=(n, 2)) for n in (3, 9)]
    merged = aggregate_stats([numeric_stats(p) for p in parts])
    expected = (3 * np.quantile(parts[0], 0.9, axis=0) + 9 * np.quantile(parts[1], 0.9, axis=0)) / 12
    np.testing.assert_allclose(merged["q90"], expected, rtol=1e-12)
