"""merge-lora on tiny real VLMs, whose checkpoint names differ from the runtime names PEFT uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from vlacl.adapters.merge import merge_lora
from vlacl.config.merge_lora import MergeLoraConfig

TEXT = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TOKENS = torch.tensor([[1, 5, 9, 3, 40, 2, 7]])


def frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.train(False)
    return model


def tiny_vlm(arch: str) -> PreTrainedModel:
    """A random 2-layer Qwen2-VL or PaliGemma: saved as ``model.layers...`` / ``language_model.model.layers...``."""
    torch.manual_seed(0)
    if arch == "qwen2_vl":
        rope = {"type": "mrope", "mrope_section": [1, 1, 2]}
        text = {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_scaling": rope}
        text.update(bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
        vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "patch_size": 2}
        vision.update(spatial_merge_size=1, temporal_patch_size=1)
        config: Any = Qwen2VLConfig(
            text_config=text, vision_config=vision, image_token_id=60, video_token_id=61, vision_start_token_id=62
        )
        return frozen(Qwen2VLForConditionalGeneration(config))
    text = {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision.update(image_size=8, patch_size=4, projection_dim=32)
    config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=60, projection_dim=32)
    return frozen(PaliGemmaForConditionalGeneration(config))


@pytest.mark.parametrize("arch", ["qwen2_vl", "paligemma"])
def test_lora_on_a_vlm_merges_like_peft(tmp_path: Path, arch: str) -> None:
    model = tiny_vlm(arch)
    cls = type(model)
    model.save_pretrained(tmp_path / "base")
    # q_proj: the language model, and PaliGemma's vision tower too
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft.save_pretrained(str(tmp_path / "lora"))

    merge_lora([tmp_path / "lora"], MergeLoraConfig(), out=tmp_path / "out", base=tmp_path / "base")

    merged = frozen(cls.from_pretrained(tmp_path / "out"))
    unmerged = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), tmp_path / "lora")
    unmerged.train(False)
    with torch.no_grad():
        want_logits = unmerged(input_ids=TOKENS).logits
        want = unmerged.merge_and_unload().state_dict()
        got_logits = merged(input_ids=TOKENS).logits
    got = merged.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
