"""A task's training and validation data: stream task -> windowed datasets -> data loaders.

The training sampler is a seeded permutation per epoch whose position can be saved and restored,
so a resumed run sees exactly the batches an uninterrupted one would. It has no ``set_epoch``
(accelerate would call it at every new iterator); the loop moves it with :meth:`ResumableSampler.seek`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from vlacl.data.episode import EpisodeDataset, dataset_fingerprint
from vlacl.data.features import ACTION, role_of
from vlacl.data.keymap import KeyMap
from vlacl.data.normalize import Normalizer, StatsFile
from vlacl.data.stream import PartitionMode, StreamTask, TaskStream
from vlacl.data.windows import ShortEpisodes, WindowedDataset, WindowSpec
from vlacl.errors import InputFormatError

log = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """Indices of a seeded permutation of ``n`` samples per epoch, from a saved position on.

    Every process of a distributed run iterates the same permutation (same seed); accelerate's
    batch sampler shard gives each process its batches.
    """

    def __init__(self, n: int, seed: int, *, shuffle: bool = True) -> None:
        """``n`` samples; epoch ``e`` is the permutation drawn from seed ``(seed, e)``."""
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def seek(self, epoch: int, start: int) -> None:
        """Make the next iteration begin at position ``start`` of epoch ``epoch``'s permutation."""
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch``."""
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[int]:
        """The indices from the current position to the end of the epoch."""
        yield from self.order(self.epoch)[self.start :].tolist()

    def __len__(self) -> int:
        """Indices left in the current epoch."""
        return self.n - self.start


def observation_keys(datasets: Sequence[EpisodeDataset], keymap: KeyMap | None = None) -> list[str]:
    """The state, camera and extra sensor keys every dataset has, in the first dataset's order.

    Extra sensor streams are the key map's ``extra`` names (``observation.force``, ...); a stream
    that some dataset lacks is refused rather than dropped, since the policy would be built without it.

    Raises:
        InputFormatError: An extra stream of the key map that a dataset does not have.
    """
    first = datasets[0].features
    keys = [k for k in first if role_of(k) in ("state", "image")]
    keys = [k for k in keys if all(k in d.features for d in datasets)]
    for name in sensor_keys(keymap):
        missing = [str(d.root) for d in datasets if name not in d.features]
        if missing:
            raise InputFormatError(
                f"key map extra stream {name!r} is missing from dataset(s) {', '.join(missing)}: give every dataset "
                "the column, or drop it from the key map's extra"
            )
        keys.append(name)
    return keys


def sensor_keys(keymap: KeyMap | None) -> list[str]:
    """The extra sensor streams of a key map (its ``extra`` names, in order)."""
    return list((keymap.extra or {}) if keymap is not None else {})


def task_normalizer(stats: StatsFile, keys: Sequence[str]) -> Normalizer:
    """The normalizer of a task's non-image observation keys and the action.

    Extra sensor streams are normalized as the stats say (``norm_mode``; ``none`` unless ds-stats
    was told otherwise); a stream the stats do not describe passes through unchanged.
    """
    wanted = [k for k in (*keys, ACTION) if role_of(k) != "image"]
    features = dict(stats.features)
    absent = [k for k in wanted if k not in features and role_of(k) == "other"]
    if not absent:
        return Normalizer.from_stats(stats, keys=wanted)
    for key in absent:
        log.warning("the stats at %s do not describe %s: it is not normalized", stats.source, key)
    data = {**stats.data, "features": {**features, **{k: {"norm_mode": "none"} for k in absent}}}
    return Normalizer.from_stats(data, keys=wanted)


def train_fingerprint(datasets: Sequence[EpisodeDataset], task: StreamTask, spec: WindowSpec) -> str:
    """sha256 of the task's training samples: the datasets, the training episodes and the window."""
    ident = {
        "datasets": [dataset_fingerprint(d) for d in datasets],
        "train": [[r.dataset, r.episode] for r in task.train],
        "history": spec.history,
        "chunk": spec.chunk,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


@dataclass
class TaskData:
    """The data of one task of a stream.

    Attributes:
        stream: The whole stream (every task, for the stream position and replay references).
        task: The task trained.
        train: Its training samples.
        val: Its validation samples (held-out episodes), or ``None`` when the task has none.
        normalizer: Normalization of the state and the action from the stats.
        keymap: The key map the datasets were read with.
        fingerprint: :func:`train_fingerprint` of the training samples.
        dataset_fingerprints: Fingerprint of each dataset, in stream order.
    """

    stream: TaskStream
    task: StreamTask
    train: WindowedDataset
    val: WindowedDataset | None
    normalizer: Normalizer
    keymap: KeyMap
    fingerprint: str
    dataset_fingerprints: tuple[str, ...]


def build_task_data(
    paths: Sequence[Path],
    stats: StatsFile,
    *,
    keymap: KeyMap,
    task: str | int,
    spec: WindowSpec,
    partition: PartitionMode = "auto",
    order: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    short: ShortEpisodes = "skip",
    max_val_episodes: int | None = None,
) -> TaskData:
    """Open the datasets, check the stats belong to them, build the stream and the task's datasets.

    Raises:
        VlaclError: Unreadable datasets, stats of other data, an unknown task, episodes too short.
    """
    from vlacl.data.normalize import check_stats_match
    from vlacl.data.open import open_datasets
    from vlacl.data.stream import build_stream

    datasets = open_datasets(list(paths), keymap)
    check_stats_match(stats, datasets, keymap)
    stream = build_stream(datasets, partition=partition, order=order, val_fraction=val_fraction, seed=split_seed)
    chosen = stream.task(task)
    keys = observation_keys(datasets, keymap)
    normalizer = task_normalizer(stats, keys)
    train = WindowedDataset(
        stream.episodes(chosen.train), spec, observation_keys=keys, normalizer=normalizer, short=short
    )
    val_refs = chosen.val[:max_val_episodes] if max_val_episodes is not None else chosen.val
    val_episodes = stream.episodes(val_refs)
    if short == "skip" and val_episodes:
        long_enough = [ep for ep in val_episodes if ep.length >= spec.min_length]
        if not long_enough:
            log.warning(
                "task %d %r: every validation episode is shorter than %d frames (history %d + chunk %d): "
                "training without validation",
                chosen.position,
                chosen.key,
                spec.min_length,
                spec.history,
                spec.chunk,
            )
        val_episodes = long_enough
    val = None
    if val_episodes:
        val = WindowedDataset(val_episodes, spec, observation_keys=keys, normalizer=normalizer, short=short)
    log.info(
        "task %d %r: %d training samples from %d episodes, %d validation samples",
        chosen.position,
        chosen.key,
        len(train),
        len(chosen.train),
        0 if val is None else len(val),
    )
    return TaskData(
        stream=stream,
        task=chosen,
        train=train,
        val=val,
        normalizer=normalizer,
        keymap=keymap,
        fingerprint=train_fingerprint(datasets, chosen, spec),
        dataset_fingerprints=tuple(dataset_fingerprint(d) for d in datasets),
    )


def make_loader(
    dataset: torch.utils.data.Dataset[Any],
    *,
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    workers: int,
    sampler: Sampler[int] | None = None,
    drop_last: bool = True,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader[Any]:
    """A DataLoader with the policy's collate function, workers, pinned memory and its own generator.

    The loader's own generator keeps worker seeding from drawing on the global RNG, so a resumed
    run and an uninterrupted one draw the same random numbers in the model.
    """
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=gen,
    )


def move_batch(batch: Any, device: torch.device) -> Any:
    """A collated batch (tensors, nested dicts, other values) with its tensors on ``device`` (non-blocking)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch
