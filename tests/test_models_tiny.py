"""The built-in tiny backbone: tokenizer, save/load, inputs, LoRA."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from vlacl.errors import ArtifactError, ConfigError, InputFormatError
from vlacl.models.base import Backbone
from vlacl.models.load import BUILTIN_TINY, load_backbone
from vlacl.models.tiny import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ByteTokenizer,
    TinyBackbone,
    TinyConfig,
    load_tiny_model,
    param_count,
    save_tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = TinyConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=2, image_size=16, patch_size=8)


def frames(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def features(model: TinyBackbone, n: int = 3, state_dim: int = 5) -> torch.Tensor:
    inputs = model.prepare({"front": frames(n)}, ["pick up the cube"] * n)
    state = torch.linspace(-1, 1, n * state_dim).view(n, state_dim)
    with torch.no_grad():
        out: torch.Tensor = model(inputs, state)
    return out


def test_tokenizer_is_deterministic_byte_level_and_offline() -> None:
    tok = ByteTokenizer(max_len=8)
    assert tok.encode("ab") == [ord("a") + 2, ord("b") + 2, ByteTokenizer.EOS]
    assert tok.encode("  ab ") == tok.encode("ab")
    assert tok.encode("é") == [0xC3 + 2, 0xA9 + 2, ByteTokenizer.EOS]
    assert tok.decode(tok.encode("pick é")) == "pick é"
    assert len(tok.encode("a much longer instruction")) == 8  # truncated, the end id kept
    ids, mask = tok(["ab", "abcd", "ab"])
    assert ids.shape == (3, 5)
    assert mask.tolist()[0] == [True, True, True, False, False]
    assert torch.equal(ids, ByteTokenizer(max_len=8)(["ab", "abcd", "ab"])[0])


def test_default_sizes_are_small() -> None:
    model = TinyBackbone(TinyConfig())
    assert 0.5e6 < param_count(model) < 3e6
    assert model.hidden_size == 128
    assert isinstance(model, Backbone)


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    path = save_tiny_model(tmp_path / "tiny", SMALL, seed=3)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["model_type"] == "vlacl_tiny"
    loaded = load_backbone(path)
    assert isinstance(loaded, TinyBackbone)
    assert loaded.config == SMALL
    original = TinyBackbone(SMALL, seed=3)
    assert torch.equal(features(original), features(loaded))
    again = save_tiny_model(tmp_path / "again", SMALL, seed=3)
    assert (again / WEIGHTS_FILE).read_bytes() == (path / WEIGHTS_FILE).read_bytes()
    other = save_tiny_model(tmp_path / "other", SMALL, seed=4)
    assert (other / WEIGHTS_FILE).read_bytes() != (path / WEIGHTS_FILE).read_bytes()


def test_seeded_init_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    TinyBackbone(SMALL, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_builtin_tiny_is_the_same_everywhere() -> None:
    a = load_backbone(BUILTIN_TINY)
    b = load_backbone(BUILTIN_TINY, dtype=torch.bfloat16)
    assert isinstance(a, TinyBackbone)
    assert isinstance(b, TinyBackbone)
    assert a.config == TinyConfig()
    assert torch.equal(a.cls_token.to(torch.bfloat16), b.cls_token)
    assert b.cls_token.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown built-in"):
        load_backbone("builtin:huge")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_backbone(tmp_path / "missing")
    path = save_tiny_model(tmp_path / "tiny", SMALL)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"no model\.safetensors"):
        load_tiny_model(path)
    save_tiny_model(tmp_path / "bigger", TinyConfig(hidden_size=32, num_layers=3, num_heads=2, image_size=16))
    (path / WEIGHTS_FILE).write_bytes((tmp_path / "bigger" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ArtifactError, match="does not fit"):
        load_tiny_model(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**config, "vlacl_tiny_version": 99}))
    with pytest.raises(ArtifactError, match="upgrade vlacl"):
        load_tiny_model(path)


def test_other_model_types_go_to_the_hf_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, bool, torch.dtype | None]] = []
    fake = types.ModuleType("vlacl.models.hf")

    def load_hf_backbone(path: Path, *, trust_remote_code: bool, dtype: torch.dtype | None) -> str:
        calls.append((path, trust_remote_code, dtype))
        return "hf backbone"

    fake.load_hf_backbone = load_hf_backbone  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vlacl.models.hf", fake)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_type": "paligemma"}))
    assert load_backbone(tmp_path, trust_remote_code=True, dtype=torch.float16) == "hf backbone"  # type: ignore[comparison-overlap]
    assert calls == [(tmp_path, True, torch.float16)]


def test_prepare_resizes_stacks_cameras_and_checks_names() -> None:
    model = TinyBackbone(SMALL)
    inputs = model.prepare({"observation.images.a": frames(2, 32), "b": frames(2)}, ["x", "y"])
    assert inputs["pixel_values"].shape == (2, 2, 16, 16, 3)
    assert inputs["pixel_values"].dtype == torch.uint8
    assert model(inputs).shape == (2, 32)
    fixed = TinyBackbone(TinyConfig(**{**SMALL.__dict__, "cameras": ("wrist", "front")}))
    ordered = fixed.prepare({"front": frames(1, seed=1), "wrist": frames(1, seed=2)}, ["x"])
    assert torch.equal(ordered["pixel_values"][0, 0], frames(1, seed=2)[0])  # config order, not dict order
    with pytest.raises(InputFormatError, match="built for cameras"):
        fixed.prepare({"front": frames(1)}, ["x"])
    with pytest.raises(InputFormatError, match="at most 4 cameras"):
        model.prepare({str(i): frames(1) for i in range(5)}, ["x"])
    with pytest.raises(InputFormatError, match="uint8"):
        model.prepare({"a": frames(1).float()}, ["x"])


def test_state_only_and_inputs_matter() -> None:
    model = TinyBackbone(SMALL)
    inputs = model.prepare({}, ["push the button", "push the button"])
    assert "pixel_values" not in inputs
    state = torch.tensor([[0.5, -0.5], [0.9, 0.1]])
    with torch.no_grad():
        out = model(inputs, state)
    assert out.shape == (2, 32)
    assert not torch.allclose(out[0], out[1])  # the state token changes the feature
    with torch.no_grad():
        other_text = model(model.prepare({}, ["open the door"] * 2), state)
    assert not torch.allclose(out, other_text)
    with pytest.raises(InputFormatError, match="max_state_dim"):
        model(inputs, torch.zeros(2, SMALL.max_state_dim + 1))


def test_text_padding_does_not_change_a_frame() -> None:
    model = TinyBackbone(SMALL)
    img = frames(2)
    with torch.no_grad():
        alone = model(model.prepare({"a": img[:1]}, ["go"]))
        batched = model(model.prepare({"a": img}, ["go", "a much longer instruction"]))
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)


def test_lora_targets_and_layers() -> None:
    model = TinyBackbone(SMALL)
    assert len(model.layer_modules()) == SMALL.num_layers
    attention = model.lora_target_modules("attention")
    every = model.lora_target_modules("all-linear")
    vision = model.lora_target_modules("vision")
    assert len(attention) == 4 * SMALL.num_layers
    assert set(attention) < set(every) < set(vision)
    assert "blocks.0.mlp.fc1" in every
    assert "vision.patch_embed" in vision
    for name in vision:
        assert isinstance(model.get_submodule(name), torch.nn.Linear)
    with pytest.raises(ConfigError, match="preset"):
        model.lora_target_modules("everything")


def test_peft_lora_wraps_the_tiny_backbone() -> None:
    from peft import LoraConfig, get_peft_model

    model = TinyBackbone(SMALL)
    targets = model.lora_target_modules("all-linear")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 6 * SMALL.num_layers  # A and B of q, k, v, o, fc1, fc2 per block
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    inputs = model.prepare({"a": frames(2)}, ["go", "stop"])
    out = peft_model(inputs, torch.randn(2, 3))
    out.square().sum().backward()
    assert all(p.grad is not None for p in lora.values())
    b_grads = [p.grad for n, p in lora.items() if "lora_B" in n]  # A's are 0 while B is still 0 (PEFT's init)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in b_grads)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)
    assert model.lora_target_modules("all-linear") == targets  # the same names once PEFT wrapped the layers
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=model.lora_target_modules("attention")))
    assert any("lora_A.second" in n for n, _ in peft_model.named_parameters())
