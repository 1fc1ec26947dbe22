"""Settings of ``vlacl inspect-h5``."""

from __future__ import annotations

from dataclasses import dataclass

from vlacl.config.core import invalid, setting

MAX_SAMPLE_IMAGES = 1000
"""More sampled frames per camera and episode than this add nothing to a brightness statistic."""


@dataclass(frozen=True)
class InspectH5Config:
    """What ``inspect-h5`` checks and shows."""

    window: int = setting(
        1,
        "Observation frames per training sample; with --chunk it sets the shortest usable episode "
        "(episodes shorter than window + chunk are reported). 1 is the current frame only.",
        flag="--window",
    )
    chunk: int = setting(
        8,
        "Actions per training sample (the action chunk); 8 is OpenVLA-OFT's chunk on LIBERO.",
        flag="--chunk",
    )
    sample_images: int = setting(
        0,
        "Camera frames to read per camera and episode, evenly spaced, for image statistics (0 reads no "
        "image payload, so a file of any size is summarized from its low-dimensional data).",
        flag="--sample-images",
    )
    strict: bool = setting(False, "Exit with code 1 when any finding has severity error.", flag="--strict")
    tree: bool = setting(
        True, "Include each file's tree of groups and datasets in the report.", flag="--tree/--no-tree"
    )

    def __post_init__(self) -> None:
        if self.window < 1:
            raise invalid("window", f"must be >= 1 frame, got {self.window}", InspectH5Config)
        if self.chunk < 1:
            raise invalid("chunk", f"must be >= 1 action, got {self.chunk}", InspectH5Config)
        if not 0 <= self.sample_images <= MAX_SAMPLE_IMAGES:
            raise invalid(
                "sample_images", f"must be in [0, {MAX_SAMPLE_IMAGES}], got {self.sample_images}", InspectH5Config
            )
