"""The interfaces of a policy's parts: a backbone, an action head, and what a training step returns.

A policy is a backbone (the built-in tiny one or a Hugging Face VLM family, loaded from a local
directory) that turns each history frame's cameras and the instruction into one feature vector,
plus an action head that turns the ``W`` frame features (with the state and any extra sensor
streams) into a chunk of ``K`` actions. LoRA goes on the backbone; the head trains fully.

Batches are the default-collated samples of :class:`vlacl.data.windows.WindowedDataset`:

- ``observation.state`` ``(B, W, S)`` float32, normalized
- ``observation.images.<camera>`` ``(B, W, H, W_img, C)`` uint8, upright
- ``observation.<sensor>`` ``(B, W, D_s)`` float32 for extra sensor streams named in the key map
- ``action`` ``(B, K, A)`` float32, normalized; ``action_is_pad`` ``(B, K)``; ``observation_is_pad`` ``(B, W)``
- ``instruction`` (list of ``B`` strings), ``task_index``, ``episode_index``, ``frame_index`` ``(B,)``

After :meth:`Backbone.prepare` ran in the DataLoader's collate function
(:meth:`vlacl.models.policy.Policy.collate`), the camera frames are replaced by ``backbone_inputs``:
the backbone's own tensors for the ``N = B * W`` frames (token ids, pixel values, ...), so frames
are not moved to the device twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

BACKBONE_INPUTS = "backbone_inputs"
"""Batch key of the tensors :meth:`Backbone.prepare` made."""


@runtime_checkable
class Backbone(Protocol):
    """A frozen (LoRA-adapted) feature extractor; implementations are ``torch.nn.Module`` s.

    Attributes:
        family: ``tiny``, ``qwen2_5_vl``, ``paligemma``, ``idefics3``, ``kosmos2``, ...
        hidden_size: ``D``, the width of one frame's feature.
        takes_state: The backbone embeds ``observation.state`` itself (as a token); otherwise the
            policy projects the state next to the backbone feature.

    Optional: ``compile_regions() -> Sequence[nn.Module]``, the repeated blocks ``train-task --compile``
    compiles one by one (the language model's and the vision tower's); without it, :meth:`layer_modules`.

    Optional: ``pad_inputs(inputs, length) -> dict`` pads :meth:`prepare`'s token tensors to
    ``length`` as ``prepare`` itself would, so that batches prepared apart (a task's batch and
    replayed samples) can be joined by :meth:`~vlacl.models.policy.Policy.concat`.
    """

    family: str
    hidden_size: int
    takes_state: bool

    def prepare(self, images: Mapping[str, torch.Tensor], instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """CPU preprocessing, run in DataLoader workers: cameras ``(N, H, W, C)`` uint8 -> model inputs.

        ``instructions`` has ``N`` entries (each sample's instruction repeated over its ``W`` frames).
        """
        ...

    def forward(self, inputs: Mapping[str, torch.Tensor], state: torch.Tensor | None = None) -> torch.Tensor:
        """One feature per frame: ``(N, D)``. ``state`` ``(N, S)`` when :attr:`takes_state`."""
        ...

    def lora_target_modules(self, preset: str) -> list[str] | str:
        """Module names (or PEFT's ``all-linear``) that LoRA adapts for ``preset``.

        Presets: ``all-linear`` (every linear layer of the language model), ``attention``
        (attention projections only), ``vision`` (``all-linear`` plus the vision tower).
        """
        ...

    def layer_modules(self) -> Sequence[torch.nn.Module]:
        """The language model's transformer blocks in order (for fine-tuning the last N layers)."""
        ...


@dataclass
class PolicyOutput:
    """What a training forward pass returns.

    Attributes:
        loss: The scalar loss the optimizer minimizes (sum of the weighted terms).
        terms: Each loss term, detached, for logs and the zero-loss guard (``l1``, ``bce``, ``flow``...).
        actions: The predicted action chunk ``(B, K, A)`` where the head makes one in training
            (regression heads), else ``None``.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    actions: torch.Tensor | None = None


@runtime_checkable
class ActionHead(Protocol):
    """Frame features -> an action chunk; implementations are ``torch.nn.Module`` s, fully trainable."""

    kind: str

    def loss(
        self, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, per_sample: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Loss terms for ``cond`` ``(B, W, D)``, ``target`` ``(B, K, A)``, ``mask`` ``(B, K, A)`` (1 = counts).

        Returns the unweighted terms (scalars, or ``(B,)`` per-sample means with ``per_sample``) and
        the predicted chunk where there is one.
        """
        ...

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The action chunk ``(B, K, A)`` (normalized units) for ``cond`` ``(B, W, D)``."""
        ...
