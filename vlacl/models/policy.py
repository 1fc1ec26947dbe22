"""A policy: a backbone for the frames, a state projection, sensor encoders and an action head.

One frame's conditioning is the backbone's feature ``(D,)`` of its cameras and the instruction
(with the state as a token when the backbone ``takes_state``), then, concatenated in this order:

- the state projected to ``state_width`` (only when the backbone does not take it),
- one ``sensor_width`` vector per extra sensor stream (its encoder sees all ``W`` frames; the
  vector is repeated over the frames).

The head maps the ``(B, W, C)`` conditionings to the ``(B, K, A)`` chunk. The backbone carries the
LoRA adapters; everything else (the "head part": state projection, sensor encoders, head) trains
fully and is saved apart from the backbone by :meth:`Policy.head_state_dict`, with
:meth:`Policy.head_config` describing how to rebuild it (:func:`policy_from_head_config`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from vlacl.config.core import config_to_dict
from vlacl.config.policy import PolicyConfig
from vlacl.data.features import ACTION, IMAGE_PREFIX, STATE, image_key
from vlacl.errors import ArtifactError, ConfigError, InputFormatError
from vlacl.models.base import BACKBONE_INPUTS, ActionHead, Backbone, PolicyOutput
from vlacl.models.heads import build_head
from vlacl.models.sensors import SensorEncoder

log = logging.getLogger(__name__)

HEAD_CONFIG_VERSION: Final = 1
ACTION_IS_PAD: Final = "action_is_pad"
INSTRUCTION: Final = "instruction"
BACKBONE_PREFIX: Final = "backbone."
FEATURES: Final = "backbone_features"
"""Batch key of precomputed backbone features ``(B, W, D)`` (a feature cache); with it the backbone does not run."""


def conditioning_width(
    backbone: Backbone, *, state_dim: int, sensor_count: int, state_width: int, sensor_width: int
) -> int:
    """``C``: the width of one frame's conditioning (see the module docstring)."""
    state = state_width if state_dim > 0 and not backbone.takes_state else 0
    return backbone.hidden_size + state + sensor_count * sensor_width


class Policy(nn.Module):
    """Backbone + state projection + sensor encoders + action head.

    Args:
        backbone: The (LoRA-adapted) backbone.
        head: An action head built for :func:`conditioning_width` wide conditionings.
        cameras: Camera names, in the order the backbone gets them (``observation.images.<name>``).
        state_dim: ``S``, the state's dimensions (0 for no state).
        sensor_dims: Extra sensor stream key (``observation.<name>``) -> its dimensions, in order.
        action_dim: ``A``.
        history: ``W``, observation frames per sample.
        chunk: ``K``, actions per sample.
        config: The settings the head part was built with (widths, loss weights, masked dimensions).
        binary_dims: Binary action dimensions, with ``binary_low``/``binary_high`` their levels (for
            :meth:`head_config`; the head already holds them).
        binary_low: Low level per binary dimension.
        binary_high: High level per binary dimension.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: ActionHead,
        *,
        cameras: Sequence[str],
        state_dim: int,
        sensor_dims: Mapping[str, int],
        action_dim: int,
        history: int,
        chunk: int,
        config: PolicyConfig | None = None,
        binary_dims: Sequence[int] = (),
        binary_low: Sequence[float] | None = None,
        binary_high: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        config = config or PolicyConfig()
        if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
            raise TypeError("the backbone and the head must be torch.nn.Module instances")
        if any(d >= action_dim for d in config.masked_action_dims):
            raise ConfigError(
                f"masked action dimensions {list(config.masked_action_dims)} are outside the {action_dim} action "
                "dimensions: fix model.masked_action_dims"
            )
        self.backbone = backbone
        self.head = head
        self.cameras = tuple(c[len(IMAGE_PREFIX) :] if c.startswith(IMAGE_PREFIX) else c for c in cameras)
        self.state_dim = state_dim
        self.sensor_keys = tuple(sensor_dims)
        self.sensor_dims = dict(sensor_dims)
        self.action_dim = action_dim
        self.history = history
        self.chunk = chunk
        self.config = config
        self.binary_dims = tuple(binary_dims)
        self.binary_low = None if binary_low is None else tuple(float(v) for v in binary_low)
        self.binary_high = None if binary_high is None else tuple(float(v) for v in binary_high)
        self.state_proj = (
            nn.Linear(state_dim, config.state_width) if state_dim > 0 and not backbone.takes_state else None
        )
        self.sensor_encoders = nn.ModuleList(
            SensorEncoder(dim, history, config.sensor_width) for dim in sensor_dims.values()
        )
        dim_mask = torch.ones(action_dim)
        dim_mask[list(config.masked_action_dims)] = 0.0
        self.register_buffer("dim_mask", dim_mask, persistent=False)
        self.dim_mask: torch.Tensor
        self.loss_weights = {"bce": config.bce_weight}
        self._no_split_modules = sorted({type(block).__name__ for block in backbone.layer_modules()})
        """Class names of the backbone's transformer blocks: FSDP's transformer-based auto wrap reads them."""

    @property
    def cond_dim(self) -> int:
        """``C``, the width of one frame's conditioning."""
        return conditioning_width(
            self.backbone,
            state_dim=self.state_dim,
            sensor_count=len(self.sensor_keys),
            state_width=self.config.state_width,
            sensor_width=self.config.sensor_width,
        )

    # Data ---------------------------------------------------------------------------------------

    def collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Default-collate ``samples`` and run :meth:`Backbone.prepare` on their ``B * W`` frames.

        The camera frames ``(B, W, H, W_img, C)`` are flattened to ``(B * W, ...)`` and the
        instructions repeated over the ``W`` frames (frame ``b * W + w``); the prepared tensors go
        under :data:`~vlacl.models.base.BACKBONE_INPUTS` and the raw frames are dropped from the
        batch (the prepared ones replace them). Meant as a DataLoader's ``collate_fn``: workers run it.
        """
        batch: dict[str, Any] = default_collate(list(samples))
        images: dict[str, torch.Tensor] = {}
        for camera in self.cameras:
            key = image_key(camera)
            if key not in batch:
                raise InputFormatError(
                    f"the batch has no camera {key!r} (it has {', '.join(sorted(batch))}): the policy was built "
                    f"for cameras {list(self.cameras)}"
                )
            frames = batch.pop(key)  # (B, W, H, W_img, C)
            images[camera] = frames.flatten(0, 1)  # (B*W, H, W_img, C)
        instructions = batch.get(INSTRUCTION)
        size = len(samples)
        if instructions is None:
            instructions = [""] * size
        batch[BACKBONE_INPUTS] = self.backbone.prepare(images, [s for s in instructions for _ in range(self.history)])
        return batch

    # Model --------------------------------------------------------------------------------------

    def conditioning(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The per-frame conditioning ``(B, W, C)`` of a collated batch.

        A batch that carries precomputed backbone features under :data:`FEATURES` (``(B, W, D)``,
        e.g. from a feature cache) skips the backbone.
        """
        features = batch.get(FEATURES)
        if features is None:
            features = self.backbone_features(batch)  # (B, W, D)
        return self.conditioning_from_features(features, batch)

    def backbone_features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The backbone's feature of every frame ``(B, W, D)``, float32, of a collated batch."""
        inputs = batch.get(BACKBONE_INPUTS)
        if inputs is None:
            inputs = self._prepare_now(batch)
        state = self._state(batch)
        b = self._batch_size(batch, state)
        backbone_state = state.flatten(0, 1) if state is not None and self.backbone.takes_state else None  # (B*W, S)
        feats = cast("nn.Module", self.backbone)(inputs, state=backbone_state)  # (B*W, D)
        out: torch.Tensor = feats.float().view(b, self.history, -1)  # (B, W, D)
        return out

    def conditioning_from_features(self, features: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The conditioning ``(B, W, C)`` from backbone features ``(B, W, D)``: only the state and sensor parts run.

        Raises:
            InputFormatError: Features of another shape, or a batch without the state or a sensor stream.
        """
        state = self._state(batch)
        b = self._batch_size(batch, state)
        w = self.history
        if features.shape != (b, w, self.backbone.hidden_size):
            raise InputFormatError(
                f"backbone features have shape {tuple(features.shape)}, the policy expects "
                f"({b}, {w}, {self.backbone.hidden_size}): they were computed for another backbone or window"
            )
        dtype = self._head_dtype()
        parts = [features.to(dtype)]  # (B, W, D)
        if self.state_proj is not None and state is not None:
            parts.append(self.state_proj(state.to(dtype)))  # (B, W, state_width)
        for key, encoder in zip(self.sensor_keys, self.sensor_encoders, strict=True):
            if key not in batch:
                raise InputFormatError(f"the batch has no sensor stream {key!r}; the policy was built with it")
            enc = encoder(batch[key].to(dtype))  # (B, E)
            parts.append(enc[:, None, :].expand(b, w, enc.shape[-1]))  # (B, W, E)
        return torch.cat(parts, dim=-1)  # (B, W, C)

    def loss_from_features(self, features: torch.Tensor, batch: Mapping[str, Any]) -> PolicyOutput:
        """The training loss of ``batch`` from precomputed backbone features ``(B, W, D)``: the backbone does not run.

        Equal to ``self(batch)`` where ``features`` are :meth:`backbone_features` of the batch.
        """
        return cast("PolicyOutput", self({**batch, FEATURES: features}))

    def _state(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        state = batch.get(STATE) if self.state_dim > 0 else None
        if self.state_dim > 0 and state is None:
            raise InputFormatError(
                f"the batch has no {STATE!r}; the policy was built with a {self.state_dim}-dim state"
            )
        if state is not None and state.shape[1:] != (self.history, self.state_dim):
            raise InputFormatError(
                f"{STATE} has shape {tuple(state.shape)}, the policy expects (B, {self.history}, {self.state_dim})"
            )
        return state

    def loss_mask(self, batch: Mapping[str, Any], target: torch.Tensor) -> torch.Tensor:
        """``(B, K, A)``: 1 where a target value counts (not a padded step, not a masked dimension)."""
        pad = batch.get(ACTION_IS_PAD)
        steps = torch.ones(target.shape[:2], device=target.device) if pad is None else (~pad.bool()).float()
        return steps[:, :, None] * self.dim_mask.to(target.device)  # (B, K, A)

    def forward(self, batch: Mapping[str, Any], per_sample: bool = False) -> PolicyOutput:
        """The training loss of a collated batch: the sum of the head's terms, ``bce`` weighted by ``bce_weight``.

        With ``per_sample``, the loss and terms are ``(B,)``: each sample's own loss (their mean is
        the batch loss when every sample has as many counted action values).
        """
        cond = self.conditioning(batch)  # (B, W, C)
        target = batch[ACTION].to(cond.dtype)  # (B, K, A)
        if target.shape[1:] != (self.chunk, self.action_dim):
            raise InputFormatError(
                f"{ACTION} has shape {tuple(target.shape)}, the policy expects (B, {self.chunk}, {self.action_dim})"
            )
        terms, actions = self.head.loss(cond, target, self.loss_mask(batch, target), per_sample=per_sample)
        loss = cast("torch.Tensor", sum(self.loss_weights.get(k, 1.0) * v for k, v in terms.items()))
        return PolicyOutput(loss=loss, terms={k: v.detach() for k, v in terms.items()}, actions=actions)

    def concat(self, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One batch of the samples of several collated batches, in order (e.g. a task's and replayed ones).

        Tensors are concatenated along the batch dimension, lists joined; the backbone inputs' token
        dimension is padded to the longest with the backbone's optional ``pad_inputs(inputs, length)``
        (the padding its ``prepare`` would have added; the tiny and Hugging Face backbones have one).

        Raises:
            InputFormatError: The batches have different keys or per-sample shapes that cannot be joined.
        """
        if len(batches) == 1:
            return dict(batches[0])
        keys = set(batches[0])
        for other in batches[1:]:
            if set(other) != keys:
                raise InputFormatError(f"cannot join batches with different keys: {sorted(keys)} and {sorted(other)}")
        out: dict[str, Any] = {}
        for key in batches[0]:
            values = [b[key] for b in batches]
            if key == BACKBONE_INPUTS:
                out[key] = self._concat_inputs(values)
            elif isinstance(values[0], torch.Tensor):
                out[key] = _cat(key, values)
            elif isinstance(values[0], list | tuple):
                out[key] = [item for v in values for item in v]
            else:
                raise InputFormatError(f"cannot join batch entry {key!r} of type {type(values[0]).__name__}")
        return out

    def _concat_inputs(self, inputs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = {int(x[k].shape[1]) for x in inputs for k in x if x[k].dim() >= 2 and k in _TOKEN_KEYS}
        if len(lengths) > 1:
            longest = max(lengths)
            pad = getattr(self.backbone, "pad_inputs", None)
            if pad is None:
                raise InputFormatError(
                    f"cannot join batches whose token lengths differ ({sorted(lengths)}): the {self.backbone.family} "
                    "backbone has no pad_inputs(inputs, length) method"
                )
            inputs = [pad(x, longest) for x in inputs]
        return {k: _cat(f"{BACKBONE_INPUTS}.{k}", [x[k] for x in inputs]) for k in inputs[0]}

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The action chunk ``(B, K, A)`` in normalized units (deterministic given ``generator``)."""
        return self.head.predict(self.conditioning(batch), generator=generator)

    def _prepare_now(self, batch: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
        """Backbone inputs for a batch that did not go through :meth:`collate`."""
        images = {}
        for camera in self.cameras:
            frames = batch[image_key(camera)]  # (B, W, H, W_img, C)
            images[camera] = frames.flatten(0, 1).cpu()  # (B*W, H, W_img, C)
        b = self._batch_size(batch, batch.get(STATE))
        instructions = batch.get(INSTRUCTION) or [""] * b
        device = self._head_device()
        prepared = self.backbone.prepare(images, [s for s in instructions for _ in range(self.history)])
        return {k: v.to(device) for k, v in prepared.items()}

    def _batch_size(self, batch: Mapping[str, Any], state: torch.Tensor | None) -> int:
        if state is not None:
            return int(state.shape[0])
        for key in (ACTION, FEATURES, *(image_key(c) for c in self.cameras), *self.sensor_keys):
            if key in batch:
                return int(batch[key].shape[0])
        inputs = batch.get(BACKBONE_INPUTS)
        if inputs:
            return int(next(iter(inputs.values())).shape[0]) // self.history
        raise InputFormatError("cannot tell the batch size: the batch has no state, action, camera or backbone input")

    def _head_dtype(self) -> torch.dtype:
        return next(cast("nn.Module", self.head).parameters()).dtype

    def _head_device(self) -> torch.device:
        return next(cast("nn.Module", self.head).parameters()).device

    # Saving -------------------------------------------------------------------------------------

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the policy except the backbone's (for ``action_head.safetensors``), contiguous.

        Read child by child rather than through the policy's own ``state_dict``, whose hooks under FSDP2
        would hand back sharded tensors once training has gathered them.
        """
        out: dict[str, torch.Tensor] = {}
        for name, child in self.named_children():
            if f"{name}." == BACKBONE_PREFIX:
                continue
            out.update(child.state_dict(prefix=f"{name}."))
        out.update(self._parameters)  # type: ignore[arg-type]
        out.update({k: v for k, v in self._buffers.items() if k not in self._non_persistent_buffers_set})  # type: ignore[misc]
        return {k: v.detach().contiguous() for k, v in out.items() if v is not None}

    def load_head_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "the head weights") -> None:
        """Load :meth:`head_state_dict`'s tensors; the backbone is left as it is.

        Raises:
            ArtifactError: Missing or unexpected tensors, or tensors of the wrong shape.
        """
        own = self.head_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise ArtifactError(
                f"{source} do not fit this policy: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape "
                f"{wrong[:5]}; the checkpoint was made with another head config (compare its head_config)"
            )
        self.load_state_dict(dict(state), strict=False)

    def head_config(self) -> dict[str, Any]:
        """JSON-ready description of the head part, enough for :func:`policy_from_head_config` to rebuild it."""
        return {
            "head_config_version": HEAD_CONFIG_VERSION,
            "kind": self.head.kind,
            "policy": config_to_dict(self.config),
            "cameras": list(self.cameras),
            "state_dim": self.state_dim,
            "sensor_dims": dict(self.sensor_dims),
            "action_dim": self.action_dim,
            "history": self.history,
            "chunk": self.chunk,
            "binary_dims": list(self.binary_dims),
            "binary_low": None if self.binary_low is None else list(self.binary_low),
            "binary_high": None if self.binary_high is None else list(self.binary_high),
            "cond_dim": self.cond_dim,
            "backbone": {
                "family": self.backbone.family,
                "hidden_size": self.backbone.hidden_size,
                "takes_state": self.backbone.takes_state,
            },
        }


_TOKEN_KEYS: Final = frozenset({"input_ids", "attention_mask"})
"""Backbone inputs whose second dimension is the token sequence (padded per batch)."""


def _cat(key: str, values: Sequence[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(v.shape[1:]) for v in values}
    if len(shapes) > 1:
        raise InputFormatError(f"cannot join batch entry {key!r}: per-sample shapes differ {sorted(shapes)}")
    return torch.cat(list(values), dim=0)


def build_policy(
    model_cfg: PolicyConfig,
    backbone: Backbone,
    *,
    cameras: Sequence[str],
    state_dim: int,
    action_dim: int,
    history: int,
    chunk: int,
    sensor_dims: Mapping[str, int] | None = None,
    binary_dims: Sequence[int] | None = None,
    binary_low: Sequence[float] | None = None,
    binary_high: Sequence[float] | None = None,
) -> Policy:
    """Build a policy for a dataset's features.

    Args:
        model_cfg: The head settings.
        backbone: The backbone (already LoRA-adapted or not).
        cameras: Camera names (``observation.images.<name>`` in the batch).
        state_dim: ``S`` (0 for no state).
        action_dim: ``A``.
        history: ``W``.
        chunk: ``K``.
        sensor_dims: Extra sensor stream keys -> dimensions.
        binary_dims: Binary action dimensions found in the stats (:func:`binary_action_dims`);
            ``model_cfg.binary_dims``, when set, replaces them (its levels are then -1/+1 unless the
            stats give the same dimensions).
        binary_low: Low level of each of ``binary_dims`` (-1 when None).
        binary_high: High level of each of ``binary_dims`` (+1 when None).
    """
    sensor_dims = dict(sensor_dims or {})
    dims = tuple(binary_dims or ())
    low = None if binary_low is None else tuple(binary_low)
    high = None if binary_high is None else tuple(binary_high)
    if model_cfg.binary_dims is not None and tuple(model_cfg.binary_dims) != dims:
        levels = {
            d: (lo, hi) for d, lo, hi in zip(dims, low or (-1.0,) * len(dims), high or (1.0,) * len(dims), strict=True)
        }
        dims = tuple(model_cfg.binary_dims)
        low = tuple(levels.get(d, (-1.0, 1.0))[0] for d in dims)
        high = tuple(levels.get(d, (-1.0, 1.0))[1] for d in dims)
    if any(d >= action_dim for d in dims):
        raise ConfigError(
            f"binary action dimensions {list(dims)} are outside the {action_dim} action dimensions: fix "
            "model.binary_dims"
        )
    cond_dim = conditioning_width(
        backbone,
        state_dim=state_dim,
        sensor_count=len(sensor_dims),
        state_width=model_cfg.state_width,
        sensor_width=model_cfg.sensor_width,
    )
    head = build_head(
        model_cfg, cond_dim, action_dim, chunk, history, binary_dims=dims, binary_low=low, binary_high=high
    )
    return Policy(
        backbone,
        head,
        cameras=cameras,
        state_dim=state_dim,
        sensor_dims=sensor_dims,
        action_dim=action_dim,
        history=history,
        chunk=chunk,
        config=model_cfg,
        binary_dims=dims,
        binary_low=low,
        binary_high=high,
    )


def policy_from_head_config(data: Mapping[str, Any], backbone: Backbone, source: str = "the head config") -> Policy:
    """Rebuild the policy that :meth:`Policy.head_config` described, around ``backbone`` (weights not loaded).

    Raises:
        ArtifactError: A newer or damaged head config, or a backbone of another family or width.
    """
    version = data.get("head_config_version")
    if not isinstance(version, int) or version > HEAD_CONFIG_VERSION:
        raise ArtifactError(
            f"{source} has head_config_version {version!r}; this vlacl reads up to {HEAD_CONFIG_VERSION}: upgrade vlacl"
        )
    expected = data.get("backbone", {})
    if expected.get("family") != backbone.family or expected.get("hidden_size") != backbone.hidden_size:
        raise ArtifactError(
            f"{source} was trained on a {expected.get('family')} backbone of width {expected.get('hidden_size')}, "
            f"the base model given is {backbone.family} of width {backbone.hidden_size}: pass the base model it was "
            "trained from"
        )
    try:
        return build_policy(
            PolicyConfig.from_dict(data["policy"]),
            backbone,
            cameras=data["cameras"],
            state_dim=int(data["state_dim"]),
            action_dim=int(data["action_dim"]),
            history=int(data["history"]),
            chunk=int(data["chunk"]),
            sensor_dims={str(k): int(v) for k, v in data["sensor_dims"].items()},
            binary_dims=[int(d) for d in data["binary_dims"]],
            binary_low=data.get("binary_low"),
            binary_high=data.get("binary_high"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{source} is damaged ({type(exc).__name__}: {exc}): the checkpoint cannot be rebuilt"
        ) from None


def binary_action_dims(stats: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """The action's binary dimensions and their levels from a ``stats.json`` dict (or its ``features``).

    A dimension is binary where the stats' ``mask`` is false (left unnormalized: detected, or forced by
    ``binary_dims``); its levels are the stats' ``min`` and ``max`` (``-1``/``+1`` when they are equal).
    """
    features = stats.get("features", stats)
    action = features.get(ACTION)
    if action is None or "mask" not in action:
        return (), (), ()
    mask = np.asarray(action["mask"], dtype=bool).ravel()
    lo = np.asarray(action.get("min", [-1.0] * mask.size), dtype=np.float64).ravel()
    hi = np.asarray(action.get("max", [1.0] * mask.size), dtype=np.float64).ravel()
    dims = tuple(int(d) for d in np.flatnonzero(~mask))
    lows, highs = [], []
    for d in dims:
        if lo[d] < hi[d]:
            lows.append(float(lo[d]))
            highs.append(float(hi[d]))
        else:
            log.warning("binary action dimension %d holds one value %s; using levels -1 and +1", d, lo[d])
            lows.append(-1.0)
            highs.append(1.0)
    return dims, tuple(lows), tuple(highs)
