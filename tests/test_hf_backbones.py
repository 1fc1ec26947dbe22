"""Hugging Face VLM backbones on tiny random models of each family, loaded as a local checkpoint is."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.hf_factories import FACTORIES
from vlacl.errors import ConfigError, InputFormatError
from vlacl.models.base import Backbone
from vlacl.models.hf import HFBackbone, QwenImageTextProcessor, load_hf_backbone
from vlacl.models.hf_families import QWEN_IMAGE

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "paligemma", "idefics3", "kosmos2"]
INSTRUCTIONS = ["pick up the red cup", "open the drawer"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: build(root / family) for family, build in FACTORIES.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> HFBackbone:
    model = load_hf_backbone(model_dirs[request.param])
    model.train(False)
    return model


def cameras(frames: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two cameras of different sizes, ``(N, H, W, C)`` uint8."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "observation.images.top": torch.randint(0, 256, (frames, 24, 32, 3), dtype=torch.uint8, generator=gen),
        "observation.images.wrist": torch.randint(0, 256, (frames, 20, 20, 3), dtype=torch.uint8, generator=gen),
    }


def linear_names(module: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}.{n}" for n, m in module.get_submodule(prefix).named_modules() if isinstance(m, nn.Linear)}


def lora_wrapped(model: nn.Module) -> set[str]:
    """Names (relative to the backbone) of the modules PEFT gave a LoRA branch."""
    names = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Linear):
            names.add(re.sub(r"^(base_model\.model\.)?model\.", "", name))
    return names


def test_features_are_one_finite_vector_per_frame_and_deterministic(backbone: HFBackbone) -> None:
    assert isinstance(backbone, Backbone)
    assert backbone.hidden_size == 32
    assert backbone.takes_state is False
    inputs = backbone.prepare(cameras(), INSTRUCTIONS)
    assert all(value.shape[0] == 2 for value in inputs.values()), {k: v.shape for k, v in inputs.items()}
    with torch.no_grad():
        features = backbone(inputs)
        again = backbone(inputs)
    assert features.shape == (2, 32)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, again, rtol=0, atol=0)
    assert not torch.allclose(features[0], features[1], atol=1e-4), "two frames gave the same feature"


def test_frames_prepared_alone_stack_into_the_batch(backbone: HFBackbone) -> None:
    """Fixed-length padding: frames prepared apart have the shapes and values of the batch rows."""
    images = cameras()
    batch = backbone.prepare(images, INSTRUCTIONS)
    parts = [backbone.prepare({k: v[i : i + 1] for k, v in images.items()}, INSTRUCTIONS[i : i + 1]) for i in (0, 1)]
    for key, value in batch.items():
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), value, rtol=0, atol=0, msg=key)
    longer = backbone.prepare(images, ["put the blue block on the green plate", "turn it"])
    assert longer["input_ids"].shape == batch["input_ids"].shape


def test_the_feature_is_the_last_prompt_token_and_ignores_padding(backbone: HFBackbone) -> None:
    images = cameras()
    inputs = backbone.prepare(images, INSTRUCTIONS)
    mask = inputs["attention_mask"]
    assert (mask.sum(dim=1) < mask.shape[1]).all(), "no padding to ignore"
    with torch.no_grad():
        features = backbone(inputs)
        tighter = backbone.text_tokens
        backbone.text_tokens = 0  # shortest padding this batch allows
        try:
            short = backbone.prepare(images, INSTRUCTIONS)
        finally:
            backbone.text_tokens = tighter
        assert short["input_ids"].shape[1] < inputs["input_ids"].shape[1]
        torch.testing.assert_close(backbone(short), features, rtol=1e-4, atol=1e-5)


def test_all_linear_lora_adapts_the_language_model_only_and_trains(backbone: HFBackbone) -> None:
    inputs = backbone.prepare(cameras(), INSTRUCTIONS)
    target = backbone.lora_target_modules("all-linear")
    language = linear_names(backbone.model, backbone.spec.layers_path)
    peft = get_peft_model(backbone, LoraConfig(r=2, lora_alpha=4, target_modules=target, init_lora_weights=False))
    try:
        assert lora_wrapped(peft) == language
        for path in backbone.spec.vision_paths:
            assert not any(name.startswith(path) for name in lora_wrapped(peft)), path
        assert not any("lm_head" in name for name in lora_wrapped(peft))
        peft.train(True)
        peft(inputs).square().mean().backward()
        lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
        assert lora
        assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
        frozen = [n for n, p in peft.named_parameters() if "lora_" not in n and p.requires_grad]
        assert frozen == []
    finally:
        peft.unload()
        backbone.train(False)
        backbone.zero_grad(set_to_none=True)


def test_attention_and_vision_presets(backbone: HFBackbone) -> None:
    attention = re.compile(backbone.lora_target_modules("attention"))
    vision = re.compile(backbone.lora_target_modules("vision"))
    model = backbone.model
    lm = linear_names(model, backbone.spec.layers_path)
    tower = set().union(*(linear_names(model, path) for path in backbone.spec.vision_paths))
    everything = {n for n, m in model.named_modules()}
    got_attention = {n for n in everything if attention.fullmatch(n)}
    assert got_attention == {n for n in lm if n.endswith(backbone.spec.attention)}
    assert {n.rsplit(".", 1)[-1] for n in got_attention} <= {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj"}
    assert len(got_attention) == 4 * len(backbone.layer_modules())
    assert {n for n in everything if vision.fullmatch(n)} == lm | tower
    assert tower, "no vision linear layers found"
    # any prefix: the backbone, a policy holding it, PEFT's wrapper
    some = sorted(got_attention)[0]
    assert attention.fullmatch("model." + some)
    assert attention.fullmatch("base_model.model.backbone.model." + some)
    with pytest.raises(ConfigError, match="not one of"):
        backbone.lora_target_modules("everything")


def test_layer_modules_are_the_decoder_layers_in_order(backbone: HFBackbone) -> None:
    layers = backbone.layer_modules()
    assert len(layers) == 2
    expected = backbone.model.get_submodule(backbone.spec.layers_path)
    assert isinstance(expected, nn.ModuleList)
    assert all(a is b for a, b in zip(layers, expected, strict=True))


def test_kosmos2_takes_the_first_camera(model_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    model = load_hf_backbone(model_dirs["kosmos2"])
    images = cameras()
    with caplog.at_level(logging.WARNING, logger="vlacl.models.hf"):
        both = model.prepare(images, INSTRUCTIONS)
    assert "using camera observation.images.top" in caplog.text
    first = model.prepare({"observation.images.top": images["observation.images.top"]}, INSTRUCTIONS)
    for key in both:
        torch.testing.assert_close(both[key], first[key], rtol=0, atol=0)


def test_every_camera_of_a_frame_is_an_image_of_its_prompt(model_dirs: dict[str, Path]) -> None:
    model = load_hf_backbone(model_dirs["paligemma"])
    images = cameras()
    image_id = model.processor.image_token_id
    two = model.prepare(images, INSTRUCTIONS)["input_ids"]
    one = model.prepare({"observation.images.top": images["observation.images.top"]}, INSTRUCTIONS)["input_ids"]
    assert ((two == image_id).sum(dim=1) == 2 * (one == image_id).sum(dim=1)).all()


def test_unknown_model_type_lists_the_families(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(InputFormatError) as err:
        load_hf_backbone(tmp_path)
    message = str(err.value)
    assert "'llava'" in message
    for family in ("qwen2_5_vl", "paligemma", "idefics3", "kosmos-2", "Kosmos2ForConditionalGeneration"):
        assert family in message
    assert "--trust-remote-code" in message


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(InputFormatError, match="not a directory"):
        load_hf_backbone(tmp_path / "nowhere")
    with pytest.raises(InputFormatError, match=r"no config\.json"):
        load_hf_backbone(tmp_path)


@pytest.mark.parametrize("trust", [None, True])
def test_remote_code_runs_only_when_asked_and_nothing_is_fetched(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, trust: bool | None
) -> None:
    import transformers

    calls: list[tuple[str, dict[str, Any]]] = []
    cls = transformers.PaliGemmaForConditionalGeneration
    real_model, real_processor = cls.from_pretrained, transformers.AutoProcessor.from_pretrained

    def model(path: Path, **kwargs: Any) -> Any:
        calls.append(("model", kwargs))
        return real_model(path, **kwargs)

    def processor(path: Path, **kwargs: Any) -> Any:
        calls.append(("processor", kwargs))
        return real_processor(path, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(cls, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", processor)
    if trust is None:
        load_hf_backbone(model_dirs["paligemma"])
    else:
        load_hf_backbone(model_dirs["paligemma"], trust_remote_code=trust)
    assert [what for what, _ in calls] == ["model", "processor"]
    for _, kwargs in calls:
        assert kwargs["trust_remote_code"] is bool(trust)
        assert kwargs["local_files_only"] is True
    assert calls[0][1]["attn_implementation"] == "sdpa"


def test_dtype_is_passed_to_the_model(model_dirs: dict[str, Path]) -> None:
    model = load_hf_backbone(model_dirs["idefics3"], dtype=torch.bfloat16)
    assert model.model.dtype == torch.bfloat16
    with torch.no_grad():
        features = model(model.prepare(cameras(), INSTRUCTIONS))
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="Qwen2.5-VL's processor needs torchvision")
def test_qwen_prompts_without_torchvision_match_the_transformers_processor(model_dirs: dict[str, Path]) -> None:
    from transformers import AutoProcessor

    path = model_dirs["qwen2_5_vl"]
    real = AutoProcessor.from_pretrained(path, local_files_only=True)  # type: ignore[no-untyped-call]
    parts = QwenImageTextProcessor.from_pretrained(path)
    images = [[frame.numpy() for frame in camera] for camera in cameras().values()]
    per_frame = [list(frame) for frame in zip(*images, strict=True)]
    texts = [QWEN_IMAGE * 2 + t for t in INSTRUCTIONS]
    want = real(images=per_frame, text=texts, padding=True, return_tensors="pt")
    got = parts(images=per_frame, text=texts)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key].to(value.dtype), msg=key)
