"""How ``train-task`` adapts the backbone: LoRA (and how its adapters continue the stream) or plain fine-tuning."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final, Literal

from vlacl.config.core import invalid, setting

AdapterMode = Literal["shared", "stack", "per-task"]
FinetuneMode = Literal["lora", "full", "last-n", "frozen"]

TARGET_PRESETS: Final = ("all-linear", "attention", "vision")
"""``--lora-targets`` values the backbone resolves to its own module names."""

_REGEX_CHARS: Final = frozenset("\\^$*+?()[]{}|")
"""A ``--lora-targets`` value holding one of these is a regular expression, not a list of names."""


@dataclass(frozen=True)
class AdapterConfig:
    """What of the backbone trains on a task, and how LoRA adapters carry over from one task to the next."""

    finetune: FinetuneMode = setting(
        "lora",
        "lora: LoRA adapters on the frozen backbone; full: every backbone weight trains; last-n: only the last "
        "--last-n-layers transformer blocks train; frozen: the backbone stays as it is, only the action head trains.",
        flag="--finetune",
    )
    mode: AdapterMode = setting(
        "shared",
        "How LoRA adapters continue the stream: shared (one adapter trained on through every task, the plain "
        "sequential baseline), stack (a new adapter per task, the earlier ones frozen but active) or per-task (a new "
        "adapter per task, only the one of the evaluated task active).",
        flag="--adapter-mode",
    )
    rank: int = setting(16, "LoRA rank r of every adapted layer.", flag="--lora-rank")
    alpha: float | None = setting(
        None,
        "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --rslora); none means twice the "
        "rank, so that changing --lora-rank keeps the scale at 2.",
        flag="--lora-alpha",
    )
    dropout: float = setting(0.05, "Dropout on the LoRA branch's input, in [0, 1).", flag="--lora-dropout")
    rslora: bool = setting(
        False,
        "Rank-stabilized LoRA: scale by alpha / sqrt(r), which keeps the update's size stable at high ranks.",
        flag="--rslora",
    )
    targets: str = setting(
        "all-linear",
        "Layers LoRA adapts: all-linear (every linear layer of the language model), attention (its attention "
        "projections), vision (all-linear plus the vision tower), a comma-separated list of module names "
        "(q_proj,v_proj) or a regular expression matched against full module paths.",
        flag="--lora-targets",
    )
    last_n: int = setting(
        2, "Transformer blocks (counted from the last) that train with --finetune last-n.", flag="--last-n-layers"
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise invalid("rank", f"must be >= 1, got {self.rank}", AdapterConfig)
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise invalid("alpha", f"must be a positive number (or none), got {self.alpha}", AdapterConfig)
        if not 0.0 <= self.dropout < 1.0:
            raise invalid("dropout", f"must be in [0, 1), got {self.dropout}", AdapterConfig)
        if self.last_n < 1:
            raise invalid("last_n", f"must be >= 1, got {self.last_n}", AdapterConfig)
        if not self.targets.strip():
            raise invalid(
                "targets", f"must name a preset ({', '.join(TARGET_PRESETS)}), module names or a regex", AdapterConfig
            )
        if self.targets_are_regex:
            try:
                re.compile(self.targets)
            except re.error as exc:
                raise invalid(
                    "targets", f"{self.targets!r} is not a valid regular expression ({exc})", AdapterConfig
                ) from None
        elif not self.is_preset and not all(name.strip() for name in self.targets.split(",")):
            raise invalid("targets", f"{self.targets!r} has an empty module name between commas", AdapterConfig)

    @property
    def lora_alpha(self) -> float:
        """Alpha as LoRA uses it: the one set, else twice the rank."""
        return float(2 * self.rank) if self.alpha is None else self.alpha

    @property
    def is_preset(self) -> bool:
        """Whether :attr:`targets` names a preset the backbone resolves."""
        return self.targets.strip() in TARGET_PRESETS

    @property
    def targets_are_regex(self) -> bool:
        """Whether :attr:`targets` is a regular expression (it holds a regex metacharacter)."""
        return not self.is_preset and any(ch in _REGEX_CHARS for ch in self.targets)

    def explicit_targets(self) -> list[str] | str:
        """The targets as PEFT takes them when they are not a preset: a list of names or one regex."""
        if self.targets_are_regex:
            return self.targets.strip()
        return [name.strip() for name in self.targets.split(",")]
