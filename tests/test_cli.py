"""The CLI: global options, the exception boundary, cl-metrics end to end, and its contract with core."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from tests.conftest import EvalResultsFactory
from tests.test_cl_metrics import FULL, FULL_EXPECTED
from vlacl import __version__
from vlacl.artifacts import open_artifact, verify_outputs
from vlacl.cli import app
from vlacl.config import ClMetricsConfig
from vlacl.metrics import report
from vlacl.metrics.matrix import parse_matrix_csv
from vlacl.metrics.plots import heatmap_figure

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def full_csv(tmp_path: Path) -> Path:
    path = tmp_path / "full.csv"
    path.write_text(FULL)
    return path


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"vlacl {__version__}"


def test_help_lists_commands_and_examples(runner: CliRunner) -> None:
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    assert "cl-metrics" in top.stdout
    sub = runner.invoke(app, ["cl-metrics", "--help"])
    assert sub.exit_code == 0
    flat = " ".join(sub.stdout.replace("\u2502", " ").split())  # undo rich's box drawing and wrapping
    for text in ("Example:", "vlacl cl-metrics", "--bootstrap", "--set", "--config", "(default: 1000)"):
        assert text in flat, text


def test_importing_the_cli_leaves_heavy_libraries_unimported() -> None:
    code = (
        "import sys, vlacl.cli; "
        "print(','.join(m for m in ('torch', 'transformers', 'peft', 'accelerate', 'pandas', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_python_dash_m_runs_the_same_app() -> None:
    out = subprocess.run([sys.executable, "-m", "vlacl", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"vlacl {__version__}"


def test_cl_metrics_writes_the_artifact(runner: CliRunner, full_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics"
    result = runner.invoke(app, ["cl-metrics", str(full_csv), "--out", str(out), "--bootstrap", "0"])
    assert result.exit_code == 0, result.stderr
    assert "ASR" in result.stdout
    assert "0.733" in result.stdout
    assert "bootstrap intervals" not in result.stdout
    assert f"wrote cl_metrics artifact {out}" in result.stderr
    artifact = open_artifact(out, "cl_metrics", verify=True)
    assert sorted(artifact.manifest.outputs) == ["config.yaml", "matrix.csv", "matrix.png", "metrics.json"]
    assert (out / "matrix.csv").read_bytes() == full_csv.read_bytes()
    assert artifact.manifest.command == ("vlacl", "cl-metrics", str(full_csv), "--out", str(out), "--bootstrap", "0")
    assert [i.role for i in artifact.manifest.inputs] == ["run:full"]
    assert artifact.manifest.inputs[0].kind == "file"
    metrics = json.loads((out / "metrics.json").read_text())
    (run,) = metrics["runs"]
    assert run["name"] == "full"
    assert run["num_tasks"] == 3
    for key, expected in FULL_EXPECTED.items():
        assert run[key] == pytest.approx(expected, abs=1e-12), key
    assert run["matrix_file"] == "matrix.csv"
    assert metrics["n_bootstrap"] == 0
    png = imread(out / "matrix.png")
    assert png.ndim == 3
    assert png.shape[0] > 200
    assert png.shape[1] > 200
    assert verify_outputs(artifact) == []


def test_json_output_is_metrics_json(runner: CliRunner, full_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    result = runner.invoke(app, ["cl-metrics", str(full_csv), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == json.loads((out / "metrics.json").read_text())


def test_without_out_nothing_is_written(runner: CliRunner, full_csv: Path) -> None:
    before = sorted(full_csv.parent.iterdir())
    result = runner.invoke(app, ["cl-metrics", str(full_csv), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["runs"][0]["bwt"] == pytest.approx(-0.25)
    assert sorted(full_csv.parent.iterdir()) == before


def test_several_runs_compare_side_by_side(
    runner: CliRunner, full_csv: Path, tmp_path: Path, make_eval_results: EvalResultsFactory
) -> None:
    ev = make_eval_results("ev", {("a", "a"): (8, 10), ("a", "b"): (1, 10)}, ["a"], ["a", "b"])
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["cl-metrics", f"base={full_csv}", f"replay={ev}", "--out", str(out), "--no-plot"])
    assert result.exit_code == 0, result.stderr
    assert "Continual-learning metrics with 95% bootstrap intervals" in result.stdout
    header = next(line for line in result.stdout.splitlines() if "base" in line)
    assert header.index("base") < header.index("replay")
    artifact = open_artifact(out, "cl_metrics")
    assert sorted(artifact.manifest.outputs) == [
        "config.yaml",
        "matrices/base.csv",
        "matrices/replay.csv",
        "metrics.json",
    ]
    assert [(i.role, i.kind) for i in artifact.manifest.inputs] == [
        ("run:base", "file"),
        ("run:replay", "eval_results"),
    ]
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["base", "replay"]
    assert runs[1]["asr"] == pytest.approx(0.8)
    assert runs[1]["num_episodes"] == 20
    assert runs[1]["num_tasks"] == 1
    assert runs[1]["num_evaluated_tasks"] == 2
    assert runs[1]["bwt"] is None
    assert "needs at least 2 training stages" in runs[1]["unavailable"]["bwt"]
    assert parse_matrix_csv((out / "matrices/replay.csv").read_text()).values[0, 1] == pytest.approx(0.1)


def test_duplicate_run_names_are_refused(runner: CliRunner, full_csv: Path) -> None:
    result = runner.invoke(app, ["cl-metrics", str(full_csv), str(full_csv)])
    assert result.exit_code == 1
    assert "two runs are named 'full'" in result.stderr
    assert "NAME=PATH" in result.stderr


def test_bad_input_is_one_line_with_exit_1_and_nothing_written(runner: CliRunner, tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text(FULL)
    bad = tmp_path / "bad.csv"
    bad.write_text("stage,a,b\na,0.5,oops\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["cl-metrics", str(good), str(bad), "--out", str(out)])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "stage 'a', task 'b': 'oops' is not a number" in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "good.csv"]


def test_config_errors_exit_2_with_a_hint(runner: CliRunner, full_csv: Path) -> None:
    result = runner.invoke(app, ["cl-metrics", str(full_csv), "--set", "n_bootstrp=10"])
    assert result.exit_code == 2
    assert result.stderr == "error: unknown config key `n_bootstrp` in --set: did you mean `n_bootstrap`?\n"
    result = runner.invoke(app, ["cl-metrics", str(full_csv), "--confidence", "1.5"])
    assert result.exit_code == 2
    assert "`confidence` (--confidence): must be in (0, 1), got 1.5" in result.stderr


def test_existing_out_needs_overwrite(runner: CliRunner, full_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert runner.invoke(app, ["cl-metrics", str(full_csv), "--out", str(out)]).exit_code == 0
    first = (out / "vlacl_manifest.json").read_bytes()
    again = runner.invoke(app, ["cl-metrics", str(full_csv), "--out", str(out)])
    assert again.exit_code == 2
    assert "pass --overwrite" in again.stderr
    assert (out / "vlacl_manifest.json").read_bytes() == first
    replaced = runner.invoke(app, ["cl-metrics", str(full_csv), "--out", str(out), "--overwrite", "--seed", "4"])
    assert replaced.exit_code == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 4


def test_debug_env_shows_the_traceback(full_csv: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("stage,a\na,2\n")
    env = {**os.environ, "VLACL_DEBUG": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "vlacl", "cl-metrics", str(bad)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    env["VLACL_DEBUG"] = "0"
    out = subprocess.run(
        [sys.executable, "-m", "vlacl", "cl-metrics", str(bad)], capture_output=True, text=True, env=env
    )
    assert "Traceback" not in out.stderr


def test_cli_resolves_config_layers_and_calls_core_once(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake(specs: list[str], cfg: ClMetricsConfig, **kwargs: Any) -> report.ClMetricsResult:
        calls.append((specs, cfg, kwargs))
        return report.ClMetricsResult(runs=(), config=cfg)

    monkeypatch.setattr(report, "run_cl_metrics", fake)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("n_bootstrap: 5\nseed: 1\nconfidence: 0.8\nplot: true\n")
    argv = ["cl-metrics", "a.csv", "x=b.csv", "-c", str(cfg_file), "--set", "n_bootstrap=6", "--set", "confidence=0.9"]
    argv += ["--bootstrap", "7", "--no-plot", "--out", str(tmp_path / "o"), "--overwrite"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.stderr
    ((specs, cfg, kwargs),) = calls
    assert specs == ["a.csv", "x=b.csv"]
    assert cfg == ClMetricsConfig(n_bootstrap=7, confidence=0.9, seed=1, plot=False)
    assert kwargs["out"] == tmp_path / "o"
    assert kwargs["overwrite"] is True
    assert kwargs["command"] == ["vlacl", *argv]


def test_quiet_silences_info_logs(runner: CliRunner, full_csv: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["-q", "cl-metrics", str(full_csv), "--out", str(tmp_path / "q"), "--no-plot"])
    assert result.exit_code == 0
    assert "wrote cl_metrics artifact" not in result.stderr


def test_heatmap_shows_every_cell_value() -> None:
    matrix = parse_matrix_csv("stage,a,b\ninit,0.0,0.25\na,0.9,\nb,0.5,0.75\n")
    fig = heatmap_figure([("run", matrix, "ASR 0.625")])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["0.00", "0.25", "0.90", "-", "0.50", "0.75"]
    assert fig.axes[0].get_title() == "run\nASR 0.625"
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["init", "a", "b"]


def test_the_example_matrices_compare(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    argv = ["cl-metrics", "examples/matrices/cw4-seq.csv", "examples/matrices/cw4-er.csv"]
    for _ in range(2):  # --overwrite: running it twice works
        result = runner.invoke(app, [*argv, "--out", str(tmp_path / "cmp"), "--overwrite"])
        assert result.exit_code == 0, result.stderr
    artifact = open_artifact(tmp_path / "cmp", "cl_metrics", verify=True)
    assert sorted(artifact.manifest.outputs) == [
        "config.yaml",
        "matrices/cw4-er.csv",
        "matrices/cw4-seq.csv",
        "matrix.png",
        "metrics.json",
    ]
    runs = {r["name"]: r for r in json.loads((tmp_path / "cmp" / "metrics.json").read_text())["runs"]}
    assert runs["cw4-er"]["asr"] > runs["cw4-seq"]["asr"]
    assert runs["cw4-seq"]["bwt"] == pytest.approx(-0.7)
    assert all(runs[name][key] is not None for name in runs for key in ("asr", "bwt", "fwt", "nbt", "auc"))


def test_verbose_shows_debug_lines(runner: CliRunner, full_csv: Path) -> None:
    result = runner.invoke(app, ["-v", "cl-metrics", str(full_csv)])
    assert result.exit_code == 0
    assert re.search(
        r"^\S+ DEBUG vlacl\.metrics\.report: run full from .*: 3 stages, 3 tasks, no episodes$", result.stderr, re.M
    )


def test_sigterm_removes_the_partial_artifact(tmp_path: Path, full_csv: Path) -> None:
    out = tmp_path / "out"
    ready = tmp_path / "plotting"
    script = (
        "import pathlib, sys, time\n"
        "import vlacl.metrics.plots as plots\n"
        "def slow(panels, path):\n"
        f"    pathlib.Path({str(ready)!r}).touch()\n"
        "    time.sleep(60)\n"
        "plots.plot_matrices = slow\n"
        "from vlacl.cli import main\n"
        f"main(['cl-metrics', {str(full_csv)!r}, '--out', {str(out)!r}])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1] == "error: terminated by SIGTERM; nothing was written to --out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.csv", "plotting"]


def test_heatmap_of_a_large_matrix_stays_small() -> None:
    t = 120
    tasks = [f"task-{i}" for i in range(t)]
    rows = ["stage," + ",".join(tasks)] + [f"{task}," + ",".join(["0.5"] * t) for task in tasks]
    fig = heatmap_figure([("big", parse_matrix_csv("\n".join(rows)), "")])
    width, height = fig.get_size_inches()
    assert width <= 16 + 3.5
    assert height <= 16 + 2
    assert len(fig.axes[0].texts) == 0


def test_task_names_with_dollar_signs_plot_as_text(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("stage,$\\frac$,b_{1}\n$\\frac$,0.5,0.1\nb_{1},0.4,0.9\n")
    result = runner.invoke(app, ["cl-metrics", str(path), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.stderr
    fig = heatmap_figure([("odd", parse_matrix_csv(path.read_text()), "")])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["$\\frac$", "b_{1}"]
    assert imread(tmp_path / "m" / "matrix.png").shape[0] > 100


def test_confidence_level_is_printed_exactly(runner: CliRunner, make_eval_results: EvalResultsFactory) -> None:
    ev = make_eval_results("ev", {("a", "a"): (8, 10)}, ["a"], ["a"])
    result = runner.invoke(app, ["cl-metrics", str(ev), "--confidence", "0.995", "--no-plot"])
    assert result.exit_code == 0, result.stderr
    assert "Continual-learning metrics with 99.5% bootstrap intervals" in result.stdout
