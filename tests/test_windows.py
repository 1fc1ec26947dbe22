"""Windows and chunks: W frames of history, K actions, pad masks, short episodes, pickling and DataLoader workers."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from tests.lerobot_factories import EpisodeTruth, make_episodes, write_lerobot
from vlacl.data.episode import Episode
from vlacl.data.features import ACTION, STATE, image_key
from vlacl.data.open import open_datasets
from vlacl.data.stream import build_stream
from vlacl.data.windows import WindowedDataset, WindowSpec
from vlacl.errors import ConfigError, InputFormatError

CAMERA = image_key("front")


@dataclass(frozen=True, eq=False)
class MemEpisode:
    """An in-memory :class:`Episode`: arrays by canonical key, read with the same bounds as a real reader."""

    index: int
    arrays: Mapping[str, np.ndarray]
    task_index: int = 0
    instruction: str = ""
    subset: str = "mem"

    @property
    def length(self) -> int:
        return len(self.arrays[ACTION])

    @property
    def source(self) -> str:
        return f"mem.hdf5 (episode {self.index})"

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.length if stop is None else stop
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"frames [{start}, {stop}) out of range for length {self.length}")
        return self.arrays[key][start:stop]


def mem_episode(
    index: int, length: int, *, state_dim: int = 3, action_dim: int = 2, image: bool = False, task: int = 0
) -> MemEpisode:
    """Distinct values everywhere: state ``1000 * index + 10 * t + d``, action its negative, images from ``t``."""
    t = np.arange(length)[:, None]
    arrays: dict[str, np.ndarray] = {
        STATE: (1000 * index + 10 * t + np.arange(state_dim)).astype(np.float32),  # (T, S)
        ACTION: -(1000 * index + 10 * t + np.arange(action_dim)).astype(np.float32),  # (T, A)
    }
    if image:
        arrays[CAMERA] = ((np.arange(length) * 7 + index * 31) % 256).astype(np.uint8)[:, None, None, None] + np.zeros(
            (1, 2, 2, 3), dtype=np.uint8
        )  # (T, 2, 2, 3)
    return MemEpisode(index, arrays, task_index=task, instruction=f"task {task}")


def expected(
    arrays: Mapping[str, np.ndarray], t: int, history: int, chunk: int, keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """The sample at frame ``t``, built directly: padded frames repeat the first observation or the last action."""
    length = len(arrays[ACTION])
    obs_frames = [t - history + 1 + i for i in range(history)]
    act_frames = [t + j for j in range(chunk)]
    out = {key: np.stack([arrays[key][max(f, 0)] for f in obs_frames]) for key in keys}
    out[ACTION] = np.stack([arrays[ACTION][min(f, length - 1)] for f in act_frames])
    out["observation_is_pad"] = np.array([f < 0 for f in obs_frames])
    out["action_is_pad"] = np.array([f >= length for f in act_frames])
    return out


def tensor(sample: Mapping[str, object], key: str) -> torch.Tensor:
    """``sample[key]``, which must be a tensor."""
    value = sample[key]
    assert isinstance(value, torch.Tensor), f"{key} is a {type(value).__name__}, not a tensor"
    return value


def assert_sample(sample: Mapping[str, object], want: Mapping[str, np.ndarray]) -> None:
    for key, value in want.items():
        got = tensor(sample, key)
        assert got.dtype == torch.from_numpy(value).dtype, key
        np.testing.assert_array_equal(got.numpy(), value, err_msg=key)


def windowed(
    episodes: Sequence[Episode], history: int, chunk: int, *, short: Literal["error", "skip"] = "error"
) -> WindowedDataset:
    return WindowedDataset(episodes, WindowSpec(history, chunk), observation_keys=[STATE], short=short)


# Samples


def test_one_episode_by_hand() -> None:
    ep = MemEpisode(
        7, {STATE: np.arange(5, dtype=np.float32)[:, None], ACTION: np.arange(5, dtype=np.float32)[:, None] + 100}
    )
    ds = windowed([ep], history=3, chunk=2)
    assert len(ds) == 5
    rows = [ds[t] for t in range(5)]
    assert [tensor(r, STATE).squeeze(-1).tolist() for r in rows] == [
        [0, 0, 0],
        [0, 0, 1],
        [0, 1, 2],
        [1, 2, 3],
        [2, 3, 4],
    ]
    assert [tensor(r, "observation_is_pad").tolist() for r in rows] == [
        [True, True, False],
        [True, False, False],
        [False, False, False],
        [False, False, False],
        [False, False, False],
    ]
    assert [tensor(r, ACTION).squeeze(-1).tolist() for r in rows] == [
        [100, 101],
        [101, 102],
        [102, 103],
        [103, 104],
        [104, 104],
    ]
    assert [tensor(r, "action_is_pad").tolist() for r in rows] == [
        [False, False],
        [False, False],
        [False, False],
        [False, False],
        [False, True],
    ]
    assert [(r["episode_index"], r["frame_index"]) for r in rows] == [(7, t) for t in range(5)]


def test_sample_shapes_dtypes_and_labels() -> None:
    ep = mem_episode(3, 9, state_dim=4, action_dim=2, image=True, task=5)
    ds = WindowedDataset([ep], WindowSpec(history=2, chunk=3), observation_keys=[STATE, CAMERA])
    sample = ds[4]
    assert set(sample) == {
        STATE,
        CAMERA,
        ACTION,
        "action_is_pad",
        "observation_is_pad",
        "task_index",
        "episode_index",
        "frame_index",
        "instruction",
    }
    state, image, action = tensor(sample, STATE), tensor(sample, CAMERA), tensor(sample, ACTION)
    assert (tuple(state.shape), state.dtype) == ((2, 4), torch.float32)
    assert (tuple(image.shape), image.dtype) == ((2, 2, 2, 3), torch.uint8)
    assert (tuple(action.shape), action.dtype) == ((3, 2), torch.float32)
    assert tensor(sample, "action_is_pad").dtype == torch.bool
    assert (sample["task_index"], sample["episode_index"], sample["frame_index"]) == (5, 3, 4)
    assert sample["instruction"] == "task 5"


def test_samples_run_through_every_episode_in_order() -> None:
    episodes = [mem_episode(i, n) for i, n in enumerate([4, 6, 5])]
    ds = windowed(episodes, history=2, chunk=2)
    assert len(ds) == 15
    located = [ds.locate(i) for i in range(len(ds))]
    assert located == [(e, t) for e, n in enumerate([4, 6, 5]) for t in range(n)]
    assert [ds[i]["episode_index"] for i in (0, 3, 4, 9, 10, 14)] == [0, 0, 1, 1, 2, 2]
    for index in (-1, 15, 100):
        with pytest.raises(IndexError, match=f"sample {index} out of range for 15 samples"):
            ds[index]


def test_float64_and_integer_features_come_out_as_float32() -> None:
    ep = MemEpisode(0, {STATE: np.arange(8, dtype=np.int64).reshape(4, 2), ACTION: np.ones((4, 2), dtype=np.float64)})
    sample = windowed([ep], history=1, chunk=1)[2]
    state, action = tensor(sample, STATE), tensor(sample, ACTION)
    assert (state.dtype, action.dtype) == (torch.float32, torch.float32)
    assert state.tolist() == [[4.0, 5.0]]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    history=st.integers(1, 4),
    chunk=st.integers(1, 5),
)
def test_every_sample_matches_a_direct_construction(lengths: list[int], history: int, chunk: int) -> None:
    episodes = [mem_episode(i, n, image=True) for i, n in enumerate(lengths)]
    kept = [ep for ep in episodes if ep.length >= history + chunk]
    keys = [STATE, CAMERA]
    if not kept:
        with pytest.raises(InputFormatError, match="nothing to train on"):
            WindowedDataset(episodes, WindowSpec(history, chunk), observation_keys=keys, short="skip")
        return
    ds = WindowedDataset(episodes, WindowSpec(history, chunk), observation_keys=keys, short="skip")
    assert ds.skipped == [ep.source for ep in episodes if ep not in kept]
    assert len(ds) == sum(ep.length for ep in kept)
    i = 0
    for ep in kept:
        for t in range(ep.length):
            sample = ds[i]
            assert (sample["episode_index"], sample["frame_index"]) == (ep.index, t)
            want = expected(ep.arrays, t, history, chunk, keys)
            assert_sample(sample, want)
            assert tensor(sample, CAMERA).dtype == torch.uint8
            i += 1


# Normalization


class RecordingNormalizer:
    """``(x - shift) * 2`` with a shift per key; records what it was given."""

    def __init__(self, shift: Mapping[str, float]) -> None:
        self.shift = dict(shift)
        self.calls: list[tuple[str, np.dtype[np.generic]]] = []

    def normalize(self, key: str, values: np.ndarray) -> np.ndarray:
        self.calls.append((key, values.dtype))
        return (values.astype(np.float64) - self.shift[key]) * 2  # float64 on purpose: the dataset casts back


def test_normalizer_applies_to_numeric_features_and_leaves_uint8_images_alone() -> None:
    ep = mem_episode(1, 6, image=True)
    norm = RecordingNormalizer({STATE: 1000.0, ACTION: -1000.0})
    ds = WindowedDataset([ep], WindowSpec(2, 2), observation_keys=[STATE, CAMERA], normalizer=norm)
    sample = ds[3]
    want = expected(ep.arrays, 3, 2, 2, [STATE, CAMERA])
    state, action, image = tensor(sample, STATE), tensor(sample, ACTION), tensor(sample, CAMERA)
    assert state.dtype == action.dtype == torch.float32
    np.testing.assert_allclose(state.numpy(), (want[STATE] - 1000) * 2)
    np.testing.assert_allclose(action.numpy(), (want[ACTION] + 1000) * 2)
    assert image.dtype == torch.uint8
    np.testing.assert_array_equal(image.numpy(), want[CAMERA])
    assert sorted(norm.calls) == [(ACTION, np.dtype(np.float32)), (STATE, np.dtype(np.float32))]


def test_uint8_state_and_action_are_normalized_like_other_numbers() -> None:
    t = np.arange(6)[:, None]
    ep = MemEpisode(0, {STATE: (t + np.arange(3)).astype(np.uint8), ACTION: (t % 2 + np.zeros(2)).astype(np.uint8)})
    norm = RecordingNormalizer({STATE: 1.0, ACTION: 0.5})
    sample = WindowedDataset([ep], WindowSpec(1, 2), observation_keys=[STATE], normalizer=norm)[3]
    state, action = tensor(sample, STATE), tensor(sample, ACTION)
    assert state.dtype == action.dtype == torch.float32
    np.testing.assert_array_equal(state.numpy(), [[4.0, 6.0, 8.0]])  # ([3, 4, 5] - 1) * 2
    np.testing.assert_array_equal(action.numpy(), [[1.0, 1.0], [-1.0, -1.0]])  # ([1, 0] - 0.5) * 2
    assert sorted(norm.calls) == [(ACTION, np.dtype(np.float32)), (STATE, np.dtype(np.float32))]


def test_normalizing_in_place_does_not_change_the_episode() -> None:
    class InPlace:
        def normalize(self, key: str, values: np.ndarray) -> np.ndarray:
            values -= 1
            return values

    ep = mem_episode(0, 5)
    before = {k: v.copy() for k, v in ep.arrays.items()}
    ds = WindowedDataset([ep], WindowSpec(1, 1), observation_keys=[STATE], normalizer=InPlace())
    first, second = tensor(ds[2], STATE), tensor(ds[2], STATE)
    np.testing.assert_array_equal(first.numpy(), before[STATE][2:3] - 1)
    assert torch.equal(first, second)
    for key, value in before.items():
        np.testing.assert_array_equal(ep.arrays[key], value)


# Short episodes


def test_an_episode_of_exactly_w_plus_k_frames_is_kept() -> None:
    ds = windowed([mem_episode(0, 5)], history=2, chunk=3)
    assert len(ds) == 5
    assert ds.skipped == []


def test_a_short_episode_is_an_error_naming_it() -> None:
    episodes = [mem_episode(0, 9), mem_episode(4, 4)]
    with pytest.raises(InputFormatError) as info:
        windowed(episodes, history=2, chunk=3)
    message = str(info.value)
    for fragment in ("mem.hdf5 (episode 4)", "4 frames", "history 2 + chunk 3 = 5", "--short-episodes skip"):
        assert fragment in message


def test_short_episodes_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vlacl.data.windows")
    episodes = [mem_episode(0, 3), mem_episode(1, 8), mem_episode(2, 4), mem_episode(3, 5)]
    ds = windowed(episodes, history=2, chunk=3, short="skip")
    assert ds.skipped == ["mem.hdf5 (episode 0)", "mem.hdf5 (episode 2)"]
    assert [ep.index for ep in ds.episodes] == [1, 3]
    assert len(ds) == 13
    assert {ds[i]["episode_index"] for i in range(len(ds))} == {1, 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["skipped 2 of 4 episodes shorter than 5 frames"]


def test_no_warning_when_nothing_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vlacl.data.windows")
    windowed([mem_episode(0, 5)], history=2, chunk=3, short="skip")
    assert not caplog.records


@pytest.mark.parametrize("short", ["error", "skip"])
def test_every_episode_short_is_an_error(short: Literal["error", "skip"]) -> None:
    with pytest.raises(InputFormatError):
        windowed([mem_episode(0, 2), mem_episode(1, 4)], history=3, chunk=2, short=short)


def test_all_skipped_says_nothing_to_train_on() -> None:
    with pytest.raises(InputFormatError, match=r"no episode is at least 5 frames long \(history 3 \+ chunk 2\)"):
        windowed([mem_episode(0, 2), mem_episode(1, 4)], history=3, chunk=2, short="skip")


def test_no_episodes_is_an_error() -> None:
    with pytest.raises(InputFormatError, match="nothing to train on"):
        windowed([], history=1, chunk=1)


# Configuration


@pytest.mark.parametrize(
    ("history", "chunk", "fragment"), [(0, 1, "history must be >= 1"), (1, 0, "chunk must be >= 1")]
)
def test_window_spec_refuses_empty_windows(history: int, chunk: int, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        WindowSpec(history, chunk)


def test_window_spec_defaults_and_min_length() -> None:
    assert (WindowSpec().history, WindowSpec().chunk, WindowSpec().min_length) == (1, 1, 2)
    assert WindowSpec(4, 10).min_length == 14


def test_unknown_short_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'drop'"):
        windowed([mem_episode(0, 5)], history=1, chunk=1, short="drop")  # type: ignore[arg-type]


# Pickling and DataLoader workers


def test_pickled_dataset_gives_the_same_samples() -> None:
    ds = windowed([mem_episode(0, 6), mem_episode(1, 2), mem_episode(2, 7)], history=3, chunk=2, short="skip")
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.skipped == ds.skipped
    assert len(copy) == len(ds) == 13
    for i in range(len(ds)):
        a, b = ds[i], copy[i]
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, tensor(b, key))
            else:
                assert value == b[key]


def _expected_batches(
    truth: Sequence[EpisodeTruth], history: int, chunk: int, camera: str | None
) -> list[dict[str, np.ndarray]]:
    out = []
    for ep in truth:
        arrays = {STATE: ep.state, ACTION: ep.action}
        keys = [STATE]
        if camera is not None:
            arrays[image_key(camera)] = ep.images[camera]
            keys.append(image_key(camera))
        for t in range(ep.length):
            sample = expected(arrays, t, history, chunk, keys)
            sample["episode_index"] = np.array(ep.index)
            sample["task_index"] = np.array(ep.task_index)
            sample["frame_index"] = np.array(t)
            out.append(sample)
    return out


@pytest.mark.parametrize("images", ["embedded", "none"])
def test_dataloader_workers_read_a_lerobot_dataset(tmp_path: Path, images: Literal["embedded", "none"]) -> None:
    camera = "front" if images == "embedded" else None
    truth = make_episodes([7, 5, 9, 6, 3], ["pick the cube", "open the drawer"], cameras=("front",), seed=4)
    root = write_lerobot(tmp_path / "ds", truth, images=images, episodes_per_file=2)
    [dataset] = open_datasets([root])
    history, chunk = 2, 3
    keys = [STATE] if camera is None else [STATE, image_key(camera)]
    ds = WindowedDataset(dataset.episodes, WindowSpec(history, chunk), observation_keys=keys, short="skip")
    assert ds.skipped == [dataset.episodes[4].source]
    ds[0]  # the parent reads (and caches) a data file before the workers start
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=2)
    want = _expected_batches(truth[:4], history, chunk, camera)
    seen = 0
    instructions: list[str] = []
    for batch in loader:
        n = len(batch["frame_index"])
        for key in [*keys, ACTION, "action_is_pad", "observation_is_pad", "episode_index", "task_index", "frame_index"]:
            got = batch[key].numpy()
            np.testing.assert_array_equal(got, np.stack([w[key] for w in want[seen : seen + n]]), err_msg=key)
        if camera is not None:
            assert batch[image_key(camera)].dtype == torch.uint8
        instructions.extend(batch["instruction"])
        seen += n
    assert seen == len(want) == 27
    assert instructions == [ep.task for ep in truth[:4] for _ in range(ep.length)]


def test_pickled_lerobot_dataset_reads_in_a_spawned_worker(tmp_path: Path) -> None:
    truth = make_episodes([6, 6, 5], ["lift", "place"], seed=2)
    [dataset] = open_datasets([write_lerobot(tmp_path / "ds", truth, episodes_per_file=1)])
    stream = build_stream([dataset], val_fraction=0.0)
    ds = WindowedDataset(stream.episodes(stream.task("lift").train), WindowSpec(1, 2), observation_keys=[STATE])
    loader = DataLoader(ds, batch_size=11, num_workers=1, multiprocessing_context="spawn")
    [batch] = list(loader)
    lift = [ep for ep in truth if ep.task == "lift"]
    want = [expected({STATE: ep.state, ACTION: ep.action}, t, 1, 2, [STATE]) for ep in lift for t in range(ep.length)]
    np.testing.assert_array_equal(batch[ACTION].numpy(), np.stack([w[ACTION] for w in want]))
    np.testing.assert_array_equal(batch[STATE].numpy(), np.stack([w[STATE] for w in want]))
