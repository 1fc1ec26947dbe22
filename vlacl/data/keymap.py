"""The key map: which keys of a dataset are the cameras, the state, the action and the instruction.

Each reader has defaults for its format (LeRobot's feature names, robomimic's ``obs/<key>``, the
flat files' ``images``/``actions``); a key map given with ``--keymap FILE`` replaces them where the
defaults do not fit. It is saved as ``keymap.yaml`` in every artifact that used it, and its hash is
part of the stats fingerprint, so stats computed under one key map are never applied under another.

```yaml
state: [robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos]   # concatenated in this order
action: actions
cameras: {agentview: agentview_rgb, wrist: eye_in_hand_rgb}      # camera name -> key in the file
instruction_key: language_instruction                           # attribute or dataset holding it
flip_images: true                                               # LIBERO's upside-down frames
```
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vlacl.config.core import dump_config, invalid, resolve_config, setting


@dataclass(frozen=True)
class KeyMap:
    """Where a dataset keeps each canonical feature; unset entries keep the format's default."""

    state: tuple[str, ...] | None = setting(
        None, "Keys concatenated, in order, into observation.state (default: the format's state keys)."
    )
    action: str | None = setting(None, "Key of the actions (default: the format's action key).")
    cameras: Mapping[str, str] | None = setting(
        None, "Camera name -> key of its frames; the camera becomes observation.images.<name> (default: all cameras)."
    )
    instruction: str | None = setting(
        None, "One language instruction for every episode, replacing what the dataset says."
    )
    instruction_key: str | None = setting(
        None, "Attribute or dataset that holds each episode's instruction (default: the format's own)."
    )
    flip_images: bool | None = setting(
        None, "Rotate camera frames by 180 degrees (LIBERO records them upside down; default: the format's rule)."
    )
    extra: Mapping[str, str] | None = setting(None, "Other per-frame keys to read, canonical name -> key in the file.")

    def __post_init__(self) -> None:
        if self.state is not None and not self.state:
            raise invalid("state", "must list at least one key, or be left out for the format's default", KeyMap)
        for name in self.cameras or {}:
            if not name or "/" in name or "." in name:
                raise invalid("cameras", f"camera name {name!r} must be non-empty without '/' or '.'", KeyMap)

    @property
    def is_default(self) -> bool:
        """True when nothing is overridden."""
        return self == KeyMap()

    def to_yaml(self) -> str:
        """The key map as saved in ``keymap.yaml``."""
        return dump_config(self)

    def sha256(self) -> str:
        """Hash of the canonical YAML form: equal key maps hash equal, whatever file they came from."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


def load_keymap(path: Path | None) -> KeyMap:
    """Read a key map YAML file (unknown keys are refused with a suggestion), or the default for ``None``."""
    if path is None:
        return KeyMap()
    return resolve_config(KeyMap, config_file=path)
