"""Load a trained policy from a task checkpoint or a merged policy, for evaluation and inference.

:func:`load_policy` verifies the artifact's manifest, loads its base model (a task checkpoint's
``base_model`` or ``model_path``; a merged model is its own base), puts a checkpoint's adapters on as
its mode says (``per-task``: the adapter of ``task``), rebuilds the head from the recorded
``head_config`` and returns it in eval mode with what a caller needs to feed it: the normalizer of
``stats.json``, the key map, the window and the cameras. A caller that evaluates several
checkpoints of one base model passes the loaded base as ``backbone`` and takes the adapters off
again with :func:`release_backbone`: the base model is read once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from vlacl.artifacts.names import ACTION_HEAD_NAME, KEYMAP_NAME, STATS_NAME
from vlacl.data.features import ACTION, STATE, image_key
from vlacl.data.keymap import KeyMap
from vlacl.data.normalize import Normalizer
from vlacl.data.windows import WindowSpec
from vlacl.errors import ArtifactError, ConfigError
from vlacl.models.base import Backbone
from vlacl.models.policy import Policy
from vlacl.training.model import HEAD_CONFIG_KEY

POLICY_KINDS = ("task_checkpoint", "merged_model")
"""Artifact kinds :func:`load_policy` reads."""


@dataclass
class LoadedPolicy:
    """A trained policy in eval mode and what it needs to be fed.

    Attributes:
        policy: The :class:`~vlacl.models.policy.Policy`, on its device, every parameter frozen.
        normalizer: Normalizes the state, extra sensor streams and the action as in training
            (``unnormalize("action", policy.predict(batch))`` gives actions in dataset units).
        keymap: The key map the training data was read with.
        spec: The window: ``history`` observation frames in, ``chunk`` actions out.
        cameras: The policy's camera keys (``observation.images.<name>``), in the order it takes them.
        observation_keys: Every observation key a sample needs (state, cameras, sensor streams).
        active_adapters: The adapters active now.
        details: The checkpoint manifest's details.
        path: The checkpoint directory.
        setup: The :class:`~vlacl.adapters.lora.AdapterSetup` (for :meth:`select_task`).
    """

    policy: Policy
    normalizer: Normalizer
    keymap: KeyMap
    spec: WindowSpec
    cameras: tuple[str, ...]
    observation_keys: tuple[str, ...]
    active_adapters: tuple[str, ...]
    details: dict[str, Any]
    path: Path
    setup: Any = field(repr=False, default=None)

    def select_task(self, task: str | int) -> tuple[str, ...]:
        """Activate the adapters of ``task`` (a task name or stream index; only ``per-task`` mode switches)."""
        from vlacl.adapters.lora import activate_for_task

        self.active_adapters = activate_for_task(self.setup, task)
        return self.active_adapters


def policy_details(details: dict[str, Any], kind: str, path: Path) -> dict[str, Any]:
    """The policy's details of a manifest: a task checkpoint's own, a merged model's ``policy`` entry.

    Raises:
        ArtifactError: A merged model made without a task checkpoint (plain adapters): it has no action head.
    """
    if kind == "task_checkpoint":
        return details
    policy = details.get("policy")
    if not isinstance(policy, dict):
        raise ArtifactError(
            f"merged model {path} was merged from plain adapters, not a task checkpoint: it has no action head; "
            "merge a task checkpoint with `vlacl merge-lora <checkpoint>`"
        )
    return policy


def model_source(details: dict[str, Any], kind: str, path: Path) -> str:
    """The base model an artifact's policy loads: a task checkpoint's ``base_model``, a merged model itself."""
    if kind == "merged_model":
        return str(path)
    return _base_model(details, path)


def release_backbone(loaded: LoadedPolicy) -> Backbone:
    """Take a loaded policy's adapters off its backbone and return the bare base model, for the next checkpoint.

    Raises:
        ConfigError: The checkpoint changed backbone weights (``--finetune full``/``last-n``): the base
            model must be read again.
    """
    setup = loaded.setup
    if setup is None:
        return loaded.policy.backbone
    if setup.changed:
        raise ConfigError(f"{loaded.path} changed backbone weights: load the base model again for the next policy")
    peft = setup.peft_model
    if peft is None:
        return cast("Backbone", setup.base)
    peft.unload()
    return cast("Backbone", setup.base)


def _base_model(details: dict[str, Any], ckpt: Path) -> str:
    recorded = details.get("base_model")
    if not isinstance(recorded, str):
        raise ArtifactError(
            f"task checkpoint {ckpt} records no base_model: pass model_path (the base model it was trained from)"
        )
    if recorded.startswith("builtin:") or Path(recorded).is_absolute():
        return recorded
    return str(ckpt / recorded)


def load_policy(
    ckpt_dir: Path | str,
    *,
    model_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    task: str | int | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    backbone: Backbone | None = None,
    verify: bool = True,
) -> LoadedPolicy:
    """Load the policy of a task checkpoint (or a merged model of one) in eval mode.

    Args:
        ckpt_dir: A ``task_checkpoint`` directory (``vlacl train-task``) or a ``merged_model`` directory
            (``vlacl merge-lora`` of a task checkpoint); its manifest is verified.
        model_path: The base model; none takes the manifest's ``base_model`` (relative to the checkpoint).
        device: Where the policy goes.
        task: The task (name or stream index) whose adapter serves in ``per-task`` mode; none keeps
            the checkpoint's own (its last) adapter. Other modes keep every adapter active.
        dtype: The backbone's weights' dtype (none: float32 for the tiny model, the loader's choice otherwise).
        trust_remote_code: Let a Hugging Face model run code from its directory.
        backbone: The base model already loaded and bare (no adapters), e.g. from
            :func:`release_backbone`; it is used instead of reading ``model_path``.
        verify: Check every file of the artifact against its manifest's hashes (a caller that loads
            the same checkpoint again after verifying it once may skip it).

    Raises:
        ArtifactError: An incomplete or edited checkpoint, or one that does not fit the base model.
        ConfigError: A ``task`` without an adapter in a per-task checkpoint.
    """
    from safetensors.torch import load_file

    from vlacl.adapters.lora import activate_for_task, load_for_inference
    from vlacl.artifacts.reader import open_artifact
    from vlacl.data.keymap import load_keymap
    from vlacl.data.normalize import load_stats
    from vlacl.models.load import load_backbone
    from vlacl.models.policy import policy_from_head_config
    from vlacl.training.data import task_normalizer

    path = Path(ckpt_dir)
    artifact = open_artifact(path, POLICY_KINDS, verify=verify)
    details = policy_details(dict(artifact.manifest.details), artifact.kind, path)
    head_config = details.get(HEAD_CONFIG_KEY)
    if not isinstance(head_config, dict):
        raise ArtifactError(f"{artifact.kind} {path} has no {HEAD_CONFIG_KEY} in its manifest: it is damaged")
    if backbone is None:
        model = str(model_path) if model_path is not None else model_source(details, artifact.kind, path)
        backbone = load_backbone(model, trust_remote_code=trust_remote_code, dtype=dtype)
    setup: Any = None
    active: tuple[str, ...] = ()
    if artifact.kind == "task_checkpoint":
        setup = load_for_inference(backbone, path)
        active = activate_for_task(setup, task) if task is not None else setup.active_adapters()
        backbone = setup.backbone
    else:
        backbone.requires_grad_(False)  # type: ignore[attr-defined]
    source = f"{path / ACTION_HEAD_NAME}"
    policy = policy_from_head_config(head_config, backbone, source=f"{path} head_config")
    policy.load_head_state_dict(load_file(source), source=source)
    policy.to(device)
    policy.requires_grad_(False)
    policy.train(False)
    cameras = tuple(image_key(c) for c in policy.cameras)
    keys = (*((STATE,) if policy.state_dim > 0 else ()), *cameras, *policy.sensor_keys)
    stats = load_stats(path / STATS_NAME)
    normalizer = task_normalizer(stats, [k for k in keys if k != ACTION])
    keymap_file = path / KEYMAP_NAME
    return LoadedPolicy(
        policy=policy,
        normalizer=normalizer,
        keymap=load_keymap(keymap_file if keymap_file.is_file() else None),
        spec=WindowSpec(history=policy.history, chunk=policy.chunk),
        cameras=cameras,
        observation_keys=keys,
        active_adapters=tuple(active),
        details=details,
        path=path,
        setup=setup,
    )


__all__ = ["LoadedPolicy", "load_policy"]
