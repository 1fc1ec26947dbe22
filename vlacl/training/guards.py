"""Guards that stop a run that cannot learn, and reports that say why.

- :func:`check_first_gradients`: after the first backward pass, some trainable parameter must hold a
  non-zero gradient (a frozen model, a detached head or an all-padded loss mask give none).
- :class:`LossGuard`: a loss exactly zero for ``zero_steps`` steps in a row stops the run; a
  non-finite loss or gradient skips the step with a warning and stops after ``nonfinite_steps`` in a row.
- :func:`oom_error`: a device out-of-memory error becomes a message naming the settings that drive
  memory and what to change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from vlacl.errors import VlaclError

log = logging.getLogger(__name__)


class TrainingError(VlaclError):
    """Training cannot go on: no gradient, a loss stuck at zero, repeated non-finite losses, out of memory."""


def describe_groups(groups: Mapping[str, int]) -> str:
    """``backbone: 12,288, head: 4,166`` (trainable parameter counts by group)."""
    return ", ".join(f"{name}: {count:,}" for name, count in groups.items()) or "none"


def describe_terms(terms: Mapping[str, float]) -> str:
    """``l1=0, bce=0`` (loss terms)."""
    return ", ".join(f"{k}={v:.6g}" for k, v in terms.items()) or "no terms"


def check_first_gradients(
    params: Sequence[tuple[str, torch.nn.Parameter]], terms: Mapping[str, float], groups: Mapping[str, int]
) -> None:
    """Refuse a first step in which no trainable parameter got a non-zero gradient.

    Raises:
        TrainingError: Listing the loss terms and the trainable parameter groups.
    """
    for _, param in params:
        grad = param.grad
        if grad is not None and bool(grad.detach().abs().sum() > 0):
            return
    raise TrainingError(
        "no trainable parameter received a gradient in the first step (loss terms: "
        f"{describe_terms(terms)}; trainable parameters: {describe_groups(groups)}): the loss does not depend on "
        "what trains; check that the action mask is not all padding (--chunk, short episodes), that the head "
        "and adapters train (--finetune, --lora-rank) and that the loss weights are not zero"
    )


class LossGuard:
    """Counts zero and non-finite losses in a row, from values read at step boundaries."""

    def __init__(self, zero_steps: int, nonfinite_steps: int) -> None:
        """Stop after ``zero_steps`` zero losses or ``nonfinite_steps`` non-finite ones in a row (0 = never)."""
        self.zero_steps = zero_steps
        self.nonfinite_steps = nonfinite_steps
        self.zero_run = 0
        self.nonfinite_run = 0
        self.skipped = 0

    def nonfinite(self, step: int, loss: float, groups: Mapping[str, int]) -> None:
        """Record a skipped step whose loss or gradient was NaN or infinite.

        Raises:
            TrainingError: ``nonfinite_steps`` such steps in a row.
        """
        self.nonfinite_run += 1
        self.skipped += 1
        log.warning("step %d: loss %s or its gradient is not finite; the step is skipped", step, loss)
        if self.nonfinite_steps and self.nonfinite_run >= self.nonfinite_steps:
            raise TrainingError(
                f"the loss or its gradient was NaN/Inf for {self.nonfinite_run} steps in a row (last loss {loss}); "
                f"trainable parameters: {describe_groups(groups)}: lower --lr/--head-lr, use --precision bf16 "
                "instead of fp16, raise --grad-clip's effect (lower it), or check the stats for a zero range"
            )

    def finite(self, loss: float, terms: Mapping[str, float], groups: Mapping[str, int], steps: int) -> None:
        """Record ``steps`` finite steps whose last loss is ``loss``.

        Raises:
            TrainingError: The loss was exactly zero for ``zero_steps`` steps in a row.
        """
        self.nonfinite_run = 0
        self.zero_run = self.zero_run + steps if loss == 0.0 else 0
        if self.zero_steps and self.zero_run >= self.zero_steps:
            raise TrainingError(
                f"the loss was exactly 0 for {self.zero_run} steps in a row (loss terms: {describe_terms(terms)}; "
                f"trainable parameters: {describe_groups(groups)}): nothing is learned; check that the action "
                "mask is not all padding, that the loss weights are not zero and that the targets are not constant"
            )


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device (CUDA, MPS, XPU) out-of-memory error."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def oom_error(settings: Mapping[str, object], exc: BaseException) -> TrainingError:
    """The message for an out-of-memory error: the settings that drive memory and what to change."""
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TrainingError(
        f"out of device memory while training ({first}); settings that drive memory: {shown}: lower --batch-size "
        "and raise --grad-accum to keep the effective batch, shorten --history or --chunk, use --precision bf16, "
        "pass --activation-checkpointing, or train fewer backbone layers (--finetune lora)"
    )
