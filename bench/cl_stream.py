"""Forgetting of seq, ER and MIR on a short Meta-World stream: training loss on every task after every task.

Collects scripted-expert demos of ``--tasks`` Continual World tasks (state only, no camera, so that
the run fits a laptop), computes the stats, then trains the stream task after task with the
default tiny model (``builtin:tiny``, LoRA rank 16, MLP head) once per algorithm, each task
continuing from the previous checkpoint (``--prev``). After each task it measures the mean training
loss of the checkpoint on the training samples of every task of the stream (the same loss the
optimizer minimizes, deterministic for the MLP head), and prints, per algorithm:

- the loss matrix (row: after training task i; column: loss on task j);
- the final average loss on the earlier tasks (every task but the last) after the last task;
- the average forgetting in loss: final loss on a task minus its loss right after it was trained.

With replay, the final loss on earlier tasks is expected to be lower than with plain sequential
fine-tuning (less forgetting), and MIR's at most ER's.

Usage::

    .venv/bin/python bench/cl_stream.py                              # 3 tasks x 300 steps: ~15 min on 2 cores
    .venv/bin/python bench/cl_stream.py --tasks hammer-v3,push-wall-v3 --steps 100 --algorithms seq,er
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_TASKS = "hammer-v3,push-wall-v3,faucet-close-v3"
"""The first three tasks of Continual World's CW10 (Wolczyk et al. 2021)."""


def collect(root: Path, tasks: str, episodes: int) -> tuple[Path, Path]:
    """Expert demos of ``tasks`` and their ds-stats artifact under ``root``."""
    from vlacl.config.collect_demos import CollectDemosConfig
    from vlacl.config.ds_stats import DsStatsConfig
    from vlacl.data.stats import run_ds_stats
    from vlacl.sim.collect import collect_demos

    data = root / "demos"
    collect_demos(CollectDemosConfig(stream=tasks, episodes_per_task=episodes, cameras=()), out=data)
    run_ds_stats([data], DsStatsConfig(), out=root / "stats")
    return data, root / "stats"


def task_losses(ckpt: Path, data: Path, stats: Path, tasks: int, batch: int = 64) -> list[float]:
    """Mean training loss of the checkpoint's policy on each task's training samples (all of them)."""
    from vlacl.data.normalize import load_stats
    from vlacl.training.data import build_task_data, make_loader
    from vlacl.training.policy_io import load_policy

    loaded = load_policy(ckpt, device="cpu")
    policy = loaded.policy
    policy.eval()
    losses = []
    for task in range(tasks):
        if loaded.details.get("adapter_mode") == "per-task":
            loaded.select_task(task)
        td = build_task_data([data], load_stats(stats), keymap=loaded.keymap, task=task, spec=loaded.spec)
        loader = make_loader(td.train, batch_size=batch, collate=policy.collate, workers=0, drop_last=False, seed=0)
        total, count = 0.0, 0
        with torch.no_grad():
            for b in loader:
                n = int(b["action"].shape[0])
                total += float(policy(b).loss) * n
                count += n
        losses.append(total / count)
    return losses


def main() -> None:
    """Collect, train every algorithm over the stream, print the loss matrices and the summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--algorithms", default="seq,er,mir")
    parser.add_argument("--episodes", type=int, default=20, help="expert episodes per task")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per task")
    parser.add_argument("--refresh", type=int, default=50, help="MIR's refresh interval")
    parser.add_argument("--mir-opt", action="append", default=[], help="another MIR option, KEY=VALUE (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from vlacl.config.train_task import TrainTaskConfig
    from vlacl.training.loop import run_train_task

    names = [t for t in args.tasks.split(",") if t]
    algorithms = [a for a in args.algorithms.split(",") if a]
    summary: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        data, stats = collect(root, args.tasks, args.episodes)
        print(f"collected {len(names)} tasks x {args.episodes} episodes in {time.perf_counter() - start:.0f} s")
        for algo in algorithms:
            extra = dict(item.split("=", 1) for item in args.mir_opt)
            options = {"refresh": args.refresh, **extra} if algo == "mir" else None
            prev: Path | None = None
            matrix: list[list[float]] = []
            start = time.perf_counter()
            for task in range(len(names)):
                cfg = TrainTaskConfig(
                    datasets=(data,),
                    stats=stats,
                    task=f"#{task}",
                    cl=algo,
                    cl_options=options,
                    steps=args.steps,
                    val_every=0,
                    save_every=0,
                    log_every=50,
                    seed=args.seed,
                    device="cpu",
                )
                out = root / algo / f"task{task}"
                run_train_task(cfg, out=out, prev=prev)
                matrix.append(task_losses(out, data, stats, len(names)))
                prev = out
            seconds = time.perf_counter() - start
            final = matrix[-1]
            earlier = statistics.fmean(final[:-1])
            forgetting = statistics.fmean(final[j] - matrix[j][j] for j in range(len(names) - 1))
            summary[algo] = (earlier, forgetting, seconds)
            print(f"\n{algo}: training loss after each task (rows) on each task (columns), {seconds:.0f} s")
            print("          " + " ".join(f"{n[:12]:>12}" for n in names))
            for i, row in enumerate(matrix):
                print(f"after t{i:<2}  " + " ".join(f"{v:12.4f}" for v in row))
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"stream {args.tasks}, {args.episodes} demos per task, {args.steps} steps per task, state only")
    print(f"{'algorithm':<10} {'final loss, earlier tasks':>26} {'forgetting':>11} {'train s':>8}")
    for algo, (earlier, forgetting, seconds) in summary.items():
        print(f"{algo:<10} {earlier:26.4f} {forgetting:11.4f} {seconds:8.0f}")


if __name__ == "__main__":
    main()
