"""``inspect-h5``: the report on clean and broken files, what it reads, and the command line."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from tests.hdf5_factories import Hdf5Factory, actions_of, count_dataset_reads, garbage, replace, truncate
from vlacl.cli.app import app as vlacl_app
from vlacl.config.inspect_h5 import InspectH5Config
from vlacl.data import hdf5
from vlacl.data.inspect_h5 import Finding, InspectH5Report, expand_paths, run_inspect_h5
from vlacl.errors import ConfigError, InputFormatError

Mutate = Callable[[h5py.File], None]


@pytest.fixture
def h5(tmp_path: Path) -> Iterator[Hdf5Factory]:
    """The HDF5 factory, writing under this test's directory."""
    yield Hdf5Factory(tmp_path)
    hdf5.close_cached_files()


@pytest.fixture
def app() -> typer.Typer:
    """The vlacl app, with its exception boundary and logging."""
    return vlacl_app


def _inspect(*paths: Path | str, **cfg: Any) -> InspectH5Report:
    return run_inspect_h5(list(paths), InspectH5Config(**cfg))


def _codes(report: InspectH5Report) -> set[tuple[str, str, str | None]]:
    return {(f.severity, f.code, f.episode) for f in report.findings}


def test_clean_libero_file_reports_structure_and_only_the_flip(h5: Hdf5Factory) -> None:
    path = h5.robomimic(lengths=(12, 15, 10), compression="gzip")
    report = _inspect(path)
    assert _codes(report) == {("info", "upside_down_images", None)}
    assert not report.has_errors
    [file] = report.files
    assert (file.format, file.libero, file.flip_images) == ("hdf5_robomimic", "problem_info attribute", True)
    nodes = {node.path: node for node in file.tree}
    image = nodes["/data/demo_0/obs/agentview_rgb"]
    assert (image.shape, image.dtype, image.chunks, image.compression) == (
        (12, 8, 8, 3),
        "uint8",
        (1, 8, 8, 3),
        "gzip 4",
    )
    assert nodes["/data/demo_1"].kind == "group"
    attrs = dict(nodes["/data/demo_0"].attrs)
    assert attrs["num_samples"] == "12"
    assert attrs["model_file"].endswith("chars)")
    assert len(attrs["model_file"]) < 160
    assert json.loads(dict(nodes["/data"].attrs)["problem_info"])["language_instruction"].startswith("open the top")
    rows = file.episodes
    assert [(r.episode, r.length) for r in rows] == [("demo_0", 12), ("demo_1", 15), ("demo_2", 10)]
    assert {r.instruction for r in rows} == {"open the top drawer of the cabinet"}
    want = actions_of(15, 7, 1)
    assert rows[1].action_min == pytest.approx(tuple(want.min(axis=0)))
    assert rows[1].action_max == pytest.approx(tuple(want.max(axis=0)))
    assert file.image_samples == ()


def _set(path: str, row: int, col: int, value: float) -> Mutate:
    def mutate(f: h5py.File) -> None:
        data = f[path][()]
        data[row, col] = value
        replace(f, path, data)

    return mutate


def _all_demos(mutate_one: Callable[[h5py.File, str], None]) -> Mutate:
    def mutate(f: h5py.File) -> None:
        for name in f["data"]:
            mutate_one(f, f"data/{name}")

    return mutate


def _constant_gripper(f: h5py.File, demo: str) -> None:
    actions = f[f"{demo}/actions"][()]
    actions[:, 6] = -1.0
    replace(f, f"{demo}/actions", actions)


ROBOMIMIC_CASES: list[tuple[str, dict[str, Any], tuple[str, str, str | None], str]] = [
    (
        "missing_actions",
        {"mutate": lambda f: f.__delitem__("data/demo_1/actions")},
        ("error", "missing_key", "demo_1"),
        r"no action dataset \(actions or action\)",
    ),
    (
        "missing_obs",
        {"mutate": lambda f: f.__delitem__("data/demo_0/obs")},
        ("error", "missing_key", "demo_0"),
        r"no obs group",
    ),
    (
        "length_mismatch",
        {"mutate": lambda f: replace(f, "data/demo_2/obs/agentview_rgb", f["data/demo_2/obs/agentview_rgb"][:-2])},
        ("error", "length_mismatch", "demo_2"),
        r"obs/agentview_rgb has 8 frames but actions has 10",
    ),
    (
        "num_samples",
        {"mutate": lambda f: f["data/demo_0"].attrs.__setitem__("num_samples", 99)},
        ("warning", "length_mismatch", "demo_0"),
        r"num_samples says 99 frames but actions has 12",
    ),
    (
        "nan_action",
        {"mutate": _set("data/demo_1/actions", 4, 2, np.nan)},
        ("error", "nonfinite", "demo_1"),
        r"actions has 1 NaN or Inf values, the first in frame 4",
    ),
    (
        "inf_state",
        {"mutate": _set("data/demo_0/obs/joint_states", 7, 0, np.inf)},
        ("error", "nonfinite", "demo_0"),
        r"obs/joint_states has 1 NaN or Inf values, the first in frame 7",
    ),
    (
        "out_of_range",
        {"mutate": _set("data/demo_2/actions", 1, 3, -1.5)},
        ("warning", "action_out_of_range", "demo_2"),
        r"actions leaves \[-1, 1\] in dimension 3 \(min -1.5\)",
    ),
    ("too_short", {"lengths": (12, 4, 10)}, ("warning", "too_short", "demo_1"), r"4 frames, fewer than .* 1 \+ 8"),
    (
        "constant_dim",
        {"mutate": _all_demos(_constant_gripper)},
        ("warning", "constant_action_dim", None),
        r"action dimension 6 \(= -1\) never changes in all 3 episodes",
    ),
    (
        "extra_key",
        {"mutate": lambda f: f.create_dataset("data/demo_2/obs/depth", data=np.zeros((10, 4)))},
        ("error", "missing_key", "demo_2"),
        r"has obs/depth, which demo_0 lacks",
    ),
    (
        "shape_mismatch",
        {"mutate": lambda f: replace(f, "data/demo_1/obs/ee_pos", np.zeros((15, 4)))},
        ("error", "shape_mismatch", "demo_1"),
        r"obs/ee_pos is float64 \(4,\) per frame but float64 \(3,\) in demo_0",
    ),
    (
        "bad_problem_info",
        {"mutate": lambda f: f["data"].attrs.__setitem__("problem_info", "{not json")},
        ("warning", "bad_attribute", None),
        r"attribute problem_info of /data is not a JSON object",
    ),
    (
        "no_instruction",
        {"libero": False},
        ("info", "no_instruction", None),
        r"no language instruction",
    ),
    (
        "no_episodes",
        {"mutate": lambda f: [f["data"].pop(k) for k in list(f["data"])]},
        ("error", "no_episodes", None),
        r"no demo_N groups",
    ),
]


@pytest.mark.parametrize(
    ("factory", "expected", "message"), [c[1:] for c in ROBOMIMIC_CASES], ids=[c[0] for c in ROBOMIMIC_CASES]
)
def test_each_problem_is_one_finding(
    h5: Hdf5Factory, factory: dict[str, Any], expected: tuple[str, str, str | None], message: str
) -> None:
    report = _inspect(h5.robomimic("t.hdf5", **factory))
    matching = [f for f in report.findings if (f.severity, f.code, f.episode) == expected]
    assert len(matching) == 1, report.findings
    assert matching[0].file.endswith("t.hdf5")
    assert re.search(message, matching[0].message), matching[0].message
    assert report.has_errors is (expected[0] == "error")


def test_damaged_chunk_of_a_float_dataset_is_an_unreadable_finding(h5: Hdf5Factory) -> None:
    def compressed_state(f: h5py.File) -> None:
        data = f["data/demo_1/obs/joint_states"][()]
        del f["data/demo_1/obs/joint_states"]
        f.create_dataset("data/demo_1/obs/joint_states", data=data, chunks=(15, 7), compression="gzip")

    path = h5.robomimic("t.hdf5", mutate=compressed_state)
    with h5py.File(path, "r") as f:
        info = f["data/demo_1/obs/joint_states"].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[info.byte_offset : info.byte_offset + info.size] = b"\xff" * info.size
    path.write_bytes(bytes(data))
    report = _inspect(path)
    [finding] = [f for f in report.findings if f.code == "unreadable"]
    assert (finding.severity, finding.episode) == ("error", "demo_1")
    assert "obs/joint_states cannot be read" in finding.message


def test_flat_files_are_episodes_and_checked_together(h5: Hdf5Factory) -> None:
    root = h5.flat_dir(lengths=(12, 9, 14))
    h5.flat("mobile/episode_003.h5", length=10, mutate=lambda f: f.__delitem__("actions"))

    def short_images(f: h5py.File) -> None:
        replace(f, "images", f["images"][:-1])
        replace(f, "velocity", f["velocity"][:-1])

    h5.flat("mobile/episode_004.h5", length=10, mutate=short_images)
    report = _inspect(root)
    assert [f.format for f in report.files] == ["hdf5_flat"] * 5
    assert [row.episode for f in report.files for row in f.episodes] == [f"episode_{i:03d}.h5" for i in range(5)]
    codes = _codes(report)
    assert ("error", "missing_key", "episode_003.h5") in codes
    assert ("error", "length_mismatch", "episode_004.h5") in codes
    assert ("warning", "length_mismatch", "episode_004.h5") in codes
    assert [f.episodes[0].instruction for f in report.files][:2] == ["drive to the dock", "follow the hallway"]
    missing = [f for f in report.findings if f.code == "missing_key"]
    assert [f.episode for f in missing] == ["episode_003.h5"]  # said once, not again as a key the first file has
    assert "no action dataset" in missing[0].message

    h5.flat("mobile/episode_005.h5", mutate=lambda f: f.create_dataset("odometry", data=np.zeros((12, 3))))
    [extra] = [f for f in _inspect(root).findings if f.code == "missing_key" and f.episode == "episode_005.h5"]
    assert extra.message == f"has odometry, which episode_000.h5 ({root / 'episode_000.h5'}) lacks"


def test_no_image_payload_is_read_unless_asked(h5: Hdf5Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    path = h5.robomimic(compression="gzip")
    flat = h5.flat_dir()
    reads = count_dataset_reads(monkeypatch)
    report = _inspect(path, flat)
    images = [name for name in reads if name.endswith(("_rgb", "images"))]
    assert images == []
    assert "/data/demo_0/actions" in reads
    assert report.files[0].image_samples == ()

    reads.clear()
    report = _inspect(path, flat, sample_images=3)
    images = [name for name in reads if name.endswith(("_rgb", "images"))]
    assert sorted(set(images)) == [
        "/data/demo_0/obs/agentview_rgb",
        "/data/demo_0/obs/eye_in_hand_rgb",
        "/data/demo_1/obs/agentview_rgb",
        "/data/demo_1/obs/eye_in_hand_rgb",
        "/data/demo_2/obs/agentview_rgb",
        "/data/demo_2/obs/eye_in_hand_rgb",
        "/images",
    ]
    assert len(images) == 9  # one read of 3 frames per camera and episode
    samples = report.files[0].image_samples
    assert [(s.episode, s.dataset, s.frames) for s in samples[:2]] == [
        ("demo_0", "obs/agentview_rgb", 3),
        ("demo_0", "obs/eye_in_hand_rgb", 3),
    ]
    # The factory's frames are bright at the top; LIBERO stores them upside down.
    assert samples[0].bottom_mean > samples[0].top_mean
    flip = [f for f in report.findings if f.code == "upside_down_images"]
    assert "obs/agentview_rgb top third" in flip[0].message


def test_blank_sampled_frames_are_a_warning(h5: Hdf5Factory) -> None:
    def blank(f: h5py.File) -> None:
        replace(f, "data/demo_1/obs/eye_in_hand_rgb", np.zeros((15, 8, 8, 3), np.uint8))

    report = _inspect(h5.robomimic(mutate=blank), sample_images=4)
    [finding] = [f for f in report.findings if f.code == "blank_images"]
    assert (finding.severity, finding.episode) == ("warning", "demo_1")
    assert "4 of 4 sampled frames of obs/eye_in_hand_rgb" in finding.message


def test_report_json_is_plain_and_nan_free(h5: Hdf5Factory) -> None:
    def all_nan(f: h5py.File) -> None:
        data = f["data/demo_0/actions"][()]
        data[:, 1] = np.nan
        replace(f, "data/demo_0/actions", data)

    report = _inspect(h5.robomimic(mutate=all_nan), tree=False)
    text = json.dumps(report.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["summary"] == {"files": 1, "episodes": 3, "frames": 37, "errors": 1, "warnings": 0, "infos": 1}
    assert data["files"][0]["tree"] == []
    assert data["files"][0]["episodes"][0]["action_min"][1] is None
    assert data["config"]["tree"] is False


def test_expand_paths(h5: Hdf5Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    h5.libero_suite("suite/a", ["one", "two"])
    h5.flat_dir("suite/b/mobile", lengths=(9,))
    (h5.root / "suite" / "notes.txt").write_text("not data")
    monkeypatch.chdir(h5.root)
    assert expand_paths(["suite/a"]) == [Path("suite/a/one_demo.hdf5"), Path("suite/a/two_demo.hdf5")]
    assert expand_paths(["suite/**/*.h*5"]) == [
        Path("suite/a/one_demo.hdf5"),
        Path("suite/a/two_demo.hdf5"),
        Path("suite/b/mobile/episode_000.h5"),
    ]
    assert expand_paths(["suite/*", "suite/a/one_demo.hdf5"]) == [
        Path("suite/a/one_demo.hdf5"),
        Path("suite/a/two_demo.hdf5"),
    ]
    for pattern, message in [
        ("nowhere.hdf5", "nowhere.hdf5 does not exist"),
        ("suite/*.zarr", r"'suite/\*.zarr' matches no HDF5 file"),
        ("suite", r"suite holds no HDF5 file .*'suite/\*\*/\*.hdf5'"),
    ]:
        with pytest.raises(InputFormatError, match=message):
            expand_paths([pattern])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_file_is_one_clear_error(h5: Hdf5Factory, damage: str) -> None:
    path = garbage(h5.root / "bad.hdf5") if damage == "garbage" else truncate(h5.robomimic("bad.hdf5"))
    with pytest.raises(InputFormatError, match=r"bad.hdf5 is not an HDF5 file \(or is truncated\)"):
        _inspect(path)


def test_config_is_validated_with_the_flag_name() -> None:
    with pytest.raises(ConfigError, match=r"`sample_images` \(--sample-images\): must be in \[0, 1000\]"):
        InspectH5Config(sample_images=-1)
    with pytest.raises(ConfigError, match=r"`window` \(--window\)"):
        InspectH5Config(window=0)


def test_cli_prints_tree_table_findings_and_summary(h5: Hdf5Factory, app: typer.Typer, runner: CliRunner) -> None:
    path = h5.robomimic(lengths=(12, 15, 10, 11, 13, 9, 9, 9, 9, 9, 9))
    result = runner.invoke(app, ["inspect-h5", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "agentview_rgb  (12, 8, 8, 3)  uint8" in out
    assert "... 10 more groups (demo_1 .. demo_10)" in out
    assert "open the top drawer of the cabinet" in out
    assert "upside_down_images" in out
    assert out.rstrip().endswith("1 file, 11 episodes, 115 frames: 0 errors, 0 warnings, 1 info")
    assert "Sampled camera frames" not in out

    sampled = runner.invoke(app, ["inspect-h5", str(path), "--no-tree", "--sample-images", "2"], env={"COLUMNS": "200"})
    assert "agentview_rgb  (12, 8, 8, 3)" not in sampled.stdout
    [row] = [line for line in sampled.stdout.splitlines() if line.startswith("\u2502") and "obs/agentview_rgb" in line]
    assert row.split("\u2502")[3].strip() == "22"  # 2 frames from each of 11 episodes


def test_cli_json_strict_and_flags(h5: Hdf5Factory, app: typer.Typer, runner: CliRunner) -> None:
    bad = h5.robomimic("bad.hdf5", mutate=_set("data/demo_0/actions", 0, 0, np.nan))
    args = ["inspect-h5", str(bad), "--json", "--no-tree", "--window", "5", "--set", "chunk=10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["config"] == {"window": 5, "chunk": 10, "sample_images": 0, "strict": False, "tree": False}
    assert {(f["code"], f["episode"]) for f in data["findings"]} >= {("nonfinite", "demo_0"), ("too_short", "demo_2")}

    strict = runner.invoke(app, [*args, "--strict"])
    assert strict.exit_code == 1
    assert json.loads(strict.stdout)["summary"]["errors"] == 1
    log_line, error_line = strict.stderr.strip().splitlines()
    assert log_line.endswith("INFO vlacl.data.inspect_h5: inspected HDF5 files: 1 (1 errors, 2 warnings)")
    assert error_line == "error: 1 finding with severity error (--strict): see the report on stdout"

    good = h5.robomimic("good.hdf5")
    assert runner.invoke(app, ["inspect-h5", str(good), "--strict", "--json"]).exit_code == 0


def test_cli_config_file(h5: Hdf5Factory, app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "inspect.yaml"
    config.write_text("window: 20\nchunk: 1\n")
    result = runner.invoke(app, ["inspect-h5", str(h5.robomimic()), "--config", str(config), "--json"])
    findings = json.loads(result.stdout)["findings"]
    assert sum(f["code"] == "too_short" for f in findings) == 3


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["missing.hdf5"], 1, "error: missing.hdf5 does not exist: check the path"),
        (["--sample-images", "-1", "x.hdf5"], 2, "error: invalid config value `sample_images` (--sample-images)"),
        (["--set", "windw=3", "x.hdf5"], 2, "did you mean `window`?"),
    ],
)
def test_cli_errors_are_one_line(app: typer.Typer, runner: CliRunner, args: list[str], code: int, message: str) -> None:
    result = runner.invoke(app, ["inspect-h5", *args])
    assert result.exit_code == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_cli_damaged_file_writes_nothing_to_stdout(h5: Hdf5Factory, app: typer.Typer, runner: CliRunner) -> None:
    path = truncate(h5.robomimic())
    result = runner.invoke(app, ["inspect-h5", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {path} is not an HDF5 file (or is truncated)")
    assert "Traceback" not in result.stderr


def test_cli_help_shows_defaults(app: typer.Typer, runner: CliRunner) -> None:
    result = runner.invoke(app, ["inspect-h5", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    flat = " ".join(result.stdout.replace("\u2502", " ").split())
    for text in ("--window", "--chunk", "--sample-images", "--strict", "--no-tree", "(default: 8)", "--json"):
        assert text in flat, text


def test_findings_sort_file_level_first(h5: Hdf5Factory) -> None:
    report = _inspect(h5.robomimic(lengths=(3, 12, 2)))
    keys = [(f.episode, f.code) for f in report.findings]
    assert keys == [(None, "upside_down_images"), ("demo_0", "too_short"), ("demo_2", "too_short")]
    assert all(isinstance(f, Finding) for f in report.findings)


def test_links_neither_loop_nor_break_the_walk(h5: Hdf5Factory) -> None:
    def links(f: h5py.File) -> None:
        f["data/demo_0/obs/loop"] = f["data/demo_0"]  # a hard-link cycle
        f["data/demo_0/obs/soft"] = h5py.SoftLink("/nowhere")
        f["data/demo_0/obs/external"] = h5py.ExternalLink("missing.h5", "/x")

    path = h5.robomimic(lengths=(12, 12), mutate=links)
    report = _inspect(path)
    paths = [node.path for node in report.files[0].tree]
    assert "/data/demo_0/obs/loop" in paths
    assert not any(p.startswith("/data/demo_0/obs/loop/") for p in paths)
    assert "/data/demo_0/obs/soft" not in paths
    assert [row.length for row in report.files[0].episodes] == [12, 12]
    assert not report.has_errors
