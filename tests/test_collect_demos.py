"""``collect-demos``: scripted experts of a toy simulator (and of Meta-World) into a LeRobot v3.0 dataset artifact."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from vlacl.artifacts import open_artifact
from vlacl.cli.app import app
from vlacl.config.collect_demos import CollectDemosConfig
from vlacl.data.open import open_datasets
from vlacl.errors import ConfigError
from vlacl.sim import collect as core
from vlacl.sim.base import Observation, RenderSettings, StepResult
from vlacl.sim.collect import NoDemonstrationsError, SimSource, TaskProgress, collect_demos, episode_seeds

TOY_TASKS = ("toy-reach", "toy-flaky", "toy-far")
"""toy-reach and toy-far: the expert always succeeds; toy-flaky: only from even reset seeds; toy-fail: never."""


class ToyEnv:
    """A point moving in the plane towards a goal the reset seed places; frames draw the point."""

    def __init__(self, task: str, render: RenderSettings) -> None:
        self._task = task
        self._render = render
        self._pos = np.zeros(2)
        self._goal = np.zeros(2)
        self._steps = 0

    @property
    def task(self) -> str:
        return self._task

    @property
    def instruction(self) -> str:
        return f"move the point ({self._task})"

    @property
    def max_steps(self) -> int:
        return 25

    @property
    def action_dim(self) -> int:
        return 2

    def reset(self, seed: int) -> Observation:
        rng = np.random.default_rng(seed)
        self._pos = rng.uniform(-0.5, 0.5, size=2)
        self._goal = rng.uniform(-0.5, 0.5, size=2)
        if self._task == "toy-fail" or (self._task == "toy-flaky" and seed % 2):
            self._goal = np.array([3.0, 3.0])  # out of reach: the point stays in [-1, 1]
        self._steps = 0
        return self._observe()

    def step(self, action: np.ndarray) -> StepResult:
        self._pos = np.clip(self._pos + 0.1 * np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self._steps += 1
        distance = float(np.linalg.norm(self._goal - self._pos))
        success = distance < 0.05
        return StepResult(self._observe(), -distance, success, self._steps >= self.max_steps)

    def close(self) -> None:
        pass

    def _observe(self) -> Observation:
        obs: Observation = {"observation.state": np.concatenate([self._pos, self._goal]).astype(np.float32)}
        h, w = self._render.height, self._render.width
        for c, cam in enumerate(self._render.cameras):
            image = np.zeros((h, w, 3), dtype=np.uint8)
            y = int((np.clip(self._pos[1], -1, 1) + 1) / 2 * (h - 1))
            x = int((np.clip(self._pos[0], -1, 1) + 1) / 2 * (w - 1))
            image[y, x] = (255, 40 * c, self._steps * 7 % 256)
            image[..., 1] += np.arange(w, dtype=np.uint8)[None, :]
            obs[f"observation.images.{cam}"] = image
        return obs


class ToyExpert:
    def act(self, observation: Observation) -> np.ndarray:
        state = observation["observation.state"].astype(np.float64)
        return np.clip((state[2:] - state[:2]) / 0.1, -1.0, 1.0).astype(np.float32)


class ToySimulator:
    name = "toy"

    def tasks(self) -> Sequence[str]:
        return (*TOY_TASKS, "toy-fail")

    def make_env(self, task: str, render: RenderSettings) -> ToyEnv:
        return ToyEnv(task, render)

    def make_envs(self, tasks: Sequence[str], render: RenderSettings) -> Any:
        raise NotImplementedError

    def expert(self, task: str) -> ToyExpert:
        return ToyExpert()


def toy_source(tasks: Sequence[str] = TOY_TASKS) -> SimSource:
    return SimSource(stream="toy", simulator="toy", tasks=tuple(tasks), factory=ToySimulator)


def config(**changes: Any) -> CollectDemosConfig:
    return CollectDemosConfig(**{"stream": "toy", "episodes_per_task": 3, "fps": 10, **changes})


def data_files(root: Path) -> dict[str, bytes]:
    files = [*root.glob("data/**/*.parquet"), *root.glob("meta/**/*.parquet")]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(files)}


def replay(task: str, seed: int, actions: np.ndarray, render: RenderSettings) -> tuple[list[Observation], bool]:
    env = ToyEnv(task, render)
    observations = [env.reset(seed)]
    success = False
    for action in actions:
        result = env.step(action)
        observations.append(result.observation)
        success = result.success
    return observations[:-1], success


def test_collects_successful_episodes_that_replay_exactly(tmp_path: Path) -> None:
    out = tmp_path / "demos"
    cfg = config(cameras=("corner",), image_size=16)
    report = collect_demos(cfg, out, source=toy_source(), command=["vlacl", "collect-demos"])
    by_task = {t.task: t for t in report.tasks}
    assert by_task["toy-reach"].attempts == 3
    assert by_task["toy-reach"].successes == 3
    # toy-flaky succeeds from even seeds only: it takes more attempts than episodes.
    even = [a for a in range(9) if episode_seeds(0, "toy-flaky", a)[0] % 2 == 0]
    assert by_task["toy-flaky"].successes == 3
    assert by_task["toy-flaky"].attempts == even[2] + 1  # stops at the third success
    assert report.episodes == 9

    (ds,) = open_datasets([out])
    meta = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r["vlacl_task"] for r in meta] == ["toy-reach"] * 3 + ["toy-flaky"] * 3 + ["toy-far"] * 3
    assert all(r["vlacl_success"] for r in meta)
    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert {"next.reward", "next.success", "task_index", "timestamp", "frame_index", "episode_index", "index"} <= set(
        data.column_names
    )
    for episode, row in zip(ds.episodes, meta, strict=True):
        assert episode.instruction == f"move the point ({row['vlacl_task']})"
        assert row["vlacl_seed"] == episode_seeds(0, row["vlacl_task"], row["vlacl_attempt"])[0]
        actions = episode.read("action")
        observations, success = replay(row["vlacl_task"], row["vlacl_seed"], actions, cfg_render(cfg))
        assert success
        np.testing.assert_array_equal(episode.read("observation.state"), [o["observation.state"] for o in observations])
        np.testing.assert_array_equal(
            episode.read("observation.images.corner"), [o["observation.images.corner"] for o in observations]
        )
        rows = data.slice(row["dataset_from_index"], row["length"])
        assert rows.column("next.success").to_pylist() == [False] * (row["length"] - 1) + [True]
    assert [e.task_index for e in ds.episodes] == [0] * 3 + [1] * 3 + [2] * 3

    artifact = open_artifact(out, "dataset", verify=True)
    details = artifact.manifest.details
    assert details["stream"] == "toy"
    assert details["episodes"] == 9
    assert details["frames"] == sum(e.length for e in ds.episodes)
    assert details["fps"] == 10
    assert details["render"]["cameras"] == ["corner"]
    assert {t["task"]: (t["attempts"], t["successes"]) for t in details["tasks"]} == {
        t.task: (t.attempts, t.successes) for t in report.tasks
    }
    assert not (out / core.WORK_DIR).exists()


def cfg_render(cfg: CollectDemosConfig) -> RenderSettings:
    return RenderSettings(cameras=cfg.cameras, height=cfg.image_size, width=cfg.image_size)


def test_failing_task_is_reported_and_kept_only_with_keep_failures(tmp_path: Path) -> None:
    tasks = ("toy-reach", "toy-fail")
    report = collect_demos(config(episodes_per_task=2), tmp_path / "a", source=toy_source(tasks))
    fail = report.tasks[1]
    assert (fail.attempts, fail.successes, fail.episodes, fail.success_rate) == (6, 0, 0, 0.0)
    assert report.short_tasks == ("toy-fail",)
    assert open_artifact(tmp_path / "a", "dataset").manifest.details["short_tasks"] == ["toy-fail"]
    (ds,) = open_datasets([tmp_path / "a"])
    assert len(ds.episodes) == 2

    kept = collect_demos(config(episodes_per_task=2, keep_failures=True), tmp_path / "b", source=toy_source(tasks))
    assert [(t.attempts, t.successes, t.episodes) for t in kept.tasks] == [(2, 2, 2), (2, 0, 2)]
    meta = pq.read_table(tmp_path / "b/meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r["vlacl_success"] for r in meta] == [True, True, False, False]
    assert [r["length"] for r in meta][2:] == [25, 25]  # failures run the whole step budget

    with pytest.raises(NoDemonstrationsError, match="none of 6 attempts"):
        collect_demos(config(episodes_per_task=2), tmp_path / "c", source=toy_source(("toy-fail",)))
    assert not (tmp_path / "c").exists()


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path: Path) -> None:
    cfg = config(cameras=("corner",), image_size=16, episodes_per_task=2)
    collect_demos(cfg, tmp_path / "one", source=toy_source())
    collect_demos(cfg, tmp_path / "again", source=toy_source())
    collect_demos(dataclass_replace(cfg, workers=2), tmp_path / "two", source=toy_source())
    one = data_files(tmp_path / "one")
    assert "data/chunk-000/file-000.parquet" in one
    assert data_files(tmp_path / "again") == one
    assert data_files(tmp_path / "two") == one
    other = collect_demos(dataclass_replace(cfg, seed=1), tmp_path / "other", source=toy_source())
    assert other.episodes == 6
    assert data_files(tmp_path / "other") != one


def dataclass_replace(cfg: CollectDemosConfig, **changes: Any) -> CollectDemosConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_action_noise_is_seeded_clipped_and_recorded(tmp_path: Path) -> None:
    clean = collect_demos(config(episodes_per_task=1), tmp_path / "clean", source=toy_source(("toy-reach",)))
    noisy_cfg = config(episodes_per_task=1, action_noise=0.5, action_bound=0.8, keep_failures=True)
    collect_demos(noisy_cfg, tmp_path / "noisy", source=toy_source(("toy-reach",)))
    collect_demos(noisy_cfg, tmp_path / "noisy2", source=toy_source(("toy-reach",)))
    assert data_files(tmp_path / "noisy") == data_files(tmp_path / "noisy2")
    (a,) = open_datasets([tmp_path / "clean"])
    (b,) = open_datasets([tmp_path / "noisy"])
    clean_actions = a.episodes[0].read("action")
    noisy_actions = b.episodes[0].read("action")
    assert np.abs(noisy_actions).max() <= 0.8
    assert np.abs(noisy_actions).max() == pytest.approx(0.8)  # std 0.5 hits the bound
    assert not np.array_equal(noisy_actions[: len(clean_actions)], clean_actions[: len(noisy_actions)])
    seed = pq.read_table(tmp_path / "noisy/meta/episodes/chunk-000/file-000.parquet").column("vlacl_seed")[0].as_py()
    observations, _ = replay("toy-reach", seed, noisy_actions, RenderSettings())
    np.testing.assert_array_equal(
        b.episodes[0].read("observation.state"), [o["observation.state"] for o in observations]
    )
    assert clean.episodes == 1


def test_progress_reports_every_attempt_per_task(tmp_path: Path) -> None:
    events: list[TaskProgress] = []
    collect_demos(
        config(episodes_per_task=2), tmp_path / "d", source=toy_source(("toy-reach",)), progress=events.append
    )
    assert [(e.kept, e.attempts, e.finished) for e in events] == [
        (0, 0, False),
        (1, 1, False),
        (2, 2, False),
        (2, 2, True),
    ]


def test_config_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--episodes-per-task"):
        CollectDemosConfig(episodes_per_task=0)
    with pytest.raises(ConfigError, match="--action-noise"):
        CollectDemosConfig(action_noise=-1.0)
    with pytest.raises(ConfigError, match="--workers"):
        CollectDemosConfig(workers=0)


def test_cli_writes_the_dataset_prints_success_rates_and_ds_stats_reads_it(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def resolve(stream: str) -> SimSource:
        seen.append(stream)
        return toy_source(("toy-reach", "toy-flaky"))

    monkeypatch.setattr(core, "resolve_source", resolve)
    out = tmp_path / "demos"
    args = ["collect-demos", "--stream", "toy-reach,toy-flaky", "--episodes-per-task", "2", "--fps", "10"]
    result = runner.invoke(app, [*args, "--cameras", "corner", "--image-size", "16", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert seen == ["toy-reach,toy-flaky"]
    assert "Expert demonstrations of toy" in result.stdout
    assert "toy-flaky" in result.stdout
    assert "100%" in result.stdout
    manifest = open_artifact(out, "dataset", verify=True).manifest
    assert manifest.command[:2] == ("vlacl", "collect-demos")
    assert manifest.details["render"] == {
        "cameras": ["corner"],
        "height": 16,
        "width": 16,
        "shadows": False,
        "reflections": False,
        "multisample": False,
    }

    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 2
    assert "--overwrite" in again.stderr

    as_json = runner.invoke(app, [*args, "--keep-failures", "--json", "--overwrite", "--out", str(out)])
    assert as_json.exit_code == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert [t["episodes"] for t in report["tasks"]] == [2, 2]
    assert report["episodes"] == 4

    stats_out = tmp_path / "stats"
    stats = runner.invoke(app, ["ds-stats", str(out), "--out", str(stats_out)])
    assert stats.exit_code == 0, stats.stderr
    data = json.loads((stats_out / "stats.json").read_text())
    assert data["num_episodes"] == 4
    assert open_artifact(stats_out, "ds_stats").manifest.inputs[0].kind == "dataset"


def metaworld_run(tmp_path: Path, cameras: tuple[str, ...], tasks: str) -> Path:
    if importlib.util.find_spec("metaworld") is None:  # not imported here: vlacl sets MUJOCO_GL before it
        pytest.skip("Meta-World is not installed: pip install 'vlacl[sim]'")
    from vlacl.sim.gl import RenderingUnavailableError

    out = tmp_path / "metaworld"
    cfg = CollectDemosConfig(stream=tasks, episodes_per_task=1, cameras=cameras, image_size=64)
    try:
        report = collect_demos(cfg, out)
    except RenderingUnavailableError as exc:
        pytest.skip(f"no off-screen rendering here: {exc}")
    assert [(t.attempts, t.successes, t.episodes) for t in report.tasks] == [(1, 1, 1)] * len(report.tasks)
    assert report.fps == 80
    assert report.simulator_version
    return out


def test_metaworld_state_only_collection_replays_exactly(tmp_path: Path) -> None:
    out = metaworld_run(tmp_path, (), "reach-v3,button-press-topdown-v3")
    from vlacl.sim.registry import get_simulator

    (ds,) = open_datasets([out])
    meta = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r["vlacl_task"] for r in meta] == ["reach-v3", "button-press-topdown-v3"]
    info = json.loads((out / "meta/info.json").read_text())
    assert info["features"]["observation.state"]["shape"] == [39]
    assert info["features"]["action"]["shape"] == [4]
    assert info["robot_type"] == "metaworld"
    manifest = open_artifact(out, "dataset", verify=True).manifest
    assert manifest.libraries["metaworld"] == manifest.details["simulator_version"]
    episode, row = ds.episodes[1], meta[1]
    env = get_simulator("metaworld").make_env(row["vlacl_task"], RenderSettings())
    try:
        states = [env.reset(row["vlacl_seed"])["observation.state"]]
        for action in episode.read("action"):
            result = env.step(action)
            states.append(result.observation["observation.state"])
    finally:
        env.close()
    assert result.success
    np.testing.assert_array_equal(episode.read("observation.state"), np.stack(states[:-1]))


def test_metaworld_collection_with_one_camera(tmp_path: Path) -> None:
    out = metaworld_run(tmp_path, ("corner",), "reach-v3")
    (ds,) = open_datasets([out])
    frames = ds.episodes[0].read("observation.images.corner")
    assert frames.shape == (ds.episodes[0].length, 64, 64, 3)
    assert frames.std() > 0  # a rendered scene, not a blank frame
