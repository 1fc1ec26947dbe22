"""``train-task --compile``: the blocks it compiles, state dict names kept, and the eager run's losses."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers.modeling_layers import GradientCheckpointingLayer

from tests.hf_factories import make_tiny_qwen2_5_vl
from tests.train_factories import MICRO, Stream
from vlacl.adapters.lora import attach
from vlacl.artifacts.names import ACTION_HEAD_NAME, ADAPTER_WEIGHTS_NAME, ADAPTERS_DIR
from vlacl.config.core import resolve_config
from vlacl.config.lora import AdapterConfig
from vlacl.config.train_task import TrainTaskConfig
from vlacl.errors import ConfigError
from vlacl.models.hf import load_hf_backbone
from vlacl.models.tiny import TinyBackbone
from vlacl.training.checkpoint import METRICS_LOG_NAME
from vlacl.training.loop import _check_compile, run_train_task
from vlacl.training.model import RECOMPILE_LIMIT, compile_backbone, compile_regions, uses_cudagraphs


def compiled(module: torch.nn.Module) -> bool:
    """Whether ``nn.Module.compile`` ran on ``module`` (its calls go through the compiled ``_call_impl``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def test_the_tiny_backbones_blocks_are_compiled_in_place_with_lora(caplog: pytest.LogCaptureFixture) -> None:
    backbone = TinyBackbone(MICRO)
    setup = attach(backbone, AdapterConfig(rank=4), task="push", task_index=0)
    names = list(cast(torch.nn.Module, setup.backbone).state_dict())
    with caplog.at_level("INFO", logger="vlacl.training.model"):
        regions = compile_backbone(setup.base, "cpu")
    assert regions == list(backbone.blocks)
    assert all(compiled(block) for block in backbone.blocks)
    assert not compiled(backbone)
    assert not compiled(backbone.vision)
    assert list(cast(torch.nn.Module, setup.backbone).state_dict()) == names  # no _orig_mod. in any name
    assert any("lora_A" in n for n in names)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    assert "compilation mostly helps on GPUs" in caplog.text


def test_qwen_regions_are_the_decoder_layers_and_the_vision_blocks(tmp_path: Path) -> None:
    backbone = load_hf_backbone(make_tiny_qwen2_5_vl(tmp_path / "q25"))
    regions = compile_regions(backbone)
    model: Any = backbone.model
    assert regions == [*model.model.language_model.layers, *model.model.visual.blocks]
    assert len(regions) == 4  # 2 decoder layers, 2 vision blocks: nothing nested inside a block
    get_peft_model(backbone, LoraConfig(r=4, target_modules=backbone.lora_target_modules("vision")))
    assert compile_regions(backbone) == regions  # PEFT swaps the linear layers inside, not the blocks


def test_activation_checkpointing_reaches_the_hf_layers(tmp_path: Path) -> None:
    backbone = load_hf_backbone(make_tiny_qwen2_5_vl(tmp_path / "q25"))
    backbone.gradient_checkpointing_enable()
    layers = [m for m in backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 4
    assert all(layer.gradient_checkpointing for layer in layers)


def test_the_flag_sets_the_setting() -> None:
    assert not TrainTaskConfig().compile
    assert resolve_config(TrainTaskConfig, flags={"compile": True}).compile


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_compile_is_refused_under_sharding(kind: str) -> None:
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]

    sharded = SimpleNamespace(distributed_type=DistributedType[kind])
    with pytest.raises(ConfigError, match=f"--compile .* runs {kind}: drop --compile"):
        _check_compile(TrainTaskConfig(compile=True), sharded)
    _check_compile(TrainTaskConfig(compile=False), sharded)
    _check_compile(TrainTaskConfig(compile=True), SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / METRICS_LOG_NAME).read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r] + [r["val_loss"] for r in lines if "val_loss" in r]


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses_and_files(stream: Stream, tmp_path: Path) -> None:
    eager = run_train_task(stream.config(steps=2, log_every=1), out=tmp_path / "eager")
    fast = run_train_task(stream.config(steps=2, log_every=1, compile=True), out=tmp_path / "compiled")
    blocks = fast.policy.backbone.base.blocks
    assert all(compiled(block) for block in blocks)
    assert not any(compiled(block) for block in eager.policy.backbone.base.blocks)
    assert len(_losses(tmp_path / "eager")) == 3  # steps 1 and 2, validation at the end
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), abs=1e-4)
    for name in (f"{ADAPTERS_DIR}/shared/{ADAPTER_WEIGHTS_NAME}", ACTION_HEAD_NAME):
        want = load_file(str(tmp_path / "eager" / name))
        got = load_file(str(tmp_path / "compiled" / name))
        assert sorted(got) == sorted(want)
        assert any("lora_A" in key for key in want) or name == ACTION_HEAD_NAME
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_compiled_checkpointed_qwen_blocks_give_the_eager_gradients(tmp_path: Path) -> None:
    """Vision LoRA on every block; checkpointing runs inside the compiled blocks."""
    from tests.test_hf_speed import INSTRUCTIONS, cameras

    directory = make_tiny_qwen2_5_vl(tmp_path / "q25")
    results = []
    for fast in (False, True):
        backbone = load_hf_backbone(directory)
        torch.manual_seed(0)
        targets = backbone.lora_target_modules("vision")
        peft = get_peft_model(backbone, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        if fast:
            backbone.gradient_checkpointing_enable()
            compile_backbone(backbone, "cpu")
        out = peft(backbone.prepare(cameras([32, 32]), INSTRUCTIONS))  # (N, D)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    assert all(compiled(region) for region in compile_regions(backbone))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert sorted(got_grads) == sorted(want_grads)
    assert any(".visual.blocks.0." in n for n in want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-3)


def test_compile_mode_needs_compile_and_names_the_cuda_graph_modes() -> None:
    with pytest.raises(ConfigError, match=r"--compile-mode.*pass --compile too"):
        TrainTaskConfig(compile_mode="reduce-overhead")
    assert not uses_cudagraphs(TrainTaskConfig(compile=True))
    assert uses_cudagraphs(TrainTaskConfig(compile=True, compile_mode="reduce-overhead"))
    assert not uses_cudagraphs(TrainTaskConfig(compile=True, compile_mode="max-autotune-no-cudagraphs"))
    assert resolve_config(TrainTaskConfig, flags={"compile": True, "compile_mode": "max-autotune"}).compile_mode == (
        "max-autotune"
    )
    graphs = {"compile": True, "compile_mode": "reduce-overhead"}
    with pytest.raises(ConfigError, match=r"cannot accumulate gradients over --grad-accum 2"):
        TrainTaskConfig(grad_accum=2, **graphs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"cannot run with --cl agem"):
        TrainTaskConfig(cl="agem", **graphs)  # type: ignore[arg-type]
    assert TrainTaskConfig(compile=True, grad_accum=2, cl="agem").grad_accum == 2  # default mode: no graphs


def test_cuda_graph_mode_on_a_cpu_warns_and_compiles(caplog: pytest.LogCaptureFixture) -> None:
    backbone = TinyBackbone(MICRO)
    with caplog.at_level("INFO", logger="vlacl.training.model"):
        regions = compile_backbone(backbone, "cpu", "reduce-overhead")
    assert regions
    assert all(compiled(block) for block in regions)
    assert any("CUDA graphs need a GPU" in r.getMessage() for r in caplog.records)
    assert any("mode reduce-overhead" in r.getMessage() for r in caplog.records)
