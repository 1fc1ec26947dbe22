"""Per-episode results: reading eval_results artifacts and bootstrap confidence intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import EvalResultsFactory
from vlacl.artifacts.names import MATRIX_CSV_NAME, RESULTS_NAME
from vlacl.config import ClMetricsConfig
from vlacl.errors import ArtifactError, ConfigError, InputFormatError
from vlacl.metrics import bootstrap
from vlacl.metrics.bootstrap import resample
from vlacl.metrics.matrix import EpisodeCounts
from vlacl.metrics.report import compute_run_metrics, load_run

TASKS = ["a", "b"]
STAGES = ["init", "a", "b"]


def cells(n: int) -> dict[tuple[str, str], tuple[int, int]]:
    """A 2-task run with n episodes per cell; rates: init 0/0.1, a 0.8/0.2, b 0.6/0.9."""
    rates = {
        ("init", "a"): 0.0,
        ("init", "b"): 0.1,
        ("a", "a"): 0.8,
        ("a", "b"): 0.2,
        ("b", "a"): 0.6,
        ("b", "b"): 0.9,
    }
    return {key: (round(rate * n), n) for key, rate in rates.items()}


def test_eval_results_artifact_gives_matrix_with_counts(make_eval_results: EvalResultsFactory) -> None:
    path = make_eval_results("ev", cells(20), STAGES, TASKS)
    run = load_run(str(path))
    assert run.name == "ev"
    assert run.matrix.stages == ("a", "b")
    assert run.matrix.counts is not None
    assert run.matrix.counts.total == 6 * 20
    np.testing.assert_array_equal(run.matrix.counts.successes, [[16, 4], [12, 18]])
    assert run.matrix.values[1, 0] == pytest.approx(0.6)


def test_intervals_are_seeded_and_bracket_the_estimate(make_eval_results: EvalResultsFactory) -> None:
    run = load_run(str(make_eval_results("ev", cells(20), STAGES, TASKS)))
    first = compute_run_metrics(run, ClMetricsConfig(n_bootstrap=500, seed=1))
    again = compute_run_metrics(run, ClMetricsConfig(n_bootstrap=500, seed=1))
    other = compute_run_metrics(run, ClMetricsConfig(n_bootstrap=500, seed=2))
    assert first.metrics == again.metrics
    assert any(first.metrics[k].ci != other.metrics[k].ci for k in first.metrics)
    for key, metric in first.metrics.items():
        assert metric.value is not None, key
        assert metric.ci is not None, key
        low, high = metric.ci
        assert low <= metric.value <= high, key
        assert low < high, key


def test_intervals_shrink_with_more_episodes(make_eval_results: EvalResultsFactory) -> None:
    small = load_run(str(make_eval_results("small", cells(10), STAGES, TASKS)))
    large = load_run(str(make_eval_results("large", cells(1000), STAGES, TASKS)))
    cfg = ClMetricsConfig(n_bootstrap=400)
    for key in ("asr", "bwt", "fwt"):
        s, lg = compute_run_metrics(small, cfg).metrics[key], compute_run_metrics(large, cfg).metrics[key]
        assert s.ci is not None
        assert lg.ci is not None
        assert (lg.ci[1] - lg.ci[0]) < 0.3 * (s.ci[1] - s.ci[0]), key


def test_interval_width_matches_the_binomial_standard_error(make_eval_results: EvalResultsFactory) -> None:
    # One task, 400 episodes, 200 successes: the 95% interval of ASR is 0.5 +- 1.96 * 0.025.
    path = make_eval_results("one", {("a", "a"): (200, 400)}, ["a"], ["a"])
    ci = compute_run_metrics(load_run(str(path)), ClMetricsConfig(n_bootstrap=4000)).metrics["asr"].ci
    assert ci is not None
    assert ci[0] == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert ci[1] == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_all_successes_give_a_zero_width_interval(make_eval_results: EvalResultsFactory) -> None:
    path = make_eval_results("perfect", {("a", "a"): (30, 30)}, ["a"], ["a"])
    metric = compute_run_metrics(load_run(str(path)), ClMetricsConfig()).metrics["asr"]
    assert metric.value == 1.0
    assert metric.ci == (1.0, 1.0)


def test_binomial_draw_matches_resampling_episode_rows() -> None:
    rng = np.random.default_rng(0)
    outcomes = np.array([1] * 7 + [0] * 13)  # one cell: 7 of 20 episodes succeeded
    explicit = rng.choice(outcomes, size=(20000, outcomes.size), replace=True).mean(axis=1)
    counts = EpisodeCounts(successes=np.array([[7]]), episodes=np.array([[20]]))
    drawn, _ = resample(counts, 20000, np.random.default_rng(1))
    assert drawn.shape == (20000, 1, 1)
    assert drawn.mean() == pytest.approx(explicit.mean(), abs=0.005)
    assert drawn.std() == pytest.approx(explicit.std(), abs=0.005)
    # Binomial(20, 0.35): P(X <= 2) = 0.012 < 0.025 < P(X <= 3) = 0.044 and P(X <= 10) = 0.947 <
    # 0.975 < P(X <= 11) = 0.980, so both samples must give exactly 3/20 and 11/20.
    quantiles = [0.025, 0.975]
    assert np.quantile(drawn, quantiles, method="inverted_cdf").tolist() == [0.15, 0.55]
    assert np.quantile(explicit, quantiles, method="inverted_cdf").tolist() == [0.15, 0.55]


def test_bootstrap_off_gives_no_intervals(make_eval_results: EvalResultsFactory) -> None:
    run = load_run(str(make_eval_results("ev", cells(20), STAGES, TASKS)))
    result = compute_run_metrics(run, ClMetricsConfig(n_bootstrap=0))
    assert all(m.ci is None for m in result.metrics.values())
    assert result.metrics["asr"].value == pytest.approx(0.75)


def test_matrix_and_episodes_that_disagree_are_refused(make_eval_results: EvalResultsFactory) -> None:
    path = make_eval_results("ev", cells(20), STAGES, TASKS)
    matrix = path / MATRIX_CSV_NAME
    matrix.chmod(0o644)
    matrix.write_text(matrix.read_text().replace("0.6", "0.65"))
    with pytest.raises(InputFormatError, match=r"disagree at stage 'b', task 'a' \(0.65 vs 0.6"):
        load_run(str(path))


def test_episodes_without_required_column_are_refused(make_eval_results: EvalResultsFactory) -> None:
    path = make_eval_results("ev", cells(4), STAGES, TASKS)
    frame = pd.read_parquet(path / RESULTS_NAME).drop(columns=["success"])
    frame.to_parquet(path / RESULTS_NAME, index=False)
    with pytest.raises(InputFormatError, match="lacks column"):
        load_run(str(path))


def test_non_boolean_success_is_refused(make_eval_results: EvalResultsFactory) -> None:
    path = make_eval_results("ev", cells(4), STAGES, TASKS)
    frame = pd.read_parquet(path / RESULTS_NAME)
    frame["success"] = frame["success"].astype(float) * 0.5
    frame.to_parquet(path / RESULTS_NAME, index=False)
    with pytest.raises(InputFormatError, match=r"success holds 0\.5"):
        load_run(str(path))


def test_a_directory_of_another_kind_is_refused(tmp_path: Path, make_eval_results: EvalResultsFactory) -> None:
    path = make_eval_results("ev", cells(4), STAGES, TASKS)
    manifest = json.loads((path / "vlacl_manifest.json").read_text())
    manifest["kind"] = "ds_stats"
    (path / "vlacl_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"is a ds_stats artifact .*needs an eval_results artifact"):
        load_run(str(path))
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match="vlacl eval-suite"):
        load_run(str(tmp_path / "half"))


def test_chunked_replicates_give_the_same_intervals(
    make_eval_results: EvalResultsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = load_run(str(make_eval_results("ev", cells(200), STAGES, TASKS)))
    whole = compute_run_metrics(run, ClMetricsConfig(n_bootstrap=3000))
    monkeypatch.setattr(bootstrap, "CHUNK_CELLS", 60)  # 10 replicates of 6 cells per chunk
    chunked = compute_run_metrics(run, ClMetricsConfig(n_bootstrap=3000))
    assert chunked.metrics == whole.metrics
    assert all(m.ci is not None for m in whole.metrics.values())


def test_bootstrap_count_is_capped() -> None:
    with pytest.raises(ConfigError, match=r"`n_bootstrap` \(--bootstrap\): must be in \[0, 100000\]"):
        ClMetricsConfig(n_bootstrap=100_001)


def test_eval_results_without_episodes_explains_the_missing_intervals(
    make_eval_results: EvalResultsFactory,
) -> None:
    path = make_eval_results("ev", cells(4), STAGES, TASKS)
    manifest_path = path / "vlacl_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["outputs"][RESULTS_NAME]
    manifest_path.write_text(json.dumps(manifest))
    (path / RESULTS_NAME).unlink()
    result = compute_run_metrics(load_run(str(path)), ClMetricsConfig())
    assert result.matrix.counts is None
    assert "no confidence intervals: the eval_results artifact has no per-episode results.parquet" in result.notes


def test_corrupt_episode_data_is_an_input_error(make_eval_results: EvalResultsFactory) -> None:
    path = make_eval_results("ev", cells(50), STAGES, TASKS)
    results = path / RESULTS_NAME
    data = bytearray(results.read_bytes())
    data[8:400] = bytes(392)  # zero the first data pages, keep the footer with the schema
    results.write_bytes(bytes(data))
    with pytest.raises(InputFormatError, match="has unreadable data"):
        load_run(str(path))


def test_a_non_utf8_matrix_in_an_artifact_is_an_input_error(make_eval_results: EvalResultsFactory) -> None:
    path = make_eval_results("ev", cells(4), STAGES, TASKS)
    (path / MATRIX_CSV_NAME).write_bytes(b"\xff\xfe\x00stage")
    with pytest.raises(InputFormatError, match="is not UTF-8 text"):
        load_run(str(path))
