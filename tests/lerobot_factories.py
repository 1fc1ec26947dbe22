"""Tiny LeRobot datasets (v3.0 and v2.1) written from known arrays, for tests that read them back."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ImageMode = Literal["none", "embedded", "files", "video"]


@dataclass
class EpisodeTruth:
    """What was written for one episode."""

    index: int
    task: str
    task_index: int
    state: np.ndarray  # (T, S)
    action: np.ndarray  # (T, A)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> (T, H, W, 3)

    @property
    def length(self) -> int:
        """Number of frames."""
        return len(self.action)


def make_episodes(
    lengths: Sequence[int],
    tasks: Sequence[str],
    *,
    state_dim: int = 4,
    action_dim: int = 3,
    cameras: Sequence[str] = (),
    image_size: tuple[int, int] = (16, 16),
    seed: int = 0,
) -> list[EpisodeTruth]:
    """Random episodes: ``lengths[i]`` frames of task ``tasks[i % len(tasks)]``; smooth images for lossy codecs."""
    rng = np.random.default_rng(seed)
    distinct = list(dict.fromkeys(tasks))
    out = []
    for i, length in enumerate(lengths):
        task = tasks[i % len(tasks)]
        images = {}
        for c, cam in enumerate(cameras):
            h, w = image_size
            base = np.linspace(0, 200, h * w, dtype=np.float64).reshape(h, w)  # (H, W)
            frames = np.stack([(base + 5 * t + 20 * c + 10 * i) % 250 for t in range(length)])  # (T, H, W)
            images[cam] = np.repeat(frames[..., None], 3, axis=-1).astype(np.uint8)  # (T, H, W, 3)
        out.append(
            EpisodeTruth(
                index=i,
                task=task,
                task_index=distinct.index(task),
                state=rng.normal(size=(length, state_dim)).astype(np.float32),
                action=rng.uniform(-1, 1, size=(length, action_dim)).astype(np.float32),
                images=images,
            )
        )
    return out


def write_lerobot(
    root: Path,
    episodes: Sequence[EpisodeTruth],
    *,
    version: Literal["v3.0", "v2.1"] = "v3.0",
    images: ImageMode = "none",
    episodes_per_file: int = 2,
    fps: int = 10,
    chunks_size: int = 1000,
) -> Path:
    """Write ``episodes`` as a LeRobot dataset at ``root`` and return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    first = episodes[0]
    cameras = list(first.images) if images != "none" else []
    features: dict[str, dict[str, object]] = {
        "observation.state": {"dtype": "float32", "shape": [first.state.shape[1]], "names": None},
        "action": {"dtype": "float32", "shape": [first.action.shape[1]], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    for cam in cameras:
        h, w = first.images[cam].shape[1:3]
        features[f"observation.images.{cam}"] = {
            "dtype": "video" if images == "video" else "image",
            "shape": [h, w, 3],
            "names": ["height", "width", "channels"],
        }
    tasks = list(dict.fromkeys(e.task for e in episodes))
    info: dict[str, object] = {
        "codebase_version": version,
        "robot_type": "test",
        "total_episodes": len(episodes),
        "total_frames": sum(e.length for e in episodes),
        "total_tasks": len(tasks),
        "chunks_size": chunks_size,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "features": features,
    }
    if version == "v3.0":
        info["data_path"] = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if cameras else None
        _write_v3(root, episodes, cameras, images, episodes_per_file, fps, tasks)
    else:
        info["total_chunks"] = 1
        info["data_path"] = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        info["video_path"] = (
            "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4" if cameras else None
        )
        _write_v21(root, episodes, cameras, images, fps, tasks, chunks_size)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return root


def _frame_table(
    eps: Sequence[EpisodeTruth], starts: Sequence[int], cameras: Sequence[str], images: ImageMode, root: Path, fps: int
) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    state = np.concatenate([e.state for e in eps])  # (N, S)
    action = np.concatenate([e.action for e in eps])  # (N, A)
    cols["observation.state"] = pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), state.shape[1])
    cols["action"] = pa.FixedSizeListArray.from_arrays(pa.array(action.ravel()), action.shape[1])
    cols["timestamp"] = pa.array(np.concatenate([np.arange(e.length) / fps for e in eps]).astype(np.float32))
    cols["frame_index"] = pa.array(np.concatenate([np.arange(e.length) for e in eps]).astype(np.int64))
    cols["episode_index"] = pa.array(np.concatenate([np.full(e.length, e.index) for e in eps]).astype(np.int64))
    cols["index"] = pa.array(np.concatenate([s + np.arange(e.length) for e, s in zip(eps, starts, strict=True)]))
    cols["task_index"] = pa.array(np.concatenate([np.full(e.length, e.task_index) for e in eps]).astype(np.int64))
    if images in ("embedded", "files"):
        from PIL import Image

        for cam in cameras:
            items: list[dict[str, bytes | str | None]] = []
            for e in eps:
                for t in range(e.length):
                    buf = io.BytesIO()
                    Image.fromarray(e.images[cam][t]).save(buf, format="PNG")
                    if images == "embedded":
                        items.append({"bytes": buf.getvalue(), "path": None})
                    else:
                        rel = f"images/observation.images.{cam}/episode_{e.index:06d}/frame_{t:06d}.png"
                        (root / rel).parent.mkdir(parents=True, exist_ok=True)
                        (root / rel).write_bytes(buf.getvalue())
                        items.append({"bytes": None, "path": rel})
            cols[f"observation.images.{cam}"] = pa.array(
                items, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            )
    return pa.table(cols)


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode ``(T, H, W, 3)`` uint8 frames as a near-lossless H.264 mp4 (qp 0, yuv444p)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0", "g": "4"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_v3(
    root: Path,
    episodes: Sequence[EpisodeTruth],
    cameras: Sequence[str],
    images: ImageMode,
    per_file: int,
    fps: int,
    tasks: Sequence[str],
) -> None:
    rows = []
    start = 0
    for file_index, lo in enumerate(range(0, len(episodes), per_file)):
        group = episodes[lo : lo + per_file]
        starts = []
        for e in group:
            starts.append(start)
            start += e.length
        data = root / f"data/chunk-000/file-{file_index:03d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frame_table(group, starts, cameras, images, root, fps), data)
        offset = 0.0
        for e, s in zip(group, starts, strict=True):
            row: dict[str, object] = {
                "episode_index": e.index,
                "tasks": [e.task],
                "length": e.length,
                "dataset_from_index": s,
                "dataset_to_index": s + e.length,
                "data/chunk_index": 0,
                "data/file_index": file_index,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
            }
            for cam in cameras if images == "video" else ():
                key = f"observation.images.{cam}"
                row[f"videos/{key}/chunk_index"] = 0
                row[f"videos/{key}/file_index"] = file_index
                row[f"videos/{key}/from_timestamp"] = offset
                row[f"videos/{key}/to_timestamp"] = offset + e.length / fps
            offset += e.length / fps
            rows.append(row)
        for cam in cameras if images == "video" else ():
            frames = np.concatenate([e.images[cam] for e in group])  # (N, H, W, 3)
            write_video(root / f"videos/observation.images.{cam}/chunk-000/file-{file_index:03d}.mp4", frames, fps)
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(
        pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks)}),
        root / "meta/tasks.parquet",
    )


def _write_v21(
    root: Path,
    episodes: Sequence[EpisodeTruth],
    cameras: Sequence[str],
    images: ImageMode,
    fps: int,
    tasks: Sequence[str],
    chunks_size: int,
) -> None:
    start = 0
    lines = []
    for e in episodes:
        chunk = e.index // chunks_size
        data = root / f"data/chunk-{chunk:03d}/episode_{e.index:06d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frame_table([e], [start], cameras, images, root, fps), data)
        start += e.length
        for cam in cameras if images == "video" else ():
            key = f"observation.images.{cam}"
            write_video(root / f"videos/chunk-{chunk:03d}/{key}/episode_{e.index:06d}.mp4", e.images[cam], fps)
        lines.append(json.dumps({"episode_index": e.index, "tasks": [e.task], "length": e.length}))
    (root / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    (root / "meta/tasks.jsonl").write_text(
        "\n".join(json.dumps({"task_index": i, "task": t}) for i, t in enumerate(tasks)) + "\n"
    )
