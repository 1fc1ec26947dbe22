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
