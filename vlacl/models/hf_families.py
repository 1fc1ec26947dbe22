r"""The Hugging Face VLM families vlacl knows: classes, where the language model sits, how a prompt looks.

One :class:`Family` per architecture: the transformers class a checkpoint of that ``model_type``
loads with, the paths (runtime module names, as transformers 5 names them after it renames the
checkpoint's keys) of the language model's decoder layers and of the vision side, the names of
the attention projections, how a frame's prompt is written, and which processor call options it
needs. :mod:`vlacl.models.hf` does the rest the same way for every family.

Prompt formats (``n`` = images of the frame, ``instr`` = the instruction):

- Qwen2.5-VL, Qwen2-VL: the checkpoint's chat template, one user turn holding ``n`` images and the
  instruction, then the generation prompt (``<|im_start|>assistant\n``); without a template,
  ``<|im_start|>user\n`` + ``<|vision_start|><|image_pad|><|vision_end|>`` x ``n`` + ``instr``
  + ``<|im_end|>\n<|im_start|>assistant\n``.
- PaliGemma: ``<image>`` x ``n`` + ``instr``; the processor adds ``<bos>`` after the image tokens
  and ``\n`` at the end (PaliGemma's prefix format).
- Idefics3 / SmolVLM: the chat template (``User:<image>...instr<end_of_utterance>\nAssistant:``),
  image splitting off: each image is one ``<global-img>`` block of ``image_seq_len`` tokens.
- Kosmos-2: ``instr``; the processor puts ``<s><image>`` + 64 image places + ``</image>`` first.
  One image per prompt: the model has a single image slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import torch


@dataclass(frozen=True)
class Family:
    """One VLM architecture.

    Attributes:
        name: vlacl's name of the family (``family`` of the backbone).
        model_types: ``config.json`` ``model_type`` values of its checkpoints.
        model_class: The transformers class its checkpoints load with.
        layers_path: Runtime name of the language model's decoder layers (a ``ModuleList``).
        vision_paths: Runtime names of the vision tower and the projector into the language model.
        attention: Leaf names of the language model's attention projections (q, k, v, o).
        image_prompt: How :func:`prompt` writes the images: ``chat`` (a user turn of the chat
            template), ``paligemma`` (``<image>`` prefix tokens) or ``processor`` (the processor
            adds them: Kosmos-2).
        image_marker: The text one image takes in a prompt written without a chat template.
        turn: Text around a user turn, ``{}`` for its content, for prompts without a chat template.
        max_images: Images one prompt can hold (``None``: any number).
        processor_kwargs: Options of every processor call.
        input_keys: The processor outputs the model's forward takes.
    """

    name: str
    model_types: tuple[str, ...]
    model_class: str
    layers_path: str
    vision_paths: tuple[str, ...]
    attention: tuple[str, ...]
    image_prompt: str
    image_marker: str = ""
    turn: str = "{}"
    max_images: int | None = None
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    input_keys: tuple[str, ...] = ("input_ids", "attention_mask", "pixel_values")


QWEN_TURN: Final = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QWEN_IMAGE: Final = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_ATTENTION: Final = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
QWEN_FAMILIES: Final = frozenset({"qwen2_5_vl", "qwen2_vl"})
"""Families of the Qwen-VL layout (packed patches, ``image_grid_thw``, 3D rope positions)."""

QWEN2_5_VL: Final = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    layers_path="model.language_model.layers",
    vision_paths=("model.visual",),
    attention=QWEN_ATTENTION,
    image_prompt="chat",
    image_marker=QWEN_IMAGE,
    turn=QWEN_TURN,
    input_keys=("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"),
)

FAMILIES: Final[tuple[Family, ...]] = (
    QWEN2_5_VL,
    replace(QWEN2_5_VL, name="qwen2_vl", model_types=("qwen2_vl",), model_class="Qwen2VLForConditionalGeneration"),
    Family(
        name="paligemma",
        model_types=("paligemma",),
        model_class="PaliGemmaForConditionalGeneration",
        layers_path="model.language_model.layers",
        vision_paths=("model.vision_tower", "model.multi_modal_projector"),
        attention=QWEN_ATTENTION,
        image_prompt="paligemma",
        image_marker="<image>",
        input_keys=("input_ids", "attention_mask", "pixel_values", "token_type_ids"),
    ),
    Family(
        name="idefics3",
        model_types=("idefics3",),
        model_class="Idefics3ForConditionalGeneration",
        layers_path="model.text_model.layers",
        vision_paths=("model.vision_model", "model.connector"),
        attention=QWEN_ATTENTION,
        image_prompt="chat",
        image_marker="<image>",
        turn="<|im_start|>User:{}<end_of_utterance>\nAssistant:",
        processor_kwargs={"do_image_splitting": False},
        input_keys=("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"),
    ),
    Family(
        name="kosmos2",
        model_types=("kosmos-2",),
        model_class="Kosmos2ForConditionalGeneration",
        layers_path="text_model.model.layers",
        vision_paths=("vision_model", "image_to_text_projection"),
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        image_prompt="processor",
        max_images=1,
        input_keys=("input_ids", "attention_mask", "pixel_values", "image_embeds_position_mask"),
    ),
)
"""Every supported family."""

FAMILY_BY_MODEL_TYPE: Final[dict[str, Family]] = {t: f for f in FAMILIES for t in f.model_types}


def prompt(family: Family, processor: Any, instruction: str, images: int) -> str:
    """The text of one frame's prompt with ``images`` images, before the processor expands image tokens."""
    if family.image_prompt == "paligemma":
        return family.image_marker * images + instruction
    if family.image_prompt == "processor":
        return instruction
    template = getattr(processor, "chat_template", None)
    if template:
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(images)]
        content.append({"type": "text", "text": instruction})
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return str(text)
    return family.turn.format(family.image_marker * images + instruction)


def flatten_images(family: Family, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the per-frame layout :func:`per_frame` gave the image tensors: the model's own layout."""
    out = dict(inputs)
    if family.name in QWEN_FAMILIES:
        out["pixel_values"] = inputs["pixel_values"].flatten(0, 1)  # (N, P, D) -> (N * P, D)
        out["image_grid_thw"] = inputs["image_grid_thw"].flatten(0, 1)  # (N, n, 3) -> (N * n, 3)
        if "position_ids" in inputs:
            out["position_ids"] = inputs["position_ids"].transpose(0, 1).contiguous()  # (N, 3, L) -> (3, N, L)
    elif family.name == "paligemma":
        out["pixel_values"] = inputs["pixel_values"].flatten(0, 1)  # (N, n, C, H, W) -> (N * n, C, H, W)
    return out


def per_frame(family: Family, inputs: dict[str, torch.Tensor], frames: int) -> dict[str, torch.Tensor]:
    """Give every image tensor a leading frame dimension ``N``, so that batches stack and split by frame."""
    out = dict(inputs)
    if family.name in QWEN_FAMILIES:
        pixels = inputs["pixel_values"]
        out["pixel_values"] = pixels.reshape(frames, -1, pixels.shape[-1])  # (N * P, D) -> (N, P, D)
        out["image_grid_thw"] = inputs["image_grid_thw"].reshape(frames, -1, 3)  # (N * n, 3) -> (N, n, 3)
    elif family.name == "paligemma":
        pixels = inputs["pixel_values"]
        out["pixel_values"] = pixels.reshape(frames, -1, *pixels.shape[1:])  # (N * n, C, H, W) -> (N, n, C, H, W)
    return out


def language_hidden(
    family: Family, model: Any, inputs: dict[str, torch.Tensor], extra: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """The language model's last hidden states ``(N, L, D)``, image features merged, no LM head.

    ``extra``: more arguments of the base model's forward (Qwen-VL: the precomputed ``image_*`` packing).
    """
    if family.name == "kosmos2":
        # Kosmos2ForConditionalGeneration.forward, less the LM head: vision -> projection -> text decoder
        vision = model.vision_model(pixel_values=inputs["pixel_values"])
        image_embeds = model.vision_model.model.post_layernorm(vision.last_hidden_state)
        image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)
        image_embeds, _ = model.image_to_text_projection(image_embeds)  # (N, latent_query_num, D)
        out = model.text_model.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_embeds=image_embeds,
            image_embeds_position_mask=inputs["image_embeds_position_mask"],
            use_cache=False,
            return_dict=True,
        )
        return out.last_hidden_state  # type: ignore[no-any-return]
    if family.name in QWEN_FAMILIES and extra is not None:
        from .qwen_vl import language_hidden as qwen_language_hidden

        hidden = qwen_language_hidden(model, inputs, extra)
        if hidden is not None:
            return hidden
    # the base model (…ForConditionalGeneration.model): vision tower, merge, decoder; no LM head
    out = model.model(**inputs, **(extra or {}), use_cache=False, return_dict=True)
    return out.last_hidden_state  # type: ignore[no-any-return]


def supported_names() -> Sequence[str]:
    """``model_type (transformers class)`` of every family, for messages."""
    return [f"{t} ({f.model_class})" for f in FAMILIES for t in f.model_types]
