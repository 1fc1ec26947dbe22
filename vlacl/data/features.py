"""Feature names and the per-frame description of a feature, after LeRobot's conventions.

Every reader maps what it finds on disk to these canonical names, so the rest of vlacl never sees a
format's own keys: ``observation.state`` (all proprioceptive keys concatenated in key-map order),
``observation.images.<camera>`` (``(H, W, C)`` uint8 frames), ``action``, and per frame
``task_index``, ``episode_index``, ``frame_index``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

STATE: Final = "observation.state"
ACTION: Final = "action"
IMAGE_PREFIX: Final = "observation.images."
TASK_INDEX: Final = "task_index"
EPISODE_INDEX: Final = "episode_index"
FRAME_INDEX: Final = "frame_index"
INDEX: Final = "index"
TIMESTAMP: Final = "timestamp"

FeatureRole = Literal["state", "action", "image", "other"]


def image_key(camera: str) -> str:
    """``observation.images.<camera>``: the canonical key of a camera."""
    return f"{IMAGE_PREFIX}{camera}"


def role_of(key: str) -> FeatureRole:
    """Whether ``key`` is the state, the action, a camera or something else."""
    if key == STATE:
        return "state"
    if key == ACTION:
        return "action"
    if key.startswith(IMAGE_PREFIX):
        return "image"
    return "other"


@dataclass(frozen=True)
class Feature:
    """One feature of a dataset, as every frame has it.

    Attributes:
        key: Canonical name (``observation.state``, ``action``, ``observation.images.front``, ...).
        dtype: NumPy dtype name of the values as read (``float32``, ``uint8``, ...).
        shape: Shape of one frame's value: ``(D,)`` for vectors, ``(H, W, C)`` for images.
        names: Names of the dimensions of a vector feature, when the dataset gives them.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    names: tuple[str, ...] | None = None

    @property
    def role(self) -> FeatureRole:
        """State, action, image or other."""
        return role_of(self.key)

    @property
    def is_image(self) -> bool:
        """True for camera features."""
        return self.role == "image"

    def to_dict(self) -> dict[str, object]:
        """JSON form, as recorded in manifests and reports."""
        out: dict[str, object] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.names is not None:
            out["names"] = list(self.names)
        return out
