"""LeRobot v3.0 and v2.1 datasets written from known arrays read back through the Episode interface."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.lerobot_factories import EpisodeTruth, ImageMode, make_episodes, write_lerobot
from vlacl.data.episode import Episode, EpisodeDataset, dataset_fingerprint
from vlacl.data.features import ACTION, STATE, image_key
from vlacl.data.keymap import KeyMap
from vlacl.data.lerobot import column_to_numpy
from vlacl.data.open import open_datasets
from vlacl.errors import InputFormatError

VERSIONS = ["v3.0", "v2.1"]
VIDEO_TOLERANCE = 3
"""Largest pixel error of the near-lossless H.264 (qp 0, yuv444p) the factory writes."""


def _open(root: Path, keymap: KeyMap | None = None) -> EpisodeDataset:
    [ds] = open_datasets([root], keymap)
    return ds


def _truth(cameras: tuple[str, ...] = ()) -> list[EpisodeTruth]:
    return make_episodes([5, 7, 3, 6], ["pick the cube", "open the drawer"], cameras=cameras)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("images", ["none", "embedded", "files", "video"])
def test_round_trip_every_layout(tmp_path: Path, version: Literal["v3.0", "v2.1"], images: ImageMode) -> None:
    cameras = ("front", "wrist") if images != "none" else ()
    truth = _truth(cameras)
    ds = _open(write_lerobot(tmp_path / "ds", truth, version=version, images=images))
    assert ds.format == f"lerobot_{version}"
    assert ds.fps == 10
    assert [e.index for e in ds.episodes] == [t.index for t in truth]
    assert set(ds.features) == {STATE, ACTION, *(image_key(c) for c in cameras)}
    assert ds.features[STATE].shape == (4,)
    for ep, t in zip(ds.episodes, truth, strict=True):
        assert isinstance(ep, Episode)
        assert (ep.length, ep.task_index, ep.instruction) == (t.length, t.task_index, t.task)
        np.testing.assert_array_equal(ep.read(STATE), t.state)
        np.testing.assert_array_equal(ep.read(ACTION, 1, 3), t.action[1:3])
        for cam, frames in t.images.items():
            got = ep.read(image_key(cam), 1, t.length)
            assert got.dtype == np.uint8
            assert got.shape == frames[1:].shape
            tol = VIDEO_TOLERANCE if images == "video" else 0
            assert np.abs(got.astype(int) - frames[1:].astype(int)).max() <= tol


@pytest.mark.parametrize("version", VERSIONS)
def test_iter_columns_equals_episode_reads(tmp_path: Path, version: Literal["v3.0", "v2.1"]) -> None:
    truth = _truth()
    ds = _open(write_lerobot(tmp_path / "ds", truth, version=version, episodes_per_file=3))
    batches = list(ds.iter_columns([STATE, ACTION], rows_per_batch=4))
    state = np.concatenate([b.columns[STATE] for b in batches])
    tasks = np.concatenate([b.task_index for b in batches])
    np.testing.assert_array_equal(state, np.concatenate([t.state for t in truth]))
    np.testing.assert_array_equal(tasks, np.concatenate([np.full(t.length, t.task_index) for t in truth]))


def test_episodes_pickle_and_read_in_another_process_state(tmp_path: Path) -> None:
    truth = _truth(("front",))
    ds = _open(write_lerobot(tmp_path / "ds", truth, images="video"))
    ep = pickle.loads(pickle.dumps(ds.episodes[1]))
    np.testing.assert_array_equal(ep.read(ACTION), truth[1].action)
    assert ep.read(image_key("front"), 0, 2).shape == (2, 16, 16, 3)


def test_flip_rotates_frames_by_180_degrees(tmp_path: Path) -> None:
    truth = _truth(("front",))
    root = write_lerobot(tmp_path / "ds", truth, images="embedded")
    flipped = _open(root, KeyMap(flip_images=True)).episodes[0].read(image_key("front"))
    np.testing.assert_array_equal(flipped, truth[0].images["front"][:, ::-1, ::-1])


def test_keymap_selects_and_renames(tmp_path: Path) -> None:
    truth = _truth(("front", "wrist"))
    root = write_lerobot(tmp_path / "ds", truth, images="embedded")
    ds = _open(root, KeyMap(state=("observation.state", "action"), cameras={"cam": "observation.images.wrist"}))
    assert set(ds.features) == {STATE, ACTION, image_key("cam")}
    assert ds.features[STATE].shape == (7,)
    np.testing.assert_array_equal(ds.episodes[0].read(STATE), np.concatenate([truth[0].state, truth[0].action], axis=1))
    with pytest.raises(InputFormatError, match=r"key map names 'observation\.nope'"):
        _open(root, KeyMap(state=("observation.nope",)))


def test_fingerprint_tracks_data_and_keymap(tmp_path: Path) -> None:
    a = write_lerobot(tmp_path / "a", _truth())
    b = write_lerobot(tmp_path / "b", make_episodes([5, 7, 3, 7], ["pick the cube", "open the drawer"]))
    fa = dataset_fingerprint(_open(a))
    assert fa == dataset_fingerprint(_open(a))
    assert fa != dataset_fingerprint(_open(b))
    assert fa != dataset_fingerprint(_open(a, KeyMap(state=("observation.state",))))


def test_several_datasets_in_one_directory(tmp_path: Path) -> None:
    write_lerobot(tmp_path / "all" / "task-a", _truth())
    write_lerobot(tmp_path / "all" / "task-b", _truth())
    datasets = open_datasets([tmp_path / "all"])
    assert [d.root.name for d in datasets] == ["task-a", "task-b"]


def test_unknown_codebase_version(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v1.6"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(InputFormatError, match=r"codebase_version 'v1.6'.*convert"):
        _open(root)


def test_parquet_without_a_declared_column(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    path = root / "data/chunk-000/file-001.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["action"]), path)
    with pytest.raises(InputFormatError, match=r"file-001.parquet lacks column\(s\) action"):
        _open(root)


def test_v21_missing_column_found_when_read(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth(), version="v2.1")
    path = root / "data/chunk-000/episode_000002.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["action"]), path)
    ds = _open(root)
    with pytest.raises(InputFormatError, match=r"episode_000002\.parquet has no column 'action'"):
        ds.episodes[2].read(ACTION)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "meta/info.json").write_text("{nope"), "cannot read .*info.json"),
        (lambda r: (r / "meta/tasks.parquet").unlink(), "tasks.parquet is missing"),
        (lambda r: (r / "data/chunk-000/file-000.parquet").write_bytes(b"PAR1 damaged"), "cannot read .*as parquet"),
        (lambda r: (r / "data/chunk-000/file-000.parquet").unlink(), "file-000.parquet is missing"),
        (lambda r: [p.unlink() for p in (r / "meta/episodes").rglob("*.parquet")], "no episode metadata"),
    ],
)
def test_damaged_dataset_is_one_clear_error(tmp_path: Path, damage: object, message: str) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    damage(root)  # type: ignore[operator]
    with pytest.raises(InputFormatError, match=message):
        _open(root)


def test_episode_naming_an_unknown_task(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth(), version="v2.1")
    (root / "meta/tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "something else"}) + "\n")
    with pytest.raises(InputFormatError, match="names task 'pick the cube'"):
        _open(root)


def test_missing_video_is_reported_when_read(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth(("front",)), images="video")
    for mp4 in root.rglob("*.mp4"):
        mp4.unlink()
    ds = _open(root)
    with pytest.raises(InputFormatError, match=r"video .* is missing"):
        ds.episodes[0].read(image_key("front"))


def test_video_shorter_than_the_data(tmp_path: Path) -> None:
    truth = _truth(("front",))
    root = write_lerobot(tmp_path / "ds", truth, images="video", episodes_per_file=4)
    ds = _open(root)
    ds.episodes[0].read(image_key("front"))
    from tests.lerobot_factories import write_video

    video = next(root.rglob("*.mp4"))
    write_video(video, truth[0].images["front"][:2], fps=10)
    with pytest.raises(InputFormatError, match="has no frame within"):
        ds.episodes[3].read(image_key("front"))


def test_out_of_range_read(tmp_path: Path) -> None:
    ds = _open(write_lerobot(tmp_path / "ds", _truth()))
    with pytest.raises(IndexError):
        ds.episodes[0].read(ACTION, 3, 99)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (pa.array([1.0, 2.0]), np.array([1.0, 2.0])),
        (pa.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 2.0], [3.0, 4.0]])),
        (pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0, 3.0, 4.0]), 2), np.array([[1.0, 2.0], [3.0, 4.0]])),
    ],
)
def test_column_to_numpy(array: pa.Array, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(column_to_numpy(array, "x"), expected)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (pa.array([[1.0], [2.0, 3.0]]), "lists of different lengths"),
        (pa.array([1.0, None]), "missing values"),
        (pa.array(["a", "b"]), "not numbers"),
    ],
)
def test_column_to_numpy_refuses(array: pa.Array, message: str) -> None:
    with pytest.raises(InputFormatError, match=message):
        column_to_numpy(array, "x")
