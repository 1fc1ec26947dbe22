"""Benchmark of ``vlacl ds-stats`` against a bare pyarrow read of the same columns.

Writes, once per size, a LeRobot v3.0 dataset with pyarrow (``observation.state`` and ``action`` as
``fixed_size_list<float32>[32]`` columns plus LeRobot's index columns, 500-frame episodes, 10
tasks, about 100k rows per data file; the last action dimension is a two-level gripper). Then
runs, each in a fresh subprocess that reports its wall time and its peak resident memory (VmHWM)
above what it held before the work:

(a) read   ``pyarrow.parquet.read_table`` of ``observation.state``, ``action`` and ``task_index``,
           file by file, each column converted to a NumPy array,
(b) stats  :func:`vlacl.data.stats.compute_stats` over the dataset opened with
           :func:`vlacl.data.open.open_datasets` (the core of ``vlacl ds-stats``: global and
           per-task moments, extremes, binary detection and quantile histograms), reading
           through the LeRobot reader's ``iter_columns``,
(c) core   the same stats fed by plain ``pyarrow.parquet.ParquetFile.iter_batches`` (a file opened
           and dropped per data file), to tell the stats' own cost and memory from the reader's.

It prints the targets of issue 3: ``stats`` takes at most 2x the ``read`` of the largest size, and
its peak memory does not grow with the number of frames (the larger size's peak above start is
at most 1.25x the smaller one's plus 32 MiB). The page cache is warmed first, so every run reads
from memory; times are the best of ``--repeat`` runs (interleaved), memory the largest peak. CPU
seconds (all threads) are printed too: on a machine shared with other jobs they move much less
than wall time. ``--check`` exits with 1 when a target is missed.

Usage::

    .venv/bin/python bench/bench_ds_stats.py                        # 250k and 1M frames
    .venv/bin/python bench/bench_ds_stats.py --frames 1000000 2000000 --repeat 3 --check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

DIM = 32
EPISODE_LENGTH = 500
TASKS = 10
ROWS_PER_FILE = 100_000
MAX_VS_READ = 2.0
MEMORY_GROWTH = 1.25
MEMORY_SLACK_MIB = 32.0
COLUMNS = ("observation.state", "action", "task_index")
MODES = ("read", "stats", "core")


def write_dataset(root: Path, frames: int, seed: int = 0) -> Path:
    """Write a LeRobot v3.0 dataset of ``frames`` frames at ``root`` (skipped when it is already there)."""
    import numpy as np
    import pyarrow as pa

    if (root / "meta" / "info.json").is_file():
        return root
    rng = np.random.default_rng(seed)
    episodes = frames // EPISODE_LENGTH
    per_file = ROWS_PER_FILE // EPISODE_LENGTH
    rows: list[dict[str, Any]] = []
    for file_index, first in enumerate(range(0, episodes, per_file)):
        eps = range(first, min(first + per_file, episodes))
        n = len(eps) * EPISODE_LENGTH
        state = rng.normal(size=(n, DIM)).astype(np.float32) * np.linspace(0.1, 3.0, DIM, dtype=np.float32)
        action = rng.standard_t(4, size=(n, DIM)).astype(np.float32)
        action[:, -1] = np.where(rng.random(n) < 0.5, -1.0, 1.0)  # a gripper: two levels
        task = np.repeat([e * TASKS // episodes for e in eps], EPISODE_LENGTH)
        start = first * EPISODE_LENGTH
        table = pa.table(
            {
                "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), DIM),
                "action": pa.FixedSizeListArray.from_arrays(pa.array(action.ravel()), DIM),
                "timestamp": pa.array(np.tile(np.arange(EPISODE_LENGTH, dtype=np.float32) / 10, len(eps))),
                "frame_index": pa.array(np.tile(np.arange(EPISODE_LENGTH), len(eps))),
                "episode_index": pa.array(np.repeat(np.arange(first, first + len(eps)), EPISODE_LENGTH)),
                "index": pa.array(np.arange(start, start + n)),
                "task_index": pa.array(task.astype(np.int64)),
            }
        )
        path = root / f"data/chunk-000/file-{file_index:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for i, e in enumerate(eps):
            rows.append(
                {
                    "episode_index": e,
                    "tasks": [f"task {e * TASKS // episodes}"],
                    "length": EPISODE_LENGTH,
                    "dataset_from_index": start + i * EPISODE_LENGTH,
                    "dataset_to_index": start + (i + 1) * EPISODE_LENGTH,
                    "data/chunk_index": 0,
                    "data/file_index": file_index,
                }
            )
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(
        pa.table({"task_index": pa.array(range(TASKS), pa.int64()), "task": [f"task {t}" for t in range(TASKS)]}),
        root / "meta/tasks.parquet",
    )
    vector = {"dtype": "float32", "shape": [DIM], "names": None}
    scalar = {"shape": [1], "names": None}
    info = {
        "codebase_version": "v3.0",
        "robot_type": "bench",
        "fps": 10,
        "total_episodes": episodes,
        "total_frames": episodes * EPISODE_LENGTH,
        "total_tasks": TASKS,
        "chunks_size": 1000,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "features": {
            "observation.state": vector,
            "action": vector,
            "timestamp": {"dtype": "float32", **scalar},
            "frame_index": {"dtype": "int64", **scalar},
            "episode_index": {"dtype": "int64", **scalar},
            "index": {"dtype": "int64", **scalar},
            "task_index": {"dtype": "int64", **scalar},
        },
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return root


def _peak_kib() -> int:
    """VmHWM of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Reset VmHWM to the current resident size (Linux 4.0+), so the peak measured is the work's own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child(mode: str, root: Path) -> dict[str, float]:
    """Run one measurement in this process; return seconds and peak MiB above the start."""
    import numpy as np

    from vlacl.config.ds_stats import DsStatsConfig
    from vlacl.data.open import open_datasets
    from vlacl.data.stats import compute_stats

    files = sorted((root / "data").glob("chunk-*/file-*.parquet"))
    _reset_peak()
    before = _peak_kib()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    if mode == "read":
        rows = 0
        for path in files:
            table = pq.read_table(path, columns=list(COLUMNS))
            for name in COLUMNS:
                column = table.column(name).combine_chunks()
                if name == "task_index":
                    values = column.to_numpy()
                else:
                    values = column.flatten().to_numpy().reshape(len(column), DIM)  # (N, D)
                rows += len(values)
        assert rows == 3 * int(json.loads((root / "meta/info.json").read_text())["total_frames"])
    else:
        datasets = open_datasets([root])
        if mode == "core":
            datasets[0].iter_columns = lambda keys, rows_per_batch=65536: _plain_batches(files, keys, rows_per_batch)  # type: ignore[method-assign,misc]
        stats = compute_stats(datasets, DsStatsConfig(image_frames=0))
        assert stats["features"]["action"]["binary_dims"] == [DIM - 1]
        assert np.isfinite(stats["features"]["observation.state"]["q99"]).all()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu": _cpu_seconds() - cpu0, "peak_mib": (_peak_kib() - before) / 1024}


def _cpu_seconds() -> float:
    """User and system CPU time of this process, all threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _plain_batches(files: list[Path], keys: list[str], rows_per_batch: int) -> Any:
    """ColumnBatches straight from pyarrow, each file opened for its own batches only."""
    from vlacl.data.episode import ColumnBatch

    for path in files:
        source = pq.ParquetFile(path)
        for batch in source.iter_batches(batch_size=rows_per_batch, columns=[*keys, "task_index"]):
            columns = {k: batch.column(k).flatten().to_numpy().reshape(batch.num_rows, DIM) for k in keys}  # (N, D)
            yield ColumnBatch(columns, batch.column("task_index").to_numpy())
        source.close()


def _run_child(mode: str, root: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(root)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"the {mode} run failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    """Write the datasets, run the measurements, print the table and the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[250_000, 1_000_000], help="dataset sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best time counts")
    parser.add_argument("--workdir", type=Path, default=None, help="where to keep the datasets (default: a temp dir)")
    parser.add_argument("--check", action="store_true", help="exit with 1 when a target is missed")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="vlacl-bench-stats-") as tmp:
        work = args.workdir or Path(tmp)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
        results: dict[int, dict[str, dict[str, float]]] = {}
        for frames in sorted(args.frames):
            root = write_dataset(work / f"lerobot-{frames}", frames)
            for path in root.rglob("*.parquet"):
                path.read_bytes()  # warm the page cache
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
            for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every mode alike
                for mode in MODES:
                    runs[mode].append(_run_child(mode, root))
            results[frames] = {
                mode: {
                    "seconds": min(r["seconds"] for r in rs),
                    "cpu": min(r["cpu"] for r in rs),
                    "peak_mib": max(r["peak_mib"] for r in rs),
                }
                for mode, rs in runs.items()
            }
        print(
            f"{'frames':>9} {'read s':>7} {'stats s':>8} {'ratio':>6} {'core s':>7} {'ratio':>6} | {'read cpu':>8} "
            f"{'stats cpu':>9} {'ratio':>6} | {'read MiB':>8} {'stats MiB':>9} {'core MiB':>8}"
        )
        for frames, r in results.items():
            read, cpu = r["read"]["seconds"], r["read"]["cpu"]
            print(
                f"{frames:>9} {read:>7.3f} {r['stats']['seconds']:>8.3f} {r['stats']['seconds'] / read:>6.2f} "
                f"{r['core']['seconds']:>7.3f} {r['core']['seconds'] / read:>6.2f} | {cpu:>8.3f} "
                f"{r['stats']['cpu']:>9.3f} {r['stats']['cpu'] / cpu:>6.2f} | {r['read']['peak_mib']:>8.0f} "
                f"{r['stats']['peak_mib']:>9.0f} {r['core']['peak_mib']:>8.0f}"
            )
        largest, smallest = max(results), min(results)
        ratio = results[largest]["stats"]["seconds"] / results[largest]["read"]["seconds"]
        time_ok = ratio <= MAX_VS_READ
        print(
            f"time:   stats at {largest} frames is {ratio:.2f}x the read (target <= {MAX_VS_READ}x): "
            f"{'ok' if time_ok else 'MISSED'}"
        )
        memory_ok = True
        for mode in ("stats", "core"):
            small, large = results[smallest][mode]["peak_mib"], results[largest][mode]["peak_mib"]
            ok = large <= MEMORY_GROWTH * small + MEMORY_SLACK_MIB
            memory_ok = memory_ok and ok
            print(
                f"memory: {mode} peak {large:.0f} MiB at {largest} frames vs {small:.0f} MiB at {smallest} "
                f"(target <= {MEMORY_GROWTH}x + {MEMORY_SLACK_MIB:.0f} MiB): {'ok' if ok else 'MISSED'}"
            )
    return 1 if args.check and not (time_ok and memory_ok) else 0


if __name__ == "__main__":
    sys.exit(main())
