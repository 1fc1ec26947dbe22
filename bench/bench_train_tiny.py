"""Benchmark of ``vlacl train-task`` on the built-in tiny backbone against a bare PyTorch loop.

Builds, once, a LeRobot dataset of two tasks with one 64x64 camera (``--episodes`` episodes of
``--frames`` frames, PNG frames embedded in parquet) and its ds-stats artifact, then trains task 0
with the default tiny model (``builtin:tiny``: D=128, 4 blocks, LoRA rank 16 on every linear layer,
an MLP head) at batch 32, history W=1, chunk K=4, fp32 on the CPU, and prints:

- ``vlacl``: samples/s of ``run_train_task`` (median of its logged intervals after the first, which
  holds the warm-up), and the peak resident memory of the process (``resource.getrusage``);
- ``bare``: samples/s of a plain loop over the same policy, data and AdamW (no accelerate, no
  guards, no metrics), timed in the same process after the same warm-up;
- their ratio (vlacl's overhead: 1.0 means none).

Each is run ``--repeat`` times, interleaved, and the best is shown (the machine may be shared).

Usage::

    .venv/bin/python bench/bench_train_tiny.py               # 40 steps, about a minute on 2 cores
    .venv/bin/python bench/bench_train_tiny.py --steps 100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests' data factories

import torch

from tests.lerobot_factories import make_episodes, write_lerobot
from vlacl.config.ds_stats import DsStatsConfig
from vlacl.config.train_task import TrainTaskConfig
from vlacl.data.stats import run_ds_stats

BATCH = 32
LOG_EVERY = 5


def make_data(root: Path, episodes: int, frames: int) -> tuple[Path, Path]:
    """The dataset and its stats under ``root``."""
    truth = make_episodes(
        [frames] * episodes, ["pick the cube", "open the drawer"], cameras=["front"], image_size=(64, 64), seed=0
    )
    data = write_lerobot(root / "data", truth, images="embedded")
    run_ds_stats([data], DsStatsConfig(image_frames=64), out=root / "stats")
    return data, root / "stats"


def run_vlacl(cfg: TrainTaskConfig, out: Path) -> float:
    """samples/s of run_train_task: the median of the logged intervals after the first."""
    from vlacl.training.checkpoint import METRICS_LOG_NAME
    from vlacl.training.loop import run_train_task

    run_train_task(cfg, out=out)
    records = [json.loads(x) for x in (out / METRICS_LOG_NAME).read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r.get("samples_per_s")]
    return float(statistics.median(rates[1:] or rates))


def run_bare(cfg: TrainTaskConfig, steps: int) -> float:
    """samples/s of a plain loop: same policy, data and optimizer, nothing else."""
    from vlacl.data.keymap import KeyMap
    from vlacl.data.normalize import load_stats
    from vlacl.data.windows import WindowSpec
    from vlacl.training.data import build_task_data
    from vlacl.training.model import build_model

    assert cfg.stats is not None
    stats = load_stats(cfg.stats)
    data = build_task_data(
        cfg.datasets, stats, keymap=KeyMap(), task=0, spec=WindowSpec(cfg.history, cfg.chunk), split_seed=cfg.seed
    )
    built = build_model(cfg, data, stats, None, mixed="no")
    policy = built.policy
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=BATCH, shuffle=True, drop_last=True, collate_fn=policy.collate, generator=gen
    )

    def batches() -> object:
        while True:
            yield from loader

    it = iter(batches())  # type: ignore[call-overload]
    policy.train()
    start = 0.0
    for step in range(steps):
        if step == LOG_EVERY:  # the same warm-up the vlacl figure leaves out
            start = time.perf_counter()
        batch = next(it)
        loss = policy(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (steps - LOG_EVERY) * BATCH / (time.perf_counter() - start)


def main() -> None:
    """Build the data, run both loops, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs of each; the best is shown")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, stats = make_data(root, args.episodes, args.frames)
        cfg = TrainTaskConfig(
            datasets=(data,),
            stats=stats,
            steps=args.steps,
            batch_size=BATCH,
            history=1,
            chunk=4,
            log_every=LOG_EVERY,
            val_every=0,
            save_every=0,
            device="cpu",
        )
        vlacl_rates, bare_rates = [], []
        for i in range(args.repeat):  # interleaved, so that a busy spell of a shared machine hits both
            vlacl_rates.append(run_vlacl(cfg, root / f"ckpt{i}"))
            bare_rates.append(run_bare(cfg, args.steps))
        vlacl_rate, bare_rate = max(vlacl_rates), max(bare_rates)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"tiny default, batch {BATCH}, 64x64 camera, W=1, K=4, fp32 CPU, {args.steps} steps")
    print(f"vlacl train-task: {vlacl_rate:8.1f} samples/s")
    print(f"bare loop:        {bare_rate:8.1f} samples/s")
    print(f"ratio vlacl/bare: {vlacl_rate / bare_rate:8.2f}")
    print(f"peak RSS:         {peak_mib:8.0f} MiB")


if __name__ == "__main__":
    main()
