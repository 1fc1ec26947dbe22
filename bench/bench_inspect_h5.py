"""Benchmark of ``vlacl inspect-h5``: milliseconds per episode, whatever the episode length.

Writes, once per episode length, a LIBERO-like robomimic file with h5py: two 128x128 RGB cameras
(``agentview_rgb``, ``eye_in_hand_rgb``; uint8, one frame per chunk, gzip level 4, as robomimic's
``--compress`` writes them), a 9-dimensional state (``joint_states`` 7 + ``gripper_states`` 2),
7-dimensional ``actions``, ``dones``, ``rewards`` and LIBERO's ``problem_info``. Frames are a
smooth gradient plus noise; a pool of them is deflated once and written chunk by chunk with
``write_direct_chunk``, so writing is quick and the chunks are exactly what the gzip filter
makes. Then times, in this process:

(a) baseline  a bare h5py pass that opens the file and reads every demo's ``actions`` (the least
              any per-episode summary must read),
(b) inspect   :func:`vlacl.data.inspect_h5.run_inspect_h5` with the tree on and no image sampling
              (what ``vlacl inspect-h5 FILE`` does before printing).

It prints ms/episode for both, their ratio, and the ratio to issue 3's target: at most 50 ms per
episode, at every length. The page cache is warm (the files were just written or read); times are
the best of ``--repeat`` runs. ``--check`` exits with 1 when the target is missed.

Usage::

    .venv/bin/python bench/bench_inspect_h5.py                       # 100, 1,000 and 10,000 frames
    .venv/bin/python bench/bench_inspect_h5.py --lengths 100 1000 --repeat 5 --check
    .venv/bin/python bench/bench_inspect_h5.py --dir /scratch/bench  # keep the files between runs
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import h5py
import numpy as np

TARGET_MS = 50.0
IMAGE = (128, 128, 3)
STATE = (("gripper_states", 2), ("joint_states", 7))
ACTION_DIM = 7
FRAMES_PER_FILE = 20_000
"""Episodes per file: 20,000 frames' worth (at least 2), about 2 GB of raw frames per size."""
GZIP_LEVEL = 4
"""h5py's default gzip level."""
POOL = 32
"""Distinct frames cycled through an episode: realistic texture without generating every frame."""


def frame_pool(seed: int = 0) -> np.ndarray:
    """``POOL`` frames of a shifting gradient plus noise: ``(POOL, H, W, 3)`` uint8."""
    rng = np.random.default_rng(seed)
    h, w, _ = IMAGE
    rows = np.linspace(40, 200, h)[:, None, None]  # (H, 1, 1)
    cols = np.linspace(0, 40, w)[None, :, None]  # (1, W, 1)
    tint = np.array([0.0, 10.0, 25.0])[None, None, :]  # (1, 1, C)
    frames = []
    for i in range(POOL):
        noise = rng.normal(0, 6, size=IMAGE)  # (H, W, C)
        frames.append(np.clip(rows + cols + tint + 2 * i + noise, 0, 255))
    return np.stack(frames).astype(np.uint8)  # (POOL, H, W, C)


def write_file(path: Path, length: int, episodes: int) -> Path:
    """A LIBERO-like file of ``episodes`` demos of ``length`` frames (skipped when it already exists)."""
    if path.is_file():
        return path
    chunks = [zlib.compress(frame.tobytes(), GZIP_LEVEL) for frame in frame_pool()]
    partial = path.with_suffix(".partial")
    with h5py.File(partial, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": "open the top drawer of the cabinet"})
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop", "env_kwargs": {}})
        t = np.arange(length)[:, None]  # (T, 1)
        for e in range(episodes):
            demo = data.create_group(f"demo_{e}")
            demo.attrs["num_samples"] = length
            demo.create_dataset("actions", data=np.sin(0.01 * t + np.arange(ACTION_DIM) + e))
            demo.create_dataset("dones", data=(np.arange(length) == length - 1).astype(np.uint8))
            demo.create_dataset("rewards", data=(np.arange(length) == length - 1).astype(np.float64))
            obs = demo.create_group("obs")
            for key, dim in STATE:
                obs.create_dataset(key, data=0.001 * t + np.arange(dim))
            for c, camera in enumerate(("agentview_rgb", "eye_in_hand_rgb")):
                ds = obs.create_dataset(
                    camera,
                    shape=(length, *IMAGE),
                    dtype=np.uint8,
                    chunks=(1, *IMAGE),
                    compression="gzip",
                    compression_opts=GZIP_LEVEL,
                )
                for i in range(length):
                    ds.id.write_direct_chunk((i, 0, 0, 0), chunks[(i + c + e) % POOL])
    partial.rename(path)
    return path


def baseline(path: Path) -> None:
    """Open the file and read every demo's actions."""
    with h5py.File(path, "r") as f:
        for name in f["data"]:
            f["data"][name]["actions"][()]


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 1 with ``--check`` when the target is missed."""
    from vlacl.config.inspect_h5 import InspectH5Config
    from vlacl.data.inspect_h5 import run_inspect_h5

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1_000, 10_000], help="episode lengths")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per size (the best counts)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (and keep) the files")
    parser.add_argument("--check", action="store_true", help="exit with 1 when the target is missed")
    args = parser.parse_args(argv)

    print(f"python {platform.python_version()}, h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}")
    print(
        f"{'frames':>7} {'episodes':>8} {'file MB':>8} {'baseline ms/ep':>15} {'inspect ms/ep':>14} "
        f"{'vs baseline':>12} {'vs target':>10}"
    )
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = InspectH5Config(tree=True)
        for length in args.lengths:
            episodes = max(2, FRAMES_PER_FILE // length)
            path = write_file(root / f"libero_{length}.hdf5", length, episodes)
            base = best_seconds(partial(baseline, path), args.repeat) / episodes * 1e3
            report = run_inspect_h5([path], cfg)  # warm-up; also checks the file is read as intended
            assert [row.length for row in report.files[0].episodes] == [length] * episodes
            ms = best_seconds(partial(run_inspect_h5, [path], cfg), args.repeat) / episodes * 1e3
            worst = max(worst, ms)
            size = path.stat().st_size / 1e6
            print(
                f"{length:>7,} {episodes:>8} {size:>8.0f} {base:>15.2f} {ms:>14.2f} {ms / base:>11.1f}x "
                f"{ms / TARGET_MS:>9.2f}x"
            )
    ok = worst <= TARGET_MS
    verdict = "ok" if ok else "MISSED"
    print(f"target: inspect <= {TARGET_MS:.0f} ms/episode at every length: worst {worst:.2f} ms {verdict}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
