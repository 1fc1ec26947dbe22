"""Every CL algorithm continues a stream in every adapter mode: two tasks through ``run_train_task``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.train_factories import Stream
from vlacl.artifacts.reader import open_artifact
from vlacl.cl.base import available
from vlacl.config.lora import AdapterConfig
from vlacl.training.checkpoint import METRICS_LOG_NAME, load_cl_state
from vlacl.training.loop import run_train_task

ALGORITHMS = ("seq", "er", "mir", "ewc", "agem", "lwf")
OPTIONS: dict[str, dict[str, Any]] = {
    "er": {"per_task": 12},
    "mir": {"per_task": 12, "refresh": 1, "candidates": 8, "top_k": 4},
    "ewc": {"fisher_samples": 4},
    "agem": {"per_task": 12},
}
REPLAY = ("er", "mir", "agem")


def test_every_builtin_algorithm_is_registered() -> None:
    assert set(ALGORITHMS) <= set(available())


@pytest.mark.parametrize("mode", ["shared", "stack", "per-task"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_continues_the_stream_in_every_adapter_mode(
    stream: Stream, tmp_path: Path, name: str, mode: str
) -> None:
    adapter = AdapterConfig(rank=4, dropout=0.0, mode=mode)  # type: ignore[arg-type]
    options = OPTIONS.get(name)
    first = stream.config(steps=2, cl=name, cl_options=options, adapter=adapter)
    run_train_task(first, out=tmp_path / "t0")
    second = stream.config(steps=2, cl=name, cl_options=options, adapter=adapter, task="#1")
    result = run_train_task(second, out=tmp_path / "t1", prev=tmp_path / "t0")
    assert math.isfinite(result.final_loss)
    details = open_artifact(tmp_path / "t1", "task_checkpoint", verify=True).manifest.details
    assert details["cl_algorithm"] == name
    assert details["adapter_mode"] == mode
    assert len(details["adapter_stack"]) == (1 if mode == "shared" else 2)
    state = load_cl_state(tmp_path / "t1")
    assert state is not None
    if name in REPLAY:
        assert sorted(set(state["memory.task"].tolist())) == [0, 1]
    terms = [json.loads(x) for x in (tmp_path / "t1" / METRICS_LOG_NAME).read_text().splitlines()]
    penalized = any("cl_penalty" in r.get("terms", {}) for r in terms)
    assert penalized == (name in ("ewc", "lwf"))
    if name == "ewc":
        assert any(k.startswith("fisher.") for k in state)
    if name == "agem":
        assert state["reference_steps"]["1"] == 2  # a reference gradient at each step of task 1
    if name == "mir":
        assert state["mir.cache"].numel() == 4  # top_k of the last refresh
    if name == "lwf":
        assert not any(k.startswith("teacher.") for k in state)  # the teacher is not in the checkpoint


@pytest.mark.parametrize(
    ("name", "kind", "stage", "refused"),
    [
        ("mir", "DistributedType.FSDP", 0, True),
        ("ewc", "DistributedType.DEEPSPEED", 3, True),
        ("lwf", "DistributedType.DEEPSPEED", 2, False),
        ("agem", "DistributedType.DEEPSPEED", 2, True),
        ("agem", "DistributedType.MULTI_GPU", 0, False),
    ],
)
def test_gradient_algorithms_refuse_sharded_runs(name: str, kind: str, stage: int, refused: bool) -> None:
    from types import SimpleNamespace

    from vlacl.cl.base import require_unsharded
    from vlacl.errors import ConfigError

    accelerator = SimpleNamespace(
        distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))
    )
    ctx = SimpleNamespace(accelerator=accelerator)
    gradients = name == "agem"
    if refused:
        with pytest.raises(ConfigError, match=rf"--cl {name} needs the full trainable .* train it under DDP"):
            require_unsharded(ctx, name, gradients=gradients)  # type: ignore[arg-type]
    else:
        require_unsharded(ctx, name, gradients=gradients)  # type: ignore[arg-type]
