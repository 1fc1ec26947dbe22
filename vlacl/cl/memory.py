"""Episodic memory by reference, shared by the replay-based algorithms (ER, MIR, A-GEM).

The memory holds :class:`~vlacl.cl.base.SampleRef` s (dataset fingerprint, episode, frame) and the
stream position of the task each came from, never copies of frames: a checkpoint of a 10,000-sample
memory stays a few hundred kB, and replay reads the samples from the datasets like training does.

Filling happens once per task, at its end, from the task's training samples:

- ``quota``: ``per_task`` samples drawn uniformly without replacement from each task (all of them
  when the task has fewer); the memory grows by ``per_task`` per task (LIBERO's ER baseline keeps a
  fixed number per task the same way).
- ``reservoir`` (Vitter 1985; Chaudhry et al. 2019): a buffer of ``size`` samples that is at every
  point a uniform sample of all the training samples of the tasks so far; the task's samples are
  offered in a seeded random order.

Every process computes the same memory from the same seed (no communication). Sampling a replay
batch is :class:`ReplaySampler`: an endless, seeded stream of index lists, uniform over the memory or
balanced over its tasks, that each process draws with its own seed and that restarts at any draw.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from vlacl.cl.base import SampleRef, TaskContext
from vlacl.config.core import invalid, setting
from vlacl.errors import ArtifactError

Selection = Literal["quota", "reservoir"]
Sampling = Literal["uniform", "balanced"]


@dataclass(frozen=True)
class MemoryOptions:
    """The memory's options shared by the replay-based algorithms (``--cl-opt KEY=VALUE``)."""

    selection: Selection = setting(
        "quota",
        "How the memory is filled at each task's end: quota (per_task samples of every task) or reservoir "
        "(a uniform sample of size samples over all tasks so far).",
        flag="--cl-opt selection",
    )
    per_task: int = setting(
        500, "Samples kept per task with selection=quota (all of a task's when it has fewer).", flag="--cl-opt per_task"
    )
    size: int = setting(2000, "Capacity of the memory with selection=reservoir.", flag="--cl-opt size")
    sampling: Sampling = setting(
        "uniform",
        "How memory samples are drawn: uniform over the memory, or balanced (each row picks a task "
        "uniformly, then one of its samples).",
        flag="--cl-opt sampling",
    )
    seed: int | None = setting(
        None, "Seed of the memory selection and of the draws from it; none uses --seed.", flag="--cl-opt seed"
    )

    def __post_init__(self) -> None:
        cls = type(self)
        if self.per_task < 1:
            raise invalid("per_task", f"must be >= 1, got {self.per_task}", cls)
        if self.size < 1:
            raise invalid("size", f"must be >= 1, got {self.size}", cls)
        if self.seed is not None and self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", cls)

    def seed_for(self, ctx: TaskContext) -> int:
        """The ``seed`` option, or ``--seed``."""
        return self.seed if self.seed is not None else ctx.seed


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every one of ``parts`` (non-negative integers)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class ReplayMemory:
    """The samples kept from earlier tasks, by reference.

    Attributes:
        refs: The samples, in slot order.
        tasks: The stream position of each sample's task (same length as ``refs``).
        seen: Training samples offered to the memory so far (the reservoir's counter).
    """

    refs: list[SampleRef] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)
    seen: int = 0

    def __len__(self) -> int:
        return len(self.refs)

    def task_counts(self) -> dict[int, int]:
        """Samples per task position, in task order."""
        counts: dict[int, int] = {}
        for t in sorted(self.tasks):
            counts[t] = counts.get(t, 0) + 1
        return counts

    def add_task(self, ctx: TaskContext, options: MemoryOptions) -> int:
        """Offer the task's training samples (``ctx.train_dataset``) to the memory; returns how many were kept.

        ``per_task`` applies to ``quota``, ``size`` to ``reservoir``. The choice depends only on
        the seed, the task's position and the number of its samples.
        """
        selection, per_task, size, seed = options.selection, options.per_task, options.size, options.seed_for(ctx)
        if ctx.sample_refs is None:
            raise RuntimeError("the task context cannot name samples (sample_refs is missing)")
        n = len(ctx.train_dataset)
        rng = np.random.default_rng([seed, ctx.task, n])
        if selection == "quota":
            chosen = np.sort(rng.choice(n, size=min(per_task, n), replace=False)) if n else np.zeros(0, np.int64)
            refs = ctx.sample_refs([int(i) for i in chosen])
            self.refs.extend(refs)
            self.tasks.extend([ctx.task] * len(refs))
            self.seen += n
            return len(refs)
        slots = _reservoir_slots(rng, n, seen=self.seen, filled=len(self.refs), size=size)
        if slots:
            order = sorted(slots)  # memory slot -> the task's sample index that ends up there
            refs = ctx.sample_refs([slots[s] for s in order])
            for slot, ref in zip(order, refs, strict=True):
                if slot == len(self.refs):
                    self.refs.append(ref)
                    self.tasks.append(ctx.task)
                else:
                    self.refs[slot] = ref
                    self.tasks[slot] = ctx.task
        self.seen += n
        return len(slots)

    def state_dict(self, prefix: str = "memory.") -> dict[str, Any]:
        """Tensors of dataset index, episode, frame and task per slot; the fingerprints and counter as JSON."""
        fingerprints = sorted({r.dataset_fingerprint for r in self.refs})
        index = {fp: i for i, fp in enumerate(fingerprints)}
        return {
            f"{prefix}dataset": torch.tensor([index[r.dataset_fingerprint] for r in self.refs], dtype=torch.int64),
            f"{prefix}episode": torch.tensor([r.episode for r in self.refs], dtype=torch.int64),
            f"{prefix}frame": torch.tensor([r.frame for r in self.refs], dtype=torch.int64),
            f"{prefix}task": torch.tensor(self.tasks, dtype=torch.int64),
            f"{prefix}fingerprints": fingerprints,
            f"{prefix}seen": self.seen,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], prefix: str = "memory.") -> ReplayMemory:
        """The memory :meth:`state_dict` saved; an empty one when ``state`` has none.

        Raises:
            ArtifactError: The saved memory is inconsistent (columns of different lengths, an unknown dataset).
        """
        if f"{prefix}episode" not in state:
            return cls()
        try:
            fps = [str(f) for f in state[f"{prefix}fingerprints"]]
            columns = [state[f"{prefix}{k}"].tolist() for k in ("dataset", "episode", "frame", "task")]
            datasets, episodes, frames, tasks = columns
            if len({len(c) for c in columns}) != 1:
                raise ValueError("columns of different lengths")
            refs = [SampleRef(fps[d], int(e), int(f)) for d, e, f in zip(datasets, episodes, frames, strict=True)]
            return cls(refs=refs, tasks=[int(t) for t in tasks], seen=int(state[f"{prefix}seen"]))
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"the replay memory in the CL state is damaged ({exc}): retrain the previous task or start the "
                "stream over"
            ) from None


def _reservoir_slots(rng: np.random.Generator, n: int, *, seen: int, filled: int, size: int) -> dict[int, int]:
    """Reservoir sampling of ``n`` new items into a buffer of ``size`` holding ``filled`` after ``seen`` items.

    Returns memory slot -> index of the new item that holds it at the end (slots equal to or past
    ``filled`` are appended in order). Items are offered in a random order drawn from ``rng``.
    """
    order = rng.permutation(n)
    draws = rng.random(n)
    slots: dict[int, int] = {}
    count = filled
    for j in range(n):
        offered = seen + j + 1  # the item's position in the whole stream (1-based)
        if count < size:
            slots[count] = int(order[j])
            count += 1
            continue
        slot = int(draws[j] * offered)  # uniform in [0, offered)
        if slot < size:
            slots[slot] = int(order[j])
    return slots


class ReplaySampler:
    """Endless index lists of ``batch`` memory slots: uniform over slots, or balanced over tasks.

    Draw ``i`` depends only on ``(seed, rank, i)``, so a stream restarted at ``start=i`` continues
    exactly (resume): the consumer counts the batches it used and restarts there. Uniform sampling
    draws without replacement within a draw unless the memory is smaller than the batch; balanced
    sampling picks a task per row, then a slot of that task.
    """

    def __init__(
        self, tasks: Sequence[int], batch: int, *, sampling: Sampling, seed: int, rank: int = 0, start: int = 0
    ) -> None:
        """Sample over a memory whose slots belong to ``tasks`` (one entry per slot)."""
        if not tasks:
            raise ValueError("cannot sample from an empty memory")
        self.tasks = np.asarray(tasks, dtype=np.int64)
        self.batch = batch
        self.sampling = sampling
        self.seed = seed
        self.rank = rank
        self.start = start
        self.by_task = [np.flatnonzero(self.tasks == t) for t in np.unique(self.tasks)]

    def indices(self, draw: int) -> list[int]:
        """The slots of draw number ``draw``."""
        rng = np.random.default_rng([self.seed, self.rank, draw])
        n = len(self.tasks)
        if self.sampling == "uniform":
            return [int(i) for i in rng.choice(n, size=self.batch, replace=n < self.batch)]
        picks = rng.integers(0, len(self.by_task), size=self.batch)  # a task per row, uniform over tasks
        return [int(self.by_task[t][rng.integers(0, len(self.by_task[t]))]) for t in picks]

    def __iter__(self) -> Iterator[list[int]]:
        """Draws ``start``, ``start + 1``, ... (a DataLoader prefetches ahead: count what you consume)."""
        draw = self.start
        while True:
            yield self.indices(draw)
            draw += 1
