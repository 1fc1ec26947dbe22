"""The task checkpoint artifact, and the mid-task resume state.

Task checkpoint (kind ``task_checkpoint``), written once at the end of ``train-task``::

    adapters/<name>/            PEFT adapter dirs, in the order of details["adapter_stack"]
    action_head.safetensors     the head's weights; its config in details["head_config"]
    trainable.safetensors       backbone weights trained without LoRA (--finetune full/last-n), if any
    cl_state.safetensors        the CL algorithm's tensors; cl_state.json its other values
    stats.json, keymap.yaml     the stats the policy was trained with, and the key map
    metrics.jsonl               one JSON object per logged step (and per validation)
    best/                       with --keep-best: adapters/, action_head.safetensors of the best val loss
    config.yaml, vlacl_manifest.json

Resume state, ``<out parent>/.<out name>.resume/`` (outside the artifact's temporary directory,
which the writer removes when a run dies), replaced atomically (written to a temporary sibling,
then renamed)::

    state.json                  step, epoch, sampler position, guard counters, best val loss, ...
    trainable.safetensors       every trainable weight (adapters, head, fine-tuned layers)
    accelerate/                 instead, under FSDP/DeepSpeed: Accelerator.save_state (sharded)
    optimizer.pt, rng.pt        optimizer and scheduler state, RNG states (torch.save of our own
                                tensors; read back with weights_only=True)
    cl_state.safetensors/.json  the CL algorithm's state
    metrics.jsonl, tensorboard/ the logs so far (they continue after a resume)
    best/                       the best weights so far (--keep-best)
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlacl.artifacts.names import CL_META_NAME, CL_STATE_NAME, TRAIN_METRICS_NAME
from vlacl.errors import ArtifactError

log = logging.getLogger(__name__)

METRICS_LOG_NAME = TRAIN_METRICS_NAME
TRAINABLE_NAME = "trainable.safetensors"
STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng.pt"
TENSORBOARD_DIR = "tensorboard"
RESUME_VERSION = 1


def resume_dir(out: Path) -> Path:
    """``<out parent>/.<out name>.resume``: where the mid-task state of ``--out`` lives."""
    out = Path(os.path.abspath(out))  # noqa: PTH100
    return out.parent / f".{out.name}.resume"


def feature_cache_dir(out: Path) -> Path:
    """``<out parent>/.<out name>.features``: the default directory of ``--cache-features`` files of ``--out``."""
    out = Path(os.path.abspath(out))  # noqa: PTH100
    return out.parent / f".{out.name}.features"


def save_cl_state(state: Mapping[str, Any], directory: Path) -> None:
    """Tensors to ``cl_state.safetensors``, everything else to ``cl_state.json`` (both always written)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, str(directory / CL_STATE_NAME))
    (directory / CL_META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_cl_state(directory: Path) -> dict[str, Any] | None:
    """What :func:`save_cl_state` wrote, or ``None`` when ``directory`` has no CL state."""
    if not (directory / CL_STATE_NAME).is_file():
        return None
    state: dict[str, Any] = dict(load_file(str(directory / CL_STATE_NAME)))
    meta = directory / CL_META_NAME
    if meta.is_file():
        state.update(json.loads(meta.read_text(encoding="utf-8")))
    return state


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy and torch (CPU and every CUDA device)."""
    version, internal, gauss = random.getstate()
    key, words, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [str(key), torch.from_numpy(words.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    key, words, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((key, words.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


ACCELERATE_DIR = "accelerate"
"""Sub-directory of a resume state holding ``Accelerator.save_state`` (FSDP/DeepSpeed: sharded model and optimizer)."""


def resume_tmp(directory: Path) -> Path:
    """The temporary sibling a resume state is built in (the same name on every process)."""
    return directory.parent / f"{directory.name}.tmp"


def save_resume_state(
    directory: Path,
    *,
    state: Mapping[str, Any],
    trainable: Mapping[str, torch.Tensor] | None,
    optimizer: Mapping[str, Any] | None,
    cl_state: Mapping[str, Any],
    carry: Mapping[str, Path],
    prepared: bool = False,
) -> None:
    """Replace the resume state at ``directory`` atomically: build a sibling, then rename it into place.

    Args:
        directory: The resume directory (:func:`resume_dir`).
        state: JSON values (step, epoch, sampler position, ...).
        trainable: The trainable weights, by parameter name; ``None`` when ``accelerate/`` holds them.
        optimizer: ``{"optimizer": ..., "scheduler": ..., "scaler": ...}`` state dicts; the
            optimizer's ``None`` when ``accelerate/`` holds it.
        cl_state: The CL algorithm's state dict.
        carry: Files or directories to copy in (``metrics.jsonl``, ``best/``, ...), by name.
        prepared: :func:`resume_tmp` already exists (with ``accelerate/`` written by every process).
    """
    tmp = resume_tmp(directory)
    old = directory.parent / f"{directory.name}.old-{os.getpid()}"
    if not prepared:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        if trainable is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE_NAME))
        torch.save(dict(optimizer or {}), tmp / OPTIMIZER_NAME)
        torch.save(rng_state(), tmp / RNG_NAME)
        save_cl_state(cl_state, tmp)
        for name, source in carry.items():
            if source.is_dir():
                shutil.copytree(source, tmp / name)
            elif source.is_file():
                shutil.copy2(source, tmp / name)
        payload = {"resume_version": RESUME_VERSION, **state}
        (tmp / STATE_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():
            old.rename(directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_resume_state(directory: Path) -> dict[str, Any]:
    """Read the state written by :func:`save_resume_state`.

    Returns:
        ``state`` (JSON), ``trainable`` (tensors, or ``None``), ``accelerate`` (the ``save_state``
        directory, or ``None``), ``optimizer``, ``rng`` and ``cl``.

    Raises:
        ArtifactError: The directory is incomplete or of a newer layout.
    """
    file = directory / STATE_NAME
    if not file.is_file():
        raise ArtifactError(
            f"resume state {directory} has no {STATE_NAME} (an interrupted save): remove {directory} and "
            "start the task again, or pass --resume never"
        )
    state = json.loads(file.read_text(encoding="utf-8"))
    if state.get("resume_version", 0) > RESUME_VERSION:
        raise ArtifactError(f"resume state {directory} was written by a newer vlacl: upgrade vlacl or remove it")
    trainable = directory / TRAINABLE_NAME
    return {
        "state": state,
        "trainable": load_file(str(trainable)) if trainable.is_file() else None,
        "accelerate": directory / ACCELERATE_DIR if (directory / ACCELERATE_DIR).is_dir() else None,
        "optimizer": torch.load(directory / OPTIMIZER_NAME, weights_only=True),
        "rng": torch.load(directory / RNG_NAME, weights_only=True),
        "cl": load_cl_state(directory) or {},
    }
