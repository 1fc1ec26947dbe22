"""EWC, A-GEM and LwF: their maths on hand-made cases and their state through real two-task runs."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import vlacl.cl.agem
import vlacl.cl.ewc
import vlacl.cl.lwf
from tests.train_factories import Stream
from vlacl.artifacts.names import TRAIN_METRICS_NAME
from vlacl.cl.agem import AGEM, project
from vlacl.cl.base import SampleRef, TaskContext, get_algorithm
from vlacl.cl.ewc import EWC
from vlacl.cl.lwf import LwF
from vlacl.errors import ConfigError
from vlacl.training.checkpoint import load_cl_state
from vlacl.training.loop import run_train_task

# -- a toy context: a linear "policy" over a list of samples, one process ---------------------------


class _Output:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class _Toy(torch.nn.Module):
    """A linear regressor whose forward takes a batch and returns an object with ``.loss`` (the MSE)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> _Output:
        return _Output((self.lin(batch["x"]).squeeze(-1) - batch["y"]).square().mean())


class _OneProcess:
    process_index = 0
    num_processes = 1
    device = torch.device("cpu")

    def autocast(self) -> Any:
        return torch.autocast("cpu", enabled=False)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


def _toy_context(policy: torch.nn.Module, samples: list[dict[str, torch.Tensor]], task: int) -> TaskContext:
    def batches(dataset: Sequence[dict[str, torch.Tensor]], sampler: Iterable[list[int]]) -> Iterator[dict[str, Any]]:
        for idx in sampler:
            yield {k: torch.stack([dataset[i][k] for i in idx]) for k in ("x", "y")}

    return TaskContext(
        accelerator=_OneProcess(),
        model=policy,
        task=task,
        task_key=str(task),
        task_name="toy",
        stream_name="toy",
        num_tasks=2,
        train_dataset=samples,
        dataset_fingerprints=("fp",),
        train_fingerprint="0" * 64,
        prev_checkpoint=None,
        out_dir=Path("unused"),
        sample_refs=lambda indices: [SampleRef("fp", 0, int(i)) for i in indices],
        ref_dataset=lambda refs: [samples[r.frame] for r in refs],
        batches=batches,
        policy=policy,
    )


def _samples(seed: int, n: int = 5) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, generator=g), "y": torch.randn((), generator=g)} for _ in range(n)]


def _fisher_by_hand(policy: torch.nn.Module, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of squared per-sample gradients, one ``.backward()`` per sample on a deep copy."""
    total: dict[str, torch.Tensor] = {}
    for s in samples:
        clone = copy.deepcopy(policy)
        clone({"x": s["x"][None], "y": s["y"][None]}).loss.backward()
        for name, p in clone.named_parameters():
            assert p.grad is not None
            total[name] = total.get(name, torch.zeros_like(p)) + p.grad.square()
    return {k: v / len(samples) for k, v in total.items()}


# -- EWC ---------------------------------------------------------------------------------------------


def test_ewc_penalty_matches_a_hand_computed_value() -> None:
    policy = _Toy()
    ewc = EWC({"lam": 2.0})
    ewc.load_state_dict(
        {
            "fisher.lin.weight": torch.tensor([[1.0, 2.0]]),
            "fisher.lin.bias": torch.tensor([3.0]),
            "anchor.lin.weight": torch.tensor([[0.5, 0.5]]),
            "anchor.lin.bias": torch.tensor([-1.0]),
            "tasks": [0],
        }
    )
    with torch.no_grad():
        policy.lin.weight.copy_(torch.tensor([[1.5, 0.0]]))  # moved by (+1, -0.5)
        policy.lin.bias.copy_(torch.tensor([0.0]))  # moved by +1
    ewc.on_task_start(_toy_context(policy, _samples(0), task=1))
    penalty = ewc.compute_penalty(policy)
    assert penalty is not None
    # lam / 2 * (1 * 1 + 2 * 0.25 + 3 * 1) = 1 * 4.5
    assert penalty.item() == pytest.approx(4.5, abs=1e-6)
    torch.autograd.backward(penalty)
    # d/dtheta = lam * F * d = 2 * (1 * 1, 2 * -0.5) and 2 * 3 * 1
    assert policy.lin.weight.grad is not None
    assert policy.lin.bias.grad is not None
    assert policy.lin.weight.grad[0].tolist() == pytest.approx([2.0, -2.0])
    assert policy.lin.bias.grad.tolist() == pytest.approx([6.0])


def test_ewc_has_no_penalty_on_the_first_task() -> None:
    policy = _Toy()
    ewc = EWC()
    ewc.on_task_start(_toy_context(policy, _samples(0), task=0))
    assert ewc.compute_penalty(policy) is None


def test_ewc_fisher_is_the_mean_squared_per_sample_gradient_and_decays_online() -> None:
    torch.manual_seed(0)
    policy = _Toy()
    first, second = _samples(1), _samples(2)
    ewc = EWC({"decay": 0.5, "fisher_samples": 100})
    ctx = _toy_context(policy, first, task=0)
    ewc.on_task_start(ctx)
    ewc.on_task_end(ctx)
    f1 = _fisher_by_hand(policy, first)
    for name, value in f1.items():
        torch.testing.assert_close(ewc.fisher[name], value)
        torch.testing.assert_close(ewc.anchors[name], dict(policy.named_parameters())[name].detach())
    with torch.no_grad():
        policy.lin.weight.add_(0.3)  # the second task ends at other weights
    ctx = _toy_context(policy, second, task=1)
    ewc.on_task_start(ctx)
    ewc.on_task_end(ctx)
    f2 = _fisher_by_hand(policy, second)
    for name in f1:
        torch.testing.assert_close(ewc.fisher[name], 0.5 * f1[name] + f2[name])
    assert ewc.anchors["lin.weight"].tolist() == policy.lin.weight.detach().tolist()
    assert ewc.tasks == [0, 1]


def test_ewc_fisher_uses_a_subset_of_fisher_samples() -> None:
    policy = _Toy()
    samples = _samples(3, n=8)
    ewc = EWC({"fisher_samples": 3, "seed": 7})
    ctx = _toy_context(policy, samples, task=0)
    ewc.on_task_end(ctx)
    subset = vlacl.cl.ewc.sample_subset(8, 3, 7, 0)
    assert len(subset) == 3
    expected = _fisher_by_hand(policy, [samples[i] for i in subset])
    torch.testing.assert_close(ewc.fisher["lin.weight"], expected["lin.weight"])


class _LoadedEWC(EWC):
    """EWC that remembers the state it was given."""

    loaded: dict[str, Any]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loaded = dict(state)
        super().load_state_dict(state)


def _metrics(out: Path) -> list[dict[str, Any]]:
    lines = (out / TRAIN_METRICS_NAME).read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "terms" in r]


def test_ewc_state_goes_through_the_task_checkpoint(stream: Stream, tmp_path: Path) -> None:
    options = {"fisher_samples": 8, "lam": 1000.0}
    run_train_task(stream.config(steps=2, cl="ewc", cl_options=options), out=tmp_path / "t0")
    saved = load_cl_state(tmp_path / "t0")
    assert saved is not None
    fisher = {k: v for k, v in saved.items() if k.startswith("fisher.")}
    assert fisher
    assert any(k.startswith("fisher.backbone.") for k in fisher)
    assert {k.replace("fisher.", "anchor.", 1) for k in fisher} <= set(saved)
    assert sum(float(v.sum()) for v in fisher.values()) > 0
    assert saved["tasks"] == [0]
    assert "cl_penalty" not in _metrics(tmp_path / "t0")[-1]["terms"]

    algo = _LoadedEWC(options)
    cfg = stream.config(steps=3, cl="ewc", cl_options=options, task="#1", log_every=3)
    run_train_task(cfg, out=tmp_path / "t1", prev=tmp_path / "t0", algorithm=algo)
    assert set(algo.loaded) == set(saved)
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(algo.loaded[key].cpu(), value)
    terms = _metrics(tmp_path / "t1")[-1]["terms"]
    assert terms["cl_penalty"] > 0
    after = load_cl_state(tmp_path / "t1")
    assert after is not None
    assert after["tasks"] == [0, 1]
    name = next(iter(fisher))
    assert not torch.equal(after[name], saved[name])  # the second task's Fisher was added


# -- A-GEM -------------------------------------------------------------------------------------------


def test_agem_projection_on_hand_made_vectors() -> None:
    g, ref = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    new, projected = project(g, ref)
    assert bool(projected)
    assert new.tolist() == [1.0, 0.0]  # g - (-1 / 1) * ref
    new, projected = project(torch.tensor([2.0, 0.0, -3.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert bool(projected)
    assert new.tolist() == pytest.approx([7 / 3, 1 / 3, -8 / 3])  # g + (1 / 3) * ref
    assert float(new @ torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(0.0, abs=1e-6)
    g = torch.tensor([1.0, 1.0])
    new, projected = project(g, ref)  # g . ref = 1 >= 0
    assert not bool(projected)
    assert torch.equal(new, g)
    new, projected = project(torch.tensor([1.0, 0.0]), ref)  # orthogonal: left alone
    assert not bool(projected)
    assert new.tolist() == [1.0, 0.0]


def test_agem_projects_the_accumulated_gradient_of_the_last_micro_batch() -> None:
    """Through the hooks on the toy: memory of one sample; p.grad ends as the exact projection."""
    policy = _Toy()
    with torch.no_grad():
        policy.lin.weight.copy_(torch.tensor([[1.0, 0.0]]))
        policy.lin.bias.zero_()
    memory_sample = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor(0.0)}  # loss (w0 + b)^2: g_ref = (2, 0; 2)
    agem = AGEM({"per_task": 1, "ref_batch": 1})
    ctx = _toy_context(policy, [memory_sample], task=0)
    ctx.grad_accum = 2
    agem.on_task_end(ctx)  # the memory now holds the sample
    assert len(agem.memory) == 1
    ctx = _toy_context(policy, [memory_sample], task=1)
    ctx.grad_accum = 2
    agem.on_task_start(ctx)
    policy.lin.weight.grad = torch.tensor([[-1.0, 3.0]])
    policy.lin.bias.grad = torch.tensor([-5.0])
    agem.after_backward(policy)  # the first micro-batch: nothing happens
    assert policy.lin.weight.grad.tolist() == [[-1.0, 3.0]]
    agem.after_backward(policy)
    # g = (-1, 3, -5), g_ref = (2, 0, 2): g . g_ref = -12, g_ref . g_ref = 8 -> g + 1.5 g_ref = (2, 3, -2)
    assert policy.lin.weight.grad.tolist() == [[2.0, 3.0]]
    assert policy.lin.bias.grad.tolist() == [-2.0]
    policy.lin.weight.grad = torch.tensor([[1.0, 3.0]])
    policy.lin.bias.grad = torch.tensor([1.0])
    agem.after_backward(policy)
    agem.after_backward(policy)
    assert policy.lin.weight.grad.tolist() == [[1.0, 3.0]]  # g . g_ref = 4 >= 0: left alone
    assert policy.lin.bias.grad.tolist() == [1.0]
    state = agem.state_dict()
    assert state["projected_steps"] == {"1": 1}
    assert state["reference_steps"] == {"1": 2}
    assert state["consumed"] == 2


def test_agem_records_projections_through_two_tasks(stream: Stream, tmp_path: Path) -> None:
    options = {"per_task": 16, "ref_batch": 4}
    run_train_task(stream.config(steps=1, cl="agem", cl_options=options), out=tmp_path / "t0")
    first = load_cl_state(tmp_path / "t0")
    assert first is not None
    assert first["memory.episode"].numel() == 16
    assert first["reference_steps"] == {"0": 0}  # no memory during the first task
    cfg = stream.config(steps=3, cl="agem", cl_options=options, task="#1")
    run_train_task(cfg, out=tmp_path / "t1", prev=tmp_path / "t0")
    second = load_cl_state(tmp_path / "t1")
    assert second is not None
    assert second["reference_steps"] == {"0": 0, "1": 3}
    assert second["consumed"] == 3
    assert second["memory.episode"].numel() == 32
    assert second["memory.task"].tolist() == [0] * 16 + [1] * 16


# -- LwF ---------------------------------------------------------------------------------------------


class _RecordingLwF(LwF):
    """LwF that records every penalty it returns."""

    penalties: list[float | None]

    def compute_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        penalty = super().compute_penalty(model)
        self.penalties = getattr(self, "penalties", [])
        self.penalties.append(None if penalty is None else float(penalty.detach()))
        return penalty


@pytest.mark.parametrize("head", ["mlp", "flow"])
def test_lwf_penalty_is_zero_at_the_start_and_grows(stream: Stream, tmp_path: Path, head: str) -> None:
    from vlacl.config.policy import PolicyConfig

    model = PolicyConfig(head=head, hidden_sizes=(64,))  # type: ignore[arg-type]
    first = _RecordingLwF()
    run_train_task(stream.config(steps=1, cl="lwf", model=model), out=tmp_path / "t0", algorithm=first)
    assert first.penalties == [None]
    assert "cl_penalty" not in _metrics(tmp_path / "t0")[-1]["terms"]
    saved = load_cl_state(tmp_path / "t0")
    assert saved is not None
    assert not any(k.startswith("teacher.") for k in saved)

    second = _RecordingLwF({"lam": 10.0})
    cfg = stream.config(steps=3, cl="lwf", model=model, task="#1", lr=1e-2, head_lr=1e-2)
    run_train_task(cfg, out=tmp_path / "t1", prev=tmp_path / "t0", algorithm=second)
    penalties = second.penalties
    assert len(penalties) == 3
    assert all(p is not None for p in penalties)
    assert penalties[0] == 0.0  # student == teacher before the first optimizer step
    assert penalties[1] is not None
    assert penalties[1] > 0
    assert not second.teacher  # dropped at the task's end
    after = load_cl_state(tmp_path / "t1")
    assert after is not None
    assert not any(k.startswith("teacher.") for k in after)


def test_lwf_keeps_the_teacher_in_the_state_while_a_task_runs() -> None:
    lwf = LwF()
    policy = _Toy()
    lwf.load_state_dict({"teacher.lin.weight": torch.ones(1, 2), "lam": 1.0})
    assert torch.equal(lwf.state_dict()["teacher.lin.weight"], torch.ones(1, 2))
    lwf.on_task_end(_toy_context(policy, _samples(0), task=1))
    assert set(lwf.state_dict()) == {"lam"}


# -- options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("ewc", {"lamda": 1.0}, r"--cl ewc has no option 'lamda' .*its options are lam, decay, fisher_samples"),
        ("ewc", {"decay": 0.0}, r"`decay`.*must be in \(0, 1\], got 0.0"),
        ("ewc", {"decay": 1.5}, r"`decay`.*must be in \(0, 1\], got 1.5"),
        ("ewc", {"lam": -1.0}, r"`lam`.*must be a finite number >= 0, got -1.0"),
        ("ewc", {"fisher_samples": 0}, r"`fisher_samples`.*must be >= 1, got 0"),
        ("ewc", {"params": "head"}, r"params"),
        ("agem", {"per_task": 0}, r"`per_task`.*must be >= 1, got 0"),
        ("agem", {"ref_batch": 0}, r"`ref_batch`.*must be >= 1"),
        ("agem", {"selection": "fifo"}, r"selection"),
        ("agem", {"memory": 10}, r"--cl agem has no option 'memory'"),
        ("lwf", {"lam": -0.5}, r"`lam`.*must be a finite number >= 0, got -0.5"),
        ("lwf", {"temperature": 2}, r"--cl lwf has no option 'temperature' .*its options are lam, seed"),
    ],
)
def test_bad_options_are_one_clear_config_error(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_algorithm(name, options)


def test_defaults_and_string_values() -> None:
    ewc = get_algorithm("ewc", {"lam": "5", "decay": "0.9", "params": "lora"})
    assert isinstance(ewc, EWC)
    assert (ewc.options.lam, ewc.options.decay, ewc.options.params, ewc.options.fisher_samples) == (
        5.0,
        0.9,
        "lora",
        256,
    )
    agem = get_algorithm("agem")
    assert isinstance(agem, AGEM)
    assert (agem.options.per_task, agem.options.size, agem.options.ref_batch) == (500, 2000, None)
    lwf = get_algorithm("lwf")
    assert isinstance(lwf, LwF)
    assert lwf.options.lam == 1.0


# -- resume ------------------------------------------------------------------------------------------


def _weights(out: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    from vlacl.artifacts.names import ACTION_HEAD_NAME, ADAPTER_WEIGHTS_NAME, ADAPTERS_DIR

    files = [out / ADAPTERS_DIR / "shared" / ADAPTER_WEIGHTS_NAME, out / ACTION_HEAD_NAME]
    return {f"{f.name}/{k}": v.numpy().tobytes() for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize(("name", "options"), [("agem", {"per_task": 16, "ref_batch": 4}), ("lwf", {"lam": 5.0})])
def test_a_resumed_task_ends_like_an_uninterrupted_one(
    stream: Stream, tmp_path: Path, name: str, options: dict[str, Any]
) -> None:
    """The consumed reference batches (A-GEM) and the task-start teacher (LwF) travel in the resume state."""
    import signal

    from vlacl.config.policy import PolicyConfig
    from vlacl.training.loop import PreemptedError, StopFlag

    model = PolicyConfig(head="flow", hidden_sizes=(64,))
    run_train_task(stream.config(steps=1, cl=name, cl_options=options, model=model), out=tmp_path / "t0")
    cfg = stream.config(steps=4, grad_accum=2, cl=name, cl_options=options, model=model, task="#1", lr=1e-2)
    run_train_task(cfg, out=tmp_path / "whole", prev=tmp_path / "t0")

    flag = StopFlag()
    base = {"agem": AGEM, "lwf": LwF}[name]

    class Stopper(base):  # type: ignore[valid-type,misc]
        calls = 0

        def after_backward(self, model: torch.nn.Module) -> None:
            super().after_backward(model)
            Stopper.calls += 1
            if Stopper.calls == 4:  # the end of step 2
                flag.set(signal.SIGUSR1)

    with pytest.raises(PreemptedError, match="at step 2 of 4"):
        run_train_task(cfg, out=tmp_path / "cut", prev=tmp_path / "t0", stop=flag, algorithm=Stopper(options))
    resumed = get_algorithm(name, options)
    run_train_task(cfg, out=tmp_path / "cut", prev=tmp_path / "t0", algorithm=resumed)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert [k for k in a if a[k] != b[k]] == []
    whole, cut = load_cl_state(tmp_path / "whole"), load_cl_state(tmp_path / "cut")
    assert whole is not None
    assert cut is not None
    assert {k: v for k, v in whole.items() if not isinstance(v, torch.Tensor)} == {
        k: v for k, v in cut.items() if not isinstance(v, torch.Tensor)
    }
    if name == "agem":
        assert cut["consumed"] == 4
        assert cut["reference_steps"]["1"] == 4
