"""Normalization modes, their exact inverse, masks and overrides, numpy and torch, and loading stats safely."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.stats_fakes import FakeDataset, make_dataset
from vlacl.artifacts import ArtifactWriter
from vlacl.artifacts.names import STATS_NAME
from vlacl.config.ds_stats import DsStatsConfig
from vlacl.data.keymap import KeyMap
from vlacl.data.normalize import (
    DimOverrides,
    Normalizer,
    StatsFile,
    check_stats_match,
    load_stats,
    stats_fingerprint,
)
from vlacl.data.stats import compute_stats
from vlacl.errors import ArtifactError, ConfigError, InputFormatError

STATE, ACTION, CAM = "observation.state", "action", "observation.images.front"


def feature(**values: Any) -> dict[str, Any]:
    """A stats entry for a 4-dim feature: dim 2 has zero width, dim 3 is binary (mask false)."""
    entry: dict[str, Any] = {
        "min": [-2.0, 0.0, 5.0, 0.0],
        "max": [2.0, 10.0, 5.0, 1.0],
        "q01": [-1.0, 1.0, 5.0, 0.0],
        "q99": [1.0, 9.0, 5.0, 1.0],
        "mean": [0.5, 4.0, 5.0, 0.5],
        "std": [2.0, 0.5, 0.0, 0.5],
        "mask": [True, True, True, False],
        "norm_mode": "q99",
    }
    entry.update(values)
    return entry


def normalizer(mode: str = "q99", **values: Any) -> Normalizer:
    return Normalizer.from_stats({"features": {ACTION: feature(norm_mode=mode, **values)}})


X = np.array([[0.0, 5.0, 5.0, 1.0], [3.0, -1.0, 7.0, 0.0], [-0.5, 9.0, 5.0, 1.0]])  # (3, 4)


def test_q99_maps_q01_q99_to_minus_one_one_and_clips() -> None:
    y = normalizer("q99").normalize(ACTION, X)
    want0 = np.clip(2 * (X[:, 0] - -1.0) / 2.0 - 1, -1, 1)
    want1 = np.clip(2 * (X[:, 1] - 1.0) / 8.0 - 1, -1, 1)
    np.testing.assert_allclose(y[:, 0], want0, rtol=1e-15)
    np.testing.assert_allclose(y[:, 1], want1, rtol=1e-15)
    assert y[1, 0] == 1.0  # clipped
    assert y[1, 1] == -1.0
    np.testing.assert_array_equal(y[:, 2], 0.0)  # zero width: 0, never NaN
    np.testing.assert_array_equal(y[:, 3], X[:, 3])  # binary: unchanged


def test_min_max_uses_min_and_max() -> None:
    y = normalizer("min_max").normalize(ACTION, X)
    np.testing.assert_allclose(y[:, 0], np.clip(2 * (X[:, 0] + 2.0) / 4.0 - 1, -1, 1), rtol=1e-15)
    np.testing.assert_allclose(y[:, 1], np.clip(2 * X[:, 1] / 10.0 - 1, -1, 1), rtol=1e-15)


def test_mean_std_is_not_clipped_and_a_zero_std_maps_to_zero() -> None:
    y = normalizer("mean_std").normalize(ACTION, X)
    np.testing.assert_allclose(y[:, 0], (X[:, 0] - 0.5) / 2.0, rtol=1e-15)
    np.testing.assert_allclose(y[:, 1], (X[:, 1] - 4.0) / 0.5, rtol=1e-15)
    assert np.abs(y[:, 1]).max() > 1
    np.testing.assert_array_equal(y[:, 2], 0.0)
    np.testing.assert_array_equal(normalizer("mean_std").unnormalize(ACTION, y)[:, 2], 5.0)


def test_none_passes_through() -> None:
    norm = normalizer("none")
    assert norm.normalize(ACTION, X) is X
    assert norm.unnormalize(ACTION, X) is X


@pytest.mark.parametrize("mode", ["q99", "min_max", "mean_std"])
def test_zero_width_dims_round_trip_to_their_value(mode: str) -> None:
    norm = normalizer(mode)
    back = norm.unnormalize(ACTION, norm.normalize(ACTION, X))
    assert np.isfinite(back).all()
    np.testing.assert_array_equal(back[:, 2], 5.0)


@settings(max_examples=80, deadline=None)
@given(
    mode=st.sampled_from(["q99", "min_max", "mean_std"]),
    lo=st.floats(-1e4, 1e4),
    width=st.floats(1e-3, 1e4),
    u=hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.just(4)), elements=st.floats(0.0, 1.0)),
)
def test_unnormalize_inverts_normalize_on_the_unclipped_range(
    mode: str, lo: float, width: float, u: np.ndarray
) -> None:
    hi = lo + width
    stats = {"features": {ACTION: {"min": [lo] * 4, "max": [hi] * 4, "q01": [lo] * 4, "q99": [hi] * 4,
                                   "mean": [(lo + hi) / 2] * 4, "std": [width] * 4, "mask": [True, True, False, True],
                                   "norm_mode": mode}}}  # fmt: skip
    norm = Normalizer.from_stats(stats)
    x = lo + u * width  # (N, 4) inside [lo, hi]: nothing is clipped
    y = norm.normalize(ACTION, x)
    assert np.abs(y[:, [0, 1, 3]]).max() <= 1.0 + 1e-12 or mode == "mean_std"
    np.testing.assert_allclose(norm.unnormalize(ACTION, y), x, rtol=1e-12, atol=1e-12 * max(abs(lo), abs(hi), 1.0))
    np.testing.assert_array_equal(y[:, 2], x[:, 2])  # masked out: untouched


def test_overrides_replace_the_mask() -> None:
    stats = {"features": {ACTION: feature()}}
    forced = Normalizer.from_stats(stats, overrides=DimOverrides(binary={ACTION: (0,)}, continuous={ACTION: (3,)}))
    y = forced.normalize(ACTION, X)
    np.testing.assert_array_equal(y[:, 0], X[:, 0])
    np.testing.assert_allclose(y[:, 3], 2 * X[:, 3] - 1)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (lambda: DimOverrides(binary={ACTION: (4,)}), ConfigError, r"outside \[0, 4\)"),
        (lambda: DimOverrides(continuous={STATE: (0,)}), ConfigError, "names feature 'observation.state'"),
        (lambda: DimOverrides(binary={ACTION: (1,)}, continuous={ACTION: (1,)}), ConfigError, "in both"),
    ],
)
def test_bad_overrides_are_refused(overrides: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Normalizer.from_stats({"features": {ACTION: feature()}}, overrides=overrides())


def test_modes_argument_replaces_the_stats_mode_and_unknown_ones_are_refused() -> None:
    norm = Normalizer.from_stats({"features": {ACTION: feature()}}, modes={ACTION: "mean_std"})
    assert norm.mode(ACTION) == "mean_std"
    with pytest.raises(ConfigError, match="unknown normalization mode 'z'"):
        Normalizer.from_stats({"features": {ACTION: feature()}}, modes={ACTION: "z"})  # type: ignore[dict-item]


def test_a_missing_feature_or_statistic_is_a_clear_error() -> None:
    with pytest.raises(InputFormatError, match=r"have no feature 'observation\.state'; features there: action"):
        Normalizer.from_stats({"features": {ACTION: feature()}}, keys=[STATE])
    entry = feature()
    del entry["q99"]
    with pytest.raises(InputFormatError, match="no 'q99' for action, which norm mode q99 needs"):
        Normalizer.from_stats({"features": {ACTION: entry}})


def test_float32_stays_float32_and_integers_become_float() -> None:
    norm = normalizer()
    assert norm.normalize(ACTION, X.astype(np.float32)).dtype == np.float32
    assert norm.normalize(ACTION, X.astype(np.int64)).dtype == np.float64


def test_torch_tensors_match_numpy_and_keep_their_dtype() -> None:
    for mode in ("q99", "min_max", "mean_std"):
        norm = normalizer(mode)
        x = torch.tensor(X, dtype=torch.float32)
        y = norm.normalize(ACTION, x)
        assert isinstance(y, torch.Tensor)
        assert y.dtype == torch.float32
        np.testing.assert_allclose(y.numpy(), norm.normalize(ACTION, X.astype(np.float32)), rtol=1e-6, atol=1e-6)
        back = norm.unnormalize(ACTION, y)
        np.testing.assert_allclose(back.numpy(), norm.unnormalize(ACTION, y.numpy()), rtol=1e-6, atol=1e-6)
    y64 = normalizer().normalize(ACTION, torch.tensor(X))
    assert y64.dtype == torch.float64


def test_image_stats_broadcast_over_channels_first_frames() -> None:
    stats = {"features": {CAM: {"mean": [[[0.5]], [[0.25]], [[0.0]]], "std": [[[0.5]], [[0.25]], [[1.0]]],
                                "norm_mode": "mean_std"}}}  # fmt: skip
    norm = Normalizer.from_stats(stats)
    frames = np.ones((2, 3, 4, 5))  # (B, C, H, W)
    y = norm.normalize(CAM, frames)
    np.testing.assert_allclose(y[:, 0], 1.0)
    np.testing.assert_allclose(y[:, 1], 3.0)
    np.testing.assert_allclose(y[:, 2], 1.0)
    np.testing.assert_allclose(norm.unnormalize(CAM, y), frames)


def test_importing_normalize_needs_no_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; import numpy as np; "
        "from vlacl.data.normalize import Normalizer; "
        "n = Normalizer.from_stats({'action': {'q01': [0.0], 'q99': [2.0], 'mask': [True], 'norm_mode': 'q99'}}); "
        "print(n.normalize('action', np.array([[1.0]]))[0, 0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.0"


# ------------------------------------------------------------------------------------------
# Loading and matching


def small_dataset(name: str = "ds", offset: float = 0.0) -> FakeDataset:
    rng = np.random.default_rng(0)
    eps = [{STATE: rng.normal(size=(20, 3)) + offset, ACTION: rng.normal(size=(20, 2))} for _ in range(3)]
    return make_dataset(name, eps, [0, 1, 0])


def write_stats_artifact(tmp_path: Path, data: dict[str, Any], name: str = "stats") -> Path:
    out = tmp_path / name
    with ArtifactWriter(out, "ds_stats", command=["vlacl", "ds-stats"], config_yaml=None, seed=0) as writer:
        (writer.path / STATS_NAME).write_text(json.dumps(data), encoding="utf-8")
    return out


def test_load_stats_reads_an_artifact_or_its_file(tmp_path: Path) -> None:
    data = compute_stats([small_dataset()], DsStatsConfig(image_frames=0))
    out = write_stats_artifact(tmp_path, data)
    from_dir = load_stats(out)
    from_file = load_stats(out / STATS_NAME)
    assert from_dir.data == from_file.data == data
    assert from_dir.source == str(out / STATS_NAME)
    assert from_dir.fingerprint == data["fingerprint"]
    norm = Normalizer.from_stats(from_dir)
    assert norm.keys == [STATE, ACTION]


def test_load_stats_refuses_other_artifacts_and_files(tmp_path: Path) -> None:
    (tmp_path / "lerobot_stats.json").write_text(json.dumps({ACTION: feature()}))
    with pytest.raises(InputFormatError, match="not a stats file written by `vlacl ds-stats`"):
        load_stats(tmp_path / "lerobot_stats.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputFormatError, match="cannot read stats"):
        load_stats(tmp_path / "broken.json")
    with pytest.raises(InputFormatError, match="does not exist"):
        load_stats(tmp_path / "missing.json")
    with pytest.raises(ArtifactError, match="expected a ds_stats artifact"):
        load_stats(tmp_path)


def test_load_stats_refuses_a_newer_version_and_edited_files(tmp_path: Path) -> None:
    data = compute_stats([small_dataset()], DsStatsConfig(image_frames=0))
    newer = {**data, "vlacl_stats_version": 2}
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(InputFormatError, match="newer than this vlacl reads"):
        load_stats(tmp_path / "newer.json")
    edited = {**data, "settings": {**data["settings"], "norm_modes": {STATE: "none", ACTION: "none"}}}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(InputFormatError, match="was edited after `vlacl ds-stats` wrote it"):
        load_stats(tmp_path / "edited.json")


@pytest.mark.parametrize(
    ("field", "value"),
    [("datasets", "ds"), ("datasets", ["ds"]), ("features", [1, 2]), ("features", {ACTION: 3}), ("settings", [])],
)
def test_load_stats_refuses_a_file_of_the_wrong_structure(tmp_path: Path, field: str, value: Any) -> None:
    data = {**compute_stats([small_dataset()], DsStatsConfig(image_frames=0)), field: value}
    (tmp_path / "stats.json").write_text(json.dumps(data))
    with pytest.raises(InputFormatError, match=rf"stats.json: {field!r} is .*recreate it with `vlacl ds-stats`"):
        load_stats(tmp_path / "stats.json")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"q01": "low"}, r"'q01' of action is 'low', not numbers"),
        ({"mask": [True, False]}, r"'mask' of action has 2 values, 'q01' 4"),
        ({"q99": [1.0, 2.0]}, r"'q99' of action has 2 values, 'q01' 4"),
        ({"std": [[1.0], [2.0]]}, r"'std' of action has 2 values, 'mean' 4"),
    ],
)
def test_malformed_feature_stats_are_one_clear_error(values: dict[str, Any], message: str) -> None:
    mode = "mean_std" if "std" in values else "q99"
    with pytest.raises(InputFormatError, match=message + r".*recompute the stats with `vlacl ds-stats`"):
        normalizer(mode, **values)


def test_fingerprint_is_recomputable_from_the_file() -> None:
    data = compute_stats([small_dataset()], DsStatsConfig(image_frames=0))
    fps = [d["fingerprint"] for d in data["datasets"]]
    assert stats_fingerprint(fps, data["keymap_sha256"], data["settings"]) == data["fingerprint"]


def test_check_stats_match_accepts_the_same_data_in_any_order() -> None:
    a, b = small_dataset("a"), small_dataset("b", offset=1.0)
    stats = StatsFile(compute_stats([a, b], DsStatsConfig(image_frames=0)), "runs/stats/stats.json")
    check_stats_match(stats, [b, a], KeyMap())


def test_check_stats_match_names_both_sides_and_the_fix() -> None:
    stats = StatsFile(compute_stats([small_dataset()], DsStatsConfig(image_frames=0)), "runs/stats/stats.json")
    other = small_dataset(offset=1.0)
    with pytest.raises(InputFormatError) as info:
        check_stats_match(stats, [other], KeyMap())
    text = str(info.value)
    assert "stats at runs/stats/stats.json" in text
    assert stats.dataset_fingerprints[0][:12] in text
    from vlacl.data.episode import dataset_fingerprint

    assert dataset_fingerprint(other)[:12] in text
    assert "with the default key map" in text
    assert "the datasets differ" in text
    assert "rerun `vlacl ds-stats /memory/ds --out <dir>` or pass the matching --stats" in text


def test_check_stats_match_refuses_another_key_map() -> None:
    ds = small_dataset()
    stats = StatsFile(compute_stats([ds], DsStatsConfig(image_frames=0)), "s.json")
    with pytest.raises(InputFormatError, match="the key maps differ"):
        check_stats_match(stats, [ds], KeyMap(action="actions"))
