"""Averaged Gradient Episodic Memory: project the step's gradient so it does not raise the memory's loss.

A-GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM", ICLR) keeps an episodic
memory of earlier tasks' samples. At every optimizer step it computes the gradient ``g_ref`` of the
loss on a batch drawn from the memory; when the step's gradient ``g`` points against it
(``g . g_ref < 0``), ``g`` is replaced by its projection ``g - (g . g_ref / g_ref . g_ref) g_ref``,
which has a zero dot product with ``g_ref`` (to first order the memory's loss does not rise).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlacl.cl.base import Algorithm, TaskContext, parse_options, register, require_unsharded
from vlacl.cl.ewc import trainable_parameters
from vlacl.cl.memory import MemoryOptions, ReplayMemory, ReplaySampler, derived_seed
from vlacl.config.core import invalid, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AGEMOptions(MemoryOptions):
    """Options of ``--cl agem`` (``--cl-opt KEY=VALUE``): the memory's, and the reference batch size."""

    ref_batch: int | None = setting(
        None, "Samples per reference batch (per process), >= 1; none means --batch-size.", flag="--cl-opt ref_batch"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ref_batch is not None and self.ref_batch < 1:
            raise invalid("ref_batch", f"must be >= 1 (or none), got {self.ref_batch}", type(self))


def project(grad: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A-GEM's projection of the flat gradient ``grad`` against the flat reference gradient ``ref``.

    Returns ``grad - (grad . ref / ref . ref) ref`` where ``grad . ref < 0`` and ``grad`` itself
    otherwise, and whether it projected (a bool tensor: no read from the device).
    """
    dot = grad @ ref
    ref_sq = ref @ ref
    projected = (dot < 0) & (ref_sq > 0)
    coef = torch.where(projected, dot / ref_sq.clamp_min(torch.finfo(ref.dtype).tiny), torch.zeros_like(dot))
    return grad - coef * ref, projected


@register("agem")
class AGEM(Algorithm):
    """Averaged GEM: one reference gradient on the episodic memory per optimizer step, and a projection.

    Method: the memory holds earlier tasks' samples by reference (filled at each task's end like
    ER). After the backward pass of the last micro-batch of each step, the gradient ``g_ref`` of
    the loss of one memory batch (``ref_batch`` samples per process) is computed through the
    unwrapped policy and averaged over processes; the step's gradient ``g`` (the accumulated
    ``p.grad``, already averaged over processes by DDP) is replaced by
    ``g - (g . g_ref / g_ref . g_ref) g_ref`` when ``g . g_ref < 0``, else left alone. Every
    process computes the same ``g`` and ``g_ref``, so all take the same decision. With the fp16
    loss scaler, ``p.grad`` is the gradient times a constant; the projection is linear in ``g``
    (the coefficient too), so the projected gradient is the projected true gradient times the same
    constant and the scaler's unscaling stays right. Nothing happens while the memory is empty
    (the first task).

    Source: Chaudhry, Ranzato, Rohrbach and Elhoseiny 2019, "Efficient Lifelong Learning with
    A-GEM" (ICLR).

    Hyperparameters (``--cl-opt KEY=VALUE``):

    - ``selection`` (quota): ``quota`` keeps ``per_task`` samples of each task, ``reservoir`` a
      uniform sample of ``size`` over all tasks so far.
    - ``per_task`` (500): samples per task with ``quota``.
    - ``size`` (2000): memory size with ``reservoir``.
    - ``sampling`` (uniform): reference batches uniform over the samples, or ``balanced`` over tasks.
    - ``ref_batch`` (none: ``--batch-size``): samples per reference batch per process.
    - ``seed`` (none: ``--seed``): seed of the memory's selection and the reference batches.

    Cost per optimizer step (not per micro-batch): one forward and backward pass of a reference
    batch, one all-reduce of the trainable parameters' gradient under DDP, and a few vector ops.
    Works with every adapter mode (the trainable parameters of the run are projected). The
    parameters and gradients must not be sharded (DDP, not FSDP/ZeRO).
    """

    name = "agem"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """Parse the options (``ConfigError`` on an unknown or out-of-range one)."""
        super().__init__(config)
        self.options = parse_options(AGEMOptions, "agem", self.config)
        self.memory = ReplayMemory()
        self.consumed = 0
        self.projected_steps: dict[str, int] = {}
        self.reference_steps: dict[str, int] = {}
        self._calls = 0
        self._batches: Iterator[dict[str, Any]] | None = None
        self._projected = torch.zeros((), dtype=torch.int64)
        self._checked = 0

    def on_task_start(self, ctx: TaskContext) -> None:
        """Open the stream of reference batches (at the consumed count after ``--resume``)."""
        require_unsharded(ctx, self.name, gradients=True)
        self.ctx = ctx
        self._calls = 0
        key = str(ctx.task)
        if not ctx.resumed:
            self.consumed = 0
            self.projected_steps[key] = 0
            self.reference_steps[key] = 0
        self._projected = torch.tensor(
            self.projected_steps.get(key, 0), dtype=torch.int64, device=ctx.accelerator.device
        )
        self._checked = self.reference_steps.get(key, 0)
        self._params = [p for _, p in trainable_parameters(ctx)]
        self._batches = None
        if not len(self.memory):
            log.info("agem: task %d: the episodic memory is empty: no projection in this task", ctx.task)
            return
        if ctx.ref_dataset is None or ctx.batches is None:
            raise RuntimeError("the task context cannot read samples (ref_dataset or batches is missing)")
        sampler = ReplaySampler(
            self.memory.tasks,
            self.options.ref_batch or ctx.batch_size,
            sampling=self.options.sampling,
            seed=derived_seed(self.options.seed_for(ctx), ctx.task),
            rank=ctx.accelerator.process_index,
            start=self.consumed,
        )
        self._batches = ctx.batches(ctx.ref_dataset(self.memory.refs), sampler)
        log.info(
            "agem: task %d: memory of %d samples (per task %s), reference batches of %d from draw %d",
            ctx.task,
            len(self.memory),
            self.memory.task_counts(),
            sampler.batch,
            self.consumed,
        )

    def after_backward(self, model: torch.nn.Module) -> None:
        """On the last micro-batch of a step: project the accumulated gradient against the memory's."""
        self._calls += 1
        if self._batches is None or self._calls % self.ctx.grad_accum:
            return
        ctx = self.ctx
        acc = ctx.accelerator
        params = [p for p in self._params if p.requires_grad and p.grad is not None]
        if not params:
            return
        with torch.random.fork_rng(devices=[]):  # a DataLoader's first batch draws its base seed from the global RNG
            batch = next(self._batches)
        self.consumed += 1
        # fp16: scale the reference loss like the training loss, so that small gradients do not underflow
        scale = float(acc.scaler.get_scale()) if getattr(acc, "scaler", None) is not None else 1.0
        with acc.autocast():
            loss = ctx.policy(batch).loss
        refs = torch.autograd.grad(loss.float() * scale, params, allow_unused=True)
        ref = torch.cat(
            [
                (r if r is not None else torch.zeros_like(p)).reshape(-1).float()
                for p, r in zip(params, refs, strict=True)
            ]
        )  # (P,)
        if acc.num_processes > 1:
            ref = acc.reduce(ref, reduction="mean")
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads if g is not None])  # (P,)
        new, projected = project(flat, ref)
        for p, chunk in zip(params, torch.split(new, [p.numel() for p in params]), strict=True):
            assert p.grad is not None
            p.grad.copy_(chunk.view_as(p.grad))
        self._projected += projected.to(self._projected.device, torch.int64)
        self._checked += 1

    def _sync_counts(self) -> None:
        if hasattr(self, "ctx"):
            key = str(self.ctx.task)
            self.projected_steps[key] = int(self._projected)
            self.reference_steps[key] = self._checked

    def on_task_end(self, ctx: TaskContext) -> None:
        """Close the reference stream and add the task's samples to the memory."""
        self._sync_counts()
        if self._batches is not None:
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
            self._batches = None
        key = str(ctx.task)
        log.info(
            "agem: task %d: projected %d of %d steps with a reference gradient",
            ctx.task,
            self.projected_steps.get(key, 0),
            self.reference_steps.get(key, 0),
        )
        kept = self.memory.add_task(ctx, self.options)
        log.info("agem: task %d: kept %d samples; the memory holds %d", ctx.task, kept, len(self.memory))

    def state_dict(self) -> dict[str, Any]:
        """The memory (``memory.*``), the consumed reference batches and the projected/reference step counts."""
        self._sync_counts()
        state = self.memory.state_dict("memory.")
        state.update(
            {
                "consumed": self.consumed,
                "projected_steps": dict(self.projected_steps),
                "reference_steps": dict(self.reference_steps),
            }
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the memory, the consumed count and the step counts."""
        self.memory = ReplayMemory.from_state_dict(state, "memory.")
        self.consumed = int(state.get("consumed", 0))
        self.projected_steps = {str(k): int(v) for k, v in dict(state.get("projected_steps", {})).items()}
        self.reference_steps = {str(k): int(v) for k, v in dict(state.get("reference_steps", {})).items()}
