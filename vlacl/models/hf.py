r"""Hugging Face VLM backbones: Qwen2.5-VL, Qwen2-VL, PaliGemma, Idefics3 / SmolVLM, Kosmos-2, from a local directory.

:func:`load_hf_backbone` reads ``config.json``'s ``model_type``, loads the family's transformers
class (SDPA attention) and its processor with ``AutoProcessor``, never from a hub
(``local_files_only``), running the directory's own code only with ``trust_remote_code``.

:meth:`HFBackbone.prepare` writes one prompt per frame (the family's image tokens, then the
instruction: see :mod:`vlacl.models.hf_families`) and runs the processor; every camera of a frame
goes into its prompt as one image, in the order of the batch's keys (Kosmos-2, which holds one
image, takes the first camera). The tokens are padded to a fixed length, the prompt's length
without instruction plus ``text_tokens``, so that shapes stay the same from batch to batch; a
longer instruction is kept whole, and that batch is padded to its longest prompt. Floating-point
outputs (pixel values) are cast to the model's dtype there, on the CPU. For Qwen-VL, ``prepare`` also
computes the 3D rope positions (``position_ids``) and the forward passes the vision tower's packing
precomputed and runs its attention batched (:mod:`vlacl.models.qwen_vl`).

:meth:`HFBackbone.forward` runs the family's base model (vision tower, features merged into the
token embeddings, language model; no LM head, no ``output_hidden_states``) and pools each frame's
feature from the last hidden state: the last token that is not padding. With the chat template
that is the end of the generation prompt (``assistant\n`` / ``Assistant:``), the token the model
answers from; for PaliGemma the ``\n`` closing the prefix; for Kosmos-2 the instruction's last token.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, cast

import torch
from torch import nn

from vlacl.errors import ConfigError, InputFormatError

from .hf_families import (
    FAMILY_BY_MODEL_TYPE,
    QWEN_FAMILIES,
    Family,
    flatten_images,
    language_hidden,
    per_frame,
    prompt,
    supported_names,
)

log = logging.getLogger(__name__)

LORA_PRESETS: Final = ("all-linear", "attention", "vision")
"""The ``lora_target_modules`` presets."""

SEQUENCE_KEYS: Final = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "image_embeds_position_mask"}
)
"""Processor outputs of shape ``(N, L)``, padded together."""

PRECOMPUTED_KEYS: Final = ("position_ids",)
"""Inputs :meth:`HFBackbone.prepare` computes beside the processor's (Qwen-VL's 3D rope positions, ``(N, 3, L)``)."""

DEFAULT_TEXT_TOKENS: Final = 32
"""Instruction tokens the fixed prompt length leaves room for: robot instructions are a sentence."""


class HFBackbone(nn.Module):
    """A Hugging Face VLM as a :class:`vlacl.models.base.Backbone`.

    Attributes:
        family: The family's name (``qwen2_5_vl``, ``paligemma``, ``idefics3``, ``kosmos2``...).
        hidden_size: The language model's width ``D``.
        takes_state: ``False``: the policy projects the state beside the feature.
        model: The transformers model (``...ForConditionalGeneration``). PEFT adapters made on it
            carry the checkpoint's runtime names, which ``merge-lora`` maps back to the files.
        processor: The family's processor (``AutoProcessor``).
        text_tokens: Instruction tokens the fixed prompt length leaves room for.
    """

    takes_state = False

    def __init__(self, family: Family, model: nn.Module, processor: Any, *, text_tokens: int = DEFAULT_TEXT_TOKENS):
        super().__init__()
        self.spec = family
        self.family = family.name
        self.model = model
        self.processor = processor
        self.text_tokens = text_tokens
        embeddings = cast(Any, model).get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise InputFormatError(f"{family.model_class} has no token embedding table; vlacl cannot use it")
        self.hidden_size = embeddings.embedding_dim
        self._base_lengths: dict[tuple[tuple[int, ...], ...], int] = {}
        self._warned: set[str] = set()
        self._layouts: Any = None
        if family.name in QWEN_FAMILIES:
            from .qwen_vl import VisionLayouts, install_batched_vision_attention

            visual = model.get_submodule(family.vision_paths[0])
            self._layouts = VisionLayouts(visual)
            install_batched_vision_attention(visual)

    def prepare(self, images: Mapping[str, torch.Tensor], instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompts and processor outputs for ``N`` frames; every tensor has a leading ``N``.

        Args:
            images: Camera key -> ``(N, H, W, C)`` uint8, upright.
            instructions: ``N`` instructions.

        Raises:
            InputFormatError: No camera, or cameras and instructions of different lengths.
        """
        if not images:
            raise InputFormatError(f"the {self.family} backbone needs at least one camera; the batch has none")
        cameras = list(images)
        if self.spec.max_images is not None and len(cameras) > self.spec.max_images:
            self._warn_once(
                "cameras",
                f"{self.family} holds {self.spec.max_images} image per prompt: using camera {cameras[0]}, "
                f"ignoring {', '.join(cameras[self.spec.max_images :])}",
            )
            cameras = cameras[: self.spec.max_images]
        frames = len(instructions)
        for name in cameras:
            if images[name].ndim != 4 or images[name].shape[0] != frames:
                raise InputFormatError(
                    f"camera {name} has shape {tuple(images[name].shape)}; expected ({frames}, H, W, C) uint8 for "
                    f"{frames} instructions"
                )
        arrays = [images[name].numpy() for name in cameras]
        per_image = [[array[i] for array in arrays] for i in range(frames)]
        encoded = self._encode(per_image, list(instructions))
        key = tuple(tuple(array.shape[1:]) for array in arrays)
        if key not in self._base_lengths:
            base = self._encode(per_image[:1], [""])
            self._base_lengths[key] = int(base["attention_mask"].sum())
        length = self._base_lengths[key] + self.text_tokens
        current = encoded["input_ids"].shape[1]
        if current > length:
            self._warn_once(
                "length",
                f"an instruction is longer than text_tokens={self.text_tokens} tokens: this batch is padded to "
                f"{current} tokens instead of {length}",
            )
        else:
            encoded = self._pad(encoded, length)
        if self.spec.name in QWEN_FAMILIES:
            from .qwen_vl import rope_positions_of

            positions = rope_positions_of(encoded, int(cast(Any, self.model).config.vision_config.spatial_merge_size))
            if positions is not None:
                encoded["position_ids"] = positions  # (N, 3, L)
        dtype: torch.dtype = cast(Any, self.model).dtype
        for name, value in encoded.items():
            if value.is_floating_point():
                encoded[name] = value.to(dtype)  # the model's dtype here, in the workers: half the bytes to copy
        return per_frame(self.spec, encoded, frames)

    def forward(self, inputs: Mapping[str, torch.Tensor], state: torch.Tensor | None = None) -> torch.Tensor:
        """One float32 feature per frame ``(N, D)``: the last non-padding token's last hidden state."""
        keys = (*self.spec.input_keys, *PRECOMPUTED_KEYS)
        model_inputs = flatten_images(self.spec, {k: inputs[k] for k in keys if k in inputs})
        dtype: torch.dtype = cast(Any, self.model).dtype
        for key, value in model_inputs.items():
            if value.is_floating_point():
                model_inputs[key] = value.to(dtype)
        extra = None
        if self._layouts is not None and "image_grid_thw" in model_inputs and "pixel_values" in model_inputs:
            extra = self._layouts(model_inputs["image_grid_thw"])
        hidden = language_hidden(self.spec, self.model, model_inputs, extra)  # (N, L, D)
        mask = model_inputs["attention_mask"]
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * positions).argmax(dim=1)  # (N,): last attended token, either padding side
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()

    def lora_target_modules(self, preset: str) -> str:
        r"""A regular expression PEFT matches (``re.fullmatch``) against module names, for ``preset``.

        ``all-linear``: every ``nn.Linear`` of the language model's decoder layers (not the LM
        head, not the vision tower). ``attention``: their q, k, v and o projections.
        ``vision``: ``all-linear`` plus every ``nn.Linear`` of the vision tower and the projector.
        Layer indices are written ``\d+``; any prefix is allowed before the names, so the
        expression matches whether PEFT wraps the transformers model, this backbone or the policy.

        Raises:
            ConfigError: An unknown preset.
        """
        if preset not in LORA_PRESETS:
            raise ConfigError(f"LoRA preset {preset!r} is not one of {', '.join(LORA_PRESETS)}")
        names = self._linear_names(self.spec.layers_path)
        if preset == "attention":
            names = [n for n in names if n.endswith(self.spec.attention)]
            if len({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names}) != len(self.spec.attention):
                raise InputFormatError(
                    f"{self.spec.model_class} has no {', '.join(self.spec.attention)} in {self.spec.layers_path}: "
                    "this version of transformers names its modules differently; use the all-linear preset"
                )
        elif preset == "vision":
            for path in self.spec.vision_paths:
                names += self._linear_names(path)
        return _name_pattern(names)

    def pad_inputs(self, inputs: Mapping[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """The token tensors padded to ``length`` on the tokenizer's side, with its padding id."""
        return self._pad(dict(inputs), length)

    def layer_modules(self) -> Sequence[nn.Module]:
        """The language model's decoder layers in order."""
        layers = self.model.get_submodule(self.spec.layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise InputFormatError(f"{self.spec.layers_path} of {self.spec.model_class} is not a list of layers")
        return list(layers)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in the backward pass (``--activation-checkpointing``).

        transformers' non-reentrant checkpointing of every decoder layer and vision block; it also
        runs inside blocks compiled by ``--compile``, where the compiler keeps the recomputation.
        """
        model = cast(Any, self.model)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()

    def compile_regions(self) -> list[nn.Module]:
        """The blocks ``--compile`` compiles: the decoder layers, then the vision tower's blocks.

        The vision tower's blocks are the entries of its lists of modules of one class
        (``visual.blocks`` of Qwen-VL, ``encoder.layers`` of SigLIP and the other towers); a list
        inside such a block is part of the block.
        """
        regions = list(self.layer_modules())
        for path in self.spec.vision_paths:
            regions += _block_lists(self.model.get_submodule(path))
        return regions

    def _linear_names(self, path: str) -> list[str]:
        scope = self.model.get_submodule(path)
        return [f"{path}.{name}" for name, module in scope.named_modules() if isinstance(module, nn.Linear)]

    def _encode(self, images: list[list[Any]], instructions: list[str]) -> dict[str, torch.Tensor]:
        prompts = [
            prompt(self.spec, self.processor, text, len(frame))
            for text, frame in zip(instructions, images, strict=True)
        ]
        if self.spec.max_images == 1:
            call_images: list[Any] = [frame[0] for frame in images]
        else:
            call_images = images
        # numpy out, tensors made here: PaliGemma's processor copies torch tensors through np.array (deprecated)
        out = self.processor(
            images=call_images, text=prompts, padding=True, return_tensors="np", **self.spec.processor_kwargs
        )
        return {key: torch.as_tensor(out[key]) for key in self.spec.input_keys if key in out}

    def _pad(self, encoded: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """Pad the ``(N, L)`` tensors to ``length``, on the tokenizer's padding side."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        left = getattr(tokenizer, "padding_side", "right") == "left"
        extra = length - encoded["input_ids"].shape[1]
        if extra == 0:
            return encoded
        out = dict(encoded)
        for key in SEQUENCE_KEYS & encoded.keys():
            value = encoded[key]
            fill = pad_id if key == "input_ids" else 0
            pad = torch.full((value.shape[0], extra), fill, dtype=value.dtype, device=value.device)
            out[key] = torch.cat([pad, value] if left else [value, pad], dim=1)  # (N, L) -> (N, length)
        if "position_ids" in encoded:
            value = encoded["position_ids"]
            pad = value.new_zeros((*value.shape[:-1], extra))
            # (N, 3, L) -> (N, 3, length): padding has position 0, as get_rope_index gives it
            out["position_ids"] = torch.cat([pad, value] if left else [value, pad], dim=-1)
        return out

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message)


def _block_lists(scope: nn.Module) -> list[nn.Module]:
    """The entries of the outermost ``nn.ModuleList`` s under ``scope`` whose entries are all of one class."""
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in scope.named_modules():
        if any(name.startswith(f"{prefix}.") for prefix in taken):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            taken.append(name)
            blocks += list(module)
    return blocks


def _name_pattern(names: Sequence[str]) -> str:
    r"""``(?:.*\.)?(?:a|b|...)`` of ``names``, layer indices generalized to ``\d+``."""
    patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) for name in names})
    return r"(?:.*\.)?(?:" + "|".join(patterns) + ")"


def load_hf_backbone(
    path: Path | str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
) -> HFBackbone:
    """Load a Hugging Face VLM directory as a backbone, offline.

    Args:
        path: A local model directory (``config.json``, safetensors weights, tokenizer, processor files).
        trust_remote_code: Let transformers run Python code the directory ships (``--trust-remote-code``).
        dtype: The weights' dtype; ``None`` keeps the checkpoint's.
        text_tokens: Instruction tokens the fixed prompt length leaves room for.

    Raises:
        InputFormatError: Not a model directory, a ``model_type`` vlacl does not support, or files
            transformers cannot load.
    """
    import transformers

    path = Path(path)
    config = _read_config(path)
    model_type = str(config.get("model_type", ""))
    family = FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise InputFormatError(_unsupported(path, model_type, config, trust_remote_code))
    if text_tokens < 0:
        raise ConfigError(f"text_tokens must be >= 0, got {text_tokens}")
    cls = getattr(transformers, family.model_class)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = cls.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"{family.model_class} cannot load {path}: {exc}") from None
    processor = _load_processor(path, family, trust_remote_code)
    log.info("loaded %s backbone %s from %s", family.name, family.model_class, path)
    return HFBackbone(family, model, processor, text_tokens=text_tokens)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not path.is_dir():
        raise InputFormatError(f"model {path} is not a directory: pass a local Hugging Face model directory")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFormatError(f"model {path} has no config.json: pass a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"model config {file} cannot be read ({exc}): re-download or re-save it") from None
    if not isinstance(config, dict):
        raise InputFormatError(f"model config {file} must hold a JSON object")
    return config


def _unsupported(path: Path, model_type: str, config: Mapping[str, Any], trust_remote_code: bool) -> str:
    message = (
        f"model {path} has model_type {model_type!r}, which is not a VLM family vlacl supports; supported: "
        f"{', '.join(supported_names())}, and vlacl_tiny (the built-in backbone)"
    )
    if "auto_map" in config and not trust_remote_code:
        message += (
            "; the directory ships its own model code (auto_map): --trust-remote-code lets transformers run it, "
            "but vlacl still needs a checkpoint of a supported family"
        )
    return message


def _load_processor(path: Path, family: Family, trust_remote_code: bool) -> Any:
    """``AutoProcessor.from_pretrained(path)``; for Qwen-VL without torchvision, the processor's parts.

    transformers 5 cannot build Qwen2-VL's or Qwen2.5-VL's processor without torchvision (its
    video processor needs it, even for images only); the image processor and the tokenizer load
    without it, and :class:`QwenImageTextProcessor` does the processor's work for images.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ImportError as exc:
        if family.name not in ("qwen2_5_vl", "qwen2_vl") or "torchvision" not in str(exc).lower():
            raise InputFormatError(f"the processor of {path} cannot be loaded: {exc}") from None
        log.info("torchvision is not installed: %s prompts are built from its image processor and tokenizer", path)
        return QwenImageTextProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InputFormatError(
            f"the processor of {path} cannot be loaded ({exc}): the directory needs its tokenizer and "
            "processor files (preprocessor_config.json, tokenizer.json, ...)"
        ) from None


class QwenImageTextProcessor:
    """Qwen2(.5)-VL's processor for images and text, made of its image processor and tokenizer.

    Each ``<|image_pad|>`` of a prompt becomes ``grid_t * grid_h * grid_w / merge_size**2``
    copies, as the transformers processor does; ``mm_token_type_ids`` marks them with 1.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = str(getattr(tokenizer, "image_token", None) or "<|image_pad|>")
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))

    @classmethod
    def from_pretrained(cls, path: Path, *, trust_remote_code: bool = False) -> QwenImageTextProcessor:
        """Load the image processor, the tokenizer and the chat template of ``path``."""
        from transformers import AutoImageProcessor, AutoTokenizer

        options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        image_processor = AutoImageProcessor.from_pretrained(path, **options)  # type: ignore[no-untyped-call]
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        return cls(image_processor, tokenizer, template or getattr(tokenizer, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """The tokenizer's ``apply_chat_template`` with the processor's template."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(
        self, *, images: list[list[Any]], text: list[str], padding: bool = True, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        """Pixel values, ``image_grid_thw``, and the tokens of ``text`` with the image tokens expanded.

        The outputs are torch tensors whatever ``return_tensors`` asks (accepted for the processor's signature).
        """
        flat = [image for frame in images for image in frame]
        pixels = self.image_processor(images=flat, return_tensors="pt")
        merge = int(self.image_processor.merge_size) ** 2
        counts = iter((pixels["image_grid_thw"].prod(dim=-1) // merge).tolist())
        marker = re.escape(self.image_token)
        expanded = [re.sub(marker, lambda _: self.image_token * next(counts), t) for t in text]
        tokens = self.tokenizer(expanded, padding=padding, return_tensors="pt")
        out = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        out["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).int()
        out["pixel_values"] = pixels["pixel_values"]
        out["image_grid_thw"] = pixels["image_grid_thw"]
        return out
