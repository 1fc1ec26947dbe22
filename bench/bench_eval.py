"""Benchmark of ``eval-suite`` rollouts: episodes per second with N worker processes against one.

Builds a small Meta-World stream (state-only demos of ``--tasks``, their stats, one task checkpoint
of the built-in tiny policy trained for a few steps: its success does not matter here), then runs
``run_eval_suite`` on it with one worker and with ``--workers`` workers, interleaved ``--repeat``
times, every episode a fixed ``--max-steps`` long (the policy barely trained, so episodes rarely end
early; the rows report the steps taken). Prints episodes per second (wall clock, worker start-up
included), the scaling efficiency ``rate(N) / (N * rate(1))`` and each rollout step split into
simulator and policy time. Target (the evaluation issue): efficiency at least 0.8 up to the core
count; ``--check`` exits with 1 when it is missed.

Usage::

    .venv/bin/python bench/bench_eval.py                      # N = the core count, 4 tasks x 16 trials
    .venv/bin/python bench/bench_eval.py --workers 4 --trials 24 --check
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vlacl.sim  # noqa: F401  (MuJoCo's GL setting first)
from vlacl.config.eval_suite import EvalSuiteConfig
from vlacl.evaluation.runner import EvalReport, run_eval_suite

MIN_EFFICIENCY = 0.8
TASKS = "reach-v3,button-press-topdown-v3,window-close-v3,faucet-close-v3"


def cli(*args: str) -> None:
    """Run a vlacl command in a subprocess, quietly."""
    subprocess.run([sys.executable, "-m", "vlacl", "-q", *args], check=True, stdout=subprocess.DEVNULL)


def build(root: Path, tasks: str) -> Path:
    """Demos, stats and one task checkpoint; returns the checkpoint."""
    cli("collect-demos", "--stream", tasks, "--episodes-per-task", "2", "--out", str(root / "data"))
    cli("ds-stats", str(root / "data"), "--out", str(root / "stats"))
    ckpt = root / "task0"
    cli("train-task", "--dataset", str(root / "data"), "--stats", str(root / "stats"), "--steps", "5",
          "--out", str(ckpt))  # fmt: skip
    return ckpt


def run(ckpt: Path, args: argparse.Namespace, workers: int) -> tuple[float, EvalReport]:
    """Wall seconds and the report of one evaluation."""
    cfg = EvalSuiteConfig(
        suite=f"metaworld:{args.tasks}",
        trials=args.trials,
        envs=args.envs,
        max_steps=args.max_steps,
        workers=workers,
    )
    start = time.perf_counter()
    report = run_eval_suite([ckpt], cfg, out=None)
    return time.perf_counter() - start, report


def main() -> None:
    """Build the stream, time one worker against N, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=TASKS, help="Meta-World tasks, comma-separated")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N (default: the core count)")
    parser.add_argument("--trials", type=int, default=16, help="episodes per task")
    parser.add_argument("--envs", type=int, default=4, help="environments per worker group")
    parser.add_argument("--max-steps", type=int, default=500, help="step budget of an episode (Meta-World's own)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repetitions; the median is reported")
    parser.add_argument("--check", action="store_true", help="exit 1 when the efficiency target is missed")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per worker, in this process too
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build(Path(tmp), args.tasks)
        times: dict[int, list[float]] = {1: [], args.workers: []}
        reports: dict[int, EvalReport] = {}
        for _ in range(args.repeat):
            for workers in times:
                wall, report = run(ckpt, args, workers)
                times[workers].append(wall)
                reports[workers] = report
    episodes = len(reports[1].episodes)
    steps = int(reports[1].episodes["steps"].sum())
    print(f"{episodes} episodes ({steps} steps) of {args.tasks}, groups of {args.envs} environments")
    print(f"{'workers':>8} {'wall s':>8} {'episodes/s':>11} {'sim ms/step':>12} {'policy ms/step':>15}")
    rates: dict[int, float] = {}
    for workers, walls in times.items():
        wall = statistics.median(walls)
        rates[workers] = episodes / wall
        report = reports[workers]
        sim = 1e3 * report.sim_seconds / max(report.env_steps, 1)
        policy = 1e3 * report.policy_seconds / max(report.env_steps, 1)
        print(f"{workers:>8} {wall:>8.1f} {rates[workers]:>11.2f} {sim:>12.2f} {policy:>15.2f}")
    efficiency = rates[args.workers] / (args.workers * rates[1])
    print(
        f"scaling efficiency with {args.workers} workers: {efficiency:.2f} "
        f"(target >= {MIN_EFFICIENCY}: {'met' if efficiency >= MIN_EFFICIENCY else 'missed'})"
    )
    if args.check and efficiency < MIN_EFFICIENCY:
        sys.exit(1)


if __name__ == "__main__":
    main()
