"""The policy of one task: backbone (with adapters from ``--prev``) + action head, and how its weights are saved."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlacl.artifacts.names import ACTION_HEAD_NAME
from vlacl.config.train_task import TrainTaskConfig
from vlacl.data.features import ACTION, STATE, role_of
from vlacl.data.normalize import StatsFile
from vlacl.errors import ConfigError
from vlacl.training.data import TaskData

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64
"""Compiled variants dynamo keeps per code with ``--compile`` (its default 8 is too few when blocks share one)."""

CUDAGRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})
"""``--compile-mode`` values under which torch.compile replays the compiled blocks as CUDA graphs."""

HEAD_CONFIG_KEY = "head_config"
"""Manifest details key of the head's config (what rebuilds the head around action_head.safetensors)."""


@dataclass
class BuiltModel:
    """The policy and its adapter setup.

    Attributes:
        policy: The :class:`~vlacl.models.policy.Policy` (an ``nn.Module``).
        setup: The :class:`~vlacl.adapters.lora.AdapterSetup` of the backbone.
    """

    policy: Any
    setup: Any

    def backbone_params(self) -> list[torch.nn.Parameter]:
        """The backbone parameters this task trains (LoRA factors or fine-tuned weights)."""
        from vlacl.adapters.lora import backbone_parameters

        return backbone_parameters(self.setup)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the backbone's trainable parameters (stage 1 of --two-stage)."""
        from vlacl.adapters.lora import set_backbone_trainable

        set_backbone_trainable(self.setup, trainable)

    def save_weights(
        self, policy: Any, directory: Any, full_state: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Write adapters (PEFT format), changed backbone weights and the head; return the manifest details.

        ``full_state`` is the policy's gathered full state dict under FSDP, whose modules hold only shards.
        """
        from vlacl.adapters.lora import save_adapters
        from vlacl.models.policy import BACKBONE_PREFIX

        if full_state is None:
            details = dict(save_adapters(self.setup, directory))
            head = {k: v.detach().cpu().contiguous() for k, v in policy.head_state_dict().items()}
        else:
            names = {id(module): name for name, module in policy.named_modules()}
            details = dict(
                save_adapters(
                    self.setup,
                    directory,
                    peft_state=_under(full_state, names.get(id(self.setup.peft_model))),
                    base_state=_under(full_state, names.get(id(self.setup.base))),
                )
            )
            head = {
                k: v.detach().cpu().contiguous() for k, v in full_state.items() if not k.startswith(BACKBONE_PREFIX)
            }
        save_file(head, str(directory / ACTION_HEAD_NAME), metadata={"format": "pt"})
        details[HEAD_CONFIG_KEY] = policy.head_config()
        return details


def _under(state: Mapping[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor] | None:
    """The entries of ``state`` under module ``prefix``, named relative to it (``None`` without a module)."""
    if prefix is None:
        return None
    head = f"{prefix}." if prefix else ""
    return {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}


def _dtype(mixed: str, device_type: str) -> torch.dtype | None:
    """The frozen backbone's dtype: bf16/fp16 weights on a GPU with mixed precision, fp32 otherwise."""
    if device_type == "cuda" and mixed == "bf16":
        return torch.bfloat16
    if device_type == "cuda" and mixed == "fp16":
        return torch.float16
    return None


def build_model(
    cfg: TrainTaskConfig, data: TaskData, stats: StatsFile, prev: Any, *, mixed: str, device_type: str = "cpu"
) -> BuiltModel:
    """Load the backbone, attach the adapters (continuing ``prev``), build the policy and load ``prev``'s head.

    Trainable parameters are cast to fp32 whatever the backbone's dtype, so that the optimizer and
    the fp16 loss scaler work on fp32 weights and gradients.
    """
    from vlacl.adapters.lora import attach, load_previous
    from vlacl.models.load import load_backbone
    from vlacl.models.policy import binary_action_dims, build_policy

    torch.manual_seed(cfg.seed)
    backbone = load_backbone(cfg.model_path, trust_remote_code=cfg.trust_remote_code, dtype=_dtype(mixed, device_type))
    previous = load_previous(prev.path) if prev is not None else None
    setup = attach(backbone, cfg.adapter, task=data.task.key, task_index=data.task.position, previous=previous)
    features = data.stream.datasets[0].features
    cameras = [k for k in data.train.observation_keys if role_of(k) == "image"]
    state_dim = int(features[STATE].shape[0]) if STATE in data.train.observation_keys else 0
    sensor_dims = {k: math.prod(features[k].shape) for k in data.train.observation_keys if role_of(k) == "other"}
    binary, low, high = binary_action_dims(stats.data)
    policy = build_policy(
        cfg.model,
        setup.backbone,
        cameras=cameras,
        state_dim=state_dim,
        action_dim=int(features[ACTION].shape[0]),
        history=cfg.history,
        chunk=cfg.chunk,
        sensor_dims=sensor_dims,
        binary_dims=binary,
        binary_low=low,
        binary_high=high,
    )
    if prev is not None:
        policy.load_head_state_dict(load_file(str(prev.file(ACTION_HEAD_NAME))))
    if cfg.activation_checkpointing:
        enable = getattr(setup.base, "gradient_checkpointing_enable", None)
        if enable is None:
            log.warning(
                "the %s backbone has no activation checkpointing; --activation-checkpointing is ignored",
                backbone.family,
            )
        else:
            enable()
    for param in policy.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if cfg.compile:
        compile_backbone(setup.base, device_type, cfg.compile_mode)
    return BuiltModel(policy, setup)


def compile_regions(backbone: Any) -> list[torch.nn.Module]:
    """The blocks ``--compile`` compiles: the backbone's ``compile_regions()``, else its ``layer_modules()``."""
    regions = getattr(backbone, "compile_regions", None)
    return list(regions() if regions is not None else backbone.layer_modules())


def uses_cudagraphs(cfg: Any) -> bool:
    """Whether ``--compile --compile-mode`` replays the compiled blocks as CUDA graphs."""
    return bool(cfg.compile) and cfg.compile_mode in CUDAGRAPH_MODES


def compile_backbone(backbone: Any, device_type: str, mode: str = "default") -> list[torch.nn.Module]:
    """Compile each of the backbone's blocks in place with ``torch.compile`` (regional compilation); return them.

    Called once LoRA is attached (PEFT replaces the blocks' linear layers) and before the
    accelerator wraps the policy (DDP). ``nn.Module.compile`` keeps the modules and their
    parameter names, so state dicts, PEFT's adapter files and the optimizer state are those of an
    uncompiled run. Each block is compiled on its first call, then reused by every block of the
    same code.

    Shapes: ``dynamic=None`` (torch's default): a block is first compiled for the shapes it sees,
    and a size that later changes (a batch padded to a longer instruction, a smaller last
    validation batch, the vision tower's full-attention blocks among its window blocks) is
    compiled once more as a dynamic size, after which it no longer recompiles. Every transformers
    layer runs the same wrapper code (its gradient checkpointing wrapper), whose compiled variants
    (vision and language blocks, training and evaluation, gradient or not at the input) share one
    cache; dynamo's limit of 8 variants per code is raised to :data:`RECOMPILE_LIMIT` so that
    none falls back to eager.

    ``mode``: torch.compile's mode (``default`` is torch's own default). With ``reduce-overhead``
    (or ``max-autotune``) each block's forward and backward are recorded as CUDA graphs on their
    first calls and replayed after, so a step launches a few graphs instead of thousands of kernels;
    the training loop marks the start of every step (:func:`uses_cudagraphs`).
    """
    import torch._dynamo.config

    regions = compile_regions(backbone)
    if not regions:
        raise ConfigError(
            f"--compile: the {getattr(backbone, 'family', type(backbone).__name__)} backbone names no blocks to "
            "compile; drop --compile"
        )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for region in regions:
        region.compile(dynamic=None, mode=None if mode == "default" else mode)
    kinds = sorted({type(region).__name__ for region in regions})
    log.info("--compile: %d blocks (%s) compiled on their first call, mode %s", len(regions), ", ".join(kinds), mode)
    if mode in CUDAGRAPH_MODES and device_type != "cuda":
        log.warning(
            "--compile-mode %s: CUDA graphs need a GPU; on %s the blocks run compiled, without them", mode, device_type
        )
    elif device_type != "cuda":
        log.info("--compile on %s: compilation mostly helps on GPUs, where it fuses the blocks' kernels", device_type)
    return regions
