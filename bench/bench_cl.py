"""Per-step cost of the continual-learning algorithms of ``vlacl train-task``, as ratios to ER in the same run.

Builds, once, the two-task LeRobot dataset of ``bench_train_tiny.py`` (one 64x64 camera) and trains
task 0 briefly with each algorithm (so that task 1 has a memory, a Fisher, a teacher), then trains
task 1 with ``--prev`` for ``--steps`` steps with each algorithm on the default tiny model
(``builtin:tiny``, LoRA rank 16 on every linear layer, MLP head, batch 32, fp32 on the CPU) and
times every optimizer step through the loop's progress callback. Printed per algorithm: the mean
step time over the steps after the warm-up (a mean, not a median: MIR's refresh every 200 steps is
part of its cost), the median, and the ratio of the mean to ER's.

The targets of the CL issue: MIR at refresh 200 at most 1.05x ER, EWC at most 1.02x ER. ER and MIR
train on the joined batch (32 task samples + 32 replayed ones at the default replay fraction 0.5);
seq, EWC, A-GEM and LwF on the 32 task samples, so their ratios to ER are below 1 where they add
less work than replay does.

Runs are interleaved ``--repeat`` times (the machine may be shared) and the lowest mean is kept.

Usage::

    .venv/bin/python bench/bench_cl.py                         # 201 steps per algorithm: about 10 min on 2 cores
    .venv/bin/python bench/bench_cl.py --algorithms er,mir --steps 401
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: vlacl and tests' factories

import torch
from bench_train_tiny import make_data  # the script directory is on sys.path

from vlacl.config.train_task import TrainTaskConfig

BATCH = 32
WARMUP = 5
OPTIONS: dict[str, dict[str, object]] = {"mir": {"refresh": 200}}


def step_times(cfg: TrainTaskConfig, out: Path, prev: Path | None) -> list[float]:
    """Seconds of every optimizer step of one run (from one progress report to the next)."""
    from vlacl.training.loop import Progress, run_train_task

    stamps: list[float] = []

    def progress(p: Progress) -> None:
        if p.phase == "train":
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    run_train_task(cfg, out=out, prev=prev, progress=progress)
    edges = [start, *stamps]
    return [b - a for a, b in itertools.pairwise(edges)]


def main() -> None:
    """Build the data, train task 0 and task 1 with every algorithm, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default="seq,er,mir,ewc,agem,lwf")
    parser.add_argument("--steps", type=int, default=201, help="task 1 steps (MIR refreshes at 0 and 200)")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of each; the lowest mean is kept")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if "er" not in names:
        names.insert(0, "er")
    means: dict[str, float] = {}
    medians: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, stats = make_data(root, args.episodes, args.frames)
        base = TrainTaskConfig(
            datasets=(data,),
            stats=stats,
            batch_size=BATCH,
            history=1,
            chunk=4,
            log_every=50,
            val_every=0,
            save_every=0,
            device="cpu",
        )
        first: dict[str, Path] = {}
        for name in names:
            cfg = dataclasses.replace(base, cl=name, cl_options=OPTIONS.get(name), steps=5)
            first[name] = root / f"{name}-task0"
            step_times(cfg, first[name], None)
        for r in range(args.repeat):
            for name in names:
                cfg = dataclasses.replace(base, cl=name, cl_options=OPTIONS.get(name), steps=args.steps, task="#1")
                times = step_times(cfg, root / f"{name}-task1-{r}", first[name])[WARMUP:]
                mean = statistics.fmean(times)
                if name not in means or mean < means[name]:
                    means[name], medians[name] = mean, statistics.median(times)
                print(f"run {r} {name}: mean step {mean * 1000:.1f} ms over {len(times)} steps", flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"tiny default, batch {BATCH}, 64x64 camera, W=1, K=4, fp32 CPU, task 1 of 2, {args.steps} steps")
    print(f"{'algorithm':<10} {'mean ms':>9} {'median ms':>10} {'mean / ER':>10}")
    for name in names:
        ratio = means[name] / means["er"]
        print(f"{name:<10} {means[name] * 1000:9.1f} {medians[name] * 1000:10.1f} {ratio:10.3f}")


if __name__ == "__main__":
    main()
