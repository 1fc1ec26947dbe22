"""Settings of ``vlacl compose-adapters``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vlacl.config.core import invalid, setting

ComposeMethod = Literal["cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
EXACT_METHODS: tuple[ComposeMethod, ...] = ("cat", "linear")
"""Methods whose result is exactly the (weighted) sum of the adapters' weight updates."""
PRUNING_METHODS: tuple[ComposeMethod, ...] = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Methods that prune the dense updates and so use ``density``."""


@dataclass(frozen=True)
class ComposeAdaptersConfig:
    """How ``compose-adapters`` combines the weight updates dW_i = scale_i * B_i @ A_i."""

    method: ComposeMethod = setting(
        "linear",
        "cat: the exact sum of the updates (ranks concatenated); linear: the exact weighted sum (also "
        "concatenated); svd: the weighted sum truncated to --rank; ties, dare_linear, dare_ties, magnitude_prune: "
        "merged on the dense updates, then factorized to --rank by SVD.",
        flag="--method",
    )
    weights: tuple[float, ...] = setting(
        (),
        "One weight per adapter, comma-separated (e.g. 0.7,0.3); empty means 1 for every adapter. "
        "cat takes no weights.",
        flag="--weights",
    )
    rank: int | None = setting(
        None,
        "Rank of the result for svd and the pruning methods; none means the largest rank of any input adapter "
        "(a task checkpoint's stack counts as the sum of its ranks), as PEFT's svd does.",
        flag="--rank",
    )
    density: float = setting(
        0.2,
        "Fraction of each dense update kept by ties, dare_* and magnitude_prune, in (0, 1]; 0.2 keeps the top "
        "20% as in the TIES paper.",
        flag="--density",
    )
    majority_sign: Literal["total", "frequency"] = setting(
        "total",
        "How ties and dare_ties elect each entry's sign: total (sign of the weighted sum, as TIES) or frequency "
        "(the more common sign).",
        flag="--majority-sign",
    )
    seed: int = setting(0, "Seed of DARE's random drops; the same seed gives the same adapter.", flag="--seed")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "auto",
        "Dtype of the written factors; auto keeps the inputs' dtype when they all share one, else float32.",
        flag="--dtype",
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise invalid("density", f"must be in (0, 1], got {self.density}", ComposeAdaptersConfig)
        if self.rank is not None and self.rank < 1:
            raise invalid("rank", f"must be >= 1 (or none), got {self.rank}", ComposeAdaptersConfig)
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", ComposeAdaptersConfig)
        if not all(math.isfinite(w) for w in self.weights):
            raise invalid("weights", f"must be finite numbers, got {list(self.weights)}", ComposeAdaptersConfig)
        if self.method == "cat" and any(w != 1.0 for w in self.weights):
            raise invalid(
                "weights",
                f"cat sums the updates unweighted, got {list(self.weights)}; use --method linear for a weighted sum",
                ComposeAdaptersConfig,
            )
