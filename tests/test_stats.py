"""Streaming stats against NumPy on the full data: exact moments and extremes, quantiles within the stated bound."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.stats_fakes import FakeDataset, make_dataset, split_rows
from vlacl.config.ds_stats import DsStatsConfig
from vlacl.data import stats
from vlacl.data.episode import ColumnBatch, dataset_names
from vlacl.data.stats import HIST_BINS, QUANTILE_LEVELS, compute_stats, task_key
from vlacl.errors import ConfigError, InputFormatError

STATE, ACTION = "observation.state", "action"
NO_IMAGES = DsStatsConfig(image_frames=0)


def assert_matches_numpy(
    entry: Mapping[str, Any],
    values: np.ndarray,
    *,
    exact_quantiles: Sequence[int] = (),
    grid_span: np.ndarray | None = None,
) -> None:
    """Moments and extremes equal NumPy's; every quantile within the entry's stated bound.

    The bound is below ``grid_span / (bins - 1)``: the data's own range, or for a task the
    feature's global range, whose grid every task shares.
    """
    x = np.asarray(values, dtype=np.float64)  # (N, D)
    assert entry["count"] == [len(x)]
    np.testing.assert_array_equal(entry["min"], x.min(axis=0))
    np.testing.assert_array_equal(entry["max"], x.max(axis=0))
    scale = np.maximum(np.abs(x).max(axis=0), 1.0)
    np.testing.assert_allclose(entry["mean"], x.mean(axis=0), rtol=0, atol=1e-13 * scale.max())
    np.testing.assert_allclose(entry["std"], x.std(axis=0), rtol=1e-11, atol=1e-12 * scale.max())
    bound = np.asarray(entry["quantile_error_bound"])
    span = x.max(axis=0) - x.min(axis=0) if grid_span is None else grid_span
    assert (bound <= span / (HIST_BINS - 1)).all(), "the bound must be below range / (bins - 1)"
    for name, q in QUANTILE_LEVELS:
        want = np.quantile(x, q, axis=0)  # NumPy's default "linear" method
        err = np.abs(np.asarray(entry[name]) - want)
        slack = 1e-12 * scale
        assert (err <= bound + slack).all(), (name, err, bound)
        for d in exact_quantiles:
            assert err[d] <= slack[d], (name, d, err[d])


def mixed_data(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 7)``: normal, heavy-tailed, constant, binary gripper, integer-valued, offset, tiny spread."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 7))
    out[:, 0] = rng.normal(size=n)
    out[:, 1] = rng.standard_cauchy(size=n)  # heavy tails: the grid grows many times
    out[:, 2] = 3.25  # constant
    out[:, 3] = rng.choice([-0.04, 0.04], size=n)  # a gripper: two levels
    out[:, 4] = rng.integers(0, 5, size=n)  # few levels: ties everywhere
    out[:, 5] = 1000.0 + rng.normal(size=n)  # far from zero
    out[:, 6] = 1e-7 * rng.normal(size=n)  # tiny spread
    return out


def episodes_of(state: np.ndarray, action: np.ndarray, lengths: Sequence[int]) -> list[dict[str, np.ndarray]]:
    return [{STATE: s, ACTION: a} for s, a in zip(split_rows(state, lengths), split_rows(action, lengths), strict=True)]


@pytest.fixture
def mixed() -> tuple[FakeDataset, np.ndarray, np.ndarray, list[int]]:
    rng = np.random.default_rng(1)
    lengths = [int(v) for v in rng.integers(1, 700, size=40)]
    n = sum(lengths)
    state = mixed_data(n).astype(np.float32)
    action = mixed_data(n, seed=2)
    tasks = [i % 3 for i in range(len(lengths))]  # tasks alternate: several groups in one chunk
    return make_dataset("mixed", episodes_of(state, action, lengths), tasks), state, action, tasks


def rows_of_task(values: np.ndarray, lengths: Sequence[int], tasks: Sequence[int], task: int) -> np.ndarray:
    parts = split_rows(values, lengths)
    return np.concatenate([p for p, t in zip(parts, tasks, strict=True) if t == task])


@pytest.mark.parametrize("rows_per_batch", [97, 65536])
def test_global_and_per_task_stats_equal_numpy(
    mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]], rows_per_batch: int
) -> None:
    ds, state, action, tasks = mixed
    lengths = [e.length for e in ds.episodes]
    result = compute_stats([ds], DsStatsConfig(image_frames=0, rows_per_batch=rows_per_batch))
    assert_matches_numpy(result["features"][STATE], state, exact_quantiles=(2, 3))
    assert_matches_numpy(result["features"][ACTION], action, exact_quantiles=(2, 3))
    assert list(result["tasks"]) == ["0", "1", "2"]
    for task in range(3):
        entry = result["tasks"][str(task)]
        assert entry["instruction"] == f"task {task}"
        assert entry["num_frames"] == sum(n for n, t in zip(lengths, tasks, strict=True) if t == task)
        for key, values in ((STATE, state), (ACTION, action)):
            span = np.ptp(values.astype(np.float64), axis=0)
            assert_matches_numpy(
                entry["features"][key],
                rows_of_task(values, lengths, tasks, task),
                exact_quantiles=(2, 3),
                grid_span=span,
            )
    assert result["num_frames"] == len(state)


def test_binary_dims_are_detected_masked_and_exact(
    mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]],
) -> None:
    ds, state, _, _ = mixed
    result = compute_stats([ds], NO_IMAGES)
    feat = result["features"][STATE]
    assert feat["binary_dims"] == [3]
    assert feat["mask"] == [True, True, True, False, True, True, True]
    assert feat["quantile_error_bound"][2] == 0.0  # constant
    assert feat["quantile_error_bound"][3] == 0.0  # two levels: exact
    assert feat["norm_mode"] == "q99"
    levels = {float(v) for v in np.asarray(state[:, 3], dtype=np.float64)}
    assert {feat["q01"][3], feat["q99"][3]} <= levels


def test_norm_mode_applies_to_state_and_action_and_extras_default_to_none() -> None:
    eps = [{STATE: np.ones((4, 2)), ACTION: np.ones((4, 1)), "timestamps": np.arange(4.0)}]
    ds = make_dataset("extras", eps, [0])
    result = compute_stats([ds], DsStatsConfig(image_frames=0, norm_mode="mean_std"))
    assert [result["features"][k]["norm_mode"] for k in (STATE, ACTION, "timestamps")] == ["mean_std"] * 2 + ["none"]
    cfg = DsStatsConfig(image_frames=0, feature_norm_modes={"timestamps": "min_max", ACTION: "none"})
    result = compute_stats([ds], cfg)
    assert [result["features"][k]["norm_mode"] for k in (STATE, ACTION, "timestamps")] == ["q99", "none", "min_max"]


def test_overrides_force_the_mask(mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]]) -> None:
    ds, _, _, _ = mixed
    cfg = DsStatsConfig(image_frames=0, binary_dims={ACTION: (0,)}, continuous_dims={STATE: (3,)})
    result = compute_stats([ds], cfg)
    assert result["features"][STATE]["mask"][3] is True
    assert result["features"][STATE]["binary_dims"] == [3]  # still reported as detected
    assert result["features"][ACTION]["mask"][0] is False
    assert result["settings"]["binary_dims"] == {ACTION: [0]}


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"binary_dims": {ACTION: (9,)}}, r"outside \[0, 7\)"),
        ({"continuous_dims": {"observation.velocity": (0,)}}, "which the data lacks"),
        ({"feature_norm_modes": {"observation.images.front": "mean_std"}}, "which the data lacks"),
    ],
)
def test_overrides_of_missing_features_or_dims_are_refused(
    mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]], cfg: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        compute_stats([mixed[0]], DsStatsConfig(image_frames=0, **cfg))


def test_a_range_that_grows_by_orders_of_magnitude_keeps_the_bound() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(300, 2)) * 10.0**k + (-1) ** k * 10.0**k for k in range(-6, 7)]
    values = np.concatenate(parts)  # first batch spans 1e-6, the last 1e6
    ds = make_dataset("grow", [{STATE: p, ACTION: p[:, :1]} for p in parts], [0] * len(parts))
    result = compute_stats([ds], DsStatsConfig(image_frames=0, rows_per_batch=300))
    assert_matches_numpy(result["features"][STATE], values)
    assert result["quantiles"]["relative_error_bound"] < 1 / (HIST_BINS - 1) <= 1e-4  # the bound the issue allows


def test_results_do_not_depend_on_batching_beyond_rounding(
    mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]],
) -> None:
    ds = mixed[0]
    a = compute_stats([ds], DsStatsConfig(image_frames=0, rows_per_batch=13))
    b = compute_stats([ds], DsStatsConfig(image_frames=0, rows_per_batch=100000))
    assert a["fingerprint"] == b["fingerprint"]  # the batch size is not part of what the stats are
    for key in (STATE, ACTION):
        np.testing.assert_allclose(a["features"][key]["mean"], b["features"][key]["mean"], rtol=1e-12, atol=1e-15)
        assert a["features"][key]["min"] == b["features"][key]["min"]


def test_two_datasets_key_tasks_by_dataset_name() -> None:
    rng = np.random.default_rng(4)
    one = make_dataset("libero_10", [{STATE: rng.normal(size=(5, 2)), ACTION: rng.normal(size=(5, 1))}] * 2, [0, 1])
    two = make_dataset("libero_10", [{STATE: rng.normal(size=(4, 2)), ACTION: rng.normal(size=(4, 1))}], [0])
    assert dataset_names([one, two]) == ["libero_10", "libero_10#1"]
    assert task_key(one.episodes[1], "libero_10") == "libero_10/1"
    assert task_key(one.episodes[1], None) == "1"
    result = compute_stats([one, two], NO_IMAGES)
    assert list(result["tasks"]) == ["libero_10/0", "libero_10/1", "libero_10#1/0"]
    assert [d["name"] for d in result["datasets"]] == ["libero_10", "libero_10#1"]
    assert result["features"][STATE]["count"] == [14]
    assert result["tasks"]["libero_10#1/0"]["features"][STATE]["count"] == [4]


def test_feature_shapes_must_agree_across_datasets() -> None:
    one = make_dataset("a", [{STATE: np.zeros((3, 2)), ACTION: np.zeros((3, 1))}], [0])
    two = make_dataset("b", [{STATE: np.zeros((3, 5)), ACTION: np.zeros((3, 1))}], [0])
    with pytest.raises(InputFormatError, match=r"observation.state has shape \[2\] in /memory/a but \[5\]"):
        compute_stats([one, two], NO_IMAGES)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_feature_dimension_frame_and_episode(bad: float) -> None:
    eps = [{STATE: np.zeros((10, 3)), ACTION: np.zeros((10, 2))} for _ in range(3)]
    eps[2][ACTION][7, 1] = bad
    ds = make_dataset("nan", eps, [0, 0, 1])
    with pytest.raises(InputFormatError) as info:
        compute_stats([ds], NO_IMAGES)
    text = str(info.value)
    assert f"action dimension 1 is {bad} at frame 7 of episode 2 (nan:episode_2)" in text
    assert "fix or drop that episode" in text


def test_a_task_without_frames_is_refused() -> None:
    eps = [{STATE: np.zeros((4, 2)), ACTION: np.zeros((4, 1))}, {STATE: np.zeros((0, 2)), ACTION: np.zeros((0, 1))}]
    ds = make_dataset("empty", eps, [0, 1], instructions={1: "stack the blocks"})
    with pytest.raises(InputFormatError, match=r"task 1 \(stack the blocks\) of /memory/empty has no frames"):
        compute_stats([ds], NO_IMAGES)


def test_no_frames_at_all_is_refused() -> None:
    ds = make_dataset("none", [{STATE: np.zeros((0, 2)), ACTION: np.zeros((0, 1))}], [0])
    with pytest.raises(InputFormatError, match="no frames"):
        compute_stats([ds], NO_IMAGES)


def test_a_reader_yielding_fewer_frames_than_its_episodes_is_refused() -> None:
    ds = make_dataset("short", [{STATE: np.zeros((6, 2)), ACTION: np.zeros((6, 1))}], [0])

    def short(keys: Sequence[str], *, rows_per_batch: int = 65536) -> Iterator[ColumnBatch]:
        yield ColumnBatch({k: np.zeros((4, 2 if k == STATE else 1)) for k in keys}, np.zeros(4, dtype=np.int64))

    ds.iter_columns = short  # type: ignore[method-assign]
    with pytest.raises(InputFormatError, match=r"yielded 4 frames .* but its episodes list 6"):
        compute_stats([ds], NO_IMAGES)


def test_reader_errors_reach_the_caller_through_the_prefetch_thread() -> None:
    ds = make_dataset("broken", [{STATE: np.zeros((6, 2)), ACTION: np.zeros((6, 1))}], [0])

    def broken(keys: Sequence[str], *, rows_per_batch: int = 65536) -> Iterator[ColumnBatch]:
        yield ColumnBatch({k: np.zeros((3, 2 if k == STATE else 1)) for k in keys}, np.zeros(3, dtype=np.int64))
        raise InputFormatError("data/chunk-000/file-000.parquet lacks column 'action'")

    ds.iter_columns = broken  # type: ignore[method-assign]
    with pytest.raises(InputFormatError, match="lacks column 'action'"):
        compute_stats([ds], NO_IMAGES)


def test_more_tasks_than_max_tasks_keeps_only_global_stats(
    mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    ds, state, _, _ = mixed
    with caplog.at_level(logging.WARNING, logger="vlacl"):
        result = compute_stats([ds], DsStatsConfig(image_frames=0, max_tasks=2))
    assert result["tasks"] == {}
    assert result["drift"] == {}
    assert result["tasks_omitted"] == "3 tasks, more than max_tasks (2)"
    assert "per-task stats left out" in caplog.text
    assert_matches_numpy(result["features"][STATE], state)


def test_drift_reports_mean_shift_and_range_ratio_with_their_dimensions() -> None:
    a = np.column_stack([np.linspace(0, 1, 101), np.linspace(0, 1, 101)])  # (101, 2)
    b = np.column_stack([np.linspace(2, 3, 101), np.linspace(0, 4, 101)])
    ds = make_dataset("drift", [{STATE: a, ACTION: a[:, :1]}, {STATE: b, ACTION: a[:, :1]}], [0, 1])
    result = compute_stats([ds], NO_IMAGES)
    glob = result["features"][STATE]
    both = np.concatenate([a, b])
    z = np.abs(b.mean(axis=0) - both.mean(axis=0)) / both.std(axis=0)
    d1 = result["drift"]["1"][STATE]
    assert d1["mean_shift_dim"] == int(z.argmax())
    assert d1["mean_shift"] == pytest.approx(z.max(), rel=1e-9)
    ratios = (
        np.asarray(result["tasks"]["1"]["features"][STATE]["q99"]) - result["tasks"]["1"]["features"][STATE]["q01"]
    ) / (np.asarray(glob["q99"]) - glob["q01"])
    far = int(np.abs(np.log(ratios)).argmax())
    assert d1["range_ratio_dim"] == far
    assert d1["range_ratio"] == pytest.approx(ratios[far])
    assert result["drift"]["0"][ACTION]["mean_shift"] == pytest.approx(0.0, abs=1e-12)


def test_drift_skips_binary_and_constant_dimensions() -> None:
    x = np.column_stack([np.full(20, 2.0), np.tile([0.0, 1.0], 10)])  # constant, binary
    ds = make_dataset("flat", [{STATE: x[:10], ACTION: x[:10, :1]}, {STATE: x[10:], ACTION: x[10:, :1]}], [0, 1])
    result = compute_stats([ds], NO_IMAGES)
    assert result["drift"]["0"][STATE] == {
        "mean_shift": None,
        "mean_shift_dim": None,
        "range_ratio": None,
        "range_ratio_dim": None,
    }


def test_fingerprint_ties_data_keymap_and_settings(
    mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]],
) -> None:
    ds = mixed[0]
    base = compute_stats([ds], NO_IMAGES)["fingerprint"]
    assert compute_stats([ds], NO_IMAGES)["fingerprint"] == base
    assert compute_stats([ds], DsStatsConfig(image_frames=0, norm_mode="min_max"))["fingerprint"] != base
    assert compute_stats([ds], DsStatsConfig(image_frames=0, binary_dims={STATE: (0,)}))["fingerprint"] != base
    ds.episode_list[0].arrays[STATE][0, 0] += 1.0  # other data: another dataset fingerprint
    assert compute_stats([ds], NO_IMAGES)["fingerprint"] != base


def test_layout_names_every_documented_key(mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]]) -> None:
    result = compute_stats([mixed[0]], NO_IMAGES)
    assert set(result) == {
        "vlacl_stats_version",
        "fingerprint",
        "datasets",
        "keymap_sha256",
        "keymap_is_default",
        "settings",
        "quantiles",
        "image_frames",
        "num_frames",
        "num_episodes",
        "features",
        "tasks",
        "tasks_omitted",
        "drift",
    }
    lerobot_keys = {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert set(result["features"][STATE]) == lerobot_keys | {"mask", "norm_mode", "binary_dims", "quantile_error_bound"}
    assert set(result["tasks"]["0"]["features"][STATE]) == lerobot_keys | {"quantile_error_bound"}
    assert result["quantiles"]["method"] == "dyadic_histogram"
    assert result["quantiles"]["bins"] == HIST_BINS
    assert result["datasets"][0]["num_frames"] == len(mixed[1])


def test_progress_reports_frames_up_to_the_total(mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]]) -> None:
    calls: list[tuple[str, int, int]] = []
    compute_stats([mixed[0]], DsStatsConfig(image_frames=0, rows_per_batch=1000), progress=lambda *a: calls.append(a))
    total = len(mixed[1])
    assert calls[-1] == ("frames", total, total)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)


def image_dataset(dtype: str = "uint8") -> tuple[FakeDataset, np.ndarray]:
    rng = np.random.default_rng(5)
    lengths = [7, 11, 5, 9]
    frames = rng.integers(0, 256, size=(sum(lengths), 4, 6, 3), dtype=np.uint8)  # (T, H, W, C)
    frames[..., 2] = 17  # one channel constant
    stored = frames if dtype == "uint8" else frames.astype(np.float32) / 255
    eps = [
        {STATE: rng.normal(size=(n, 2)), ACTION: rng.normal(size=(n, 1)), "observation.images.front": f}
        for n, f in zip(lengths, split_rows(stored, lengths), strict=True)
    ]
    return make_dataset("cams", eps, [0, 1, 0, 1]), frames


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_image_stats_over_every_frame_equal_numpy(dtype: str) -> None:
    ds, frames = image_dataset(dtype)
    result = compute_stats([ds], DsStatsConfig(image_frames=10_000))
    cam = result["features"]["observation.images.front"]
    pixels = frames.reshape(-1, 3).astype(np.float64) / 255  # (P, C)
    assert result["image_frames"] == len(frames)
    assert cam["count"] == [len(frames)]
    assert cam["norm_mode"] == "none"
    for name, want in [
        ("mean", pixels.mean(0)),
        ("std", pixels.std(0)),
        ("min", pixels.min(0)),
        ("max", pixels.max(0)),
    ]:
        got = np.asarray(cam[name])
        assert got.shape == (3, 1, 1)
        np.testing.assert_allclose(got[:, 0, 0], want, rtol=1e-6 if dtype == "float32" else 1e-12, atol=1e-12)
    bound = np.asarray(cam["quantile_error_bound"])[:, 0, 0]
    for name, q in QUANTILE_LEVELS:
        err = np.abs(np.asarray(cam[name])[:, 0, 0] - np.quantile(pixels, q, axis=0))
        assert (err <= bound + 1e-6).all(), (name, err)
    if dtype == "uint8":
        assert (bound == 0).all()
    assert "observation.images.front" not in result["tasks"]["0"]["features"]


def test_camera_frames_of_mixed_dtypes_or_with_nan_are_refused() -> None:
    ds, _ = image_dataset("float32")
    cam = "observation.images.front"
    ds.episode_list[1].arrays[cam][0, 0, 0, 1] = np.nan
    with pytest.raises(
        InputFormatError, match=r"observation\.images\.front channel 1 is nan in a frame of cams:episode_1"
    ):
        compute_stats([ds], DsStatsConfig(image_frames=10_000))
    ds, frames = image_dataset("float32")
    third = ds.episode_list[2]
    ds.episode_list[2] = dataclasses.replace(third, arrays={**third.arrays, cam: frames[:5]})  # uint8 among float
    with pytest.raises(InputFormatError, match="has uint8 frames in cams:episode_2 but other frames are not uint8"):
        compute_stats([ds], DsStatsConfig(image_frames=10_000))


def test_image_sample_is_seeded_and_sized() -> None:
    ds, _ = image_dataset()
    a = compute_stats([ds], DsStatsConfig(image_frames=6, seed=1))
    b = compute_stats([ds], DsStatsConfig(image_frames=6, seed=1))
    c = compute_stats([ds], DsStatsConfig(image_frames=6, seed=2))
    cam = "observation.images.front"
    assert a["image_frames"] == 6
    assert a["features"][cam]["count"] == [6]
    assert a["features"][cam] == b["features"][cam]
    assert a["features"][cam]["mean"] != c["features"][cam]["mean"]
    assert cam not in compute_stats([ds], NO_IMAGES)["features"]


def test_smallest_exponent_covers_the_range_with_the_stated_width() -> None:
    for lo, hi in [(0.0, 1.0), (-1e-300, 1e-300), (1000.0, 1000.001), (-3e38, 3e38), (-5.0, -4.9), (0.1, 0.1 + 2**-40)]:
        j = stats._smallest_exponent(lo, hi, -2000)
        w = math.ldexp(1.0, j)
        assert math.floor(hi / w) - math.floor(lo / w) <= HIST_BINS - 1
        assert w / 2 < (hi - lo) / (HIST_BINS - 1)


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 300), st.integers(1, 3)),
        elements=st.one_of(
            st.floats(-1e6, 1e6, allow_nan=False, width=32),
            st.sampled_from([0.0, 1.0, -1.0, 2.5]),  # ties and few levels
        ),
    ),
    batch=st.integers(1, 64),
)
def test_quantiles_within_the_bound_for_any_data(values: np.ndarray, batch: int) -> None:
    n = len(values)
    cut = sorted({0, n, *range(0, n, max(1, n // 3))})
    parts = [values[a:b] for a, b in itertools.pairwise(cut) if b > a]
    ds = make_dataset("h", [{STATE: p, ACTION: p[:, :1]} for p in parts], [i % 2 for i in range(len(parts))])
    result = compute_stats([ds], DsStatsConfig(image_frames=0, rows_per_batch=batch))
    assert_matches_numpy(result["features"][STATE], values)


def test_features_reduced_in_parallel_give_the_same_stats(
    mixed: tuple[FakeDataset, np.ndarray, np.ndarray, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = compute_stats([mixed[0]], NO_IMAGES)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # a pool of one thread per feature
    parallel = compute_stats([mixed[0]], NO_IMAGES)
    assert parallel == serial
