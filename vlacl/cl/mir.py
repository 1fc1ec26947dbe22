"""Maximally Interfered Retrieval (``--cl mir``): replay the memory samples the next update would hurt most.

Source: Aljundi et al. 2019, "Online Continual Learning with Maximally Interfered Retrieval"
(NeurIPS; arXiv:1908.04742). This version is amortized: the scoring runs every ``refresh`` steps
and the most-interfered samples are cached and replayed until the next refresh.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from vlacl.cl.base import TaskContext, register, require_unsharded
from vlacl.cl.er import ExperienceReplay, ReplayOptions
from vlacl.cl.memory import ReplaySampler, derived_seed
from vlacl.config.core import invalid, setting

log = logging.getLogger(__name__)

CACHE = "mir.cache"
"""State-dict key: the memory slots of the cache (int64 tensor), replayed until the next refresh."""

ParamChoice = Literal["lora", "all"]


@dataclass(frozen=True)
class MIROptions(ReplayOptions):
    """Options of ``--cl mir``: those of ``--cl er`` and the retrieval's."""

    refresh: int = setting(
        200,
        "Optimizer steps between two scorings of the memory (the cache is replayed in between).",
        flag="--cl-opt refresh",
    )
    candidates: int = setting(
        256,
        "Memory samples scored at each refresh (all of the memory when it holds fewer).",
        flag="--cl-opt candidates",
    )
    top_k: int = setting(
        64, "Most-interfered candidates kept in the cache that replay draws from.", flag="--cl-opt top_k"
    )
    virtual_lr: float | None = setting(
        None,
        "Learning rate of the virtual SGD step; none uses each parameter's current learning rate (its group's "
        "initial one while the schedule is at 0, e.g. at the start of a warmup).",
        flag="--cl-opt virtual_lr",
    )
    params: ParamChoice = setting(
        "lora",
        "Parameters of the virtual step: lora (the backbone's trainable ones, the adapters under --finetune lora; "
        "all trainable ones when the backbone has none) or all (every trainable parameter).",
        flag="--cl-opt params",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self)
        if self.refresh < 1:
            raise invalid("refresh", f"must be >= 1, got {self.refresh}", cls)
        if self.candidates < 1:
            raise invalid("candidates", f"must be >= 1, got {self.candidates}", cls)
        if not 1 <= self.top_k <= self.candidates:
            raise invalid("top_k", f"must be in [1, candidates={self.candidates}], got {self.top_k}", cls)
        if self.virtual_lr is not None and not self.virtual_lr > 0:
            raise invalid("virtual_lr", f"must be > 0, got {self.virtual_lr}", cls)


@register("mir")
class MaximallyInterferedRetrieval(ExperienceReplay):
    """Maximally Interfered Retrieval, amortized (``--cl mir``).

    Method: experience replay (``--cl er``: same memory, same options) whose replayed samples are
    the ones the coming update would hurt most. Every ``refresh`` optimizer steps, on the step's
    first micro-batch, ``candidates`` memory samples are drawn; the gradient ``g`` of the task
    batch's loss is taken, the virtual SGD step ``theta' = theta - lr * g`` applied, and each
    candidate's loss before and after compared (same random draws for both, so the flow head's
    noise and dropout masks cancel); the weights are then restored exactly. The ``top_k``
    candidates with the largest loss increase form the cache, and replay batches are drawn from it
    until the next refresh. The extra cost is one forward and backward of a task batch and two
    no-grad forwards of the candidates per refresh.

    Source: Aljundi et al. 2019, "Online Continual Learning with Maximally Interfered Retrieval"
    (NeurIPS). The original scores at every step; scoring every ``refresh`` steps keeps the cost
    within a few percent of experience replay.

    Hyperparameters (``--cl-opt KEY=VALUE``): those of ``er`` (``selection``, ``per_task``,
    ``size``, ``replay_fraction``, ``sampling``, applied to the cache, and ``seed``), and

    - ``refresh`` (200): optimizer steps between two scorings.
    - ``candidates`` (256): memory samples scored per refresh.
    - ``top_k`` (64): most-interfered candidates cached for replay.
    - ``virtual_lr`` (none = each parameter's current learning rate): step size of the virtual update.
    - ``params`` (lora): parameters of the virtual update, ``lora`` (the backbone's trainable ones;
      every trainable one when there are none) or ``all``.

    Every process scores its own candidates (seeded by its rank, the step and ``seed``); at each
    refresh the processes' caches are gathered (one small all-gather every ``refresh`` steps) so
    that the state dict holds every process's cache and a resume between two refreshes replays from
    the same caches on every process. The scoring passes run without autocast: the loss change of
    one small step is below bf16's resolution, so mixed precision would rank by rounding noise.
    """

    name = "mir"
    options_class: type[ReplayOptions] = MIROptions

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """Parse and check the options (``cl_options`` / ``--cl-opt``)."""
        super().__init__(config)
        self.mir: MIROptions = self.options  # type: ignore[assignment]
        self.cache: list[int] = []
        self.caches = torch.zeros((0, 0), dtype=torch.int64)  # (processes, k): every process's cache
        self._refreshed_at: int | None = None

    def on_task_start(self, ctx: TaskContext) -> None:
        """As ER; a fresh task starts without a cache (the first step scores the memory)."""
        require_unsharded(ctx, self.name)
        rank = int(ctx.accelerator.process_index)
        if not ctx.resumed:
            self.cache = []
            self.caches = torch.zeros((0, 0), dtype=torch.int64)
        elif self.caches.dim() == 2 and rank < self.caches.shape[0]:
            self.cache = [int(i) for i in self.caches[rank].tolist()]
        if any(not 0 <= i < len(self.memory) for i in self.cache):
            self.cache = []
        self._refreshed_at = None
        super().on_task_start(ctx)

    def modify_batch(self, batch: dict[str, Any], task: int) -> dict[str, Any]:
        """Refresh the cache when due (from this batch, before replay), then join a replay batch from the cache."""
        if self.dataset is None:
            return batch
        ctx = self._context()
        step = ctx.step
        if not self.cache or (step % self.mir.refresh == 0 and self._refreshed_at != step):
            self.refresh_cache(ctx, batch)
        replay = self._next_replay(ctx)
        joined: dict[str, Any] = ctx.policy.concat([batch, replay])
        return joined

    def state_dict(self) -> dict[str, Any]:
        """ER's state and the cache's memory slots."""
        return {**super().state_dict(), CACHE: self.caches.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ER's state and the cache."""
        super().load_state_dict(state)
        saved = state.get(CACHE)
        if isinstance(saved, torch.Tensor) and saved.dim() == 1:
            saved = saved[None]  # one process's cache
        self.caches = (
            saved.to(torch.int64) if isinstance(saved, torch.Tensor) else torch.zeros((0, 0), dtype=torch.int64)
        )
        self.cache = [int(i) for i in self.caches[0].tolist()] if self.caches.numel() else []

    # -- retrieval ------------------------------------------------------------------------------

    def candidate_slots(self, ctx: TaskContext, step: int) -> list[int]:
        """The memory slots scored at ``step`` by this process (sorted); seeded by (seed, task, rank, step)."""
        n = len(self.memory)
        rng = np.random.default_rng([self.seed(ctx), ctx.task, int(ctx.accelerator.process_index), step])
        return sorted(int(i) for i in rng.choice(n, size=min(self.mir.candidates, n), replace=False))

    def scored_params(self, ctx: TaskContext) -> tuple[list[torch.nn.Parameter], list[float]]:
        """The parameters of the virtual step and the learning rate of each."""
        named = [(n, p) for n, p in ctx.policy.named_parameters() if p.requires_grad]
        chosen = [p for n, p in named if n in ctx.backbone_trainable] if self.mir.params == "lora" else []
        if not chosen:
            chosen = [p for _, p in named]
        lr_of: dict[int, float] = {}
        for group in ctx.optimizer.param_groups if ctx.optimizer is not None else ():
            lr = float(group["lr"]) or float(group.get("initial_lr", 0.0))
            for p in group["params"]:
                lr_of[id(p)] = lr
        params: list[torch.nn.Parameter] = []
        lrs: list[float] = []
        for p in chosen:
            rate = self.mir.virtual_lr if self.mir.virtual_lr is not None else lr_of.get(id(p))
            if rate is not None:
                params.append(p)
                lrs.append(float(rate))
        return params, lrs

    def refresh_cache(self, ctx: TaskContext, batch: Mapping[str, Any]) -> None:
        """Score candidates of the memory against ``batch`` (the task's, before replay) and cache the ``top_k``."""
        step = ctx.step
        rank = int(ctx.accelerator.process_index)
        slots = self.candidate_slots(ctx, step)
        params, lrs = self.scored_params(ctx)
        if ctx.batches is None:
            raise RuntimeError("the task context cannot load batches (batches is missing)")
        chunk = ctx.batch_size + max(self.replay_size, 1)
        # Loader workers read the next chunks while the first ones are scored; the fork keeps the
        # loader's base-seed draw out of the training's random stream.
        with torch.random.fork_rng(devices=[]):
            chunks = ctx.batches(self.dataset, [slots[i : i + chunk] for i in range(0, len(slots), chunk)])
            scores = interference_scores(
                ctx.policy,
                batch,
                chunks,
                params,
                lrs,
                seed=derived_seed(self.seed(ctx), ctx.task, rank, step, 2),
            )
        order = torch.argsort(scores, descending=True, stable=True)[: self.mir.top_k]
        self.cache = [slots[int(i)] for i in order]
        mine = torch.tensor(self.cache, dtype=torch.int64)
        if ctx.accelerator.num_processes > 1:  # every process refreshes at this step: equal lengths
            gathered = ctx.accelerator.gather(mine.to(ctx.accelerator.device))
            self.caches = gathered.view(ctx.accelerator.num_processes, -1).cpu()
        else:
            self.caches = mine[None]
        self._refreshed_at = step
        self._close_replay()  # the next replay batch is drawn from the new cache
        log.debug(
            "%s: step %d: cached %d of %d candidates, loss increase %.4g (mean of cache) vs %.4g (all)",
            self.name,
            step,
            len(self.cache),
            len(slots),
            float(scores[order].mean()),
            float(scores.mean()),
        )

    def replay_sampler(self, ctx: TaskContext, start: int) -> Iterable[list[int]]:
        """Replay batches ``start``, ``start + 1``, ... drawn from the cache, as memory slots."""
        sampler = ReplaySampler(
            [self.memory.tasks[s] for s in self.cache],
            self.replay_size,
            sampling=self.options.sampling,
            seed=self.replay_seed(ctx),
            rank=int(ctx.accelerator.process_index),
            start=start,
        )
        return _SlotsOf(sampler, self.cache)


class _SlotsOf:
    """Index lists of a sampler over the cache's positions, mapped to the memory slots they hold."""

    def __init__(self, sampler: ReplaySampler, slots: Sequence[int]) -> None:
        self.sampler = sampler
        self.slots = list(slots)

    def __iter__(self) -> Iterator[list[int]]:
        for positions in self.sampler:
            yield [self.slots[i] for i in positions]


def interference_scores(
    policy: torch.nn.Module,
    batch: Mapping[str, Any],
    candidates: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    params: Sequence[torch.nn.Parameter],
    lrs: Sequence[float],
    seed: int,
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> torch.Tensor:
    """How much one virtual SGD step on ``batch`` raises each candidate's loss: ``(C,)`` float32 on the CPU.

    The step is ``theta' = theta - lr * g`` over ``params`` (each with its ``lrs`` entry), ``g``
    the gradient of ``policy(batch).loss``. The candidates' per-sample losses are computed before
    and after the step under the same random state (seeded from ``seed``), so a stochastic head
    (flow, diffusion) or dropout draws the same noise both times. The parameters are restored
    exactly (copied back) afterwards, and the caller's random state is left as it was.

    Args:
        policy: A :class:`~vlacl.models.policy.Policy` (unwrapped: no gradient synchronisation).
        batch: The collated task batch the step is taken on.
        candidates: One collated batch of candidates, or an iterable of several (chunks, e.g. from a
            loader: each is scored as it arrives) whose scores are concatenated.
        params: The parameters of the virtual step.
        lrs: The learning rate of each of ``params``.
        seed: Seed of the random draws of the forward passes.
        autocast: A context-manager factory for the forward passes (``accelerator.autocast``).
    """
    if len(params) != len(lrs):
        raise ValueError(f"{len(params)} parameters but {len(lrs)} learning rates")
    device = next(iter(params)).device if params else torch.device("cpu")
    with _seeded(derived_seed(seed, 0), device), autocast():
        loss = policy(batch).loss
    grads = torch.autograd.grad(loss, list(params), allow_unused=True) if params else ()
    chunks: list[Mapping[str, Any]] = []
    before = _losses(
        policy, [candidates] if isinstance(candidates, Mapping) else candidates, seed, device, autocast, chunks
    )
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g, lr in zip(params, grads, lrs, strict=True):
                if g is not None:
                    p.sub_(g.to(p.dtype), alpha=lr)
        after = _losses(policy, chunks, seed, device, autocast)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return (after - before).cpu()


def _losses(
    policy: torch.nn.Module,
    chunks: Iterable[Mapping[str, Any]],
    seed: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    keep: list[Mapping[str, Any]] | None = None,
) -> torch.Tensor:
    """Per-sample losses ``(C,)`` float32 of the chunks, chunk ``i`` under the random state of ``(seed, i + 1)``.

    With ``keep``, the chunks are appended to it as they are read (for a second pass).
    """
    out = []
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            if keep is not None:
                keep.append(chunk)
            with _seeded(derived_seed(seed, i + 1), device), autocast():
                out.append(policy(chunk, per_sample=True).loss.float())  # (c,)
    return torch.cat(out) if out else torch.zeros(0)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the CPU (and ``device``'s) random generator seeded, restoring both afterwards."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if index is not None else []):
        torch.default_generator.manual_seed(seed)
        if index is not None:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
