"""``vlacl eval-suite`` on a two-task Meta-World stream made through the Typer app.

The chain collect-demos -> ds-stats -> train-task -> eval-suite -> cl-metrics, and the evaluation's
contracts: rows, matrix, eval_info, workers, shards, resume, stats checks, adapter swapping.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import vlacl.sim  # noqa: F401  (sets MuJoCo's GL backend before metaworld imports mujoco)
from vlacl.artifacts.names import EVAL_INFO_NAME, MATRIX_CSV_NAME, RESULTS_NAME
from vlacl.artifacts.reader import lineage, open_artifact
from vlacl.cli.app import app
from vlacl.config.eval_suite import EvalSuiteConfig, parse_shard
from vlacl.errors import ArtifactError, ConfigError, VlaclError
from vlacl.evaluation.policies import PolicyBank, find_checkpoints
from vlacl.evaluation.runner import resume_dir, run_eval_suite, wilson_interval
from vlacl.metrics.matrix import read_matrix

pytest.importorskip("metaworld")

TASKS = ("reach-v3", "button-press-topdown-v3")
KEEP = ["stage", "task", "trial", "seed", "success", "return", "steps"]
"""Columns that do not depend on timing."""


@dataclass(frozen=True)
class Chain:
    root: Path
    data: Path
    stats: Path
    run: Path

    @property
    def checkpoints(self) -> list[Path]:
        return [self.run / "task0", self.run / "task1"]


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.stderr if result.stderr_bytes else "")
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """Demos of two Meta-World tasks, their stats and two chained task checkpoints, all through the CLI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chain")
    data, stats, run = root / "data", root / "stats", root / "run"
    invoke("-q", "collect-demos", "--stream", ",".join(TASKS), "--episodes-per-task", "3", "--out", str(data))
    invoke("-q", "ds-stats", str(data), "--out", str(stats))
    prev: list[str] = []
    for k in range(2):
        out = run / f"task{k}"
        invoke("-q", "train-task", "--dataset", str(data), "--stats", str(stats), "--task", f"#{k}", *prev,
               "--steps", "6", "--batch-size", "8", "--out", str(out))  # fmt: skip
        prev = ["--prev", str(out)]
    yield Chain(root, data, stats, run)
    torch.set_num_threads(threads)


def small(**overrides: Any) -> EvalSuiteConfig:
    values: dict[str, Any] = {"trials": 2, "envs": 2, "max_steps": 12, **overrides}
    return EvalSuiteConfig(**values)


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / RESULTS_NAME)


# Pure functions ---------------------------------------------------------------------------------


def test_wilson_interval_matches_the_closed_form() -> None:
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.39677, abs=1e-5)
    assert hi == pytest.approx(0.89221, abs=1e-5)
    assert wilson_interval(0, 5)[0] == 0.0
    assert wilson_interval(5, 5)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.mark.parametrize("text", ["1/1", "2", "-1/2", "a/b", "0/0"])
def test_a_bad_shard_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="shard"):
        parse_shard(text)


def test_shard_parses() -> None:
    assert parse_shard("3/8") == (3, 8)


# The chain --------------------------------------------------------------------------------------


def test_the_chain_writes_results_a_matrix_and_eval_info(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = invoke("eval-suite", str(chain.run), "--trials", "3", "--envs", "2", "--max-steps", "15",
                    "--out", str(out))  # fmt: skip
    assert "Success rate on metaworld:" in result.stdout
    artifact = open_artifact(out, "eval_results", verify=True)
    details = artifact.manifest.details
    assert details["suite"] == f"metaworld:{','.join(TASKS)}"  # --suite auto: the dataset's stream
    assert details["stages"] == list(TASKS)
    assert details["tasks"] == list(TASKS)
    assert details["shard"] == {"index": 0, "count": 1}
    roles = {i.role: i for i in artifact.manifest.inputs}
    assert roles["checkpoint:0"].sha256 == open_artifact(chain.checkpoints[0]).manifest_sha256
    assert roles["checkpoint:1"].sha256 == open_artifact(chain.checkpoints[1]).manifest_sha256

    episodes = rows(out)
    assert len(episodes) == 2 * 2 * 3  # stages x tasks x trials
    for column in ("checkpoint", "stage", "task", "seed", "success", "return", "steps", "seconds"):
        assert column in episodes.columns
    assert episodes["seed"].tolist() == [0, 1, 2] * 4  # trial t from seed 0 + t, for every cell
    assert (episodes["steps"] <= 15).all()
    assert (episodes.loc[~episodes["success"], "steps"] == 15).all()  # a failed episode uses its budget
    assert (episodes["seconds"] > 0).all()

    matrix = read_matrix(out / MATRIX_CSV_NAME)
    assert matrix.stages == TASKS
    assert matrix.tasks == TASKS
    expected = episodes.groupby(["stage", "task"])["success"].mean()
    for i, stage in enumerate(TASKS):
        for j, task in enumerate(TASKS):
            assert matrix.values[i, j] == pytest.approx(expected[(stage, task)])

    info = json.loads((out / EVAL_INFO_NAME).read_text())
    assert {"per_task", "per_group", "overall"} <= set(info)
    assert info["overall"]["n_episodes"] == 12
    assert info["overall"]["pc_success"] == pytest.approx(100 * episodes["success"].mean())
    assert info["overall"]["eval_s"] > 0
    cell = info["per_task"][0]
    assert (cell["task_group"], cell["task_id"]) == (TASKS[0], TASKS[0])
    k = int(episodes[(episodes.stage == TASKS[0]) & (episodes.task == TASKS[0])]["success"].sum())
    assert cell["metrics"]["n_successes"] == k
    lo, hi = wilson_interval(k, 3)
    assert cell["metrics"]["ci95"] == pytest.approx([100 * lo, 100 * hi])

    metrics = invoke("cl-metrics", str(out), "--out", str(tmp_path / "metrics"))
    assert "plasticity" in metrics.stdout
    nodes = lineage(open_artifact(tmp_path / "metrics", "cl_metrics"))
    assert {n.kind for n in nodes} >= {"eval_results", "task_checkpoint", "ds_stats", "dataset"}
    assert all(n.status == "ok" for n in nodes)  # every artifact of the chain is where it was, unchanged
    second = open_artifact(chain.checkpoints[1], "task_checkpoint", verify=True).manifest
    assert second.details["cl_algorithm"] == "seq"
    assert {i.role for i in second.inputs} >= {"stats", "dataset", "prev"}


def test_rerunning_a_finished_evaluation_runs_nothing(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    first = run_eval_suite(chain.checkpoints, small(), out=out)
    again = run_eval_suite(chain.checkpoints, small(), out=out)
    assert again.already_complete
    assert not first.already_complete
    pd.testing.assert_frame_equal(rows(out)[KEEP], first.episodes[KEEP])
    with pytest.raises(ArtifactError, match="--overwrite"):
        run_eval_suite(chain.checkpoints, small(trials=3), out=out)


def test_last_only_evaluates_the_final_row(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "last"
    report = run_eval_suite(chain.checkpoints, small(last_only=True), out=out)
    assert report.stages == TASKS  # every stage is a row; only the last one is evaluated
    assert set(report.episodes["stage"]) == {TASKS[1]}
    assert len(report.episodes) == 2 * 2
    matrix = read_matrix(out / MATRIX_CSV_NAME)
    assert np.isnan(matrix.values[0]).all()
    result = json.loads(invoke("cl-metrics", str(out), "--json").stdout)["runs"][0]
    assert result["num_tasks"] == 2  # both tasks count as trained
    assert result["asr"] == pytest.approx(report.episodes["success"].mean())
    assert result["plasticity"] is None  # the diagonal's first cell was not evaluated


def test_a_resumed_evaluation_equals_an_uninterrupted_one(chain: Chain, tmp_path: Path) -> None:
    whole = run_eval_suite(chain.checkpoints, small(envs=1), out=tmp_path / "whole")

    class StopError(Exception):
        pass

    calls = []

    def stop_after_three_groups(done: int, total: int, successes: int | None) -> None:
        calls.append(done)
        if len(calls) == 4:  # the first call reports 0 done; then one per finished group
            raise StopError

    out = tmp_path / "resumed"
    with pytest.raises(StopError):
        run_eval_suite(chain.checkpoints, small(envs=1), out=out, progress=stop_after_three_groups)
    assert not out.exists()
    assert len(list((resume_dir(out) / "rows").glob("*.parquet"))) == 3
    resumed = run_eval_suite(chain.checkpoints, small(envs=1), out=out)
    assert resumed.resumed_episodes == 3
    pd.testing.assert_frame_equal(rows(out)[KEEP], rows(tmp_path / "whole")[KEEP])
    assert (out / MATRIX_CSV_NAME).read_text() == (tmp_path / "whole" / MATRIX_CSV_NAME).read_text()
    assert not resume_dir(out).exists()
    assert whole.resumed_episodes == 0


def test_a_partial_evaluation_of_other_settings_is_refused(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "eval"

    def stop(done: int, total: int, successes: int | None) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval_suite(chain.checkpoints, small(), out=out, progress=stop)
    with pytest.raises(ConfigError, match="other settings"):
        run_eval_suite(chain.checkpoints, small(seed=5), out=out)


def test_shards_cover_the_cells_once_and_cl_metrics_joins_them(chain: Chain, tmp_path: Path) -> None:
    whole = run_eval_suite(chain.checkpoints, small(), out=tmp_path / "whole")
    parts = [run_eval_suite(chain.checkpoints, small(shard=f"{i}/3"), out=tmp_path / f"part{i}") for i in range(3)]
    assert sorted(len(p.episodes) for p in parts) == [2, 2, 4]  # 4 cells over 3 shards, 2 trials each
    joined = pd.concat([p.episodes for p in parts]).sort_values(["stage_index", "task_index", "trial"])
    pd.testing.assert_frame_equal(joined.reset_index(drop=True)[KEEP], whole.episodes[KEEP])
    ids = {open_artifact(tmp_path / f"part{i}").manifest.details["eval_id"] for i in range(3)}
    assert len(ids) == 1
    one = invoke("cl-metrics", str(tmp_path / "whole"), "--json")
    three = invoke("cl-metrics", *(str(tmp_path / f"part{i}") for i in range(3)), "--json")
    run_one, run_three = json.loads(one.stdout)["runs"][0], json.loads(three.stdout)["runs"][0]
    assert run_three["num_episodes"] == run_one["num_episodes"] == 8
    for key in ("asr", "bwt", "forgetting", "plasticity", "auc", "ci"):
        assert run_three[key] == run_one[key]


def test_two_workers_give_the_rows_of_one(chain: Chain) -> None:
    one = run_eval_suite(chain.checkpoints, small(envs=1), out=None)
    two = run_eval_suite(chain.checkpoints, small(envs=1, workers=2), out=None)
    pd.testing.assert_frame_equal(two.episodes[KEEP], one.episodes[KEEP])


def test_stats_of_other_data_are_refused(chain: Chain, tmp_path: Path) -> None:
    other = tmp_path / "other-stats"
    invoke("-q", "ds-stats", str(chain.data), "--norm-mode", "min_max", "--out", str(other))
    result = CliRunner().invoke(app, ["eval-suite", str(chain.run), "--stats", str(other), "--trials", "1"])
    assert result.exit_code == 1
    assert "--stats has fingerprint" in result.stderr
    assert "silent 0% success" in result.stderr
    same = run_eval_suite(chain.checkpoints, small(stats=chain.stats, last_only=True, trials=1), out=None)
    assert len(same.episodes) == 2


def test_a_suite_without_the_trained_task_is_refused(chain: Chain) -> None:
    with pytest.raises(ConfigError, match="not a task of --suite"):
        run_eval_suite(chain.checkpoints, small(suite="metaworld:push-v3,reach-v3"), out=None)
    with pytest.raises(ConfigError, match="metaworld:<stream>"):
        run_eval_suite(chain.checkpoints, small(suite="mujoco:reach-v3"), out=None)


def test_adapters_are_swapped_on_one_base_model(chain: Chain) -> None:
    """Swapping checkpoint 1's adapters onto the base that served checkpoint 0 gives checkpoint 1's policy."""
    from vlacl.training.policy_io import load_policy

    refs = find_checkpoints([chain.run])
    bank = PolicyBank(torch.device("cpu"))
    bank.get(refs[0])
    swapped = bank.get(refs[1])
    assert bank.base_loads == 1
    fresh = load_policy(chain.checkpoints[1])
    state = torch.randn(3, 1, swapped.policy.state_dim)
    samples = [{"observation.state": state[i], "instruction": "reach the goal position"} for i in range(3)]
    a = swapped.policy.predict(swapped.policy.collate(samples))
    b = fresh.policy.predict(fresh.policy.collate(samples))
    torch.testing.assert_close(a, b)
    first = load_policy(chain.checkpoints[0])
    c = first.policy.predict(first.policy.collate(samples))
    assert not torch.allclose(a, c)  # the two checkpoints do differ


def test_a_directory_of_checkpoints_is_read_in_task_order(chain: Chain) -> None:
    refs = find_checkpoints([chain.run])
    assert [r.path.name for r in refs] == ["task0", "task1"]
    assert [r.task_index for r in refs] == [0, 1]
    with pytest.raises(ConfigError, match="holds no task checkpoint"):
        find_checkpoints([chain.root])
    with pytest.raises(ArtifactError, match="is a ds_stats artifact"):
        find_checkpoints([chain.stats])
    with pytest.raises(ConfigError, match="given twice"):
        find_checkpoints([chain.checkpoints[0], chain.checkpoints[0]])


def test_offline_suite_scores_held_out_episodes_and_cl_metrics_refuses_it(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "offline"
    invoke("-q", "eval-suite", str(chain.run), "--suite", "offline", "--split", "all", "--out", str(out))
    artifact = open_artifact(out, "eval_results", verify=True)
    assert artifact.manifest.details["suite"] == "offline"
    episodes = rows(out)
    assert set(episodes["task"]) == set(TASKS)
    assert set(episodes["stage"]) == set(TASKS)
    assert len(episodes) == 2 * 2 * 3  # stages x tasks x episodes
    errors = pd.read_csv(out / "error_matrix.csv", index_col="stage")
    for (stage, task), cell in episodes.groupby(["stage", "task"]):
        pooled = float(np.sum(cell["mse"] * cell["values"]) / np.sum(cell["values"]))
        assert errors.loc[str(stage), str(task)] == pytest.approx(pooled)
    refused = CliRunner().invoke(app, ["cl-metrics", str(out)])
    assert refused.exit_code == 1
    assert "offline evaluation" in refused.stderr


def test_a_merged_policy_evaluates_like_its_checkpoint(chain: Chain, tmp_path: Path) -> None:
    from vlacl.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    ckpt, merged = tmp_path / "ckpt", tmp_path / "merged"
    invoke("-q", "train-task", "--dataset", str(chain.data), "--stats", str(chain.stats), "--model", str(model),
           "--steps", "4", "--batch-size", "8", "--out", str(ckpt))  # fmt: skip
    invoke("-q", "merge-lora", str(ckpt), "--out", str(merged))
    from_ckpt = run_eval_suite([ckpt], small(), out=None)
    from_merged = run_eval_suite([merged], small(), out=None)  # suite auto: the datasets of its checkpoint
    same = ["stage", "task", "trial", "seed", "success", "steps"]
    pd.testing.assert_frame_equal(from_merged.episodes[same], from_ckpt.episodes[same])
    np.testing.assert_allclose(from_merged.episodes["return"], from_ckpt.episodes["return"], rtol=1e-5)


def test_checkpoints_out_of_training_order_are_refused(chain: Chain) -> None:
    with pytest.raises(ConfigError, match="training order"):
        find_checkpoints([chain.checkpoints[1], chain.checkpoints[0]])


def test_hidden_siblings_of_a_run_are_not_checkpoints(chain: Chain, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(chain.run, run)
    shutil.copytree(run / "task1", run / ".task1.old-host-1")  # what an interrupted --overwrite leaves
    assert [r.path.name for r in find_checkpoints([run])] == ["task0", "task1"]


def test_videos_need_an_output(chain: Chain) -> None:
    with pytest.raises(ConfigError, match="--videos needs --out"):
        run_eval_suite(chain.checkpoints, small(videos=1), out=None)


def test_a_failed_attempt_does_not_block_the_corrected_rerun(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    with pytest.raises(VlaclError):
        run_eval_suite(chain.checkpoints, small(videos=1, video_camera="no-such-camera"), out=out)
    report = run_eval_suite(chain.checkpoints, small(), out=out)
    assert len(report.episodes) == 8


def test_videos_of_the_first_trials_are_written(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    report = run_eval_suite(chain.checkpoints, small(videos=1, last_only=True), out=out)
    videos = sorted(p.relative_to(out).as_posix() for p in (out / "videos").rglob("*.mp4"))
    assert videos == [f"videos/{TASKS[1]}/{task}/trial_0000.mp4" for task in sorted(TASKS)]
    assert sorted(v for v in report.episodes["video"] if v) == videos
    import av

    with av.open(str(out / videos[0])) as container:
        frames = sum(1 for _ in container.decode(video=0))
    first = report.episodes[(report.episodes["trial"] == 0) & (report.episodes["task"] == TASKS[0])]
    assert frames == int(first["steps"].iloc[0]) + 1  # the reset frame and one per step


def test_per_task_checkpoints_use_the_adapter_of_the_evaluated_task(chain: Chain, tmp_path: Path) -> None:
    from vlacl.evaluation.runner import Cell, Group, WorkerSpec, _task_keys, _Worker
    from vlacl.evaluation.suites import resolve_suite

    prev: list[str] = []
    for k in range(2):
        invoke("-q", "train-task", "--dataset", str(chain.data), "--stats", str(chain.stats), "--task", f"#{k}",
               *prev, "--adapter-mode", "per-task", "--steps", "2", "--batch-size", "8",
               "--out", str(tmp_path / f"pt{k}"))  # fmt: skip
        prev = ["--prev", str(tmp_path / f"pt{k}")]
    refs = find_checkpoints([tmp_path / "pt0", tmp_path / "pt1"])
    suite = resolve_suite("auto", refs)

    def active(given: list[Any], checkpoint: int, task: int) -> tuple[str, ...]:
        """The adapters serving ``task`` when checkpoint ``checkpoint`` of ``given`` is evaluated."""
        worker = _Worker(WorkerSpec(tuple(given), suite, small(), "cpu", None, None, None, 1, _task_keys(given, suite)))
        try:
            stage = given[checkpoint].task_index
            worker.run(Group(Cell(0, checkpoint, TASKS[stage], stage, TASKS[task], task), (0,)))
            assert worker.bank._loaded is not None
            return worker.bank._loaded.active_adapters
        finally:
            worker.close()

    first, last = open_artifact(tmp_path / "pt1").manifest.details["adapter_stack"]
    assert active(refs, 1, 0) == (first,)  # the last checkpoint evaluates task 0 with task 0's adapter
    assert active(refs, 1, 1) == (last,)
    assert active(refs, 0, 1) == (first,)  # task 1 not trained yet: the newest adapter serves
    assert active(refs[1:], 0, 0) == (first,)  # the last checkpoint alone still finds task 0's adapter
