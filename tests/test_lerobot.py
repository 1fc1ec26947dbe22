"""LeRobot v3.0 and v2.1 datasets written from known arrays read back through the Episode interface."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Literal

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


# Metadata that does not match the data: an error, never rows of another episode.


def _rewrite(path: Path, edit: Any) -> None:
    pq.write_table(edit(pq.read_table(path)), path)


def test_episodes_whose_rows_are_not_in_episode_order_read_and_iterate_in_episode_order(tmp_path: Path) -> None:
    truth = _truth()
    shuffled = [truth[1], truth[3], truth[0], truth[2]]  # file-000: episodes 1 and 3; file-001: 0 and 2
    ds = _open(write_lerobot(tmp_path / "ds", shuffled))
    assert [e.index for e in ds.episodes] == [0, 1, 2, 3]
    for ep, t in zip(ds.episodes, truth, strict=True):
        np.testing.assert_array_equal(ep.read(STATE), t.state)
    batches = list(ds.iter_columns([STATE, ACTION], rows_per_batch=4))
    np.testing.assert_array_equal(
        np.concatenate([b.columns[STATE] for b in batches]), np.concatenate([t.state for t in truth])
    )
    assert [e.instruction for e in ds.episodes] == [t.task for t in truth]
    np.testing.assert_array_equal(
        np.concatenate([b.task_index for b in batches]),
        np.concatenate([np.full(e.length, e.task_index) for e in ds.episodes]),
    )


def test_stats_name_the_episode_of_a_bad_value_when_rows_are_not_in_episode_order(tmp_path: Path) -> None:
    from vlacl.config.ds_stats import DsStatsConfig
    from vlacl.data.stats import compute_stats

    truth = _truth()
    truth[2].state[1, 0] = np.nan
    ds = _open(write_lerobot(tmp_path / "ds", [truth[1], truth[3], truth[0], truth[2]]))
    with pytest.raises(InputFormatError, match=r"dimension 0 is nan at frame 1 of episode 2 "):
        compute_stats([ds], DsStatsConfig(image_frames=0))


def test_a_missing_episode_metadata_file_is_an_error_not_rows_of_other_episodes(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth(), episodes_per_file=4)
    meta = root / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(meta)
    pq.write_table(table.slice(2), root / "meta/episodes/chunk-000/file-001.parquet")
    meta.unlink()  # episodes 0 and 1 lost; 2 and 3 would read their rows
    with pytest.raises(InputFormatError, match=r"file-000.parquet holds 21 rows, but the episode metadata places 9"):
        _open(root)


@pytest.mark.parametrize("shift", [1, -1])
def test_dataset_from_index_off_by_one_is_an_error(tmp_path: Path, shift: int) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    meta = root / "meta/episodes/chunk-000/file-000.parquet"

    def edit(table: pa.Table) -> pa.Table:
        column = table.column("dataset_from_index").to_pylist()
        column[1] += shift  # episode 1 starts one row late (or early) in file-000
        return table.set_column(table.column_names.index("dataset_from_index"), "dataset_from_index", pa.array(column))

    _rewrite(meta, edit)
    with pytest.raises(InputFormatError, match=r"file-000.parquet holds 12 rows, but the episode metadata"):
        _open(root)


def test_data_rows_in_another_order_than_the_metadata_says_are_an_error(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    _rewrite(root / "data/chunk-000/file-000.parquet", lambda t: pa.concat_tables([t.slice(5), t.slice(0, 5)]))
    ds = _open(root)
    with pytest.raises(InputFormatError, match=r"row 0 of .*file-000.parquet belongs to episode 1, but .* episode 0"):
        ds.episodes[0].read(ACTION)
    with pytest.raises(InputFormatError, match=r"belongs to episode 1, but"):
        list(ds.iter_columns([ACTION]))


@pytest.mark.parametrize("rows", [2, 8])
def test_v21_file_of_another_length_than_its_episode_is_an_error(tmp_path: Path, rows: int) -> None:
    root = write_lerobot(tmp_path / "ds", _truth(), version="v2.1")
    path = root / "data/chunk-000/episode_000001.parquet"  # 7 frames
    _rewrite(path, lambda t: pa.concat_tables([t, t]).slice(0, rows))
    ds = _open(root)
    with pytest.raises(InputFormatError, match=rf"episode_000001.parquet holds {rows} rows, but .* places 7 frames"):
        ds.episodes[1].read(ACTION)
    with pytest.raises(InputFormatError, match=rf"holds {rows} rows"):
        list(ds.iter_columns([ACTION]))


def test_a_declared_width_other_than_the_data_is_an_error(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["action"]["shape"] = [2]  # the data has 3
    (root / "meta/info.json").write_text(json.dumps(info))
    ds = _open(root)
    with pytest.raises(InputFormatError, match=r"column\(s\) action hold 3 values per frame, but .* declares 2"):
        ds.episodes[0].read(ACTION)
    with pytest.raises(InputFormatError, match=r"hold 3 values per frame"):
        list(ds.iter_columns([ACTION]))


@pytest.mark.parametrize(("dtype", "values"), [("int64", [0.5, 1.0, 0.0]), ("uint8", [300, 1, 2])])
def test_values_the_declared_dtype_cannot_hold_are_an_error(tmp_path: Path, dtype: str, values: list[float]) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["action"]["dtype"] = dtype
    (root / "meta/info.json").write_text(json.dumps(info))
    for path in (root / "data").rglob("*.parquet"):
        column = pa.FixedSizeListArray.from_arrays(pa.array(values * (pq.read_metadata(path).num_rows)), 3)
        _rewrite(path, lambda t, c=column: t.set_column(t.column_names.index("action"), "action", c))
    with pytest.raises(InputFormatError, match=rf"values that {dtype}, the dtype meta/info.json declares"):
        _open(root).episodes[0].read(ACTION)


def test_integral_values_read_exactly_in_the_declared_integer_dtype(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["action"]["dtype"] = "int64"
    (root / "meta/info.json").write_text(json.dumps(info))
    for path in (root / "data").rglob("*.parquet"):
        n = pq.read_metadata(path).num_rows
        column = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(3 * n, dtype=np.float64) - 4), 3)
        _rewrite(path, lambda t, c=column: t.set_column(t.column_names.index("action"), "action", c))
    got = _open(root).episodes[0].read(ACTION)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.arange(15).reshape(5, 3) - 4)


@pytest.mark.parametrize("images", ["embedded", "video"])
def test_an_empty_range_of_frames_has_the_frame_shape(tmp_path: Path, images: ImageMode) -> None:
    ds = _open(write_lerobot(tmp_path / "ds", _truth(("front",)), images=images))
    assert ds.episodes[0].read(image_key("front"), 2, 2).shape == (0, 16, 16, 3)
    assert ds.episodes[0].read(ACTION, 2, 2).shape == (0, 3)


def test_one_channel_images_read_as_grey_levels(tmp_path: Path) -> None:
    truth = _truth(("front",))
    root = write_lerobot(tmp_path / "ds", truth, images="embedded")
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.images.front"]["shape"] = [16, 16, 1]
    (root / "meta/info.json").write_text(json.dumps(info))
    ds = _open(root)
    assert ds.features[image_key("front")].shape == (16, 16, 1)
    np.testing.assert_array_equal(ds.episodes[1].read(image_key("front")), truth[1].images["front"][..., :1])


def test_frames_of_another_size_than_declared_are_an_error(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth(("front",)), images="video")
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.images.front"]["shape"] = [8, 8, 3]
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(InputFormatError, match=r"decode as \[16, 16, 3\], but meta/info.json declares \[8, 8, 3\]"):
        _open(root).episodes[0].read(image_key("front"))


def test_an_extra_feature_may_not_take_a_canonical_name(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    with pytest.raises(InputFormatError, match=r"extra name 'action' is a canonical feature name"):
        _open(root, KeyMap(extra={"action": "timestamp"}))


def test_a_dataset_rewritten_in_place_reads_its_new_data(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    _open(root).episodes[0].read(STATE)  # cached in this process
    again = make_episodes([5, 7, 3, 6], ["pick the cube", "open the drawer"], seed=1)
    write_lerobot(root, again)
    np.testing.assert_array_equal(_open(root).episodes[0].read(STATE), again[0].state)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fps", "10", r"'fps' is '10', not a positive number"),
        ("fps", -10, r"'fps' is -10"),
        ("data_path", None, r"'data_path' is None, not a path template"),
        ("chunks_size", 0, r"'chunks_size' is 0, not a positive integer"),
        ("features", {"action": [3]}, r"feature 'action' is \[3\], not an object"),
    ],
)
def test_info_fields_of_the_wrong_type_are_one_clear_error(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    info = json.loads((root / "meta/info.json").read_text())
    info[field] = value
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(InputFormatError, match=message):
        _open(root)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("3", r"'action' has shape '3', not a list of positive sizes"),
        ([-3], r"shape \[-3\]"),
        ([1.5], r"shape \[1.5\]"),
    ],
)
def test_feature_shapes_that_are_not_sizes_are_one_clear_error(tmp_path: Path, shape: Any, message: str) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["action"]["shape"] = shape
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(InputFormatError, match=message):
        _open(root)


@pytest.mark.parametrize(("value", "message"), [(-4, r"length is -4"), ("5", r"length is '5'")])
def test_episode_lengths_that_are_not_counts_are_one_clear_error(tmp_path: Path, value: Any, message: str) -> None:
    root = write_lerobot(tmp_path / "ds", _truth(), version="v2.1")
    path = root / "meta/episodes.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["length"] = value
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InputFormatError, match=rf"episodes.jsonl:2: {message}, not a non-negative integer"):
        _open(root)


def test_an_episode_listed_twice_is_an_error(tmp_path: Path) -> None:
    root = write_lerobot(tmp_path / "ds", _truth())
    meta = root / "meta/episodes/chunk-000/file-000.parquet"
    _rewrite(meta, lambda t: pa.concat_tables([t, t.slice(3)]))
    with pytest.raises(InputFormatError, match=r"lists episode 3 twice"):
        _open(root)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (pa.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]), np.arange(1.0, 9.0).reshape(2, 4)),
        (pa.array([[True, False], [False, True]]), np.array([[True, False], [False, True]])),
    ],
)
def test_column_to_numpy_flattens_nested_lists(array: pa.Array, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(column_to_numpy(array, "x"), expected)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (pa.array([["a", "b"], ["c", "d"]]), "not numbers"),
        (pa.array([[1.0, None], [2.0, 3.0]]), "missing values"),
        (pa.array([[[1.0], [2.0]], [[3.0, 4.0], [5.0]]]), "lists of different lengths"),
    ],
)
def test_column_to_numpy_refuses_lists_of_other_things(array: pa.Array, message: str) -> None:
    with pytest.raises(InputFormatError, match=message):
        column_to_numpy(array, "x")
