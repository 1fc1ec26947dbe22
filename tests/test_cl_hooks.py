"""The CL hook protocol: call order through a real short run, the registry, CL state in checkpoints."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from tests.train_factories import Stream
from vlacl.artifacts.reader import open_artifact
from vlacl.cl.base import Algorithm, CLAlgorithm, SampleRef, TaskContext, available, get_algorithm, register, unregister
from vlacl.errors import ConfigError
from vlacl.training.checkpoint import load_cl_state
from vlacl.training.loop import run_train_task


class Spy(Algorithm):
    """Records every hook call; keeps a counter tensor and the refs of the first batch as its state."""

    calls: ClassVar[list[str]] = []
    contexts: ClassVar[list[TaskContext]] = []
    loaded: ClassVar[list[Mapping[str, Any]]] = []

    def on_task_start(self, ctx: TaskContext) -> None:
        Spy.calls.append("on_task_start")
        Spy.contexts.append(ctx)
        self.ctx = ctx
        self.seen = torch.zeros(())

    def observe(self, batch: dict[str, Any], task: int) -> None:
        Spy.calls.append("observe")
        self.seen += batch["action"].shape[0]

    def modify_batch(self, batch: dict[str, Any], task: int) -> dict[str, Any]:
        Spy.calls.append("modify_batch")
        return batch

    def compute_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        Spy.calls.append("compute_penalty")
        return None

    def after_backward(self, model: torch.nn.Module) -> None:
        has_grad = any(p.grad is not None for p in model.parameters() if p.requires_grad)
        Spy.calls.append("after_backward" if has_grad else "after_backward-without-grad")

    def on_task_end(self, ctx: TaskContext) -> None:
        Spy.calls.append("on_task_end")

    def state_dict(self) -> dict[str, Any]:
        Spy.calls.append("state_dict")
        return {"seen": self.seen.clone(), "task": self.ctx.task}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        Spy.calls.append("load_state_dict")
        Spy.loaded.append(dict(state))


@pytest.fixture
def spy() -> Iterator[type[Spy]]:
    register("spy")(Spy)
    Spy.calls, Spy.contexts, Spy.loaded = [], [], []
    yield Spy
    unregister("spy")


def test_hooks_run_in_the_documented_order(stream: Stream, tmp_path: Path, spy: type[Spy]) -> None:
    run_train_task(stream.config(steps=2, grad_accum=2, cl="spy"), out=tmp_path / "t0")
    micro = ["observe", "modify_batch", "compute_penalty", "after_backward"]
    assert spy.calls == ["on_task_start", *micro * 4, "on_task_end", "state_dict"]
    ctx = spy.contexts[0]
    assert ctx.task == 0
    assert ctx.num_tasks == 2
    assert ctx.prev_checkpoint is None
    assert not ctx.resumed
    assert ctx.out_dir == (tmp_path / "t0").resolve() or ctx.out_dir == tmp_path / "t0"
    assert len(ctx.train_fingerprint) == 64
    assert len(ctx.dataset_fingerprints) == 1
    state = load_cl_state(tmp_path / "t0")
    assert state is not None
    assert float(state["seen"]) == 4 * 8
    assert state["task"] == 0
    assert open_artifact(tmp_path / "t0").manifest.details["cl_algorithm"] == "spy"


def test_context_builds_batches_by_sample_reference(stream: Stream, tmp_path: Path, spy: type[Spy]) -> None:
    run_train_task(stream.config(steps=1, cl="spy"), out=tmp_path / "t0")
    ctx = spy.contexts[0]
    assert ctx.sample_refs is not None
    assert ctx.collate_refs is not None
    assert ctx.make_loader is not None
    refs = ctx.sample_refs([0, 5, 7])
    assert all(isinstance(r, SampleRef) and r.dataset_fingerprint == ctx.dataset_fingerprints[0] for r in refs)
    batch = ctx.collate_refs(refs)
    direct = [ctx.train_dataset[i] for i in (0, 5, 7)]
    assert torch.equal(batch["action"], torch.stack([s["action"] for s in direct]))
    assert batch["frame_index"].tolist() == [r.frame for r in refs]
    batches = list(ctx.make_loader(refs, 2, 0))
    assert sum(b["action"].shape[0] for b in batches) == 3


def test_prev_hands_the_cl_state_to_the_next_task(stream: Stream, tmp_path: Path, spy: type[Spy]) -> None:
    run_train_task(stream.config(steps=1, cl="spy"), out=tmp_path / "t0")
    spy.calls.clear()
    run_train_task(stream.config(steps=1, cl="spy", task="#1"), out=tmp_path / "t1", prev=tmp_path / "t0")
    assert spy.calls[:2] == ["load_state_dict", "on_task_start"]
    assert float(spy.loaded[0]["seen"]) == 8
    assert spy.loaded[0]["task"] == 0
    assert spy.contexts[-1].prev_checkpoint == tmp_path / "t0"
    assert spy.contexts[-1].task == 1


def test_registry() -> None:
    assert "seq" in available()
    seq = get_algorithm("seq")
    assert isinstance(seq, CLAlgorithm)
    assert seq.name == "seq"
    with pytest.raises(ConfigError, match=r"unknown CL algorithm 'ewc-typo' \(--cl\): registered ones are .*seq"):
        get_algorithm("ewc-typo")
    with pytest.raises(ValueError, match="already registered"):
        register("seq")(Spy)


def test_a_stream_continued_with_another_cl_warns(
    stream: Stream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A seq checkpoint keeps no state, so er after it starts with an empty memory: never silently."""
    run_train_task(stream.config(steps=1), out=tmp_path / "t0")
    with caplog.at_level("WARNING", logger="vlacl.training.loop"):
        run_train_task(stream.config(steps=1, cl="er", task="#1"), out=tmp_path / "t1", prev=tmp_path / "t0")
    (line,) = [r.getMessage() for r in caplog.records if "does not carry over" in r.getMessage()]
    assert "--cl seq" in line
    assert "--cl er" in line
    assert "train every task of a stream with one --cl" in line
