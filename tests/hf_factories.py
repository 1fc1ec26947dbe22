"""Tiny random Hugging Face VLM directories, one per family, laid out as a user's local checkpoint is.

Each ``make_tiny_<family>(path)`` writes ``config.json`` and ``model.safetensors`` of the real
transformers class (a 2-layer language model of width 32, a small vision tower on small images),
a word-level tokenizer built with the ``tokenizers`` library (``tokenizer.json`` +
``tokenizer_config.json``) holding the family's special tokens, and the processor files (image
processor config, ``processor_config.json``, chat template) written as transformers reads them.
``AutoProcessor.from_pretrained(path)`` (where the processor class can be built here) and the
model class's ``from_pretrained(path)`` then load them offline, as they load a real checkpoint.

The files are written from dictionaries rather than by saving a processor object: Qwen2-VL's
processor cannot be built at all without torchvision, and the other processors add their own
tokens to the tokenizer as they are built.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

VERBS = ("pick", "up", "put", "open", "close", "push", "pull", "turn", "lift", "place")
OBJECTS = ("cup", "bowl", "drawer", "door", "block", "plate", "mug", "red", "blue", "green", "top", "left", "right")
WORDS = (*VERBS, *OBJECTS, "the", "a", "an", "on", "in", "into", "of", "to", "and", "it", "user", "assistant", "system")
"""Ordinary words of the tiny tokenizers; others become the unknown token."""

HIDDEN = 32
"""Width of every tiny language model."""

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The structure of Qwen2.5-VL's chat template: a default system turn, vision markers per image."""

IDEFICS3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>")
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""SmolVLM's chat template: ``User:<image>...<end_of_utterance>\\nAssistant:``."""

PALIGEMMA_EXTRA = tuple(f"<loc{i:0>4}>" for i in range(1024)) + tuple(f"<seg{i:0>3}>" for i in range(128))
"""The location and segmentation tokens every PaliGemma tokenizer holds (its processor adds them otherwise)."""

KOSMOS2_TAGS = (
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
)
KOSMOS2_PATCH_INDEX = tuple(f"<patch_index_{i:04d}>" for i in range(1024))
KOSMOS2_LATENT_QUERIES = 64
"""Kosmos-2's processor puts 64 image places in the prompt (its default); the model's ``latent_query_num``."""

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _save_tokenizer(
    path: Path,
    head: Sequence[str],
    specials: Sequence[str],
    *,
    tail: Sequence[str] = (),
    lowercase: bool = True,
    **config: Any,
) -> dict[str, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` of a word-level tokenizer; returns its vocabulary.

    The vocabulary is ``head`` (in order), the special tokens, :data:`WORDS` and ``tail``; the
    special tokens are added tokens (never split); ``config`` (``eos_token``, ``pad_token``...)
    goes to ``tokenizer_config.json``.
    """
    tokens = list(dict.fromkeys([*head, *specials, *WORDS, *tail]))
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = config.get("unk_token", "[UNK]")
    if unk not in vocab:
        vocab[unk] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(path / "tokenizer.json"))
    settings = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "model_max_length": 4096}
    settings.update(config)
    _write_json(path / "tokenizer_config.json", settings)
    return vocab


def _write_json(file: Path, data: Mapping[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_model(path: Path, build: Callable[[], torch.nn.Module], seed: int) -> None:
    """Build the model under ``seed`` and save it (config + safetensors)."""
    torch.manual_seed(seed)
    model: Any = build()
    model.save_pretrained(path)


def write_qwen_vl_files(
    path: Path, *, processor_class: str, min_pixels: int, max_pixels: int, patch_size: int, temporal: int, merge: int
) -> dict[str, int]:
    """A Qwen-VL directory's tokenizer, chat template and processor configs; returns the vocabulary."""
    vocab = _save_tokenizer(
        path, ["[UNK]"], QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]"
    )
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE, encoding="utf-8")
    _write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": processor_class,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "rescale_factor": 1 / 255,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "patch_size": patch_size,
            "temporal_patch_size": temporal,
            "merge_size": merge,
        },
    )
    _write_json(path / "processor_config.json", {"processor_class": processor_class})
    return vocab


def qwen_token_ids(vocab: Mapping[str, int]) -> dict[str, Any]:
    """The special-token ids a Qwen-VL config names, from the vocabulary of :func:`write_qwen_vl_files`."""
    return {
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
    }


def make_tiny_qwen2_5_vl(path: Path, *, seed: int = 0, qwen2: bool = False) -> Path:
    """A random Qwen2.5-VL (or Qwen2-VL with ``qwen2``): 2 text layers, a 2-block vision tower, patch 4, merge 2.

    Images are resized to 16x16..32x32 pixels (``min_pixels``/``max_pixels``): 4 to 16 image tokens.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig
    from transformers import Qwen2VLForConditionalGeneration as Qwen2Model

    path.mkdir(parents=True, exist_ok=True)
    processor_class = "Qwen2VLProcessor" if qwen2 else "Qwen2_5_VLProcessor"
    vocab = write_qwen_vl_files(
        path, processor_class=processor_class, min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, temporal=2, merge=2
    )
    text = {
        "vocab_size": len(vocab),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    vision: dict[str, Any] = {
        "depth": 2,
        "num_heads": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    tokens: dict[str, Any] = qwen_token_ids(vocab)
    if qwen2:
        vision.update(embed_dim=16, hidden_size=HIDDEN, mlp_ratio=2)
        _save_model(path, lambda: Qwen2Model(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)), seed)
    else:
        vision.update(hidden_size=16, intermediate_size=32, out_hidden_size=HIDDEN, window_size=16)
        vision.update(fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        _save_model(path, lambda: Qwen2_5_VLForConditionalGeneration(config), seed)
    return path


def make_tiny_qwen2_vl(path: Path, *, seed: int = 0) -> Path:
    """A random Qwen2-VL, laid out as :func:`make_tiny_qwen2_5_vl`."""
    return make_tiny_qwen2_5_vl(path, seed=seed, qwen2=True)


def make_tiny_paligemma(path: Path, *, seed: int = 0) -> Path:
    """A random PaliGemma: a 2-layer Gemma, a 1-layer SigLIP on 16x16 images of 4x4 patches (16 image tokens)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    path.mkdir(parents=True, exist_ok=True)
    vocab = _save_tokenizer(
        path,
        ["<pad>", "<eos>", "<bos>", "<unk>"],
        ["<image>"],
        tail=PALIGEMMA_EXTRA,
        lowercase=False,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens={"image_token": "<image>"},
    )
    _write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "PaliGemmaProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "rescale_factor": 1 / 255,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "size": {"height": 16, "width": 16},
            "resample": 3,
            "image_seq_length": 16,
        },
    )
    _write_json(path / "processor_config.json", {"processor_class": "PaliGemmaProcessor"})
    text = {
        "model_type": "gemma",
        "vocab_size": len(vocab),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": 512,
        "pad_token_id": vocab["<pad>"],
        "bos_token_id": vocab["<bos>"],
        "eos_token_id": vocab["<eos>"],
    }
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32}
    vision.update(num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4, projection_dim=HIDDEN)
    vision.update(vision_use_head=False)  # as in PaliGemma checkpoints: SigLIP without its pooling head
    config = PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=vocab["<image>"], projection_dim=HIDDEN
    )
    _save_model(path, lambda: PaliGemmaForConditionalGeneration(config), seed)
    return path


def make_tiny_idefics3(path: Path, *, seed: int = 0) -> Path:
    """A random Idefics3 as SmolVLM ships it: a 2-layer Llama, a 1-layer vision tower on 32x32 images.

    Patches of 8 and a pixel-shuffle scale factor of 2: 4 image tokens per image.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    path.mkdir(parents=True, exist_ok=True)
    rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    vocab = _save_tokenizer(
        path,
        ["[UNK]"],
        [*IDEFICS3_SPECIALS, "<global-img>", *rows],
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
    )
    (path / "chat_template.jinja").write_text(IDEFICS3_CHAT_TEMPLATE, encoding="utf-8")
    _write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "Idefics3ImageProcessor",
            "processor_class": "Idefics3Processor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_pad": True,
            "do_convert_rgb": True,
            "do_image_splitting": True,
            "rescale_factor": 1 / 255,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "size": {"longest_edge": 64},
            "max_image_size": {"longest_edge": 32},
            "resample": 1,
        },
    )
    _write_json(path / "processor_config.json", {"processor_class": "Idefics3Processor", "image_seq_len": 4})
    text = {
        "model_type": "llama",
        "vocab_size": len(vocab),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": vocab["<|endoftext|>"],
        "bos_token_id": vocab["<|im_start|>"],
        "eos_token_id": vocab["<end_of_utterance>"],
    }
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision.update(image_size=32, patch_size=8)
    config = Idefics3Config(text_config=text, vision_config=vision, image_token_id=vocab["<image>"], scale_factor=2)
    _save_model(path, lambda: Idefics3ForConditionalGeneration(config), seed)
    return path


def make_tiny_kosmos2(path: Path, *, seed: int = 0) -> Path:
    """A random Kosmos-2: a 2-layer text decoder, a 1-layer CLIP-style vision tower on 16x16 images.

    The prompt holds 64 image places (the processor's fixed number; the model's ``latent_query_num``).
    """
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    path.mkdir(parents=True, exist_ok=True)
    # the image places take the ids after <unk>: unused filler tokens, as in the real vocabulary
    filler = [f"[unused{i}]" for i in range(KOSMOS2_LATENT_QUERIES)]
    vocab = _save_tokenizer(
        path,
        ["<s>", "<pad>", "</s>", "<unk>", *filler],
        [*KOSMOS2_TAGS, *KOSMOS2_PATCH_INDEX],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    _write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "Kosmos2Processor",
            "do_resize": True,
            "do_center_crop": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "rescale_factor": 1 / 255,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "size": {"shortest_edge": 16},
            "crop_size": {"height": 16, "width": 16},
            "resample": 3,
        },
    )
    _write_json(path / "processor_config.json", {"processor_class": "Kosmos2Processor"})
    text = {
        "vocab_size": len(vocab),
        "embed_dim": HIDDEN,
        "layers": 2,
        "ffn_dim": 2 * HIDDEN,
        "attention_heads": 4,
        "max_position_embeddings": 512,
        "pad_token_id": vocab["<pad>"],
        "bos_token_id": vocab["<s>"],
        "eos_token_id": vocab["</s>"],
    }
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision.update(image_size=16, patch_size=4)
    config = Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=KOSMOS2_LATENT_QUERIES)
    _save_model(path, lambda: Kosmos2ForConditionalGeneration(config), seed)
    return path


FACTORIES: dict[str, Callable[[Path], Path]] = {
    "qwen2_5_vl": make_tiny_qwen2_5_vl,
    "qwen2_vl": make_tiny_qwen2_vl,
    "paligemma": make_tiny_paligemma,
    "idefics3": make_tiny_idefics3,
    "kosmos2": make_tiny_kosmos2,
}
"""Family (``config.json`` ``model_type``) -> builder of its tiny model directory."""
