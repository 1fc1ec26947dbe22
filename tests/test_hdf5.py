"""robomimic/LIBERO and flat HDF5 files written by the factories, read back through the Episode interface."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tests.hdf5_factories import (
    LIBERO_STATE,
    Hdf5Factory,
    actions_of,
    count_dataset_reads,
    garbage,
    lowdim_of,
    replace,
    truncate,
    upright_frames,
)
from vlacl.data import hdf5
from vlacl.data.episode import Episode, EpisodeDataset, dataset_fingerprint
from vlacl.data.features import ACTION, STATE, image_key
from vlacl.data.keymap import KeyMap, load_keymap
from vlacl.data.open import open_datasets
from vlacl.errors import InputFormatError

EXAMPLES = Path(__file__).parent.parent / "examples" / "keymaps"


@pytest.fixture
def h5(tmp_path: Path) -> Iterator[Hdf5Factory]:
    """The HDF5 factory, writing under this test's directory; cached read handles closed afterwards."""
    yield Hdf5Factory(tmp_path)
    hdf5.close_cached_files()


def _open(path: Path, keymap: KeyMap | None = None) -> EpisodeDataset:
    [ds] = open_datasets([path], keymap)
    return ds


def _state(length: int, episode: int, keys: tuple[tuple[str, int], ...] = LIBERO_STATE) -> np.ndarray:
    parts = [lowdim_of(length, dim, episode, key) for key, dim in sorted(keys)]
    return np.concatenate(parts, axis=1).astype(np.float32)  # (T, sum of D)


def test_libero_file_reads_back_with_flipped_frames(h5: Hdf5Factory) -> None:
    path = h5.robomimic(lengths=(12, 15, 10), compression="gzip")
    ds = _open(path)
    assert isinstance(ds, EpisodeDataset)
    assert ds.format == "hdf5_robomimic"
    assert ds.fps == 20.0
    assert list(ds.features) == [
        STATE,
        image_key("agentview"),
        image_key("eye_in_hand"),
        ACTION,
        "dones",
        "rewards",
    ]
    assert ds.features[STATE].shape == (12,)
    assert ds.features[STATE].names is not None
    assert ds.features[STATE].names[:4] == (
        "ee_pos_0",
        "ee_pos_1",
        "ee_pos_2",
        "gripper_states_0",
    )
    assert ds.features[image_key("agentview")].shape == (8, 8, 3)
    assert ds.features[ACTION].to_dict() == {"dtype": "float32", "shape": [7]}
    assert [ep.length for ep in ds.episodes] == [12, 15, 10]
    for i, ep in enumerate(ds.episodes):
        assert isinstance(ep, Episode)
        assert ep.index == i
        assert ep.task_index == 0
        assert ep.instruction == "open the top drawer of the cabinet"
        assert ep.subset == "open_the_drawer_demo"
        assert ep.source == f"{path}:data/demo_{i}"
        np.testing.assert_array_equal(ep.read(STATE), _state(ep.length, i))
        np.testing.assert_allclose(ep.read(ACTION), actions_of(ep.length, 7, i).astype(np.float32))
        for c, camera in enumerate(("agentview", "eye_in_hand")):
            frames = ep.read(image_key(camera))
            assert frames.dtype == np.uint8
            assert frames.flags.c_contiguous
            np.testing.assert_array_equal(frames, upright_frames(ep.length, (8, 8, 3), i, c))
        assert ep.read("dones").shape == (ep.length, 1)
        assert ep.read("rewards")[-1, 0] == 1.0


def test_read_ranges_and_bad_requests(h5: Hdf5Factory) -> None:
    ep = _open(h5.robomimic()).episodes[1]
    full = ep.read(image_key("agentview"))
    np.testing.assert_array_equal(ep.read(image_key("agentview"), 3, 7), full[3:7])
    assert ep.read(STATE, 5, 5).shape == (0, 12)
    with pytest.raises(IndexError, match="outside episode"):
        ep.read(ACTION, 0, ep.length + 1)
    with pytest.raises(IndexError):
        ep.read(ACTION, 4, 2)
    with pytest.raises(InputFormatError, match=r"no feature 'observation.images.front'.*observation.state"):
        ep.read(image_key("front"))


def test_plain_robomimic_numbers_tasks_by_first_appearance_and_sorts_demos_naturally(h5: Hdf5Factory) -> None:
    instructions = ["lift", "stack", "lift", *["stack"] * 8, "push"]
    path = h5.robomimic("lift.hdf5", libero=False, lengths=[5 + i for i in range(12)], instructions=instructions)
    ds = _open(path)
    assert ds.features.keys() >= {STATE, image_key("agentview")}
    assert [ep.length for ep in ds.episodes] == [5 + i for i in range(12)]  # demo_10 after demo_9, not demo_1
    assert [ep.instruction for ep in ds.episodes] == instructions
    assert [ep.task_index for ep in ds.episodes] == [0, 1, 0, *[1] * 8, 2]
    # Plain robomimic frames are the right way up: no flip.
    stored = upright_frames(5, (8, 8, 3), 0, 0)
    np.testing.assert_array_equal(ds.episodes[0].read(image_key("agentview")), stored)
    assert ds.identity()["tasks"] == {"0": "lift", "1": "stack", "2": "push"}


def test_example_libero_keymap_renames_cameras_and_picks_state(h5: Hdf5Factory) -> None:
    state = (("ee_states", 6), ("gripper_states", 2), ("joint_states", 7))
    path = h5.robomimic(state=state)
    ds = _open(path, load_keymap(EXAMPLES / "libero.yaml"))
    assert set(ds.features) == {STATE, image_key("agentview"), image_key("wrist"), ACTION, "dones", "rewards"}
    ep = ds.episodes[0]
    want = np.concatenate([lowdim_of(12, 6, 0, "ee_states"), lowdim_of(12, 2, 0, "gripper_states")], axis=1)
    np.testing.assert_array_equal(ep.read(STATE), want.astype(np.float32))
    np.testing.assert_array_equal(ep.read(image_key("wrist")), upright_frames(12, (8, 8, 3), 0, 1))


@pytest.mark.parametrize(("flip", "flipped"), [(False, False), (True, True), (None, True)])
def test_keymap_flip_overrides_the_libero_default(h5: Hdf5Factory, flip: bool | None, flipped: bool) -> None:
    path = h5.robomimic()
    ds = _open(path, KeyMap(flip_images=flip))
    frames = ds.episodes[0].read(image_key("agentview"))
    upright = upright_frames(12, (8, 8, 3), 0, 0)
    np.testing.assert_array_equal(frames, upright if flipped else upright[:, ::-1, ::-1])
    assert ds.identity()["flip_images"] is flipped


def test_image_convention_attribute_decides_the_flip(h5: Hdf5Factory) -> None:
    def opencv(f: h5py.File) -> None:
        f["data"].attrs["macros_image_convention"] = "opencv"

    ds = _open(h5.robomimic(mutate=opencv))
    assert not ds.identity()["flip_images"]


def test_keymap_instruction_and_instruction_key(h5: Hdf5Factory) -> None:
    def per_demo(f: h5py.File) -> None:
        for i in range(3):
            f[f"data/demo_{i}"].attrs["goal"] = f"goal {i % 2}"

    path = h5.robomimic(mutate=per_demo)
    ds = _open(path, KeyMap(instruction_key="goal"))
    assert [(ep.instruction, ep.task_index) for ep in ds.episodes] == [("goal 0", 0), ("goal 1", 1), ("goal 0", 0)]
    ds = _open(path, KeyMap(instruction="pick it up"))
    assert {ep.instruction for ep in ds.episodes} == {"pick it up"}
    with pytest.raises(InputFormatError, match=r"instruction_key 'nothing' which demo_0 in open_the_drawer_demo.hdf5"):
        _open(path, KeyMap(instruction_key="nothing"))


def test_instruction_from_a_string_dataset(h5: Hdf5Factory) -> None:
    def strings(f: h5py.File) -> None:
        f.create_dataset("language_instruction", data=np.array([b"go left"] * 12))

    ds = _open(h5.flat(instruction=None, mutate=strings))
    assert ds.episodes[0].instruction == "go left"


def test_directory_of_libero_files_gives_one_dataset_per_file(h5: Hdf5Factory) -> None:
    suite = h5.libero_suite("libero_goal", ["open the drawer", "turn on the stove"])
    datasets = open_datasets([suite])
    assert [ds.root.name for ds in datasets] == ["open_the_drawer_demo.hdf5", "turn_on_the_stove_demo.hdf5"]
    assert [ds.episodes[0].instruction for ds in datasets] == ["open the drawer", "turn on the stove"]
    assert [ds.episodes[0].subset for ds in datasets] == ["open_the_drawer_demo", "turn_on_the_stove_demo"]
    assert dataset_fingerprint(datasets[0]) != dataset_fingerprint(datasets[1])


def test_flat_directory_is_one_dataset_of_files(h5: Hdf5Factory) -> None:
    root = h5.flat_dir(lengths=(12, 9, 14))
    ds = _open(root)
    assert ds.format == "hdf5_flat"
    assert ds.fps == 10.0
    assert list(ds.features) == [STATE, image_key("image"), ACTION, "action_event_types", "timestamps"]
    assert ds.features["action_event_types"].to_dict() == {"dtype": "int32", "shape": [1]}
    assert ds.features[STATE].names == ("velocity_0", "velocity_1", "velocity_2")
    assert [ep.source for ep in ds.episodes] == [str(root / f"episode_{i:03d}.h5") for i in range(3)]
    assert [(ep.instruction, ep.task_index) for ep in ds.episodes] == [
        ("drive to the dock", 0),
        ("follow the hallway", 1),
        ("drive to the dock", 0),
    ]
    assert {ep.subset for ep in ds.episodes} == {"mobile"}
    ep = ds.episodes[2]
    np.testing.assert_array_equal(ep.read(image_key("image")), upright_frames(14, (8, 8, 3), 2, 0))
    np.testing.assert_array_equal(ep.read(STATE), lowdim_of(14, 3, 2, "velocity").astype(np.float32))
    np.testing.assert_array_equal(ep.read("action_event_types")[:, 0], np.arange(14) % 3)
    ident = ds.identity()
    assert [f["name"] for f in ident["files"]] == ["episode_000.h5", "episode_001.h5", "episode_002.h5"]
    assert all(f["bytes"] > 0 for f in ident["files"])
    assert ident["episode_lengths"] == [12, 9, 14]


def test_example_mobile_keymap_on_a_single_flat_file(h5: Hdf5Factory) -> None:
    path = h5.flat(state_dim=0)
    ds = _open(path, load_keymap(EXAMPLES / "mobile-flat.yaml"))
    assert set(ds.features) == {image_key("front"), ACTION, "action_event_types"}
    assert ds.episodes[0].instruction == "drive to the charging dock"
    assert ds.episodes[0].subset == "episode_000"
    assert ds.identity()["files"] == [{"name": "episode_000.h5", "bytes": path.stat().st_size}]


def test_flat_file_without_state_uses_the_camera_alone(h5: Hdf5Factory) -> None:
    ds = _open(h5.flat(state_dim=0))
    assert STATE not in ds.features
    assert set(ds.features) == {image_key("image"), ACTION, "action_event_types", "timestamps"}


def test_identity_and_fingerprint_follow_content_and_keymap(h5: Hdf5Factory) -> None:
    path = h5.robomimic()
    first = _open(path)
    assert json.loads(json.dumps(first.identity())) == first.identity()
    assert dataset_fingerprint(first) == dataset_fingerprint(_open(path))
    assert dataset_fingerprint(first) != dataset_fingerprint(_open(path, KeyMap(flip_images=False)))
    other = h5.robomimic("other.hdf5", lengths=(12, 15, 11))
    assert dataset_fingerprint(first) != dataset_fingerprint(_open(other))


def test_iter_columns_concatenates_episodes(h5: Hdf5Factory) -> None:
    ds = _open(h5.robomimic(lengths=(12, 15, 10)))
    batches = list(ds.iter_columns([STATE, ACTION], rows_per_batch=20))
    assert [b.num_rows for b in batches] == [27, 10]
    state = np.concatenate([b.columns[STATE] for b in batches])
    np.testing.assert_array_equal(state, np.concatenate([_state(n, i) for i, n in enumerate((12, 15, 10))]))
    with pytest.raises(InputFormatError, match=r"no feature 'velocity'"):
        list(ds.iter_columns(["velocity"]))


def test_opening_reads_no_arrays(h5: Hdf5Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    path = h5.robomimic(lengths=(30, 30))
    flat = h5.flat_dir()
    reads = count_dataset_reads(monkeypatch)
    ds = _open(path)
    _open(flat)
    assert reads == []
    ds.episodes[0].read(ACTION, 0, 2)
    assert reads == ["/data/demo_0/actions"]


def test_episode_pickles_and_reads_after_unpickling(h5: Hdf5Factory) -> None:
    ds = _open(h5.robomimic())
    ep = ds.episodes[1]
    before = ep.read(image_key("agentview"))
    again = pickle.loads(pickle.dumps(ep))
    np.testing.assert_array_equal(again.read(image_key("agentview")), before)
    ds_again = pickle.loads(pickle.dumps(ds))
    assert ds_again.identity() == ds.identity()


class _Frames(Dataset[torch.Tensor]):
    """Frame ``t`` of every episode's first camera, as a torch dataset."""

    def __init__(self, episodes: tuple[Episode, ...], key: str) -> None:
        self.items = [(ep, t) for ep in episodes for t in range(ep.length)]
        self.key = key

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        ep, t = self.items[i]
        return torch.from_numpy(ep.read(self.key, t, t + 1)[0])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_open_their_own_handles(h5: Hdf5Factory, context: str) -> None:
    ds = _open(h5.robomimic(lengths=(6, 5)))
    key = image_key("agentview")
    want = np.concatenate([ep.read(key) for ep in ds.episodes])  # opens (and caches) the handle in this process
    loader = DataLoader(_Frames(tuple(ds.episodes), key), batch_size=4, num_workers=2, multiprocessing_context=context)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, want)


def _read_action(ep: Episode) -> None:
    ep.read(ACTION)


def test_a_child_forked_while_the_parent_is_inside_the_handle_cache_still_reads(h5: Hdf5Factory) -> None:
    import multiprocessing

    ep = _open(h5.robomimic(lengths=(6, 5))).episodes[0]
    ep.read(ACTION)
    with hdf5._HANDLES_LOCK:  # another thread of the parent is opening a file when a DataLoader forks its workers
        child = multiprocessing.get_context("fork").Process(target=_read_action, args=(ep,))
        child.start()
    child.join(timeout=10)
    if child.exitcode is None:
        child.kill()
        child.join()
    assert child.exitcode == 0, "the forked child hung on the lock it inherited"


def test_cached_handle_reopens_when_the_file_changes(h5: Hdf5Factory) -> None:
    path = h5.flat(length=6)
    ep = _open(path).episodes[0]
    first = ep.read(ACTION)
    hdf5.close_cached_files()
    ep.read(ACTION)
    path.unlink()
    h5.flat(length=6, action_scale=0.1)
    np.testing.assert_allclose(ep.read(ACTION), first / 9, rtol=1e-5)


def test_mixed_directory_is_refused(h5: Hdf5Factory) -> None:
    h5.robomimic("mixed/a_task.hdf5")
    h5.flat("mixed/b_episode.h5")
    with pytest.raises(InputFormatError, match=r"mixes robomimic/LIBERO files \(a_task.hdf5.*\(b_episode.h5\)"):
        _open(h5.root / "mixed")


def _drop(path: str) -> Any:
    def mutate(f: h5py.File) -> None:
        del f[path]

    return mutate


def _shorten(path: str) -> Any:
    def mutate(f: h5py.File) -> None:
        replace(f, path, f[path][:-1])

    return mutate


BROKEN_ROBOMIMIC = [
    ("no_demos", lambda f: [f["data"].pop(k) for k in list(f["data"])], r"holds no episodes"),
    ("missing_actions", _drop("data/demo_1/actions"), r"demo_1 in t.hdf5 lacks actions, which action reads"),
    ("missing_first_actions", _drop("data/demo_0/actions"), r"demo_0 in t.hdf5 has no action dataset"),
    (
        "length_mismatch",
        _shorten("data/demo_2/obs/agentview_rgb"),
        r"obs/agentview_rgb in demo_2 in t.hdf5 has 9 frames but actions has 10",
    ),
    (
        "shape_mismatch",
        lambda f: replace(f, "data/demo_1/obs/ee_pos", np.zeros((15, 4))),
        r"observation.state in demo_1 in t.hdf5 is float32 \(13,\) per frame but float32 \(12,\)",
    ),
    (
        "no_observations",
        _drop("data/demo_0/obs"),
        r"demo_0 in t.hdf5 has no observations vlacl recognizes.*datasets there: actions, dones",
    ),
    (
        "scalar_actions",
        lambda f: replace(f, "data/demo_0/actions", np.float64(1.0)),
        r"actions in demo_0 in t.hdf5 has no frames",
    ),
    (
        "string_actions",
        lambda f: replace(f, "data/demo_0/actions", np.array([b"a"] * 12)),
        r"action reads actions in demo_0 in t.hdf5, which is \|S1 \(12,\)",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in BROKEN_ROBOMIMIC], ids=[c[0] for c in BROKEN_ROBOMIMIC])
def test_broken_robomimic_file_is_one_clear_error(h5: Hdf5Factory, mutate: Any, message: str) -> None:
    path = h5.robomimic("t.hdf5", mutate=mutate)
    with pytest.raises(InputFormatError, match=message):
        _open(path)


@pytest.mark.parametrize(
    ("keymap", "message"),
    [
        (
            KeyMap(state=("foo",)),
            r"key map names state key 'foo' which demo_0 in t.hdf5 lacks; datasets there: actions, dones, obs/",
        ),
        (KeyMap(action="act"), r"key map names action key 'act' which demo_0 in t.hdf5 lacks"),
        (KeyMap(cameras={"front": "ee_pos"}), r"cameras must be uint8 \(T, H, W, C\) frames"),
        (KeyMap(extra={"action": "rewards"}), r"extra name 'action' is a canonical feature name"),
        (KeyMap(state=("agentview_rgb",)), r"observation.state reads obs/agentview_rgb .* must be numeric \(T,\)"),
    ],
)
def test_bad_keymap_is_one_clear_error(h5: Hdf5Factory, keymap: KeyMap, message: str) -> None:
    with pytest.raises(InputFormatError, match=message):
        _open(h5.robomimic("t.hdf5"), keymap)


def test_flat_files_must_agree(h5: Hdf5Factory) -> None:
    h5.flat("dir/a.h5")
    h5.flat("dir/b.h5", state_dim=4)
    with pytest.raises(InputFormatError, match=r"observation.state in b.h5 is float32 \(4,\) per frame but .* in a.h5"):
        _open(h5.root / "dir")
    h5.flat("dir2/a.h5")
    h5.flat("dir2/b.h5", state_dim=0)
    with pytest.raises(InputFormatError, match=r"b.h5 lacks velocity, which observation.state reads"):
        _open(h5.root / "dir2")


def test_flat_file_without_actions_names_the_fix(h5: Hdf5Factory) -> None:
    path = h5.flat(mutate=_drop("actions"))
    with pytest.raises(InputFormatError, match=r"no action dataset \(actions or action\): name it in a key map"):
        _open(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_files_are_one_clear_error(h5: Hdf5Factory, damage: str) -> None:
    path = h5.root / "bad.hdf5"
    if damage == "garbage":
        garbage(path)
    elif damage == "truncated":
        truncate(h5.robomimic("bad.hdf5"))
    else:
        path.write_bytes(b"")
    with pytest.raises(InputFormatError, match=r"bad.hdf5 is not an HDF5 file \(or is truncated\): .*h5dump"):
        _open(path)
    with pytest.raises(InputFormatError, match=r"bad.hdf5 is not an HDF5 file"):
        open_datasets([h5.root])


def test_damaged_chunk_is_an_error_when_read(h5: Hdf5Factory) -> None:
    path = h5.robomimic(compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["data/demo_0/obs/agentview_rgb"].id.get_chunk_info(0)
    ds = _open(path)
    data = bytearray(path.read_bytes())
    data[info.byte_offset : info.byte_offset + info.size] = b"\x00" * info.size
    path.write_bytes(bytes(data))
    with pytest.raises(InputFormatError, match=r"cannot read 'observation.images.agentview' .*demo_0: .*damaged"):
        ds.episodes[0].read(image_key("agentview"))


def test_broken_json_attribute_is_one_warning_line(h5: Hdf5Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(f: h5py.File) -> None:
        f["data"].attrs["problem_info"] = "{not json"

    path = h5.robomimic(mutate=broken)
    lines: list[str] = []
    monkeypatch.setattr(hdf5.log, "warning", lambda msg, *args: lines.append(msg % args))
    ds = _open(path)
    assert lines == [
        f"attribute /data@problem_info in {path} is not a JSON object; ignored (no instruction or fps from it)"
    ]
    assert {ep.instruction for ep in ds.episodes} == {""}
    assert ds.identity()["flip_images"] is True  # still LIBERO's, by its bddl_file_name attribute


def test_flat_camera_of_another_length_is_an_error_not_left_out(h5: Hdf5Factory) -> None:
    path = h5.flat(mutate=_shorten("images"))
    with pytest.raises(InputFormatError, match=r"images in episode_000.h5 has 11 frames but actions has 12"):
        _open(path)


def test_default_camera_names(h5: Hdf5Factory) -> None:
    def cameras(f: h5py.File) -> None:
        f.create_dataset("observations/images/cam.high", data=np.zeros((12, 4, 4, 3), np.uint8))
        f.create_dataset("wrist_image", data=np.zeros((12, 4, 4, 1), np.uint8))
        f.create_dataset("depth_images", data=np.zeros((12, 4, 4), np.uint8))  # no channel axis: not a camera

    ds = _open(h5.flat(mutate=cameras))
    cams = sorted(k for k in ds.features if ds.features[k].is_image)
    assert cams == [image_key("cam_high"), image_key("image"), image_key("wrist")]
