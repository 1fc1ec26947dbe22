"""Elastic Weight Consolidation: a quadratic penalty that keeps the weights important to earlier tasks.

EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", PNAS) adds
``lam / 2 * sum_i F_i * (theta_i - theta*_i) ** 2`` to the loss, where ``theta*`` are the weights at
the end of the earlier tasks and ``F`` the diagonal of their Fisher information. With ``decay < 1``
the Fisher of the tasks is accumulated online as in Schwarz et al. 2018 ("Progress & Compress",
ICML): ``F = decay * F_old + F_task`` and a single anchor, the weights after the last task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from vlacl.cl.base import Algorithm, TaskContext, parse_options, register, require_unsharded
from vlacl.config.core import invalid, setting
from vlacl.errors import ArtifactError

log = logging.getLogger(__name__)

FISHER_PREFIX = "fisher."
"""State-dict prefix of the accumulated diagonal Fisher of each parameter."""
ANCHOR_PREFIX = "anchor."
"""State-dict prefix of each parameter's anchor (its value at the end of the last task)."""

ParamSet = Literal["all", "lora"]


@dataclass(frozen=True)
class EWCOptions:
    """Options of ``--cl ewc`` (``--cl-opt KEY=VALUE``)."""

    lam: float = setting(
        100.0,
        "Penalty weight lambda, >= 0. 1 would weigh the earlier tasks' mean loss like the new task's (the Laplace "
        "approximation of a mean-reduced loss), but the diagonal empirical Fisher of LoRA and head weights is small, "
        "so 1 holds nothing; 100 makes the penalty a visible fraction of the loss.",
        flag="--cl-opt lam",
    )
    decay: float = setting(
        1.0,
        "Online decay gamma in (0, 1] of the earlier tasks' Fisher: F = decay * F_old + F_task; 1 sums the tasks "
        "(plain EWC), below 1 is online EWC (Progress & Compress).",
        flag="--cl-opt decay",
    )
    fisher_samples: int = setting(
        256,
        "Training samples of the task (a seeded subset, >= 1) whose squared per-sample gradients give its Fisher.",
        flag="--cl-opt fisher_samples",
    )
    params: ParamSet = setting(
        "all",
        "Which trainable parameters are consolidated: all (LoRA factors, head and encoders) or lora (only the "
        "backbone's trainable ones).",
        flag="--cl-opt params",
    )
    seed: int | None = setting(None, "Seed of the Fisher's sample subset; none means --seed.", flag="--cl-opt seed")

    def __post_init__(self) -> None:
        if not (self.lam >= 0.0 and np.isfinite(self.lam)):
            raise invalid("lam", f"must be a finite number >= 0, got {self.lam}", EWCOptions)
        if not 0.0 < self.decay <= 1.0:
            raise invalid("decay", f"must be in (0, 1], got {self.decay}", EWCOptions)
        if self.fisher_samples < 1:
            raise invalid("fisher_samples", f"must be >= 1, got {self.fisher_samples}", EWCOptions)
        if self.seed is not None and self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", EWCOptions)


def trainable_parameters(ctx: TaskContext) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters of ``ctx.policy`` this task trains, by name, in the policy's order.

    Those the optimizer holds (so the backbone's count also while ``--two-stage`` freezes it); the
    ones with ``requires_grad`` when the context has no optimizer.
    """
    if ctx.optimizer is not None:
        ids = {id(p) for group in ctx.optimizer.param_groups for p in group["params"]}
        return [(n, p) for n, p in ctx.policy.named_parameters() if id(p) in ids]
    return [(n, p) for n, p in ctx.policy.named_parameters() if p.requires_grad]


def sample_subset(n: int, count: int, seed: int, task: int) -> list[int]:
    """``min(count, n)`` distinct sample indices out of ``n``, sorted; the same for the same arguments."""
    rng = np.random.default_rng([seed, task, n])
    return [int(i) for i in np.sort(rng.choice(n, size=min(count, n), replace=False))] if n else []


def empirical_fisher(
    ctx: TaskContext, named: Sequence[tuple[str, torch.nn.Parameter]], indices: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher: the mean over the samples ``indices`` of the squared per-sample gradient.

    Each process takes every ``num_processes``-th sample from its rank on, one at a time (batch size
    1) through ``ctx.policy`` with :func:`torch.autograd.grad`; the sums are added up over processes,
    so every process returns the same Fisher. The policy runs in eval mode (no dropout noise).
    """
    if ctx.sample_refs is None or ctx.ref_dataset is None or ctx.batches is None:
        raise RuntimeError("the task context cannot read samples (sample_refs, ref_dataset or batches is missing)")
    acc = ctx.accelerator
    params = [p for _, p in named]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    mine = list(indices[acc.process_index :: acc.num_processes])
    policy = ctx.policy
    was_training = policy.training
    policy.eval()
    try:
        if mine:
            refs = ctx.sample_refs(mine)
            for batch in ctx.batches(ctx.ref_dataset(refs), [[i] for i in range(len(refs))]):
                with acc.autocast():
                    loss = policy(batch).loss
                grads = torch.autograd.grad(loss.float(), params, allow_unused=True)
                for total, grad in zip(sums, grads, strict=True):
                    if grad is not None:
                        total.addcmul_(grad.float(), grad.float())
    finally:
        policy.train(was_training)
    flat = torch.cat([s.reshape(-1) for s in sums]) if sums else torch.zeros(0)  # (P,)
    if acc.num_processes > 1 and sums:  # every process has the same (possibly empty) parameter list
        flat = acc.reduce(flat, reduction="sum")
    flat = flat / max(1, len(indices))
    chunks = torch.split(flat, [p.numel() for p in params])
    return {name: chunk.view_as(p) for (name, p), chunk in zip(named, chunks, strict=True)}


@register("ewc")
class EWC(Algorithm):
    """Elastic Weight Consolidation with optional online accumulation of the Fisher.

    Method: after each task, the diagonal empirical Fisher ``F_task`` of the trained parameters is
    estimated on ``fisher_samples`` of the task's training samples (the mean of the squared
    per-sample gradients of the task loss, batch size 1, split over processes and summed) and
    folded into ``F = decay * F_old + F_task``; the anchors ``theta*`` are the weights at the end of
    the task. While later tasks train, ``lam / 2 * sum F * (theta - theta*) ** 2`` is added to every
    micro-batch's loss (``cl_penalty`` in the logged terms).

    Sources: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks"
    (PNAS); the online variant of Schwarz et al. 2018, "Progress & Compress" (ICML).

    Hyperparameters (``--cl-opt KEY=VALUE``):

    - ``lam`` (100.0): the penalty weight lambda. The loss is a per-sample mean of order 0.1 to 1
      and the Fisher is that of the mean, so ``lam = 1`` is the Laplace approximation that weighs
      the earlier tasks' mean loss like the new task's. The diagonal empirical Fisher of LoRA
      factors and head weights at the end of a task is small (a mean of about 5e-4 per value on
      the test stream of the micro tiny model), so with ``lam = 1`` the penalty stays below 1e-4
      of the loss and holds nothing; 100 makes it a visible fraction that grows with the drift.
      Compare ``cl_penalty`` with the task loss and move ``lam`` by factors of 10.
    - ``decay`` (1.0): gamma in (0, 1]; 1 sums the tasks' Fisher (plain EWC with one anchor),
      below 1 discounts older tasks (online EWC).
    - ``fisher_samples`` (256): training samples of the task (a seeded subset) in the Fisher.
    - ``params`` (all): ``all`` consolidates every trainable parameter (LoRA factors, head,
      state and sensor encoders), ``lora`` only the backbone's trainable ones.
    - ``seed`` (none: ``--seed``): seed of the Fisher's sample subset.

    Adapter modes: the penalty covers the parameters that have a Fisher and an anchor and that
    this run trains, matched by name. In ``shared`` mode that is the one adapter and the head. In
    ``stack`` and ``per-task`` mode the new task's adapter has no Fisher yet (the earlier adapters
    are frozen anyway, so there is nothing to hold there): the penalty guards the shared head.

    Cost: the penalty is a few fused ``torch._foreach`` ops over the consolidated parameters per
    micro-batch; the Fisher costs ``fisher_samples`` forward and backward passes of batch size 1 at
    the end of each task. The state holds two float32 copies of the consolidated parameters
    (``fisher.<name>``, ``anchor.<name>``). The parameters must not be sharded (DDP, not FSDP/ZeRO-3).
    """

    name = "ewc"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """Parse the options (``ConfigError`` on an unknown or out-of-range one)."""
        super().__init__(config)
        self.options = parse_options(EWCOptions, "ewc", self.config)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchors: dict[str, torch.Tensor] = {}
        self.tasks: list[int] = []
        self._params: list[torch.Tensor] = []
        self._anchor_list: list[torch.Tensor] = []
        self._sqrt_fisher: list[torch.Tensor] = []

    def _named(self, ctx: TaskContext) -> list[tuple[str, torch.nn.Parameter]]:
        named = trainable_parameters(ctx)
        if self.options.params == "lora":
            named = [(n, p) for n, p in named if n in ctx.backbone_trainable]
        return named

    def on_task_start(self, ctx: TaskContext) -> None:
        """Resolve the penalized parameters once: trained now, with a Fisher and an anchor."""
        require_unsharded(ctx, self.name)
        self.ctx = ctx
        self._params, self._anchor_list, self._sqrt_fisher = [], [], []
        named = self._named(ctx)
        for name, param in named:
            if name not in self.fisher or name not in self.anchors:
                continue
            fisher, anchor = self.fisher[name], self.anchors[name]
            if fisher.shape != param.shape or anchor.shape != param.shape:
                raise ArtifactError(
                    f"the EWC state of --prev {ctx.prev_checkpoint} has parameter {name} of shape "
                    f"{tuple(fisher.shape)}, this run's is {tuple(param.shape)}: continue with the settings the "
                    "previous task used (LoRA rank, head), or start the stream over"
                )
            self.fisher[name] = fisher.to(param.device, torch.float32)
            self.anchors[name] = anchor.to(param.device, torch.float32)
            self._params.append(param)
            self._anchor_list.append(self.anchors[name])
            self._sqrt_fisher.append(self.fisher[name].sqrt())
        values = sum(p.numel() for p in self._params)
        if self._params:
            log.info(
                "ewc: task %d: penalty on %d parameter tensors (%s values) with lam=%g, Fisher of tasks %s (decay %g)",
                ctx.task,
                len(self._params),
                f"{values:,}",
                self.options.lam,
                self.tasks,
                self.options.decay,
            )
        else:
            log.info("ewc: task %d: no Fisher of an earlier task covers this run's parameters: no penalty", ctx.task)

    def compute_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """``lam / 2 * sum F * (theta - theta*) ** 2``; ``None`` when nothing is consolidated (the first task)."""
        if not self._params:
            return None
        diff = torch._foreach_sub(self._params, self._anchor_list)
        weighted = torch._foreach_mul(diff, self._sqrt_fisher)  # sqrt(F) * (theta - theta*)
        norms = torch._foreach_norm(weighted)
        return torch.stack(norms).square().sum() * (self.options.lam / 2)

    def on_task_end(self, ctx: TaskContext) -> None:
        """Estimate the task's Fisher, fold it into the accumulated one and anchor at the current weights."""
        named = [(n, p) for n, p in self._named(ctx) if p.requires_grad]
        seed = ctx.seed if self.options.seed is None else self.options.seed
        indices = sample_subset(len(ctx.train_dataset), self.options.fisher_samples, seed, ctx.task)
        fisher_task = empirical_fisher(ctx, named, indices)
        decay = self.options.decay
        combined: dict[str, torch.Tensor] = {}
        for name in {*self.fisher, *fisher_task}:
            old = self.fisher.get(name)
            new = fisher_task.get(name)
            if old is None:
                combined[name] = new  # type: ignore[assignment]
            elif new is None:
                combined[name] = decay * old
            else:
                combined[name] = decay * old.to(new.device) + new
        self.fisher = combined
        for name, param in named:
            self.anchors[name] = param.detach().float().clone()
        self.tasks.append(ctx.task)
        total = sum(float(f.sum()) for f in fisher_task.values())
        log.info(
            "ewc: task %d: Fisher of %d parameter tensors from %d samples (sum %.4g); consolidated tasks %s",
            ctx.task,
            len(fisher_task),
            len(indices),
            total,
            self.tasks,
        )

    def state_dict(self) -> dict[str, Any]:
        """``fisher.<name>`` and ``anchor.<name>`` tensors; ``lam``, ``decay`` and the ``tasks`` consolidated."""
        state: dict[str, Any] = {f"{FISHER_PREFIX}{n}": t for n, t in self.fisher.items()}
        state.update({f"{ANCHOR_PREFIX}{n}": t for n, t in self.anchors.items()})
        state.update({"lam": self.options.lam, "decay": self.options.decay, "tasks": list(self.tasks)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the Fisher, the anchors and the tasks they cover."""
        self.fisher = {k[len(FISHER_PREFIX) :]: v for k, v in state.items() if k.startswith(FISHER_PREFIX)}
        self.anchors = {k[len(ANCHOR_PREFIX) :]: v for k, v in state.items() if k.startswith(ANCHOR_PREFIX)}
        self.tasks = [int(t) for t in state.get("tasks", [])]
        saved = state.get("decay")
        if saved is not None and float(saved) != self.options.decay:
            log.info(
                "ewc: the loaded Fisher was accumulated with decay %g, this task uses %g", saved, self.options.decay
            )
