"""Qwen-VL's step without host synchronizations gives what transformers' own forward gives.

Each test compares a backbone as vlacl loads it (batched vision attention, precomputed vision
packing, rope positions from ``prepare``) with one loaded from the same directory and put back to
transformers' code: stock attention classes, no precomputed arguments, no ``position_ids``.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5

from tests.hf_factories import make_tiny_qwen2_5_vl, make_tiny_qwen2_vl
from vlacl.config.train_task import TrainTaskConfig
from vlacl.models.hf import HFBackbone, load_hf_backbone
from vlacl.models.qwen_vl import BATCHED_CLASSES, install_batched_vision_attention, rope_positions
from vlacl.training.loop import _make_accelerator

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
STOCK = {batched: stock for stock, batched in BATCHED_CLASSES.items()}
INSTRUCTIONS = ["pick up the red cup", "open", "push the blue block into the drawer"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen")
    return {"qwen2_5_vl": make_tiny_qwen2_5_vl(root / "q25"), "qwen2_vl": make_tiny_qwen2_vl(root / "q2")}


def cameras(sizes: list[int], frames: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """One camera per size, square ``(N, s, s, C)`` uint8 frames."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"cam{i}": torch.randint(0, 256, (frames, size, size, 3), dtype=torch.uint8, generator=gen)
        for i, size in enumerate(sizes)
    }


def to_stock(backbone: HFBackbone) -> HFBackbone:
    """The backbone with transformers' own vision attention and no precomputed arguments."""
    for module in backbone.model.modules():
        stock = STOCK.get(type(module))
        if stock is not None:
            module.__class__ = stock
    backbone._layouts = None
    return backbone


def base(backbone: HFBackbone) -> Any:
    """The transformers base model (``...ForConditionalGeneration.model``)."""
    return cast(Any, backbone.model).model


def without_positions(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k != "position_ids"}


@contextmanager
def count_sdpa(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """The query shapes of every ``scaled_dot_product_attention`` call inside the block."""
    shapes: list[tuple[int, ...]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(tuple(query.shape))
        return real(query, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        yield shapes


def test_rope_positions_equal_get_rope_index(model_dirs: dict[str, Path]) -> None:
    """Two cameras of different sizes, prompts of different lengths (padding), both families."""
    for family in FAMILIES:
        backbone = load_hf_backbone(model_dirs[family])
        inputs = backbone.prepare(cameras([32, 24]), INSTRUCTIONS)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert not bool(mask.all()), "the prompts should be padded"
        want, _ = base(backbone).get_rope_index(
            ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"].flatten(0, 1), attention_mask=mask
        )  # (3, N, L)
        assert inputs["position_ids"].dtype == want.dtype
        torch.testing.assert_close(inputs["position_ids"].transpose(0, 1), want, rtol=0, atol=0)
        assert int(want[:, 0].max()) < int(mask[0].sum()) - 1  # image tokens share positions: not 0..L-1

        padded = backbone.pad_inputs(inputs, ids.shape[1] + 5)
        again, _ = base(backbone).get_rope_index(
            padded["input_ids"],
            padded["mm_token_type_ids"],
            image_grid_thw=padded["image_grid_thw"].flatten(0, 1),
            attention_mask=padded["attention_mask"],
        )
        torch.testing.assert_close(padded["position_ids"].transpose(0, 1), again, rtol=0, atol=0)


def test_rope_positions_refuse_a_run_without_its_grid() -> None:
    ids = torch.zeros(1, 6, dtype=torch.long)
    kinds = torch.tensor([[0, 1, 1, 1, 1, 0]])
    mask = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="4 tokens for a grid of 1x2x1"):
        rope_positions(ids, mask, kinds, torch.tensor([[1, 4, 2]]), 2)
    with pytest.raises(ValueError, match="more image token runs"):
        rope_positions(ids, mask, kinds, torch.zeros(0, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="more grids than the prompts have image token runs"):
        rope_positions(ids, mask, kinds, torch.tensor([[1, 4, 4], [1, 4, 4]]), 2)  # a grid left without tokens


@pytest.mark.parametrize(
    ("family", "sizes", "vision_calls"),
    [
        # 32x32: 8x8 patches, 4 windows of 16 per image; 6 images: one call per block (2 blocks)
        ("qwen2_5_vl", [32, 32], 2),
        # 24x24: 6x6 patches, windows of 16, 8, 8 and 4 patches: one call per window; images of one size: one call
        ("qwen2_5_vl", [24, 24], 6 * 4 + 1),
        # 32x32 and 24x24: windows of unequal length, images too: transformers' calls
        ("qwen2_5_vl", [32, 24], 3 * 4 + 3 * 4 + 6),
        # Qwen2-VL, no windows: one call per block for images of one size, one per image otherwise
        ("qwen2_vl", [32, 32], 2),
        ("qwen2_vl", [32, 24], 2 * 6),
    ],
)
def test_features_are_unchanged_and_equal_segments_take_one_call(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, family: str, sizes: list[int], vision_calls: int
) -> None:
    fast = load_hf_backbone(model_dirs[family]).train(False)
    stock = to_stock(load_hf_backbone(model_dirs[family])).train(False)
    inputs = fast.prepare(cameras(sizes), INSTRUCTIONS)
    text_layers = 2
    with torch.no_grad(), count_sdpa(monkeypatch) as calls:
        got = fast(inputs)
    with torch.no_grad(), count_sdpa(monkeypatch) as stock_calls:
        want = stock(without_positions(inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == vision_calls + text_layers, calls
    assert len(stock_calls) >= len(calls)
    if vision_calls == 2:
        assert len(stock_calls) > len(calls)
        assert calls[0][0] > 1, "the batched call should hold several windows or images"


def test_lora_gradients_match_transformers(model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA on the vision tower and the language model: same loss, same gradient of every LoRA factor."""
    images = cameras([32, 32], frames=2)
    grads = []
    for make_stock in (False, True):
        backbone = load_hf_backbone(model_dirs["qwen2_5_vl"])
        if make_stock:
            to_stock(backbone)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=backbone.lora_target_modules("vision"))
        torch.manual_seed(1)
        model = get_peft_model(backbone, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.1)  # non-zero B: the A factors get gradients too
        model.train()
        inputs = backbone.prepare(images, INSTRUCTIONS[:2])
        with count_sdpa(monkeypatch) as calls:
            features = model(inputs if not make_stock else without_positions(inputs))
        assert len(calls) == (4 * 4 + 4 + 2 if make_stock else 2 + 2), calls  # 4 images, 2 blocks; 2 text layers
        weights = torch.linspace(-1.0, 1.0, features.numel()).reshape(features.shape)
        (features * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    fast, stock = grads
    assert fast.keys() == stock.keys()
    assert any("visual.blocks.0.attn.qkv.lora_A" in n for n in fast)
    for name, grad in fast.items():
        assert grad is not None, name
        assert stock[name] is not None, name
        torch.testing.assert_close(grad, stock[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g is not None and float(g.abs().max()) > 0 for n, g in fast.items() if "visual" in n and "lora_A" in n)


def test_pixels_are_prepared_in_the_model_dtype(model_dirs: dict[str, Path]) -> None:
    backbone = load_hf_backbone(model_dirs["qwen2_5_vl"], dtype=torch.bfloat16)
    inputs = backbone.prepare(cameras([32]), INSTRUCTIONS)
    assert inputs["pixel_values"].dtype == torch.bfloat16
    assert inputs["position_ids"].dtype == torch.long
    with torch.no_grad():
        features = backbone(inputs)
    assert features.dtype == torch.float32
    assert bool(torch.isfinite(features).all())


def test_the_batched_class_survives_copies_and_only_sdpa_gets_it(model_dirs: dict[str, Path]) -> None:
    backbone = load_hf_backbone(model_dirs["qwen2_5_vl"])
    attention = base(backbone).visual.blocks[0].attn
    assert isinstance(attention, qwen2_5.Qwen2_5_VLVisionAttention)
    assert type(attention) is BATCHED_CLASSES[qwen2_5.Qwen2_5_VLVisionAttention]
    for other in (pickle.loads(pickle.dumps(backbone)), copy.deepcopy(backbone)):
        assert type(base(other).visual.blocks[0].attn) is type(attention)
        assert other._layouts is not None
    eager = qwen2_5.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dirs["qwen2_5_vl"], attn_implementation="eager"
    )
    assert install_batched_vision_attention(eager) == 0
    assert type(cast(Any, eager).model.visual.blocks[0].attn) is qwen2_5.Qwen2_5_VLVisionAttention


def test_vision_layouts_are_cached_per_grid(model_dirs: dict[str, Path]) -> None:
    backbone = load_hf_backbone(model_dirs["qwen2_5_vl"])
    layouts = backbone._layouts
    grid = torch.tensor([[1, 8, 8], [1, 6, 6]])
    first = layouts(grid)
    assert first["image_max_seqlen"] == 64
    assert first["image_max_window_seqlen"] == 16
    assert first["image_cu_seqlens"].tolist() == [0, 64, 100]
    assert layouts(grid.clone())["image_window_index"] is first["image_window_index"]
    assert len(layouts._cache) == 1


def test_the_accelerator_copies_batches_without_blocking() -> None:
    accelerator = _make_accelerator(TrainTaskConfig(device="cpu"))
    assert accelerator.dataloader_config.non_blocking is True


class _ScalarReads(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts ``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``, ``if t:`` (a host read on a GPU)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_forward_reads_nothing_back_and_skips_transformers_merge(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """No scalar read in the forward (transformers' own reads two: the token-count check, the mask check).

    ``.tolist()`` of a CPU tensor is not a dispatched read, so this counts ``.item()``-like reads only;
    transformers' third read, the features split by ``grid.tolist()``, is ruled out by refusing
    ``get_image_features``. (``VisionLayouts`` reads the grid once per forward, documented there.)
    """
    fast = load_hf_backbone(model_dirs[family]).train(False)
    stock = to_stock(load_hf_backbone(model_dirs[family])).train(False)
    inputs = fast.prepare(cameras([32, 32]), INSTRUCTIONS)  # instructions of three lengths: padded
    assert not bool(inputs["attention_mask"].all())
    with torch.no_grad(), _ScalarReads() as stock_reads:
        want = stock(without_positions(inputs))
    fast(inputs)  # the first call computes the vision layouts on the host: once per grid
    model_class = type(base(fast))

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("transformers' image merge ran")

    monkeypatch.setattr(model_class, "get_image_features", refused)
    monkeypatch.setattr(model_class, "get_placeholder_mask", refused)
    with torch.no_grad(), _ScalarReads() as reads:
        got = fast(inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert stock_reads.count >= 2
    assert reads.count == 0
