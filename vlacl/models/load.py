"""Load a backbone from a model directory, or the built-in tiny one.

- ``builtin:tiny`` (:data:`BUILTIN_TINY`): the default tiny backbone, built in memory from
  :class:`~vlacl.models.tiny.TinyConfig`'s defaults and seed 0, the same weights on every machine.
- a directory whose ``config.json`` says ``model_type: vlacl_tiny``: a saved tiny backbone.
- any other directory: a Hugging Face VLM, through :func:`vlacl.models.hf.load_hf_backbone`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

import torch

from vlacl.errors import ArtifactError, ConfigError
from vlacl.models.base import Backbone
from vlacl.models.tiny import CONFIG_FILE, MODEL_TYPE, TinyBackbone, TinyConfig, load_tiny_model

BUILTIN_TINY: Final = "builtin:tiny"
BUILTIN_SEED: Final = 0
BUILTINS: Final = (BUILTIN_TINY,)


def is_builtin(path_or_builtin: str | Path) -> bool:
    """True for a built-in model name (``builtin:tiny``)."""
    return isinstance(path_or_builtin, str) and path_or_builtin.startswith("builtin:")


def load_backbone(
    path_or_builtin: str | Path, *, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> Backbone:
    """The backbone at ``path_or_builtin``.

    Args:
        path_or_builtin: ``builtin:tiny`` or a local model directory.
        trust_remote_code: Let a Hugging Face model run code from its directory.
        dtype: Weights' dtype; None keeps float32 for the tiny model and the loader's choice for others.

    Raises:
        ConfigError: An unknown built-in name, or a path that is not a directory.
        ArtifactError: A model directory that cannot be read.
    """
    if is_builtin(path_or_builtin):
        if path_or_builtin != BUILTIN_TINY:
            raise ConfigError(
                f"unknown built-in model {path_or_builtin!r}: use {', '.join(BUILTINS)} or a model directory"
            )
        model = TinyBackbone(TinyConfig(), seed=BUILTIN_SEED)
        return model.to(dtype) if dtype is not None else model
    path = Path(path_or_builtin)
    if not path.is_dir():
        raise ConfigError(
            f"base model {str(path)!r} is not a directory: pass a local model directory (config.json + weights) or "
            f"{BUILTIN_TINY}"
        )
    config_path = path / CONFIG_FILE
    model_type = None
    if config_path.is_file():
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"cannot read {config_path}: {exc}: the model directory is damaged") from None
    if model_type == MODEL_TYPE:
        return load_tiny_model(path, dtype=dtype)
    from vlacl.models.hf import load_hf_backbone  # heavy: transformers

    backbone: Backbone = load_hf_backbone(path, trust_remote_code=trust_remote_code, dtype=dtype)
    return backbone
