"""Plain sequential fine-tuning: each task trains on its own data, no replay, no regularization.

It is the lower bound of every continual-learning comparison and the default of ``--cl``.
"""

from __future__ import annotations

from vlacl.cl.base import Algorithm, register


@register("seq")
class Sequential(Algorithm):
    """Every hook is the no-op default."""

    name = "seq"
