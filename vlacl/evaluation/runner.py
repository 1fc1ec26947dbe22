"""``eval-suite``'s core: the work list of (checkpoint, task) cells, workers, shards, resume, the artifact.

The cells of the matrix (every checkpoint on every task, or the last checkpoint only) are split
over ``--shard i/n`` (cell ``c`` belongs to shard ``c mod n``), then into groups of at most
``--envs`` trials that one worker rolls out together. Each finished group's rows are written at
once to ``.<out>.resume/rows/`` next to ``--out``; a rerun with the same settings reads them and
runs only the groups that are missing, so an interrupted evaluation loses at most the groups in
flight. The ``eval_results`` artifact is written when every group is done, and the resume
directory is removed.

Trial ``t`` of every task is reset with seed ``--seed + t`` for every checkpoint, so the rows of a
column share their initial states (paired comparisons; LIBERO's initial state ``t``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from vlacl.artifacts.names import EVAL_INFO_NAME, MATRIX_CSV_NAME, RESULTS_NAME, VIDEOS_DIR
from vlacl.artifacts.writer import ArtifactWriter, check_output_dir
from vlacl.config.core import config_to_dict, dump_config
from vlacl.config.eval_suite import EvalSuiteConfig
from vlacl.errors import ArtifactError, ConfigError
from vlacl.evaluation.policies import CheckpointRef, PolicyBank, find_checkpoints
from vlacl.evaluation.suites import Suite, resolve_suite, stage_of, training_datasets

log = logging.getLogger(__name__)

KIND = "eval_results"
DEFAULT_IMAGE_SIZE = 64
"""Frame size of the video camera of a state-only policy without --image-size."""
ROWS_DIR = "rows"
PLAN_NAME = "plan.json"
COLUMNS: tuple[str, ...] = (
    "checkpoint",
    "stage",
    "stage_index",
    "task",
    "task_index",
    "trial",
    "seed",
    "success",
    "return",
    "steps",
    "seconds",
    "sim_seconds",
    "policy_seconds",
    "video",
)
"""Columns of ``results.parquet`` for a rollout suite, one row per episode."""
Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal (Wilson intervals)."""


def wilson_interval(successes: int, episodes: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a success rate, in [0, 1]; ``(nan, nan)`` without episodes."""
    if episodes <= 0:
        return (math.nan, math.nan)
    p = successes / episodes
    denom = 1 + z * z / episodes
    centre = (p + z * z / (2 * episodes)) / denom
    half = z * math.sqrt(p * (1 - p) / episodes + z * z / (4 * episodes * episodes)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def resume_dir(out: Path) -> Path:
    """``<out parent>/.<out name>.resume``: the rows of the groups finished so far."""
    out = Path(os.path.abspath(out))  # noqa: PTH100
    return out.parent / f".{out.name}.resume"


@dataclass(frozen=True)
class Cell:
    """One (checkpoint, task) cell of the matrix.

    Attributes:
        ordinal: Position in the full work list (before sharding).
        checkpoint: Index into the checkpoint list.
        stage: Name of the row: the suite task the checkpoint trained.
        stage_index: Position of the checkpoint in training order.
        task: The evaluated task.
        task_index: Its column.
    """

    ordinal: int
    checkpoint: int
    stage: str
    stage_index: int
    task: str
    task_index: int


@dataclass(frozen=True)
class Group:
    """Trials of one cell rolled out together by one worker."""

    cell: Cell
    trials: tuple[int, ...]

    @property
    def key(self) -> str:
        """File stem of its rows: stage index, task index, first trial."""
        return f"{self.cell.stage_index:04d}-{self.cell.task_index:04d}-{self.trials[0]:06d}"


@dataclass
class EvalReport:
    """What an evaluation produced.

    Attributes:
        out: The artifact written (``None`` without ``--out``).
        suite: The suite spec.
        stages: Row names in training order; tasks: column names.
        episodes: The rows (one per episode) of this shard.
        seconds: Wall time of this run (episodes already done before a resume are not counted).
        resumed_episodes: Episodes read from an earlier, interrupted run.
        already_complete: ``--out`` already held this evaluation; nothing ran.
        sim_seconds, policy_seconds, env_steps: Totals over the episodes run now.
        shard: ``(index, count)``.
    """

    out: Path | None
    suite: str
    stages: tuple[str, ...]
    tasks: tuple[str, ...]
    episodes: pd.DataFrame
    seconds: float
    resumed_episodes: int = 0
    already_complete: bool = False
    sim_seconds: float = 0.0
    policy_seconds: float = 0.0
    env_steps: int = 0
    shard: tuple[int, int] = (0, 1)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the eval_info content plus where it was written."""
        return {
            "out": None if self.out is None else str(self.out),
            "already_complete": self.already_complete,
            "resumed_episodes": self.resumed_episodes,
            **self.info,
        }


ProgressFn = Callable[[int, int, int | None], None]
"""``progress(done, total, successes)``: episodes (cells for the offline suite, whose successes are ``None``)."""


# Plan ------------------------------------------------------------------------------------------


def _cells(refs: Sequence[CheckpointRef], suite: Suite, last_only: bool) -> tuple[list[Cell], list[str]]:
    """The cells to evaluate, and the matrix's rows: one per checkpoint, in training order."""
    stages = [stage_of(ref, suite) for ref in refs]
    if len(set(stages)) != len(stages):
        twice = sorted({s for s in stages if stages.count(s) > 1})
        raise ConfigError(f"several checkpoints trained task(s) {twice}: a matrix has one row per task of the stream")
    chosen = [len(refs) - 1] if last_only else list(range(len(refs)))
    cells: list[Cell] = []
    for i in chosen:
        for j, task in enumerate(suite.tasks):
            cells.append(Cell(len(cells), i, stages[i], i, task, j))
    return cells, stages  # every stage is a row (--last-only leaves the earlier ones empty): cl-metrics needs them


def _groups(cells: Sequence[Cell], trials: int, envs: int) -> list[Group]:
    return [
        Group(cell, tuple(range(start, min(start + envs, trials))))
        for cell in cells
        for start in range(0, trials, envs)
    ]


def eval_id(cfg: EvalSuiteConfig, suite: Suite, refs: Sequence[CheckpointRef], image_size: int | None) -> str:
    """sha256 identifying an evaluation: what is evaluated and how, not how the work is spread.

    Shards of one evaluation share it (the shard count is part of it, the index is not); so does a
    rerun that resumes it. Workers and the device are not part of it.
    """
    ident = {
        "suite": suite.spec,
        "tasks": list(suite.tasks),
        "checkpoints": [r.manifest_sha256 for r in refs],
        "trials": cfg.trials,
        "seed": cfg.seed,
        "max_steps": cfg.max_steps,
        "last_only": cfg.last_only,
        "execute": cfg.execute,
        "envs": cfg.envs,
        "image_size": image_size,
        "shards": cfg.shard_index[1],
        "videos": cfg.videos,
        "video_camera": cfg.video_camera,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _image_size(cfg: EvalSuiteConfig, refs: Sequence[CheckpointRef]) -> int | None:
    """``--image-size``, else the frame height of the first checkpoint's training dataset, else 64 (cameras only)."""
    if cfg.image_size is not None:
        return cfg.image_size
    for path in training_datasets(refs[0]):
        info = path / "meta" / "info.json"
        if not info.is_file():
            continue
        features = json.loads(info.read_text(encoding="utf-8")).get("features", {})
        for key, feature in features.items():
            if key.startswith("observation.images.") and isinstance(feature, dict):
                shape = feature.get("shape")
                if isinstance(shape, list) and len(shape) == 3:
                    names = feature.get("names") or []
                    return int(shape[1] if names[:1] == ["channels"] else shape[0])
    return None


# Workers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to run groups (picklable, sent once to each spawned worker)."""

    refs: tuple[CheckpointRef, ...]
    suite: Suite
    cfg: EvalSuiteConfig
    device: str
    image_size: int | None
    stats_fingerprint: str | None
    video_dir: Path | None
    threads: int
    task_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Suite task -> the names it may have in a checkpoint's adapter records (its training key, instruction)."""


class _Worker:
    """A worker's state: the policy bank and one vector of environments per task, kept between groups."""

    def __init__(self, spec: WorkerSpec) -> None:
        import vlacl.sim  # noqa: F401  (MuJoCo's GL setting before anything imports mujoco)

        self.spec = spec
        self.bank = PolicyBank(torch.device(spec.device), spec.stats_fingerprint)
        self.envs: list[Any] = []
        self.env_key: tuple[str, tuple[str, ...]] | None = None
        self.sim: Any = None

    def _environments(self, task: str, count: int, cameras: tuple[str, ...]) -> list[Any]:
        """``count`` environments of ``task``; a worker keeps those of one task (groups come task by task)."""
        from vlacl.sim import RenderSettings, get_simulator

        if self.env_key != (task, cameras):
            self.close()
            self.env_key = (task, cameras)
        if self.sim is None:
            assert self.spec.suite.simulator is not None
            self.sim = get_simulator(self.spec.suite.simulator)
        if len(self.envs) < count:
            size = self.spec.image_size or DEFAULT_IMAGE_SIZE
            render = RenderSettings(cameras=cameras, height=size, width=size)
            self.envs.extend(self.sim.make_env(task, render) for _ in range(count - len(self.envs)))
        return self.envs[:count]

    def run(self, group: Group) -> tuple[list[dict[str, Any]], float, float, int]:
        """Roll out a group; its rows and the simulator seconds, policy seconds and steps it took."""
        from vlacl.data.features import image_key
        from vlacl.evaluation.rollout import PolicyActor, rollout, write_video

        spec, cell = self.spec, group.cell
        ref = spec.refs[cell.checkpoint]
        loaded = self.bank.get(ref)
        if loaded.setup is not None and loaded.setup.mode == "per-task":
            from vlacl.adapters.lora import activate_for_task

            names = spec.task_keys.get(cell.task, ())
            own = [a.task_index for a in loaded.setup.adapters if a.task in names]
            # a task the checkpoint has no adapter for (not trained yet) is served by its newest adapter
            loaded.active_adapters = activate_for_task(loaded.setup, own[0] if own else -1, unseen="latest")
        policy_cameras = tuple(c.removeprefix("observation.images.") for c in loaded.cameras)
        video_camera = spec.cfg.video_camera or (policy_cameras[0] if policy_cameras else _default_camera(spec.suite))
        if policy_cameras and spec.image_size is None:
            raise ConfigError(
                f"the policy of {ref.path} reads cameras {list(policy_cameras)} but the frame size of its training "
                "data is unknown (its dataset is not where the checkpoint recorded it): pass --image-size"
            )
        record = [t < spec.cfg.videos for t in group.trials]
        cameras = policy_cameras
        if spec.cfg.videos and video_camera not in cameras:
            cameras = (*cameras, video_camera)  # in every group, so a worker's environments stay the same
        envs = self._environments(cell.task, len(group.trials), cameras)
        seeds = [spec.cfg.seed + t for t in group.trials]
        device = torch.device(spec.device)
        generator = torch.Generator()  # the heads draw noise on the CPU: the same draws on any device
        generator.manual_seed(_group_seed(spec.cfg.seed, cell, group.trials[0]))
        results = rollout(
            envs,
            PolicyActor(loaded, device),
            group.trials,
            seeds,
            max_steps=spec.cfg.max_steps,
            execute=spec.cfg.execute,
            generator=generator,
            record=record,
            video_key=image_key(video_camera),
        )
        rows: list[dict[str, Any]] = []
        for result in results:
            video = ""
            if result.frames and spec.video_dir is not None:
                name = f"trial_{result.trial:04d}.mp4"
                relative = Path(VIDEOS_DIR) / cell.stage.replace("/", "__") / cell.task.replace("/", "__") / name
                target = spec.video_dir / relative.relative_to(VIDEOS_DIR)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_video(result.frames, target, spec.cfg.video_fps)
                video = relative.as_posix()
            rows.append(
                {
                    "checkpoint": str(ref.path),
                    "stage": cell.stage,
                    "stage_index": cell.stage_index,
                    "task": cell.task,
                    "task_index": cell.task_index,
                    "trial": result.trial,
                    "seed": result.seed,
                    "success": result.success,
                    "return": result.ret,
                    "steps": result.steps,
                    "seconds": result.seconds,
                    "sim_seconds": result.sim_seconds,
                    "policy_seconds": result.policy_seconds,
                    "video": video,
                }
            )
        return (
            rows,
            sum(r.sim_seconds for r in results),
            sum(r.policy_seconds for r in results),
            sum(r.steps for r in results),
        )

    def close(self) -> None:
        """Close the environments kept."""
        for env in self.envs:
            env.close()
        self.envs = []


def _task_keys(refs: Sequence[CheckpointRef], suite: Suite) -> dict[str, tuple[str, ...]]:
    """Each suite task's names in the training stream: its name, instruction, and training key.

    The key comes from the checkpoints that trained it and, for a ``collect-demos`` dataset, from the
    dataset's task table (its ``task_index``), so a per-task checkpoint finds its adapter for a task
    even when the checkpoint that trained the task is not among those evaluated.
    """
    from vlacl.artifacts.reader import open_artifact

    keys = {t: {t, i} for t, i in zip(suite.tasks, suite.instructions, strict=True)}
    for ref in refs:
        keys[stage_of(ref, suite)].add(ref.task_key)
    for path in training_datasets(refs[-1]):
        if not (path / "vlacl_manifest.json").is_file():
            continue
        for entry in open_artifact(path).manifest.details.get("tasks", []):
            if isinstance(entry, dict) and entry.get("task") in keys and entry.get("task_index") is not None:
                keys[str(entry["task"])].add(str(entry["task_index"]))
    return {t: tuple(sorted(k)) for t, k in keys.items()}


def _default_camera(suite: Suite) -> str:
    return "corner" if suite.simulator == "metaworld" else "agentview"


def _group_seed(seed: int, cell: Cell, first_trial: int) -> int:
    text = f"{seed}:{cell.stage_index}:{cell.task}:{first_trial}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (2**63)


_WORKER: _Worker | None = None


def _init_worker(spec: WorkerSpec) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the pool
    for signum in (signal.SIGTERM, signal.SIGHUP):  # a forked worker must not raise the CLI's Terminated
        signal.signal(signum, signal.SIG_DFL)
    torch.set_num_threads(spec.threads)
    _WORKER = _Worker(spec)


def _run_in_worker(group: Group) -> tuple[Group, list[dict[str, Any]], float, float, int]:
    assert _WORKER is not None
    rows, sim_s, policy_s, steps = _WORKER.run(group)
    return group, rows, sim_s, policy_s, steps


# Resume store ----------------------------------------------------------------------------------


class _Store:
    """The rows of finished groups under ``.<out>.resume/rows``, one parquet file per group."""

    def __init__(self, directory: Path, ident: str) -> None:
        self.dir = directory
        self.rows_dir = directory / ROWS_DIR
        self.ident = ident
        plan = directory / PLAN_NAME
        if plan.is_file():
            recorded = json.loads(plan.read_text(encoding="utf-8")).get("eval_id")
            if recorded != ident and any(self.rows_dir.glob("*.parquet")):
                raise ConfigError(
                    f"{directory} holds a partial evaluation with other settings or checkpoints: rerun with the same "
                    f"settings to finish it, or delete {directory} to start over"
                )
            if recorded != ident:  # an attempt that finished no group: nothing to keep
                shutil.rmtree(directory)

    def _write_plan(self) -> None:
        plan = self.dir / PLAN_NAME
        if plan.is_file():
            return
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{PLAN_NAME}.tmp"
        tmp.write_text(json.dumps({"eval_id": self.ident}) + "\n", encoding="utf-8")
        tmp.replace(plan)

    def done(self) -> dict[str, pd.DataFrame]:
        """The rows of the groups finished earlier, by group key."""
        found: dict[str, pd.DataFrame] = {}
        if not self.rows_dir.is_dir():
            return found
        for path in sorted(self.rows_dir.glob("*.parquet")):
            try:
                found[path.stem] = pd.read_parquet(path)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable partial rows %s (%s): the group runs again", path, exc)
        return found

    def save(self, group: Group, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write a finished group's rows (atomically: a file is complete or absent)."""
        self._write_plan()
        frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
        tmp = self.rows_dir / f".{group.key}.parquet.tmp"
        frame.to_parquet(tmp, index=False)
        tmp.replace(self.rows_dir / f"{group.key}.parquet")


# Entry point -----------------------------------------------------------------------------------


def _usable_cpus() -> int:
    """The CPUs this process may run on (a SLURM allocation, not the whole node)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def _device(cfg: EvalSuiteConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu")
    try:
        torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(f"--device {cfg.device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    return cfg.device


def _stats_fingerprint(cfg: EvalSuiteConfig) -> str | None:
    if cfg.stats is None:
        return None
    from vlacl.data.normalize import load_stats

    return load_stats(cfg.stats).fingerprint


def _iterate(
    groups: Sequence[Group], spec: WorkerSpec, workers: int
) -> Iterator[tuple[Group, list[dict[str, Any]], float, float, int]]:
    if workers <= 1 or len(groups) <= 1:
        worker = _Worker(spec)
        try:
            for group in groups:
                rows, sim_s, policy_s, steps = worker.run(group)
                yield group, rows, sim_s, policy_s, steps
        finally:
            worker.close()
        return
    context = _start_method(spec)
    if context.get_start_method() == "fork":
        spec = dataclasses.replace(spec, threads=1)  # no OpenMP thread pool is carried across the fork
    pool = context.Pool(min(workers, len(groups)), initializer=_init_worker, initargs=(spec,))
    try:
        yield from pool.imap_unordered(_run_in_worker, groups, chunksize=1)
        pool.close()
        pool.join()
    except BaseException:
        pool.terminate()
        pool.join()
        raise


def _start_method(spec: WorkerSpec) -> Any:
    """How workers start: forked, or spawned where forking is unsafe.

    On Linux with the policies on the CPU, workers fork from a parent that has imported the
    simulator and the policy code, so they are ready at once (a spawned worker spends seconds
    importing them). CUDA in forked children is unsafe and other systems do not fork: they spawn.
    The parent forks before it makes any environment or rendering context.
    """
    if spec.device == "cpu" and sys.platform.startswith("linux"):
        import peft  # noqa: F401  (with transformers: most of a worker's start-up)

        from vlacl.sim import get_simulator
        from vlacl.training import policy_io  # noqa: F401

        assert spec.suite.simulator is not None
        get_simulator(spec.suite.simulator)  # imports the simulator's package
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def run_eval_suite(
    checkpoints: Sequence[Path],
    cfg: EvalSuiteConfig,
    *,
    out: Path | None,
    overwrite: bool = False,
    command: Sequence[str] = (),
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Evaluate the checkpoints of a stream and write an ``eval_results`` artifact at ``out``.

    Raises:
        ConfigError: Bad settings, a suite that does not fit the checkpoints, a partial evaluation
            of other settings at ``out``.
        ArtifactError: Incomplete checkpoints, stats that do not match, an ``out`` in the way.
    """
    started = time.perf_counter()
    refs = find_checkpoints(list(checkpoints))
    suite = resolve_suite(cfg.suite, refs)
    if suite.offline:
        from vlacl.evaluation.offline_suite import run_offline_suite

        return run_offline_suite(refs, cfg, out=out, overwrite=overwrite, command=command, progress=progress)
    device = _device(cfg)
    stats_fp = _stats_fingerprint(cfg)
    image_size = _image_size(cfg, refs)
    cells, stages = _cells(refs, suite, cfg.last_only)
    shard_index, shard_count = cfg.shard_index
    mine = [c for c in cells if c.ordinal % shard_count == shard_index]
    ident = eval_id(cfg, suite, refs, image_size)
    if cfg.videos and out is None:
        raise ConfigError("--videos needs --out: the videos are part of the eval_results artifact")
    if out is not None and not overwrite and _already_complete(out, ident):
        log.info("%s already holds this evaluation (eval_id %s): nothing to do", out, ident[:12])
        return _report_from(out, suite, stages, started)
    if out is not None:
        check_output_dir(out, overwrite, kind=KIND)
    groups = _groups(mine, cfg.trials, cfg.envs)
    groups.sort(key=lambda g: (g.cell.task_index, g.cell.stage_index, g.trials[0]))  # task by task: envs are reused
    store = _Store(resume_dir(out), ident) if out is not None else None
    finished = store.done() if store is not None else {}
    todo = [g for g in groups if g.key not in finished]
    resumed = sum(len(finished[g.key]) for g in groups if g.key in finished)
    total = sum(len(g.trials) for g in groups)
    if resumed:
        log.info("resuming %s: %d of %d episodes already done", out, resumed, total)
    log.info(
        "evaluating %d checkpoint(s) x %d task(s) of %s: %d cells in shard %d/%d, %d episodes, %d worker(s) on %s",
        len(stages),
        len(suite.tasks),
        suite.spec,
        len(mine),
        shard_index,
        shard_count,
        total,
        cfg.workers,
        device,
    )
    video_dir = (store.dir / VIDEOS_DIR) if (store is not None and cfg.videos > 0) else None
    threads = max(1, _usable_cpus() // max(1, min(cfg.workers, len(todo) or 1)))
    keys = _task_keys(refs, suite)
    spec = WorkerSpec(tuple(refs), suite, cfg, device, image_size, stats_fp, video_dir, threads, keys)
    frames = [f for k, f in finished.items() if k in {g.key for g in groups}]
    done_eps = resumed
    successes = int(sum(int(f["success"].sum()) for f in frames))
    sim_total = policy_total = 0.0
    steps_total = 0
    if progress is not None:
        progress(done_eps, total, successes)
    try:
        for group, rows, sim_s, policy_s, steps in _iterate(todo, spec, cfg.workers):
            if store is not None:
                store.save(group, rows)
            frames.append(pd.DataFrame(rows, columns=list(COLUMNS)))
            done_eps += len(rows)
            successes += sum(bool(r["success"]) for r in rows)
            sim_total += sim_s
            policy_total += policy_s
            steps_total += steps
            if progress is not None:
                progress(done_eps, total, successes)
    except BaseException:
        if store is not None and done_eps:
            log.warning(
                "stopped with %d of %d episodes done; they are kept in %s: rerun the same command to continue",
                done_eps,
                total,
                store.dir,
            )
        raise
    episodes = _sorted(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS)))
    seconds = time.perf_counter() - started
    info = eval_info(episodes, suite, stages, seconds)
    report = EvalReport(
        out=out,
        suite=suite.spec,
        stages=tuple(stages),
        tasks=suite.tasks,
        episodes=episodes,
        seconds=seconds,
        resumed_episodes=resumed,
        sim_seconds=sim_total,
        policy_seconds=policy_total,
        env_steps=steps_total,
        shard=(shard_index, shard_count),
        info=info,
    )
    if out is not None:
        assert store is not None
        _write(out, report, cfg, refs, ident, overwrite, command, store)
        shutil.rmtree(store.dir, ignore_errors=True)
    log.info(
        "%d episodes in %.1f s: simulator %.1f s, policy %.1f s over %d steps (%.2f ms + %.2f ms per step)",
        done_eps - resumed,
        seconds,
        sim_total,
        policy_total,
        steps_total,
        1e3 * sim_total / max(steps_total, 1),
        1e3 * policy_total / max(steps_total, 1),
    )
    return report


def _sorted(episodes: pd.DataFrame) -> pd.DataFrame:
    if episodes.empty:
        return episodes
    episodes = episodes.astype({"success": bool, "stage_index": np.int64, "task_index": np.int64, "trial": np.int64})
    ordered = episodes.sort_values(["stage_index", "task_index", "trial"], kind="stable").reset_index(drop=True)
    return cast("pd.DataFrame", ordered)


def matrix_of(episodes: pd.DataFrame, stages: Sequence[str], tasks: Sequence[str]) -> Any:
    """The success matrix (with counts) of the episodes."""
    from vlacl.evaluation.results import matrix_from_episodes

    frame = episodes[["stage", "task", "success"]].copy()
    frame["success"] = frame["success"].astype(bool)
    return matrix_from_episodes(frame, list(stages), list(tasks))


def eval_info(episodes: pd.DataFrame, suite: Suite, stages: Sequence[str], seconds: float) -> dict[str, Any]:
    """``eval_info.json``: LeRobot's layout (``per_task``, ``per_group``, ``overall``) with Wilson 95% intervals.

    ``per_task`` has one entry per (checkpoint, task) cell with its episodes' ``successes``,
    ``sum_rewards``, ``pc_success`` (0-100) and ``ci95`` (0-100); ``per_group`` pools each stage's
    cells; ``overall`` pools everything, with ``n_episodes``, ``eval_s`` and ``eval_ep_s``.
    """

    def pooled(frame: pd.DataFrame) -> dict[str, Any]:
        n = len(frame)
        k = int(frame["success"].astype(bool).sum()) if n else 0
        lo, hi = wilson_interval(k, n)
        return {
            "avg_sum_reward": float(frame["return"].mean()) if n else None,
            "pc_success": 100.0 * k / n if n else None,
            "ci95": [100.0 * lo, 100.0 * hi] if n else None,
            "n_episodes": n,
            "n_successes": k,
        }

    per_task: list[dict[str, Any]] = []
    for (stage, task), frame in episodes.groupby(["stage", "task"], sort=False):
        per_task.append(
            {
                "task_group": str(stage),
                "task_id": str(task),
                "metrics": {
                    "successes": [bool(x) for x in frame["success"]],
                    "sum_rewards": [float(x) for x in frame["return"]],
                    "seeds": [int(x) for x in frame["seed"]],
                    "video_paths": [str(v) for v in frame["video"] if v],
                    **pooled(frame),
                },
            }
        )
    per_group = {str(stage): pooled(frame) for stage, frame in episodes.groupby("stage", sort=False)}
    overall: dict[str, Any] = pooled(episodes) if len(episodes) else {"n_episodes": 0, "pc_success": None}
    overall["eval_s"] = seconds
    overall["eval_ep_s"] = seconds / max(len(episodes), 1)
    return {
        "suite": suite.spec,
        "stages": list(stages),
        "tasks": list(suite.tasks),
        "per_task": per_task,
        "per_group": per_group,
        "overall": overall,
    }


def _already_complete(out: Path, ident: str) -> bool:
    from vlacl.artifacts.manifest import read_manifest
    from vlacl.artifacts.names import MANIFEST_NAME

    if not (out / MANIFEST_NAME).is_file():
        return False
    try:
        parsed = read_manifest(out)
    except ArtifactError:
        return False
    return parsed.kind == KIND and parsed.details.get("eval_id") == ident


def _report_from(out: Path, suite: Suite, stages: Sequence[str], started: float) -> EvalReport:
    from vlacl.artifacts.reader import open_artifact

    artifact = open_artifact(out, KIND)
    episodes = pd.read_parquet(artifact.file(RESULTS_NAME))
    info = json.loads(artifact.file(EVAL_INFO_NAME).read_text(encoding="utf-8"))
    shard = artifact.manifest.details.get("shard", {"index": 0, "count": 1})
    return EvalReport(
        out=out,
        suite=suite.spec,
        stages=tuple(stages),
        tasks=suite.tasks,
        episodes=episodes,
        seconds=time.perf_counter() - started,
        already_complete=True,
        shard=(int(shard["index"]), int(shard["count"])),
        info=info,
    )


def _write(
    out: Path,
    report: EvalReport,
    cfg: EvalSuiteConfig,
    refs: Sequence[CheckpointRef],
    ident: str,
    overwrite: bool,
    command: Sequence[str],
    store: _Store,
) -> None:
    from vlacl.artifacts.reader import open_artifact

    matrix = matrix_of(report.episodes, report.stages, report.tasks)
    with ArtifactWriter(
        out,
        KIND,
        command=command,
        config_yaml=dump_config(cfg),
        seed=cfg.seed,
        overwrite=overwrite or out.exists(),
        extra_libraries=("metaworld", "mujoco") if report.suite.startswith("metaworld") else ("libero", "robosuite"),
    ) as writer:
        report.episodes.to_parquet(writer.path / RESULTS_NAME, index=False)
        (writer.path / MATRIX_CSV_NAME).write_text(matrix.to_csv(), encoding="utf-8")
        (writer.path / EVAL_INFO_NAME).write_text(json.dumps(report.info, indent=2) + "\n", encoding="utf-8")
        videos = store.dir / VIDEOS_DIR
        if videos.is_dir():
            shutil.copytree(videos, writer.path / VIDEOS_DIR)
        for i, ref in enumerate(refs):
            writer.add_input(f"checkpoint:{i}", open_artifact(ref.path))
        if cfg.stats is not None:
            writer.add_input("stats", open_artifact(cfg.stats))
        writer.details.update(
            {
                "eval_id": ident,
                "suite": report.suite,
                "stages": list(report.stages),
                "tasks": list(report.tasks),
                "shard": {"index": report.shard[0], "count": report.shard[1]},
                "trials": cfg.trials,
                "episodes": len(report.episodes),
                "pc_success": report.info["overall"].get("pc_success"),
                "settings": {k: v for k, v in config_to_dict(cfg).items() if k not in ("stats", "datasets")},
                "rows_resumed": report.resumed_episodes,
            }
        )
