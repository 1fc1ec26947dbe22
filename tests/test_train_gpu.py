"""Mixed-precision training on a CUDA device: bf16/fp16 steps, an HF family in bf16, last-n on a bf16 backbone.

Run on a GPU machine with ``pytest -m gpu tests/test_train_gpu.py -s`` (``-s`` shows peak memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train_factories import Stream, make_stream
from vlacl.config.lora import AdapterConfig
from vlacl.training.checkpoint import METRICS_LOG_NAME
from vlacl.training.loop import run_train_task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / METRICS_LOG_NAME).read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def _train(stream: Stream, out: Path, precision: str, **changes: object) -> tuple[list[float], object]:
    torch.cuda.reset_peak_memory_stats()
    cfg = stream.config(
        steps=40, log_every=5, lr=1e-3, head_lr=3e-3, schedule="constant", device="cuda", precision=precision, **changes
    )
    result = run_train_task(cfg, out=out)
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"{out.name}: precision={result.details['precision']} peak memory {peak:.1f} MiB")
    losses = _losses(out)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    return losses, result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_backbone_mixed_precision_trains_lora(tmp_path: Path, precision: str) -> None:
    stream = make_stream(tmp_path / "s")
    _, result = _train(stream, tmp_path / precision, precision)
    assert result.details["precision"] == precision  # type: ignore[attr-defined]
    policy = result.policy  # type: ignore[attr-defined]
    lora = [p for n, p in policy.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora
    assert all(p.dtype == torch.float32 for p in lora)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    frozen = [p for n, p in policy.backbone.named_parameters() if not p.requires_grad]
    expected = torch.bfloat16 if precision == "bf16" else torch.float16
    assert frozen
    assert all(p.dtype == expected for p in frozen)


def test_qwen2_5_vl_family_bf16(tmp_path: Path) -> None:
    from tests.hf_factories import FACTORIES

    model = FACTORIES["qwen2_5_vl"](tmp_path / "qwen")
    stream = make_stream(tmp_path / "s", model=model)
    _train(stream, tmp_path / "qwen-bf16", "bf16", adapter=AdapterConfig(rank=4, dropout=0.0))


def test_last_n_on_a_bf16_backbone(tmp_path: Path) -> None:
    stream = make_stream(tmp_path / "s")
    _, result = _train(stream, tmp_path / "last-n", "bf16", adapter=AdapterConfig(finetune="last-n", last_n=1))
    policy = result.policy  # type: ignore[attr-defined]
    trainable = [p for p in policy.backbone.parameters() if p.requires_grad]
    assert trainable
    assert all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.bfloat16 for p in policy.backbone.parameters())


def test_two_stage_feature_cache_bf16(tmp_path: Path) -> None:
    stream = make_stream(tmp_path / "s")
    _train(stream, tmp_path / "cached", "bf16", two_stage=True, stage1_steps=20, cache_features=True)


@pytest.mark.parametrize("name", ["er", "mir", "ewc", "agem", "lwf"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cl_algorithms_continue_a_stream_in_mixed_precision(tmp_path: Path, name: str, precision: str) -> None:
    from vlacl.training.checkpoint import load_cl_state

    stream = make_stream(tmp_path / "stream")
    options = {"mir": {"refresh": 2, "candidates": 16, "top_k": 8}, "ewc": {"fisher_samples": 16}}.get(name)
    common = {"steps": 6, "device": "cuda", "precision": precision, "cl": name, "cl_options": options}
    run_train_task(stream.config(**common), out=tmp_path / "t0")
    result = run_train_task(stream.config(task="#1", **common), out=tmp_path / "t1", prev=tmp_path / "t0")
    assert result.details["precision"] == precision
    losses = _losses(tmp_path / "t1")
    assert all(torch.isfinite(torch.tensor(losses))), losses
    state = load_cl_state(tmp_path / "t1")
    assert state is not None
    if name in ("er", "mir", "agem"):
        assert sorted(set(state["memory.task"].tolist())) == [0, 1]
    if name == "ewc":
        fisher = [v for k, v in state.items() if k.startswith("fisher.")]
        assert fisher
        assert all(torch.isfinite(f).all() for f in fisher)


@pytest.mark.parametrize("name", ["mir", "ewc", "lwf", "agem"])
def test_cl_algorithms_on_an_hf_family_in_bf16(tmp_path: Path, name: str) -> None:
    from tests.hf_factories import FACTORIES

    model = FACTORIES["qwen2_5_vl"](tmp_path / "qwen")
    stream = make_stream(tmp_path / "s", model=model)
    options = {"mir": {"refresh": 2, "candidates": 16, "top_k": 8}, "ewc": {"fisher_samples": 8}}.get(name)
    adapter = AdapterConfig(rank=4, dropout=0.0)
    common = {"steps": 4, "device": "cuda", "precision": "bf16", "cl": name, "cl_options": options, "adapter": adapter}
    run_train_task(stream.config(**common), out=tmp_path / "t0")
    run_train_task(stream.config(task="#1", **common), out=tmp_path / "t1", prev=tmp_path / "t0")
    losses = _losses(tmp_path / "t1")
    assert all(torch.isfinite(torch.tensor(losses))), losses


def test_adamw_is_fused_on_cuda(stream: Stream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The optimizer is built once the policy is on the GPU, so AdamW takes its fused kernel."""
    with caplog.at_level("DEBUG", logger="vlacl.training.optim"):
        run_train_task(stream.config(steps=2, device="cuda"), out=tmp_path / "fused")
    assert any("AdamW fused=True over devices ['cuda']" in r.getMessage() for r in caplog.records)
