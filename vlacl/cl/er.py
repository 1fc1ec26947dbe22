"""Experience replay (``--cl er``): train each task's batches joined with samples kept from earlier tasks.

Sources: Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning" (arXiv:1902.10486);
Rolnick et al. 2019, "Experience Replay for Continual Learning" (NeurIPS).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlacl.cl.base import Algorithm, TaskContext, parse_options, register
from vlacl.cl.memory import MemoryOptions, ReplayMemory, ReplaySampler, derived_seed
from vlacl.config.core import invalid, setting
from vlacl.errors import ConfigError

log = logging.getLogger(__name__)

MEMORY_PREFIX = "memory."
"""Prefix of the replay memory's entries in the state dict."""

REPLAY_BATCHES = "replay_batches"
"""State-dict key: replay batches consumed in the current task (where the replay stream restarts on resume)."""


@dataclass(frozen=True)
class ReplayOptions(MemoryOptions):
    """Options of ``--cl er``: the memory's and the replayed fraction (``--cl mir`` adds more)."""

    replay_fraction: float = setting(
        0.5,
        "Fraction of the trained batch that is replay: the task's B samples are joined with "
        "round(B * f / (1 - f)) replayed ones (0.5 doubles the batch; 0 replays nothing).",
        flag="--cl-opt replay_fraction",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.replay_fraction < 1.0:
            raise invalid("replay_fraction", f"must be in [0, 1), got {self.replay_fraction}", type(self))


def replay_batch_size(batch_size: int, fraction: float) -> int:
    """Replayed samples joined to a task batch of ``batch_size``: ``B * f / (1 - f)`` rounded half up."""
    return math.floor(batch_size * fraction / (1.0 - fraction) + 0.5)


@register("er")
class ExperienceReplay(Algorithm):
    """Experience replay with an episodic memory by reference (``--cl er``).

    Method: at the end of each task some of its training samples are kept in a memory (by
    reference: dataset, episode, frame). While later tasks train, every micro-batch of ``B`` task
    samples is joined with ``round(B * f / (1 - f))`` samples drawn from the memory, so that a
    fraction ``f`` of the trained batch is replay; the loss is the mean over the joined batch.
    The first task trains alone (the memory is empty).

    Sources: Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"; Rolnick et
    al. 2019, "Experience Replay for Continual Learning".

    Hyperparameters (``--cl-opt KEY=VALUE``):

    - ``selection`` (quota): ``quota`` keeps ``per_task`` samples of every task (drawn uniformly);
      ``reservoir`` keeps a uniform sample of ``size`` samples over all tasks so far.
    - ``per_task`` (500): samples kept per task with ``quota``.
    - ``size`` (2000): memory capacity with ``reservoir``.
    - ``replay_fraction`` (0.5): fraction ``f`` in [0, 1) of the trained batch that is replay.
    - ``sampling`` (uniform): ``uniform`` over the memory's samples, or ``balanced`` over its tasks.
    - ``seed`` (none = ``--seed``): seed of the memory selection and of the replay draws.

    Every process draws its own replay batches (seeded by its rank); no communication is needed.
    The memory and the count of replay batches consumed in the task are the state dict, so
    ``--prev`` hands the memory on and ``--resume`` continues the exact replay sequence.
    """

    name = "er"
    options_class: type[ReplayOptions] = ReplayOptions

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """Parse and check the options (``cl_options`` / ``--cl-opt``)."""
        super().__init__(config)
        self.options = parse_options(self.options_class, self.name, self.config)
        self.memory = ReplayMemory()
        self.consumed = 0
        self.ctx: TaskContext | None = None
        self.replay_size = 0
        self.dataset: Any = None
        self._replay: Iterator[dict[str, Any]] | None = None

    # -- hooks ----------------------------------------------------------------------------------

    def on_task_start(self, ctx: TaskContext) -> None:
        """Reset the replay count (unless resumed) and prepare the replay stream over the memory."""
        self.ctx = ctx
        if not ctx.resumed:
            self.consumed = 0
        self.replay_size = replay_batch_size(ctx.batch_size, self.options.replay_fraction)
        self.dataset = None
        self._replay = None
        if len(self.memory) and self.replay_size:
            if ctx.cached_feature_steps > ctx.step:
                raise ConfigError(
                    f"--cache-features: --cl {self.name} joins replayed samples to stage 1's batches, but only the "
                    f"task's own samples have cached backbone features: drop --cache-features with --cl {self.name}"
                )
            if ctx.ref_dataset is None:
                raise RuntimeError("the task context cannot read samples by reference (ref_dataset is missing)")
            self.dataset = ctx.ref_dataset(self.memory.refs)
        counts = self.memory.task_counts()
        log.info(
            "%s: memory holds %d samples (per task: %s); replay batch %d joined to each task batch of %d",
            self.name,
            len(self.memory),
            ", ".join(f"{t}: {n}" for t, n in counts.items()) or "none",
            self.replay_size if self.dataset is not None else 0,
            ctx.batch_size,
        )
        if self.options.replay_fraction > 0 and self.replay_size == 0:
            log.warning(
                "%s: replay_fraction %g of a batch of %d rounds to 0 replayed samples: nothing is replayed",
                self.name,
                self.options.replay_fraction,
                ctx.batch_size,
            )

    def modify_batch(self, batch: dict[str, Any], task: int) -> dict[str, Any]:
        """The task's batch joined with the next replay batch (unchanged while the memory is empty)."""
        if self.dataset is None:
            return batch
        ctx = self._context()
        replay = self._next_replay(ctx)
        joined: dict[str, Any] = ctx.policy.concat([batch, replay])
        return joined

    def on_task_end(self, ctx: TaskContext) -> None:
        """Stop the replay stream and add the task's samples to the memory."""
        self._close_replay()
        self.dataset = None
        kept = self.memory.add_task(ctx, self.options)
        log.info(
            "%s: kept %d samples of task %d (%s); memory now holds %d samples of %d task(s)",
            self.name,
            kept,
            ctx.task,
            self.options.selection,
            len(self.memory),
            len(self.memory.task_counts()),
        )

    def state_dict(self) -> dict[str, Any]:
        """The memory (tensors + JSON) and the replay batches consumed in the current task."""
        return {**self.memory.state_dict(MEMORY_PREFIX), REPLAY_BATCHES: self.consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the memory and the replay count."""
        self.memory = ReplayMemory.from_state_dict(state, MEMORY_PREFIX)
        self.consumed = int(state.get(REPLAY_BATCHES, 0))

    # -- helpers --------------------------------------------------------------------------------

    def seed(self, ctx: TaskContext) -> int:
        """The ``seed`` option, or ``--seed``."""
        return self.options.seed_for(ctx)

    def replay_seed(self, ctx: TaskContext) -> int:
        """Seed of this task's replay draws (each process adds its rank in :class:`ReplaySampler`)."""
        return derived_seed(self.seed(ctx), ctx.task, 1)

    def replay_sampler(self, ctx: TaskContext, start: int) -> Iterable[list[int]]:
        """The memory slots of replay batches ``start``, ``start + 1``, ... of this process."""
        return ReplaySampler(
            self.memory.tasks,
            self.replay_size,
            sampling=self.options.sampling,
            seed=self.replay_seed(ctx),
            rank=int(ctx.accelerator.process_index),
            start=start,
        )

    def _context(self) -> TaskContext:
        if self.ctx is None:
            raise RuntimeError(f"{self.name}: a hook ran before on_task_start")
        return self.ctx

    def _next_replay(self, ctx: TaskContext) -> dict[str, Any]:
        if self._replay is None:
            if ctx.batches is None:
                raise RuntimeError("the task context cannot load batches (batches is missing)")
            self._replay = ctx.batches(self.dataset, self.replay_sampler(ctx, self.consumed))
            with torch.random.fork_rng(devices=[]):  # the loader's first batch draws its base seed
                replay = next(self._replay)
        else:
            replay = next(self._replay)
        self.consumed += 1
        return replay

    def _close_replay(self) -> None:
        if self._replay is not None and hasattr(self._replay, "close"):
            self._replay.close()  # stops the loader's workers
        self._replay = None
