"""Qwen2-VL and Qwen2.5-VL without host synchronizations in the training step.

transformers' Qwen-VL forward reads small tensors back from the accelerator many times per step:
the vision tower's attention splits the packed patches by ``cu_seqlens`` (``.tolist()`` in every
block) and runs SDPA once per window or image, and the language model's 3D rope positions are
rebuilt per frame in Python (``get_rope_index``). This module removes those:

- :func:`rope_positions` computes the 3D rope positions on the CPU, in :meth:`HFBackbone.prepare`
  (DataLoader workers), exactly as ``get_rope_index`` does; the forward passes them as ``position_ids``.
- :class:`VisionLayouts` computes the vision tower's packing (patch positions, window order,
  ``cu_seqlens``, the longest segment) once per distinct ``image_grid_thw`` on the CPU and keeps it
  on the model's device; the forward passes it as transformers' precomputed ``image_*`` arguments.
- :func:`language_hidden` runs the base model's forward itself when the layouts and the rope
  positions are precomputed: the vision tower with the packing passed in, the image features put
  at the image tokens by a gather on the accelerator (transformers splits the features by
  ``grid.tolist()`` and checks the token count by reading it back), and the language model with
  its causal-and-padding mask built on the accelerator (transformers reads ``mask.all()`` back
  to decide whether it may skip it). Prompts whose image-token counts do not match their grids
  never get here: :func:`rope_positions` refuses them in ``prepare``.
- :func:`install_batched_vision_attention` swaps the class of every vision attention module for a
  subclass that runs one SDPA call on ``(segments, heads, segment_length, head_dim)`` when all
  segments (windows, or images in the full-attention blocks) have the same length, known on the host
  from ``max_seqlen * segments == patches``; otherwise, or without a precomputed ``max_seqlen``, or
  with another attention implementation than SDPA, it runs transformers' own forward. The modules
  keep their children, so PEFT's LoRA layers put on ``qkv`` and ``proj`` run as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Final, cast

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5
from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

SDPA: Final = "sdpa"
MAX_LAYOUTS: Final = 16
"""Vision layouts kept per backbone (one per distinct ``image_grid_thw`` of a batch)."""


def _attention_forward(
    module: Any,
    stock: Any,
    rotary: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    max_seqlen: int | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """One batched SDPA call over equal-length segments, else ``stock`` (transformers' forward)."""
    seq_length = hidden_states.shape[0]
    segments = cu_seqlens.shape[0] - 1
    if (
        module.config._attn_implementation != SDPA
        or not isinstance(max_seqlen, int)
        or position_embeddings is None
        or segments < 1
        or max_seqlen * segments != seq_length
    ):
        out: torch.Tensor = stock(
            module, hidden_states, cu_seqlens, position_embeddings=position_embeddings, max_seqlen=max_seqlen, **kwargs
        )
        return out
    qkv = module.qkv(hidden_states).reshape(seq_length, 3, module.num_heads, -1)  # (S, 3, H, d)
    query, key, value = qkv.permute(1, 0, 2, 3).unbind(0)  # 3 x (S, H, d)
    cos, sin = position_embeddings
    query, key = rotary(query, key, cos, sin)
    shape = (segments, max_seqlen, module.num_heads, -1)
    query, key, value = (t.reshape(shape).transpose(1, 2) for t in (query, key, value))  # (G, H, s, d)
    attention = ALL_ATTENTION_FUNCTIONS[SDPA]
    attn, _ = attention(
        module,
        query,
        key,
        value,
        attention_mask=None,
        scaling=module.scaling,
        dropout=0.0 if not module.training else module.attention_dropout,
        is_causal=False,
        **kwargs,
    )  # (G, s, H, d)
    attn = attn.reshape(seq_length, -1).contiguous()  # (S, H * d)
    result: torch.Tensor = module.proj(attn)
    return result


class BatchedQwen25VLVisionAttention(qwen2_5.Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL's vision attention, its windows (or images) in one SDPA call when of equal length."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The attention output ``(S, D)`` of the packed patches ``(S, D)``."""
        stock = qwen2_5.Qwen2_5_VLVisionAttention.forward
        rotary = qwen2_5.apply_rotary_pos_emb_vision
        return _attention_forward(
            self, stock, rotary, hidden_states, cu_seqlens, position_embeddings, max_seqlen, kwargs
        )


class BatchedQwen2VLVisionAttention(qwen2.VisionAttention):
    """Qwen2-VL's vision attention, its images in one SDPA call when of equal size."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The attention output ``(S, D)`` of the packed patches ``(S, D)``."""
        stock = qwen2.VisionAttention.forward
        rotary = qwen2.apply_rotary_pos_emb_vision
        return _attention_forward(
            self, stock, rotary, hidden_states, cu_seqlens, position_embeddings, max_seqlen, kwargs
        )


BATCHED_CLASSES: Final[dict[type[nn.Module], type[nn.Module]]] = {
    qwen2_5.Qwen2_5_VLVisionAttention: BatchedQwen25VLVisionAttention,
    qwen2.VisionAttention: BatchedQwen2VLVisionAttention,
}
"""transformers' vision attention class -> its batched subclass."""


def install_batched_vision_attention(model: nn.Module) -> int:
    """Give every Qwen-VL vision attention module of ``model`` its batched class; returns how many changed.

    Only the class changes (parameters, children and hooks stay), so it can be done before or after
    PEFT wraps the model. Modules of the SDPA implementation only; others are left as they are.
    """
    changed = 0
    for module in model.modules():
        batched = BATCHED_CLASSES.get(type(module))
        if batched is not None and cast("Any", module.config)._attn_implementation == SDPA:
            module.__class__ = batched
            changed += 1
    return changed


class VisionLayouts:
    """The vision tower's precomputed packing per ``image_grid_thw``, as transformers' ``image_*`` arguments.

    Keys: ``image_position_ids``, ``image_cu_seqlens``, ``image_max_seqlen``, and for Qwen2.5-VL
    (window attention) ``image_window_index``, ``image_cu_window_seqlens``,
    ``image_max_window_seqlen``; the tensors are those transformers computes from the grid (its own
    helpers run on the CPU), on the model's device. Reading the grid is one small device-to-host
    copy per forward; everything else is cached by grid.
    """

    def __init__(self, visual: nn.Module) -> None:
        self.merge = int(cast(Any, visual).spatial_merge_size)
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self.window_size = int(getattr(visual, "window_size", 0))
        self.patch_size = int(getattr(visual, "patch_size", 0))
        self._cache: dict[tuple[tuple[int, ...], ...], dict[str, Any]] = {}

    def __call__(self, grid_thw: torch.Tensor) -> dict[str, Any]:
        """The ``image_*`` arguments for the images of ``grid_thw`` ``(I, 3)``."""
        rows: list[list[int]] = grid_thw.tolist()
        key = tuple(tuple(int(v) for v in row) for row in rows)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= MAX_LAYOUTS:
                self._cache.clear()
            cached = self._compute(torch.tensor(rows, dtype=grid_thw.dtype), grid_thw.device)
            self._cache[key] = cached
        return dict(cached)

    def __getstate__(self) -> dict[str, Any]:
        """The settings without the cached tensors (device tensors stay out of DataLoader workers)."""
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _compute(self, grid: torch.Tensor, device: torch.device) -> dict[str, Any]:
        cu_seqlens = get_vision_cu_seqlens(grid)
        out: dict[str, Any] = {
            "image_position_ids": get_vision_position_ids(grid, self.merge).to(device),
            "image_cu_seqlens": cu_seqlens.to(device),
            "image_max_seqlen": _longest(cu_seqlens),
        }
        if self.windowed:
            window_index, cu_window = get_vision_window_index(
                grid, spatial_merge_size=self.merge, window_size=self.window_size, patch_size=self.patch_size
            )
            out["image_window_index"] = window_index.to(device)
            out["image_cu_window_seqlens"] = cu_window.to(device)
            out["image_max_window_seqlen"] = _longest(cu_window)
        return out


def _longest(cu_seqlens: torch.Tensor) -> int:
    """The longest segment of cumulative boundaries (0 without segments)."""
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def rope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor,
    spatial_merge_size: int,
) -> torch.Tensor:
    """The language model's 3D rope positions ``(N, 3, L)``, as ``get_rope_index`` computes them.

    Text tokens count up by one on all three axes; each run of image tokens takes the next grid of
    ``image_grid_thw`` (in order over the frames) and gets temporal, height and width positions on
    the merged grid, offset by the position reached, which then moves on by the larger merged side.
    Padding (``attention_mask`` 0) gets 0. Images only: every non-text token type is an image.

    Args:
        input_ids: ``(N, L)`` token ids (their dtype is the positions' dtype).
        attention_mask: ``(N, L)``.
        mm_token_type_ids: ``(N, L)``: 0 for text, 1 for image tokens.
        image_grid_thw: ``(I, 3)`` grids of every image, frame by frame.
        spatial_merge_size: The vision tower's merge size.

    Raises:
        ValueError: More image runs than grids or more grids than runs, or a run whose length is not
            its grid's token count.
    """
    frames, length = input_ids.shape
    out = torch.zeros(frames, 3, length, dtype=input_ids.dtype)
    grids = iter(image_grid_thw.reshape(-1, 3).tolist())
    for i in range(frames):
        keep = attention_mask[i].bool()
        pieces: list[torch.Tensor] = []
        position = 0
        for kind, run in itertools.groupby(mm_token_type_ids[i][keep].tolist()):
            count = len(list(run))
            if kind == 0:
                pieces.append(torch.arange(position, position + count).expand(3, -1))  # (3, count)
                position += count
                continue
            grid = next(grids, None)
            if grid is None:
                raise ValueError(f"frame {i} has more image token runs than image_grid_thw has grids")
            t, h, w = int(grid[0]), int(grid[1]) // spatial_merge_size, int(grid[2]) // spatial_merge_size
            if t * h * w != count:
                raise ValueError(f"frame {i}: an image run of {count} tokens for a grid of {t}x{h}x{w} merged patches")
            axes = torch.meshgrid(
                torch.arange(t) + position,
                torch.arange(h) + position,
                torch.arange(w) + position,
                indexing="ij",
            )
            pieces.append(torch.stack(axes).reshape(3, -1))  # (3, t * h * w)
            position += max(h, w)
        if pieces:
            out[i, :, keep] = torch.cat(pieces, dim=1).to(out.dtype)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more grids than the prompts have image token runs")
    return out


def rope_positions_of(encoded: Mapping[str, torch.Tensor], spatial_merge_size: int) -> torch.Tensor | None:
    """:func:`rope_positions` of processor outputs, or ``None`` when they lack a tensor it needs."""
    needed = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")
    if any(name not in encoded for name in needed):
        return None
    return rope_positions(
        encoded["input_ids"],
        encoded["attention_mask"],
        encoded["mm_token_type_ids"],
        encoded["image_grid_thw"],
        spatial_merge_size,
    )


def language_hidden(model: Any, inputs: Mapping[str, torch.Tensor], layouts: Mapping[str, Any]) -> torch.Tensor | None:
    """Qwen-VL's last hidden states ``(N, L, D)`` without a host read, or ``None`` where transformers' forward must run.

    The same computation as ``Qwen2_5_VLModel.forward`` (and Qwen2-VL's) for images, no video, no
    cache: token embeddings; the vision tower on the pixels with the precomputed packing
    (``layouts``: :class:`VisionLayouts`' ``image_*`` arguments); each image feature written at
    its image token, in order (a cumulative count over the image tokens indexes the features);
    the language model on those embeddings with the 3D rope ``position_ids`` and a boolean mask
    ``(N, 1, L, L)``: causal, padding keys masked, and each padding query attending to itself
    only (its output is never read; a row with nothing to attend to would give NaN). The mask is
    passed even when no row is padded, where transformers would let SDPA take its causal kernel:
    the same result, from another kernel on a GPU.

    ``None`` (transformers' forward then) without precomputed ``position_ids`` or pixels, with
    another attention implementation than SDPA, or with sliding-window layers.
    """
    base = model.model
    text = base.language_model
    if (
        "position_ids" not in inputs
        or "pixel_values" not in inputs
        or "image_grid_thw" not in inputs
        or text.config._attn_implementation != SDPA
        or any(kind != "full_attention" for kind in text.config.layer_types)
    ):
        return None
    input_ids = inputs["input_ids"]
    embeds = base.get_input_embeddings()(input_ids)  # (N, L, D)
    packing = {key.removeprefix("image_"): value for key, value in layouts.items()}
    pixels = inputs["pixel_values"].type(base.visual.dtype)
    vision = base.visual(pixels, grid_thw=inputs["image_grid_thw"], return_dict=True, **packing)
    features = vision.pooler_output  # (T, D): every image's merged patches, in order
    is_image = input_ids == base.config.image_token_id  # (N, L)
    index = (is_image.flatten().cumsum(0) - 1).clamp(min=0).view(input_ids.shape)  # (N, L): feature of each token
    embeds = torch.where(is_image.unsqueeze(-1), features.to(embeds.dtype)[index], embeds)
    keep = inputs["attention_mask"].bool()  # (N, L)
    length = keep.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()  # (L, L)
    itself = torch.eye(length, dtype=torch.bool, device=keep.device)
    mask = (causal & keep[:, None, :]) | itself  # (N, L, L)
    out = text(
        input_ids=None,
        inputs_embeds=embeds,
        position_ids=inputs["position_ids"],
        attention_mask={"full_attention": mask.unsqueeze(1)},  # (N, 1, L, L)
        use_cache=False,
        return_dict=True,
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden
