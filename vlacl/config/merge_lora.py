"""Settings of ``vlacl merge-lora``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlacl.config.core import setting

MergeDtype = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass(frozen=True)
class MergeLoraConfig:
    """How ``merge-lora`` writes the merged model."""

    dtype: MergeDtype = setting(
        "auto",
        "Dtype of the merged floating-point weights; auto keeps each base tensor's dtype, so a bf16 model stays "
        "bf16 instead of doubling in size. Updates are always added in float32.",
        flag="--dtype",
    )
