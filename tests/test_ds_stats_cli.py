"""``vlacl ds-stats`` end to end on LeRobot and HDF5 datasets written to disk, and its contract with the core."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.hdf5_factories import Hdf5Factory, actions_of
from tests.lerobot_factories import EpisodeTruth, make_episodes, write_lerobot
from vlacl.artifacts import open_artifact
from vlacl.artifacts.names import KEYMAP_NAME, STATS_NAME
from vlacl.cli.app import app
from vlacl.config.ds_stats import DsStatsConfig
from vlacl.config.inspect_h5 import InspectH5Config
from vlacl.data import hdf5
from vlacl.data import stats as core
from vlacl.data.keymap import load_keymap
from vlacl.data.normalize import Normalizer, check_stats_match, load_stats
from vlacl.data.open import open_datasets
from vlacl.errors import ArtifactError

STATE, ACTION = "observation.state", "action"


@pytest.fixture
def h5(tmp_path: Path) -> Iterator[Hdf5Factory]:
    yield Hdf5Factory(tmp_path / "h5")
    hdf5.close_cached_files()


@pytest.fixture
def truth() -> list[EpisodeTruth]:
    return make_episodes([30, 45, 25, 40, 35], ["pick up the cube", "open the drawer"], cameras=["front"])


@pytest.fixture
def lerobot(tmp_path: Path, truth: list[EpisodeTruth]) -> Path:
    return write_lerobot(tmp_path / "pick_place", truth, images="embedded")


def invoke(runner: CliRunner, *args: str) -> Any:
    return runner.invoke(app, ["ds-stats", *args])


def no_temp_siblings(out: Path) -> bool:
    return not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def assert_close_to_truth(entry: dict[str, Any], values: np.ndarray) -> None:
    x = values.astype(np.float64)
    np.testing.assert_array_equal(entry["min"], x.min(axis=0))
    np.testing.assert_array_equal(entry["max"], x.max(axis=0))
    np.testing.assert_allclose(entry["mean"], x.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(entry["std"], x.std(axis=0), rtol=1e-12)
    for name, q in core.QUANTILE_LEVELS:
        err = np.abs(np.asarray(entry[name]) - np.quantile(x, q, axis=0))
        assert (err <= np.asarray(entry["quantile_error_bound"]) + 1e-12).all(), name


def test_lerobot_dataset_gives_an_artifact_whose_stats_equal_numpy(
    runner: CliRunner, lerobot: Path, truth: list[EpisodeTruth], tmp_path: Path
) -> None:
    out = tmp_path / "stats"
    result = invoke(runner, str(lerobot), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert "observation.state" in result.stdout
    assert "Normalization drift per task" in result.stdout
    assert f"wrote ds_stats artifact {out}" in result.stderr
    artifact = open_artifact(out, "ds_stats", verify=True)
    assert sorted(artifact.manifest.outputs) == ["config.yaml", STATS_NAME]  # default key map: no keymap.yaml
    data = json.loads((out / STATS_NAME).read_text())
    assert_close_to_truth(data["features"][STATE], np.concatenate([e.state for e in truth]))
    assert_close_to_truth(data["features"][ACTION], np.concatenate([e.action for e in truth]))
    task0 = np.concatenate([e.action for e in truth if e.task_index == 0]).astype(np.float64)
    np.testing.assert_allclose(data["tasks"]["0"]["features"][ACTION]["mean"], task0.mean(axis=0), rtol=1e-12)
    assert data["tasks"]["1"]["instruction"] == "open the drawer"
    cam = data["features"]["observation.images.front"]
    frames = np.concatenate([e.images["front"] for e in truth]).reshape(-1, 3) / 255  # all 175 frames sampled
    np.testing.assert_allclose(np.asarray(cam["mean"])[:, 0, 0], frames.mean(axis=0), rtol=1e-12)
    (ref,) = artifact.manifest.inputs
    assert (ref.role, ref.kind) == ("dataset", "file")
    assert ref.path.endswith("meta/info.json")
    details = artifact.manifest.details
    assert details["stats_fingerprint"] == data["fingerprint"]
    assert details["num_frames"] == 175
    assert details["tasks"] == ["0", "1"]
    stats = load_stats(out)
    datasets = open_datasets([lerobot])
    check_stats_match(stats, datasets, load_keymap(None))
    norm = Normalizer.from_stats(stats, keys=[STATE, ACTION])
    y = norm.normalize(ACTION, truth[0].action)
    assert np.abs(y).max() <= 1.0


def test_json_prints_the_stats_file(runner: CliRunner, lerobot: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    result = invoke(runner, str(lerobot), "--out", str(out), "--json", "--image-frames", "0")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == json.loads((out / STATS_NAME).read_text())


def test_stats_values_edited_in_the_artifact_are_refused(runner: CliRunner, lerobot: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    assert invoke(runner, str(lerobot), "--out", str(out), "--image-frames", "0").exit_code == 0
    data = json.loads((out / STATS_NAME).read_text())
    data["features"][ACTION]["q99"][0] += 1.0  # settings and lineage unchanged: only the manifest hash tells
    (out / STATS_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=STATS_NAME):
        load_stats(out)


def test_without_out_nothing_is_written(runner: CliRunner, lerobot: Path, tmp_path: Path) -> None:
    before = sorted(tmp_path.iterdir())
    result = invoke(runner, str(lerobot), "--json", "--image-frames", "0")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["num_frames"] == 175
    assert sorted(tmp_path.iterdir()) == before


def test_hdf5_suite_of_several_files_keys_tasks_by_file(runner: CliRunner, h5: Hdf5Factory, tmp_path: Path) -> None:
    suite = h5.libero_suite("libero_mini", ["open the drawer", "close the drawer"], lengths=(12, 15))
    out = tmp_path / "stats"
    result = invoke(runner, str(suite), "--out", str(out), "--image-frames", "5")
    assert result.exit_code == 0, result.stderr
    data = json.loads((out / STATS_NAME).read_text())
    assert list(data["tasks"]) == ["close_the_drawer_demo/0", "open_the_drawer_demo/0"]
    actions = np.concatenate([actions_of(n, 7, i) for _ in range(2) for i, n in enumerate((12, 15))])
    assert_close_to_truth(data["features"][ACTION], actions.astype(np.float32))
    assert data["image_frames"] == 5
    roles = sorted((r.role, r.kind) for r in open_artifact(out).manifest.inputs)
    assert roles == [("dataset:0", "file"), ("dataset:1", "file")]  # each HDF5 file by its own hash


def test_a_key_map_is_saved_and_the_stats_refuse_another(runner: CliRunner, h5: Hdf5Factory, tmp_path: Path) -> None:
    path = h5.robomimic(lengths=(10, 12))
    keymap = tmp_path / "keymap.yaml"
    keymap.write_text("state: [ee_pos, gripper_states]\n")
    out = tmp_path / "stats"
    result = invoke(runner, str(path), "--out", str(out), "--keymap", str(keymap), "--image-frames", "0")
    assert result.exit_code == 0, result.stderr
    assert (out / KEYMAP_NAME).read_text() == load_keymap(keymap).to_yaml()
    data = json.loads((out / STATS_NAME).read_text())
    assert len(data["features"][STATE]["min"]) == 5
    stats = load_stats(out)
    check_stats_match(stats, open_datasets([path], load_keymap(keymap)), load_keymap(keymap))
    with pytest.raises(Exception, match="rerun `vlacl ds-stats"):
        check_stats_match(stats, open_datasets([path]), load_keymap(None))


def test_a_parquet_without_a_needed_column_is_one_line_and_writes_nothing(
    runner: CliRunner, lerobot: Path, tmp_path: Path
) -> None:
    data_file = lerobot / "data/chunk-000/file-000.parquet"
    table = pq.read_table(data_file)
    pq.write_table(table.drop(["action"]), data_file)
    out = tmp_path / "stats"
    result = invoke(runner, str(lerobot), "--out", str(out))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    assert "action" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert no_temp_siblings(out)


def test_an_empty_task_is_one_line_and_writes_nothing(runner: CliRunner, tmp_path: Path) -> None:
    eps = make_episodes([20, 0, 15], ["pick", "place", "pick"])
    root = write_lerobot(tmp_path / "with_empty", eps)
    out = tmp_path / "stats"
    result = invoke(runner, str(root), "--out", str(out))
    assert result.exit_code == 1
    assert "error: task 1 (place)" in result.stderr
    assert "has no frames" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert no_temp_siblings(out)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--norm-mode", "zscore"], 2, "norm_mode"),
        (["--image-frames", "-1"], 2, "image_frames"),
        (["--set", "binary_dims={action: [99]}"], 2, "outside [0, 3)"),
    ],
)
def test_bad_settings_are_config_errors(
    runner: CliRunner, lerobot: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    out = tmp_path / "stats"
    result = invoke(runner, str(lerobot), "--out", str(out), *args)
    assert result.exit_code == code
    assert message in result.stderr
    assert not out.exists()


def test_a_missing_path_is_an_input_error(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert "does not exist" in result.stderr


def test_an_existing_artifact_needs_overwrite(runner: CliRunner, lerobot: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    assert invoke(runner, str(lerobot), "--out", str(out), "--image-frames", "0").exit_code == 0
    again = invoke(runner, str(lerobot), "--out", str(out), "--image-frames", "0")
    assert again.exit_code == 2
    assert "--overwrite" in again.stderr
    assert invoke(runner, str(lerobot), "--out", str(out), "--image-frames", "0", "--overwrite").exit_code == 0


def test_flags_config_and_set_reach_the_core(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def fake(paths: list[Path], cfg: DsStatsConfig, **kwargs: Any) -> dict[str, Any]:
        seen.update(paths=paths, cfg=cfg, **kwargs)
        return {"fingerprint": "0" * 64}

    monkeypatch.setattr(core, "run_ds_stats", fake)
    config = tmp_path / "c.yaml"
    config.write_text("image_frames: 7\nseed: 4\nfeature_norm_modes: {action: min_max}\n")
    result = invoke(
        runner,
        "a",
        "b",
        "--config",
        str(config),
        "--set",
        "seed=5",
        "--norm-mode",
        "mean_std",
        "--max-tasks",
        "9",
        "--keymap",
        "km.yaml",
        "--json",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 0, result.stderr
    cfg = seen["cfg"]
    assert seen["paths"] == [Path("a"), Path("b")]
    assert (cfg.image_frames, cfg.seed, cfg.norm_mode, cfg.max_tasks) == (7, 5, "mean_std", 9)
    assert cfg.feature_norm_modes == {"action": "min_max"}
    assert cfg.keymap == Path("km.yaml")
    assert seen["out"] == tmp_path / "o"
    assert seen["command"][:2] == ["vlacl", "ds-stats"]
    assert seen["progress"] is None  # not a terminal: no progress bar


def test_help_shows_every_option_with_its_default(runner: CliRunner) -> None:
    result = runner.invoke(app, ["ds-stats", "--help"])
    assert result.exit_code == 0
    flat = " ".join(result.stdout.replace("\u2502", " ").split())
    for text in ("--norm-mode", "--image-frames", "--keymap", "--max-tasks", "(default: q99)", "(default: 1000)"):
        assert text in flat, text


def test_progress_bar_on_a_terminal_takes_both_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from vlacl.cli import ds_stats as cli

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    with cli._progress() as progress:
        assert progress is not None
        progress("frames", 10, 100)
        progress("frames", 100, 100)
        progress("images", 3, 3)


@pytest.mark.parametrize(("command", "cls"), [("ds-stats", DsStatsConfig), ("inspect-h5", InspectH5Config)])
def test_every_flag_a_setting_names_is_an_option_of_the_command(runner: CliRunner, command: str, cls: type) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for fld in dataclasses.fields(cls):
        for flag in (fld.metadata.get("flag") or "").split("/"):
            assert flag in result.stdout, f"{fld.name} names {flag}, which `vlacl {command}` lacks"
