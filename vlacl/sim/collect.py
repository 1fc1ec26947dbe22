"""Collect scripted-expert demonstrations of a task stream into a LeRobot v3.0 dataset artifact.

For every task of the stream, the simulator's scripted expert runs episodes until
``episodes_per_task`` are kept (only successful ones unless ``keep_failures``) or the task's
attempts run out. Each attempt resets with a seed derived from the master seed, the task's name and
the attempt number (:func:`episode_seeds`), stored in the episodes' metadata (``vlacl_seed``) so an
episode can be replayed: reset with that seed and step the recorded actions.

Tasks run in worker processes (spawned) or, with one worker, in this process; either way a task's
episodes are encoded where they are collected (images as PNG) and written to a work area, and this
process appends them to the dataset in stream order, so the dataset is byte-identical whatever the
number of workers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
import queue
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa

from vlacl.artifacts.writer import ArtifactWriter, check_output_dir
from vlacl.config.collect_demos import CollectDemosConfig
from vlacl.config.core import dump_config
from vlacl.data.features import ACTION
from vlacl.data.lerobot_writer import (
    CODEBASE_VERSION,
    EncodedEpisode,
    EpisodeBuilder,
    FeatureSpec,
    LeRobotWriter,
    Stats,
)
from vlacl.errors import ConfigError, VlaclError
from vlacl.sim.base import RenderSettings, SimEnv, Simulator

log = logging.getLogger(__name__)

REWARD: Final = "next.reward"
SUCCESS: Final = "next.success"
CONTROL_HZ: Final[Mapping[str, int]] = {"metaworld": 80, "libero": 20}
"""Control rate of each simulator, the dataset's default fps: Meta-World steps 5 x 2.5 ms, LIBERO at 20 Hz."""
SIMULATOR_PACKAGES: Final[Mapping[str, str]] = {"metaworld": "metaworld", "libero": "libero"}
"""Distribution whose version the manifest records for each simulator."""
EPISODE_COLUMNS: Final[Mapping[str, pa.DataType]] = {
    "vlacl_seed": pa.int64(),
    "vlacl_task": pa.string(),
    "vlacl_attempt": pa.int64(),
    "vlacl_success": pa.bool_(),
}
"""vlacl's extra columns of meta/episodes: the reset seed, the simulator's task name, the attempt, the outcome."""
WORK_DIR: Final = ".collect-work"
POLL_SECONDS: Final = 0.1


class NoDemonstrationsError(VlaclError):
    """No episode could be kept: the experts failed every attempt."""


@dataclass(frozen=True)
class SimSource:
    """Where the tasks come from.

    Attributes:
        stream: The stream's name (a preset, or the task list as given).
        simulator: The simulator's name (``metaworld``, ``libero``, ...).
        tasks: The tasks, in stream order.
        factory: Makes the simulator; called once per task, in the process that collects it, so it must
            pickle (a module-level function or class, or a ``functools.partial`` of one).
    """

    stream: str
    simulator: str
    tasks: tuple[str, ...]
    factory: Callable[[], Simulator]


@dataclass(frozen=True)
class TaskProgress:
    """How far one task is: episodes kept out of the target, attempts so far, finished or not."""

    task: str
    position: int
    kept: int
    target: int
    attempts: int
    successes: int
    finished: bool = False


ProgressFn = Callable[[TaskProgress], None]


@dataclass(frozen=True)
class TaskReport:
    """One task's outcome: the expert's success rate over its attempts, and what was kept."""

    task: str
    instruction: str
    attempts: int
    successes: int
    episodes: int
    frames: int

    @property
    def success_rate(self) -> float:
        """Successes per attempt."""
        return self.successes / self.attempts if self.attempts else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the success rate."""
        return {**asdict(self), "success_rate": self.success_rate}


@dataclass(frozen=True)
class CollectReport:
    """What ``collect-demos`` wrote."""

    out: Path
    stream: str
    simulator: str
    simulator_version: str | None
    fps: int
    tasks: tuple[TaskReport, ...]
    episodes: int
    frames: int
    data_files: tuple[str, ...]
    short_tasks: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "out": str(self.out),
            "stream": self.stream,
            "simulator": self.simulator,
            "simulator_version": self.simulator_version,
            "fps": self.fps,
            "episodes": self.episodes,
            "frames": self.frames,
            "data_files": list(self.data_files),
            "short_tasks": list(self.short_tasks),
            "tasks": [t.to_dict() for t in self.tasks],
        }


def episode_seeds(seed: int, task: str, attempt: int) -> tuple[int, int]:
    """The reset seed and the action-noise seed of one attempt of one task.

    They depend on the master seed, the task's name (not its place in the stream, so a task gets the
    same episodes in every stream) and the attempt number. Reset seeds are below 2**31, which every
    simulator accepts.
    """
    key = int.from_bytes(hashlib.sha256(task.encode("utf-8")).digest()[:8], "little")
    state = np.random.SeedSequence(entropy=seed, spawn_key=(key, attempt)).generate_state(2, dtype=np.uint32)
    return int(state[0]) & 0x7FFFFFFF, int(state[1])


def resolve_source(stream: str) -> SimSource:
    """The stream's simulator and tasks, from vlacl's stream presets and simulator registry."""
    from vlacl.sim.registry import get_simulator
    from vlacl.sim.streams import resolve_stream

    spec = resolve_stream(stream)
    return SimSource(
        stream=spec.name,
        simulator=spec.simulator,
        tasks=tuple(spec.tasks),
        factory=functools.partial(get_simulator, spec.simulator),
    )


@dataclass(frozen=True)
class _TaskJob:
    position: int
    task: str
    factory: Callable[[], Simulator]
    render: RenderSettings
    episodes: int
    max_attempts: int
    keep_failures: bool
    stop_on_success: bool
    action_noise: float
    action_bound: float
    seed: int
    fps: int
    work_dir: Path


@dataclass(frozen=True)
class _Fragment:
    path: Path
    features: tuple[FeatureSpec, ...]
    stats: Mapping[str, Stats]
    seed: int
    attempt: int
    success: bool


@dataclass(frozen=True)
class _TaskResult:
    position: int
    task: str
    instruction: str
    attempts: int
    successes: int
    fragments: tuple[_Fragment, ...]


def _run_task(job: _TaskJob, report: ProgressFn | None) -> _TaskResult:
    """Collect one task's episodes into the work area."""
    simulator = job.factory()
    env = simulator.make_env(job.task, job.render)
    fragments: list[_Fragment] = []
    attempts = successes = 0

    def tell(finished: bool = False) -> None:
        if report is not None:
            report(TaskProgress(job.task, job.position, len(fragments), job.episodes, attempts, successes, finished))

    try:
        instruction = env.instruction
        tell()
        while len(fragments) < job.episodes and attempts < job.max_attempts:
            attempt = attempts
            reset_seed, noise_seed = episode_seeds(job.seed, job.task, attempt)
            episode, success = _rollout(env, simulator, job, reset_seed, noise_seed)
            attempts += 1
            successes += int(success)
            if success or job.keep_failures:
                path = job.work_dir / f"{job.position:05d}-{attempt:05d}.arrow"
                with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, episode.table.schema) as ipc:
                    ipc.write_table(episode.table)
                fragments.append(_Fragment(path, episode.features, episode.stats, reset_seed, attempt, success))
            tell()
    finally:
        env.close()
    tell(finished=True)
    return _TaskResult(job.position, job.task, instruction, attempts, successes, tuple(fragments))


def _rollout(
    env: SimEnv, simulator: Simulator, job: _TaskJob, reset_seed: int, noise_seed: int
) -> tuple[EncodedEpisode, bool]:
    """One episode of the expert: frames are (observation, action, reward and success after the action)."""
    expert = simulator.expert(job.task)
    rng = np.random.default_rng(noise_seed)
    builder = EpisodeBuilder(job.fps)
    observation = env.reset(reset_seed)
    success = False
    for _ in range(env.max_steps):
        action = np.asarray(expert.act(observation), dtype=np.float32)
        if action.shape != (env.action_dim,):
            raise VlaclError(
                f"the expert of {job.task} returned an action of shape {action.shape}, the environment takes "
                f"({env.action_dim},): the simulator adapter is inconsistent"
            )
        if job.action_noise > 0:
            noisy = action + rng.normal(0.0, job.action_noise, size=action.shape)
            action = np.clip(noisy, -job.action_bound, job.action_bound).astype(np.float32)
        result = env.step(action)
        frame: dict[str, Any] = {**observation, ACTION: action}
        frame[REWARD] = np.float32(result.reward)
        frame[SUCCESS] = np.bool_(result.success)
        builder.add_frame(frame)
        observation = result.observation
        if result.success:
            success = True
            if job.stop_on_success:
                break
        if result.done:
            break
    return builder.finish(), success


_WORKER_QUEUE: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = progress_queue


def _run_task_in_worker(job: _TaskJob) -> _TaskResult:
    return _run_task(job, _WORKER_QUEUE.put if _WORKER_QUEUE is not None else None)


def collect_demos(
    cfg: CollectDemosConfig,
    out: Path,
    *,
    source: SimSource | None = None,
    overwrite: bool = False,
    command: Sequence[str] = (),
    progress: ProgressFn | None = None,
) -> CollectReport:
    """Run the experts of ``cfg.stream`` and write a ``dataset`` artifact at ``out``.

    Args:
        cfg: The settings.
        out: The dataset directory to write (a LeRobot v3.0 dataset plus vlacl's manifest).
        source: The simulator and tasks; by default resolved from ``cfg.stream``.
        overwrite: Replace an existing dataset artifact at ``out``.
        command: The command line, for the manifest.
        progress: Called as episodes are collected, per task.

    Raises:
        ConfigError: The stream names no task, or the simulator's fps is unknown and ``cfg.fps`` unset.
        NoDemonstrationsError: No attempt of any task could be kept.
        OutputExistsError: ``out`` may not be written.
    """
    check_output_dir(out, overwrite, kind="dataset")
    source = source or resolve_source(cfg.stream)
    if not source.tasks:
        raise ConfigError(f"stream {cfg.stream!r} names no task: name a preset or comma-separated tasks (--stream)")
    fps = cfg.fps if cfg.fps is not None else CONTROL_HZ.get(source.simulator)
    if fps is None:
        raise ConfigError(f"the control rate of simulator {source.simulator!r} is unknown: pass --fps")
    package = SIMULATOR_PACKAGES.get(source.simulator, source.simulator)
    render = RenderSettings(cameras=tuple(cfg.cameras), height=cfg.image_size, width=cfg.image_size)
    with ArtifactWriter(
        out,
        "dataset",
        command=command,
        config_yaml=dump_config(cfg),
        seed=cfg.seed,
        overwrite=overwrite,
        extra_libraries=(package,),
    ) as artifact:
        work = artifact.path / WORK_DIR
        work.mkdir()
        jobs = [
            _TaskJob(
                position=i,
                task=task,
                factory=source.factory,
                render=render,
                episodes=cfg.episodes_per_task,
                max_attempts=cfg.episodes_per_task if cfg.keep_failures else cfg.max_attempts,
                keep_failures=cfg.keep_failures,
                stop_on_success=cfg.stop_on_success,
                action_noise=cfg.action_noise,
                action_bound=cfg.action_bound,
                seed=cfg.seed,
                fps=fps,
                work_dir=work,
            )
            for i, task in enumerate(source.tasks)
        ]
        writer = LeRobotWriter(
            artifact.path,
            fps=fps,
            robot_type=source.simulator,
            data_files_size_in_mb=cfg.data_files_size_in_mb,
            extra_episode_columns=EPISODE_COLUMNS,
        )
        reports: list[TaskReport] = []

        def assemble(result: _TaskResult) -> None:
            reports.append(_append_task(writer, result))

        try:
            _run_jobs(jobs, cfg.workers, progress, assemble)
            shutil.rmtree(work)
            if writer.features is None:
                attempts = sum(r.attempts for r in reports)
                raise NoDemonstrationsError(
                    f"the experts of stream {source.stream!r} succeeded in none of {attempts} attempts, so no episode "
                    "was kept: check the simulator install (vlacl collect-demos -v shows each task), or pass "
                    "--keep-failures to keep failed episodes"
                )
            summary = writer.close()
        except BaseException:
            writer.abort()
            raise
        from importlib.metadata import PackageNotFoundError, version

        try:
            sim_version: str | None = version(package)
        except PackageNotFoundError:
            sim_version = None
        short = tuple(r.task for r in reports if r.episodes < cfg.episodes_per_task)
        for task in short:
            log.warning("task %s: fewer than %d episodes kept, see its success rate", task, cfg.episodes_per_task)
        artifact.details.update(
            {
                "format": f"lerobot_{CODEBASE_VERSION}",
                "stream": source.stream,
                "simulator": source.simulator,
                "simulator_version": sim_version,
                "tasks": [
                    {**r.to_dict(), "task_index": summary.tasks.index(r.instruction) if r.episodes else None}
                    for r in reports
                ],
                "episodes": summary.episodes,
                "frames": summary.frames,
                "fps": fps,
                "render": asdict(render),
                "seed": cfg.seed,
                "action_noise": cfg.action_noise,
                "keep_failures": cfg.keep_failures,
                "short_tasks": list(short),
            }
        )
    report = CollectReport(
        out=Path(out),
        stream=source.stream,
        simulator=source.simulator,
        simulator_version=sim_version,
        fps=fps,
        tasks=tuple(reports),
        episodes=summary.episodes,
        frames=summary.frames,
        data_files=summary.data_files,
        short_tasks=short,
    )
    log.info("wrote %d episodes (%d frames) of %d tasks to %s", report.episodes, report.frames, len(reports), out)
    return report


def _append_task(writer: LeRobotWriter, result: _TaskResult) -> TaskReport:
    """Append a task's kept episodes to the dataset, in attempt order, and free the work area."""
    frames = 0
    for fragment in result.fragments:
        with pa.OSFile(str(fragment.path), "rb") as source:
            table = pa.ipc.open_file(source).read_all()
        episode = EncodedEpisode(fragment.features, table, fragment.stats)
        writer.add_encoded(
            episode,
            result.instruction,
            extra={
                "vlacl_seed": fragment.seed,
                "vlacl_task": result.task,
                "vlacl_attempt": fragment.attempt,
                "vlacl_success": fragment.success,
            },
        )
        frames += episode.length
        fragment.path.unlink()
    log.info(
        "task %s: expert succeeded %d of %d attempts, kept %d episodes (%d frames)",
        result.task,
        result.successes,
        result.attempts,
        len(result.fragments),
        frames,
    )
    return TaskReport(result.task, result.instruction, result.attempts, result.successes, len(result.fragments), frames)


def _run_jobs(
    jobs: Sequence[_TaskJob],
    workers: int,
    progress: ProgressFn | None,
    assemble: Callable[[_TaskResult], None],
) -> None:
    """Run every job; hand each result to ``assemble`` in job order, as soon as it and those before it are done."""
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            assemble(_run_task(job, progress))
        return
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    pool = ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(events,))
    try:
        pending = [pool.apply_async(_run_task_in_worker, (job,)) for job in jobs]
        done = 0
        while done < len(pending):
            _drain(events, progress, timeout=POLL_SECONDS)
            while done < len(pending) and pending[done].ready():
                result = pending[done].get()
                _drain(events, progress, timeout=None)
                assemble(result)
                done += 1
        pool.close()
        pool.join()
        _drain(events, progress, timeout=None)
    except BaseException:
        pool.terminate()
        pool.join()
        raise


def _drain(events: Any, progress: ProgressFn | None, *, timeout: float | None) -> None:
    """Pass on the progress events waiting (after waiting up to ``timeout`` for the first one)."""
    try:
        event = events.get(timeout=timeout) if timeout else events.get_nowait()
    except queue.Empty:
        return
    while True:
        if progress is not None:
            progress(event)
        try:
            event = events.get_nowait()
        except queue.Empty:
            return
