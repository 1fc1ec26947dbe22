"""eval-suite with the policies on a GPU: the offline suite on CUDA scores like the CPU, and --compile trains there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train_factories import Stream
from vlacl.config.eval_suite import EvalSuiteConfig
from vlacl.evaluation.runner import run_eval_suite
from vlacl.training.loop import run_train_task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_offline_suite_on_cuda_matches_the_cpu(stream: Stream, tmp_path: Path) -> None:
    run_train_task(stream.config(steps=2), out=tmp_path / "t0")
    run_train_task(stream.config(steps=2, task="#1"), out=tmp_path / "t1", prev=tmp_path / "t0")
    checkpoints = [tmp_path / "t0", tmp_path / "t1"]
    reports = {
        device: run_eval_suite(
            checkpoints, EvalSuiteConfig(suite="offline", split="all", device=device, batch_size=16), out=None
        )
        for device in ("cpu", "cuda")
    }
    cpu, gpu = (reports[d].episodes for d in ("cpu", "cuda"))
    assert len(cpu) == len(gpu) > 0
    np.testing.assert_allclose(gpu["mse"], cpu["mse"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(gpu["mae_raw"], cpu["mae_raw"], rtol=1e-3, atol=1e-5)


def test_compiled_training_on_cuda_matches_eager(stream: Stream, tmp_path: Path) -> None:
    eager = run_train_task(stream.config(steps=3, device="cuda"), out=tmp_path / "eager")
    compiled = run_train_task(stream.config(steps=3, device="cuda", compile=True), out=tmp_path / "compiled")
    assert compiled.final_loss == pytest.approx(eager.final_loss, rel=1e-3)


@pytest.mark.parametrize("family", ["tiny", "qwen2_5_vl"])
def test_cuda_graph_training_matches_eager(family: str, tmp_path: Path) -> None:
    """``--compile-mode reduce-overhead``: blocks replayed as CUDA graphs; steps and validation give eager's losses."""
    from tests.hf_factories import FACTORIES
    from tests.train_factories import make_stream
    from vlacl.config.lora import AdapterConfig

    model = None if family == "tiny" else FACTORIES[family](tmp_path / "model")
    stream = make_stream(tmp_path / "s", model=model)
    common = {
        "steps": 6,
        "log_every": 1,
        "val_every": 3,
        "device": "cuda",
        "precision": "bf16",
        "adapter": AdapterConfig(rank=4, dropout=0.0),
    }
    eager = run_train_task(stream.config(**common), out=tmp_path / "eager")
    torch._dynamo.utils.counters.clear()
    graphs = run_train_task(
        stream.config(compile=True, compile_mode="reduce-overhead", **common), out=tmp_path / "graphs"
    )
    assert graphs.final_loss == pytest.approx(eager.final_loss, rel=2e-2)
    assert eager.best_val_loss is not None
    assert graphs.best_val_loss == pytest.approx(eager.best_val_loss, rel=2e-2)
    counters = torch._dynamo.utils.counters
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
