"""Plain sequential fine-tuning: each task trains on its own data, no replay, no regularization.

It is the lower bound of every continual-learning comparison and the default of ``--cl``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlacl.cl.base import Algorithm, parse_options, register


@dataclass(frozen=True)
class SequentialOptions:
    """``--cl seq`` has no options; an option given to it is an error (it would be ignored)."""


@register("seq")
class Sequential(Algorithm):
    """Every hook is the no-op default."""

    name = "seq"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """Refuse options: ``--cl-opt`` with the default ``--cl seq`` usually means a forgotten ``--cl``."""
        super().__init__(config)
        parse_options(SequentialOptions, "seq", self.config)
