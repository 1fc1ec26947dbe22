"""Benchmark of demonstration collection through vlacl's Meta-World adapter against the raw Meta-World loop.

Measures the loop ``collect-demos`` runs, the scripted expert acting and the environment stepping,
in four modes, interleaved task by task in this one process:

(a) ``raw state``      Meta-World's own goal-observable environment (``ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE``)
                       and its scripted policy: ``policy.get_action(obs)`` then ``env.step(action)``,
(b) ``vlacl state``    ``MetaWorldSimulator().make_env(task, RenderSettings())`` and ``expert(task).act``,
(c) ``raw camera``     (a) with Meta-World's own rendering of one camera: the environment made with
                       ``render_mode="rgb_array"``, ``camera_name``, 64x64, and ``env.render()`` every step
                       (gymnasium's MujocoRenderer at Meta-World's default visual settings),
(d) ``vlacl camera``   (b) with ``RenderSettings(cameras=(camera,), height=64, width=64)`` (shadows,
                       reflections and multisampling off: the defaults).

Each episode runs ``--episode-steps`` steps (a collected demonstration stops soon after success)
and then resets with the next seed, so reset costs are in. Rates are given per wall second and per
CPU second of this process (all its threads, so llvmpipe's rendering threads count): the CPU rate is
the per-core figure and holds on a machine shared with other jobs. Targets (the collection issue):
state-only at least 1000 env steps per CPU second, one 64x64 camera at least 40 frames per CPU
second. ``--check`` exits with 1 when a target is missed.

Usage::

    .venv/bin/python bench/bench_collect.py                        # MT10's tasks
    .venv/bin/python bench/bench_collect.py --tasks reach-v3,push-v3 --state-steps 3000 --check
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlacl.sim import RenderSettings, get_simulator, resolve_stream  # sets MUJOCO_GL before mujoco loads

MIN_STATE_STEPS_PER_CPU_S = 1000.0
MIN_FRAMES_PER_CPU_S = 40.0
SIZE = 64


@dataclass
class Tally:
    """Steps, wall seconds and CPU seconds of one mode, summed over tasks."""

    steps: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    per_task: dict[str, float] = field(default_factory=dict)

    def add(self, task: str, steps: int, wall_s: float, cpu_s: float) -> None:
        """Count one task's run."""
        self.steps += steps
        self.wall_s += wall_s
        self.cpu_s += cpu_s
        self.per_task[task] = steps / cpu_s

    @property
    def per_wall_s(self) -> float:
        """Steps per wall second."""
        return self.steps / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        """Steps per CPU second of this process (all threads)."""
        return self.steps / self.cpu_s


def _timed(loop: Callable[[], int]) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    steps = loop()
    return steps, time.perf_counter() - wall, time.process_time() - cpu


def _raw_env(task: str, camera: str | None) -> Any:
    """Meta-World's goal-observable environment of ``task``, rendering ``camera`` at 64x64 if given."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    if camera is None:
        observable: Any = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"]
        return observable(seed=0)
    # The goal-observable classes take no render arguments: the same setup on the base class.
    env: Any = ALL_V3_ENVIRONMENTS[task](render_mode="rgb_array", camera_name=camera, width=SIZE, height=SIZE)
    env._partially_observable = False
    del env.sawyer_observation_space
    env._set_task_called = True
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    return env


def raw_loop(task: str, steps: int, episode_steps: int, camera: str | None) -> tuple[int, float, float]:
    """Meta-World's environment and policy, as Meta-World's own examples drive them."""
    from metaworld.policies import ENV_POLICY_MAP

    env = _raw_env(task, camera)
    policy_class: Any = ENV_POLICY_MAP[task]
    policy = policy_class()

    def loop() -> int:
        done = 0
        seed = 0
        while done < steps:
            env.seed(seed)
            obs, _ = env.reset()
            for _ in range(min(episode_steps, steps - done)):
                obs, _, _, _, _ = env.step(policy.get_action(obs))
                if camera is not None:
                    env.render()
                done += 1
            seed += 1
        return done

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # metaworld.policies' gain warning, once per step
        result = _timed(loop)
    env.close()
    return result


def vlacl_loop(task: str, steps: int, episode_steps: int, camera: str | None) -> tuple[int, float, float]:
    """The adapter's environment and expert, as ``collect-demos`` drives them."""
    simulator = get_simulator("metaworld")
    render = RenderSettings(cameras=(camera,) if camera else (), height=SIZE, width=SIZE)
    env = simulator.make_env(task, render)
    expert = simulator.expert(task)

    def loop() -> int:
        done = 0
        seed = 0
        while done < steps:
            observation = env.reset(seed)
            for _ in range(min(episode_steps, steps - done)):
                observation = env.step(expert.act(observation)).observation
                done += 1
            seed += 1
        return done

    result = _timed(loop)
    env.close()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the four modes over the tasks, print the table and the targets; 1 when ``--check`` and a miss."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mt10", help="a stream preset or comma-separated v3 task names")
    parser.add_argument("--state-steps", type=int, default=1500, help="env steps per task, state only")
    parser.add_argument("--camera-steps", type=int, default=300, help="env steps per task with one camera")
    parser.add_argument(
        "--raw-camera-steps", type=int, default=40, help="env steps per task of the raw camera loop (about 8/s)"
    )
    parser.add_argument("--episode-steps", type=int, default=150, help="steps before each reset")
    parser.add_argument("--camera", default="corner", help="the camera of the camera modes")
    parser.add_argument("--check", action="store_true", help="exit with 1 when a target is missed")
    args = parser.parse_args(argv)

    stream = resolve_stream(args.tasks)
    if stream.simulator != "metaworld":
        parser.error(f"--tasks must be Meta-World tasks, got the {stream.simulator} stream {args.tasks!r}")
    tasks = list(dict.fromkeys(stream.tasks))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, MUJOCO_GL={os.environ.get('MUJOCO_GL')}"
    )
    print(
        f"tasks: {', '.join(tasks)}; per task {args.state_steps} state steps, {args.camera_steps} camera steps "
        f"({args.raw_camera_steps} raw)"
    )

    modes: dict[str, Tally] = {name: Tally() for name in ("raw state", "vlacl state", "raw camera", "vlacl camera")}
    for task in tasks:
        runs: list[tuple[str, Callable[[str, int, int, str | None], tuple[int, float, float]], int, str | None]] = [
            ("raw state", raw_loop, args.state_steps, None),
            ("vlacl state", vlacl_loop, args.state_steps, None),
            ("raw camera", raw_loop, args.raw_camera_steps, args.camera),
            ("vlacl camera", vlacl_loop, args.camera_steps, args.camera),
        ]
        for name, loop, steps, camera in runs:
            modes[name].add(task, *loop(task, steps, args.episode_steps, camera))
        print(
            f"  {task:<28} state {modes['raw state'].per_task[task]:7.0f} -> {modes['vlacl state'].per_task[task]:7.0f}"
            f"  camera {modes['raw camera'].per_task[task]:6.1f} -> {modes['vlacl camera'].per_task[task]:6.1f}"
            "  (raw -> vlacl, steps per CPU s)",
            flush=True,
        )

    print(f"\n{'mode':<14}{'steps':>8}{'wall s':>9}{'CPU s':>9}{'steps/wall s':>14}{'steps/CPU s':>13}")
    for name, tally in modes.items():
        print(
            f"{name:<14}{tally.steps:>8}{tally.wall_s:>9.2f}{tally.cpu_s:>9.2f}"
            f"{tally.per_wall_s:>14.1f}{tally.per_cpu_s:>13.1f}"
        )
    state_ratio = modes["vlacl state"].per_cpu_s / modes["raw state"].per_cpu_s
    camera_ratio = modes["vlacl camera"].per_cpu_s / modes["raw camera"].per_cpu_s
    worst_state = min(modes["vlacl state"].per_task.items(), key=lambda item: item[1])
    worst_camera = min(modes["vlacl camera"].per_task.items(), key=lambda item: item[1])
    print(f"\nvlacl / raw, per CPU s: state {state_ratio:.2f}x, one {SIZE}x{SIZE} camera {camera_ratio:.2f}x")
    checks = [
        (
            f"state-only {modes['vlacl state'].per_cpu_s:.0f} env steps per CPU s (slowest task {worst_state[0]} "
            f"{worst_state[1]:.0f}) >= {MIN_STATE_STEPS_PER_CPU_S:.0f}",
            modes["vlacl state"].per_cpu_s >= MIN_STATE_STEPS_PER_CPU_S,
        ),
        (
            f"one {SIZE}x{SIZE} camera {modes['vlacl camera'].per_cpu_s:.0f} frames per CPU s (slowest task "
            f"{worst_camera[0]} {worst_camera[1]:.0f}) >= {MIN_FRAMES_PER_CPU_S:.0f}",
            modes["vlacl camera"].per_cpu_s >= MIN_FRAMES_PER_CPU_S,
        ),
    ]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'MISS'} {text}")
    return 1 if args.check and not all(ok for _, ok in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
