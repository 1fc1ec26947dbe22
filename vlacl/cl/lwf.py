"""Learning without Forgetting for continuous action chunks: distil the previous policy's actions.

LwF (Li & Hoiem 2017, "Learning without Forgetting", TPAMI) keeps a copy of the network as it was
before the new task and adds a distillation loss that keeps the new network's outputs on the new
task's inputs close to the old network's. For a policy the outputs are action chunks: the penalty
is the mean squared difference of the two chunks over the continuous action dimensions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlacl.cl.base import Algorithm, TaskContext, parse_options, register, require_unsharded
from vlacl.cl.ewc import trainable_parameters
from vlacl.config.core import invalid, setting
from vlacl.errors import ArtifactError

log = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher."
"""State-dict prefix of the previous policy's trainable weights (only while a task runs)."""


@dataclass(frozen=True)
class LwFOptions:
    """Options of ``--cl lwf`` (``--cl-opt KEY=VALUE``)."""

    lam: float = setting(
        1.0,
        "Weight of the distillation penalty, >= 0; 1 weighs a mean squared chunk difference like the task loss.",
        flag="--cl-opt lam",
    )
    seed: int | None = setting(
        None, "Seed of the generative heads' noise in the two predictions; none means --seed.", flag="--cl-opt seed"
    )

    def __post_init__(self) -> None:
        if not (self.lam >= 0.0 and np.isfinite(self.lam)):
            raise invalid("lam", f"must be a finite number >= 0, got {self.lam}", LwFOptions)
        if self.seed is not None and self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", LwFOptions)


def _generator(device: torch.device, seed: int, step: int, micro: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0]))
    return generator


@register("lwf")
class LwF(Algorithm):
    """Learning without Forgetting: distil the chunk the previous task's policy predicts for each batch.

    Method: when a task starts from a previous checkpoint, the trainable parameters of the policy
    (LoRA factors, head, encoders: the previous task's weights) are copied as the teacher. For
    every micro-batch, the teacher chunk is ``policy.head.predict(policy.conditioning(batch))``
    with the teacher's values swapped into the parameters (no gradients; swapped back exactly),
    and the student chunk the same with the current weights and gradients; both use the same
    generator (seeded by ``seed``, the step and the micro-batch, on the batch's device) so that a
    flow or diffusion head integrates from the same noise. The penalty is ``lam`` times the mean
    squared difference over the continuous action dimensions (not the binary ones,
    ``policy.head.binary.is_binary``, nor masked ones). Both predictions run in eval mode (no
    dropout), so the penalty is exactly 0 until the weights move. The teacher chunk is computed in
    :meth:`modify_batch`, before the training forward pass: swapping values into the parameters
    once that pass has saved them for its backward pass would invalidate it.

    Source: Li and Hoiem 2017, "Learning without Forgetting" (TPAMI), with the soft-target
    cross-entropy replaced by a squared error on continuous actions.

    Hyperparameters (``--cl-opt KEY=VALUE``):

    - ``lam`` (1.0): the penalty weight; the penalty is a mean squared error in normalized action
      units, of the order of the task loss, so 1 weighs the old behaviour like the new task.
    - ``seed`` (none: ``--seed``): seed of the generative heads' noise.

    Adapter modes: in ``shared`` mode the teacher is exactly the previous policy. In ``stack``
    mode the new adapter starts with ``B = 0`` and adds nothing, so the teacher (its values at the
    start) is again exactly the previous policy. In ``per-task`` mode the previous adapter is not
    active and the new one starts at zero, so the teacher is the base model with the previous
    head: LwF then guards the shared head's behaviour.

    Cost per micro-batch: one extra forward pass without gradients (the teacher) and one with
    gradients (the student, whose backward pass adds to the step's), plus the generative head's
    sampling steps in both; the teacher's weights (one copy of the trainable parameters) are held
    while the task runs and travel in the resume state, so ``--resume`` keeps the task-start
    teacher; the task checkpoint does not carry them. The first task has no teacher and no penalty.
    The parameters must not be sharded (DDP, not FSDP/ZeRO-3).
    """

    name = "lwf"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """Parse the options (``ConfigError`` on an unknown or out-of-range one)."""
        super().__init__(config)
        self.options = parse_options(LwFOptions, "lwf", self.config)
        self.teacher: dict[str, torch.Tensor] = {}
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._batch: dict[str, Any] | None = None
        self._target: torch.Tensor | None = None
        self._calls = 0
        self._micro = 0

    def on_task_start(self, ctx: TaskContext) -> None:
        """Copy the previous task's weights as the teacher (or keep the resumed one)."""
        require_unsharded(ctx, self.name)
        self.ctx = ctx
        self._calls = 0
        self._batch = self._target = None
        if ctx.prev_checkpoint is None:
            self.teacher, self._params = {}, []
            log.info("lwf: task %d has no previous policy: no distillation", ctx.task)
            return
        self._params = trainable_parameters(ctx)
        if ctx.resumed and not self.teacher:
            raise ArtifactError(
                "the resume state of this LwF task has no teacher (the previous policy's weights): pass --resume never"
            )
        if ctx.resumed:
            missing = [n for n, _ in self._params if n not in self.teacher]
            if missing:
                raise ArtifactError(
                    f"the LwF teacher in the resume state lacks parameters {missing[:3]}: pass --resume never"
                )
            self.teacher = {n: self.teacher[n].to(p.device, p.dtype) for n, p in self._params}
            source = "the resume state"
        else:
            self.teacher = {n: p.detach().clone() for n, p in self._params}
            source = str(ctx.prev_checkpoint)
        dims = self._continuous(ctx)
        self._dims = dims
        if not bool(dims.any()):
            log.warning("lwf: task %d: the policy has no continuous action dimension: no distillation", ctx.task)
            self._params = []
            return
        log.info(
            "lwf: task %d: distilling the policy of %s (%d parameter tensors, %s values) with lam=%g",
            ctx.task,
            source,
            len(self._params),
            f"{sum(p.numel() for _, p in self._params):,}",
            self.options.lam,
        )

    @staticmethod
    def _continuous(ctx: TaskContext) -> torch.Tensor:
        policy = ctx.policy
        binary: torch.Tensor = policy.head.binary.is_binary.bool()
        kept: torch.Tensor = policy.dim_mask.to(binary.device) > 0
        return (~binary) & kept  # (A,)

    def _predict(self, batch: Mapping[str, Any], generator: torch.Generator) -> torch.Tensor:
        policy = self.ctx.policy
        with self.ctx.accelerator.autocast():
            chunk: torch.Tensor = policy.head.predict(policy.conditioning(batch), generator)  # (B, K, A)
        return chunk.float()

    def modify_batch(self, batch: dict[str, Any], task: int) -> dict[str, Any]:
        """Keep the batch and compute the teacher's chunk for it (before the training forward pass)."""
        self._micro = self._calls % self.ctx.grad_accum
        self._calls += 1
        if not self._params:
            return batch
        self._batch = batch
        policy = self.ctx.policy
        was_training = policy.training
        current = [p.detach().clone() for _, p in self._params]
        with torch.no_grad():
            for name, param in self._params:
                param.copy_(self.teacher[name])
            policy.eval()
            try:
                self._target = self._predict(batch, self._generator(batch))
            finally:
                policy.train(was_training)
                for (_, param), value in zip(self._params, current, strict=True):
                    param.copy_(value)
        return batch

    def _generator(self, batch: Mapping[str, Any]) -> torch.Generator:
        seed = self.ctx.seed if self.options.seed is None else self.options.seed
        device = batch["action"].device if "action" in batch else self.ctx.accelerator.device
        return _generator(device, seed, self.ctx.step, self._micro)

    def compute_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """``lam`` times the mean squared difference of the student's chunk from the teacher's (continuous dims)."""
        if not self._params or self._batch is None or self._target is None:
            return None
        policy = self.ctx.policy
        was_training = policy.training
        policy.eval()
        try:
            student = self._predict(self._batch, self._generator(self._batch))  # (B, K, A)
        finally:
            policy.train(was_training)
        dims = self._dims.to(student.device)
        diff = (student - self._target)[..., dims]  # (B, K, A_continuous)
        self._batch = self._target = None
        return diff.square().mean() * self.options.lam

    def on_task_end(self, ctx: TaskContext) -> None:
        """Drop the teacher: the task checkpoint does not carry it."""
        if self.teacher:
            log.info("lwf: task %d: done; the teacher of the previous task is dropped", ctx.task)
        else:
            log.info("lwf: task %d: done", ctx.task)
        self.teacher, self._params = {}, []
        self._batch = self._target = None

    def state_dict(self) -> dict[str, Any]:
        """``teacher.<name>`` while a task runs (for ``--resume``); ``lam`` always."""
        state: dict[str, Any] = {f"{TEACHER_PREFIX}{n}": t for n, t in self.teacher.items()}
        state["lam"] = self.options.lam
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the teacher of a resumed task (a task checkpoint has none)."""
        self.teacher = {k[len(TEACHER_PREFIX) :]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
