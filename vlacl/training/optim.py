"""AdamW (fused where the device supports it), parameter groups and warmup + decay schedules."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vlacl.config.train_task import Schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamGroup:
    """A named group of trainable parameters with its learning rate.

    Attributes:
        name: ``backbone`` (LoRA or fine-tuned backbone weights) or ``head``.
        params: The parameters (those with ``requires_grad``).
        lr: Peak learning rate.
        weight_decay: AdamW's decoupled weight decay of the group's matrices.
    """

    name: str
    params: tuple[torch.nn.Parameter, ...]
    lr: float
    weight_decay: float

    @property
    def count(self) -> int:
        """Number of scalar parameters."""
        return sum(p.numel() for p in self.params)


def param_groups(
    model: torch.nn.Module,
    backbone_params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    head_lr: float,
    weight_decay: float,
) -> list[ParamGroup]:
    """Split the trainable parameters of ``model`` into the backbone's and the rest (head and projections).

    ``backbone_params`` (LoRA factors, fine-tuned backbone weights) train at ``lr``; every other
    trainable parameter of the policy at ``head_lr``. Empty groups are left out.
    """
    backbone_ids = {id(p) for p in backbone_params}
    head: list[torch.nn.Parameter] = []
    rest: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (rest if id(param) in backbone_ids else head).append(param)
    groups = [
        ParamGroup("backbone", tuple(rest), lr, weight_decay),
        ParamGroup("head", tuple(head), head_lr, weight_decay),
    ]
    return [g for g in groups if g.params]


def build_optimizer(groups: Iterable[ParamGroup], *, betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over ``groups``; fused on CUDA (one kernel per step), foreach elsewhere.

    Biases and 1-d parameters (norms) get no weight decay.
    """
    torch_groups: list[dict[str, object]] = []
    devices: set[str] = set()
    for g in groups:
        decay = [p for p in g.params if p.ndim >= 2]
        no_decay = [p for p in g.params if p.ndim < 2]
        devices.update(p.device.type for p in g.params)
        if decay:
            torch_groups.append({"params": decay, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name})
        if no_decay:
            torch_groups.append({"params": no_decay, "lr": g.lr, "weight_decay": 0.0, "name": f"{g.name}.no_decay"})
    fused = devices == {"cuda"} and "fused" in inspect.signature(torch.optim.AdamW).parameters
    log.debug("AdamW fused=%s over devices %s", fused, sorted(devices))
    if fused:
        return torch.optim.AdamW(torch_groups, betas=betas, fused=True)
    return torch.optim.AdamW(torch_groups, betas=betas)


def lr_factor(step: int, *, total: int, warmup: int, schedule: Schedule, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps.

    Linear warmup from ``1 / (warmup + 1)`` to 1 over ``warmup`` steps, then ``cosine`` or ``linear``
    decay to ``min_ratio`` at ``total``, or ``constant``.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total: int, warmup: int, schedule: Schedule, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every group's peak learning rate."""

    def factor(step: int) -> float:
        return lr_factor(step, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
