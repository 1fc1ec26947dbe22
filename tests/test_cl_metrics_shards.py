"""cl-metrics over the shards of one sharded eval-suite run: joined into one run, or refused clearly."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from vlacl.artifacts import ArtifactWriter, open_artifact
from vlacl.artifacts.names import MATRIX_CSV_NAME, RESULTS_NAME
from vlacl.cli import app
from vlacl.config import ClMetricsConfig
from vlacl.errors import InputFormatError
from vlacl.evaluation.results import matrix_from_episodes
from vlacl.metrics.matrix import read_matrix
from vlacl.metrics.report import ClMetricsResult, run_cl_metrics

STAGES = ["init", "a", "b", "c"]
TASKS = ["a", "b", "c"]
EVAL_ID = "3f9c2b7d" + "0" * 56
CFG = ClMetricsConfig(n_bootstrap=200, plot=False)


def all_episodes() -> pd.DataFrame:
    """10 episodes per (stage, task) cell, success drawn with a per-cell rate."""
    rng = np.random.default_rng(7)
    rows = []
    for stage in STAGES:
        for task in TASKS:
            rate = rng.uniform(0.1, 0.9)
            for seed in range(10):
                rows.append(
                    {
                        "checkpoint": f"ckpt-{stage}",
                        "stage": stage,
                        "task": task,
                        "seed": seed,
                        "success": bool(rng.uniform() < rate),
                        "return": 0.0,
                        "steps": 100,
                        "seconds": 0.5,
                    }
                )
    frame: pd.DataFrame = pd.DataFrame(rows)
    return frame


def write_eval(out: Path, episodes: pd.DataFrame, **details: Any) -> Path:
    """An eval_results artifact of ``episodes``: results.parquet and the matrix of its cells (others empty)."""
    matrix = matrix_from_episodes(episodes, STAGES, TASKS)
    with ArtifactWriter(out, "eval_results", command=["vlacl", "eval-suite"], config_yaml=None, seed=0) as writer:
        episodes.to_parquet(writer.path / RESULTS_NAME, index=False)
        (writer.path / MATRIX_CSV_NAME).write_text(matrix.to_csv(), encoding="utf-8")
        writer.details.update(details)
    return out


def shard_details(index: int, count: int, eval_id: str = EVAL_ID, **extra: Any) -> dict[str, Any]:
    return {
        "eval_id": eval_id,
        "shard": {"index": index, "count": count},
        "stages": STAGES,
        "tasks": TASKS,
        "suite": "metaworld:cw10",
        **extra,
    }


def write_shards(root: Path, count: int = 3, prefix: str = "ev_", eval_id: str = EVAL_ID) -> list[Path]:
    """The episodes split over ``count`` shards by row (every shard holds a part of most cells)."""
    episodes = all_episodes()
    return [
        write_eval(
            root / f"{prefix}{i}",
            episodes.iloc[i::count].reset_index(drop=True),
            **shard_details(i, count, eval_id),
        )
        for i in range(count)
    ]


def metrics_of(result: ClMetricsResult) -> dict[str, Any]:
    (run,) = result.runs
    return {k: (m.value, m.ci, m.reason) for k, m in run.metrics.items()}


def test_joined_shards_give_the_metrics_of_the_unsharded_artifact(tmp_path: Path) -> None:
    whole = write_eval(tmp_path / "whole", all_episodes(), **shard_details(0, 1))
    shards = write_shards(tmp_path)
    expected = run_cl_metrics([str(whole)], CFG)
    joined = run_cl_metrics([str(p) for p in (shards[2], shards[0], shards[1])], CFG)  # any order
    assert metrics_of(joined) == metrics_of(expected)
    assert all(v is not None for v, _, _ in metrics_of(joined).values())
    (run,) = joined.runs
    assert run.name == "ev"  # the shards' common directory-name prefix "ev_", "_" stripped
    assert run.source == ", ".join(str(p) for p in shards)  # in shard order
    ref = expected.runs[0].matrix
    np.testing.assert_array_equal(run.matrix.values, ref.values)
    assert ref.init is not None
    assert run.matrix.init is not None
    np.testing.assert_array_equal(run.matrix.init, ref.init)
    assert run.matrix.counts is not None
    assert ref.counts is not None
    np.testing.assert_array_equal(run.matrix.counts.successes, ref.counts.successes)
    assert run.matrix.counts.total == 120
    # each shard alone is only a part: its matrix has the shard's episodes only
    part = read_matrix(shards[0] / MATRIX_CSV_NAME)
    assert not np.array_equal(part.values, ref.values)


def test_names_of_joined_shards(tmp_path: Path) -> None:
    shards = [str(p) for p in write_shards(tmp_path)]
    first_named = run_cl_metrics([f"cw10={shards[0]}", shards[1], shards[2]], CFG)
    assert [r.name for r in first_named.runs] == ["cw10"]
    all_named = run_cl_metrics([f"cw10={s}" for s in shards], CFG)
    assert [r.name for r in all_named.runs] == ["cw10"]
    with pytest.raises(InputFormatError, match=r"named differently \(x, y\)"):
        run_cl_metrics([f"x={shards[0]}", f"y={shards[1]}", shards[2]], CFG)
    other = write_shards(tmp_path / "other", count=2, prefix="", eval_id="9" * 64)  # dirs "0", "1": no prefix
    assert [r.name for r in run_cl_metrics([str(p) for p in other], CFG).runs] == ["99999999"]


def test_a_missing_shard_is_refused_naming_it(tmp_path: Path) -> None:
    shards = [str(p) for p in write_shards(tmp_path, count=4)]
    with pytest.raises(InputFormatError) as err:
        run_cl_metrics([shards[0], shards[2]], CFG)
    message = str(err.value)
    assert "shard(s) 1/4, 3/4 missing" in message
    assert "--shard i/4" in message
    with pytest.raises(InputFormatError, match=r"shard\(s\) 1/4, 2/4, 3/4 missing"):
        run_cl_metrics([shards[0]], CFG)


def test_a_shard_given_twice_is_refused(tmp_path: Path) -> None:
    shards = [str(p) for p in write_shards(tmp_path)]
    with pytest.raises(InputFormatError) as err:
        run_cl_metrics([*shards, shards[1]], CFG)
    assert f"shard 1/3 given more than once ({shards[1]}, {shards[1]})" in str(err.value)
    assert "missing" not in str(err.value)


def test_shards_of_different_counts_are_refused(tmp_path: Path) -> None:
    three = [str(p) for p in write_shards(tmp_path / "three")]
    two = [str(p) for p in write_shards(tmp_path / "two", count=2)]
    with pytest.raises(InputFormatError, match=r"disagree on the shard count: .* is shard 0/3, .* is shard 0/2"):
        run_cl_metrics([three[0], two[0], three[1], three[2], two[1]], CFG)


def test_damaged_shard_details_are_refused(tmp_path: Path) -> None:
    episodes = all_episodes()
    bad = write_eval(tmp_path / "bad", episodes, **shard_details(3, 3))
    with pytest.raises(InputFormatError, match=r"shard details are damaged .*index 3 of count 3"):
        run_cl_metrics([str(bad)], CFG)
    no_stages = write_eval(tmp_path / "nostages", episodes, **{**shard_details(0, 2), "stages": []})
    with pytest.raises(InputFormatError, match="stages is"):
        run_cl_metrics([str(no_stages)], CFG)


def test_an_offline_evaluation_is_refused(tmp_path: Path) -> None:
    offline = write_eval(tmp_path / "offline", all_episodes(), suite="offline")
    with pytest.raises(InputFormatError) as err:
        run_cl_metrics([str(offline)], CFG)
    assert str(err.value) == (
        f"{offline} is an offline evaluation (action errors, no success rates): cl-metrics needs a rollout suite "
        "(metaworld:..., libero:...)"
    )
    shard = write_eval(tmp_path / "offline_s0", all_episodes(), **shard_details(0, 2, suite="offline"))
    with pytest.raises(InputFormatError, match="is an offline evaluation"):
        run_cl_metrics([str(shard)], CFG)


def test_an_artifact_without_shard_details_is_read_as_before(tmp_path: Path) -> None:
    plain = write_eval(tmp_path / "plain", all_episodes())
    counted = write_eval(tmp_path / "counted", all_episodes(), **shard_details(0, 1))
    a, b = run_cl_metrics([str(plain)], CFG), run_cl_metrics([str(counted)], CFG)
    assert metrics_of(a) == metrics_of(b)
    assert [r.name for r in b.runs] == ["counted"]


def _inputs(out: Path) -> Sequence[tuple[str, str, str]]:
    manifest = open_artifact(out, "cl_metrics", verify=True).manifest
    return [(i.role, i.kind, Path(i.path).name) for i in manifest.inputs]


def test_cli_joins_the_shards_given_as_runs(runner: CliRunner, tmp_path: Path) -> None:
    shards = write_shards(tmp_path)
    matrix_csv = tmp_path / "base.csv"
    matrix_csv.write_text("stage,a,b\na,0.8,0.1\nb,0.6,0.9\n")
    out = tmp_path / "metrics"
    argv = ["cl-metrics", *map(str, shards), f"base={matrix_csv}", "--out", str(out), "--bootstrap", "50", "--no-plot"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.stderr
    assert _inputs(out) == [
        ("run:ev:shard0", "eval_results", "ev_0"),
        ("run:ev:shard1", "eval_results", "ev_1"),
        ("run:ev:shard2", "eval_results", "ev_2"),
        ("run:base", "file", "base.csv"),
    ]
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["ev", "base"]
    assert runs[0]["num_episodes"] == 120
    assert runs[0]["source"] == ", ".join(map(str, shards))
    expected = run_cl_metrics([str(write_eval(tmp_path / "whole", all_episodes()))], CFG).runs[0]
    assert runs[0]["asr"] == pytest.approx(expected.metrics["asr"].value, abs=1e-12)
    written = read_matrix(out / "matrices" / "ev.csv")
    for got, want in zip(written.values.ravel(), expected.matrix.values.ravel(), strict=True):
        assert got == want or (math.isnan(got) and math.isnan(want))


def test_cli_names_the_missing_shard(runner: CliRunner, tmp_path: Path) -> None:
    shards = write_shards(tmp_path)
    result = runner.invoke(app, ["cl-metrics", str(shards[0]), str(shards[2])])
    assert result.exit_code != 0
    assert "shard(s) 1/3 missing" in result.stderr
