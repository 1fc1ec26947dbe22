"""Experience replay and MIR: the memory through real runs and checkpoints, replayed rows, resume, MIR's choice."""

from __future__ import annotations

import copy
import dataclasses
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch

from tests.train_factories import Stream
from vlacl.cl.base import SampleRef, TaskContext, get_algorithm
from vlacl.cl.er import ExperienceReplay, replay_batch_size
from vlacl.cl.memory import MemoryOptions, ReplayMemory, ReplaySampler
from vlacl.cl.mir import MaximallyInterferedRetrieval, interference_scores
from vlacl.config.lora import AdapterConfig, AdapterMode
from vlacl.errors import ConfigError
from vlacl.training.checkpoint import load_cl_state
from vlacl.training.loop import PreemptedError, StopFlag, run_train_task

B = 8
"""The stream config's batch size."""


def _rows(batch: Mapping[str, Any], start: int = 0) -> list[tuple[int, int]]:
    """(episode, frame) of the batch's rows from ``start`` on."""
    return list(zip(batch["episode_index"][start:].tolist(), batch["frame_index"][start:].tolist(), strict=True))


class _Records:
    """What a spy saw: the rows added to each batch, batch sizes; it sets a stop flag after ``after`` micro-batches."""

    def _init_records(self, stop: StopFlag | None, after: int) -> None:
        self.added: list[list[tuple[int, int]]] = []
        self.sizes: list[tuple[int, int]] = []
        self.kept_task_rows: list[bool] = []
        self.stop, self.after = stop, after

    def _record(self, batch: Mapping[str, Any], out: Mapping[str, Any]) -> None:
        n = int(batch["action"].shape[0])
        self.sizes.append((n, int(out["action"].shape[0])))
        self.kept_task_rows.append(_rows(out)[:n] == _rows(batch) and torch.equal(out["action"][:n], batch["action"]))
        self.added.append(_rows(out, n))
        if self.stop is not None and len(self.added) == self.after:
            self.stop.set(signal.SIGUSR1)


class ErSpy(_Records, ExperienceReplay):
    def __init__(self, config: Mapping[str, Any], stop: StopFlag | None = None, after: int = 0) -> None:
        ExperienceReplay.__init__(self, config)
        self._init_records(stop, after)

    def modify_batch(self, batch: dict[str, Any], task: int) -> dict[str, Any]:
        out = super().modify_batch(batch, task)
        self._record(batch, out)
        return out


class MirSpy(_Records, MaximallyInterferedRetrieval):
    def __init__(self, config: Mapping[str, Any], stop: StopFlag | None = None, after: int = 0) -> None:
        MaximallyInterferedRetrieval.__init__(self, config)
        self._init_records(stop, after)

    def modify_batch(self, batch: dict[str, Any], task: int) -> dict[str, Any]:
        out = super().modify_batch(batch, task)
        self._record(batch, out)
        return out


def _episodes(ctx: TaskContext) -> dict[int, int]:
    """Episode index -> length of the task's training episodes."""
    return {int(ep.index): int(ep.length) for ep in ctx.train_dataset.episodes}


# -- ER ----------------------------------------------------------------------------------------


def test_er_keeps_the_quota_of_each_task_and_replays_memory_samples(stream: Stream, tmp_path: Path) -> None:
    options = {"per_task": 10}
    first = ErSpy(options)
    run_train_task(stream.config(steps=2, cl="er", cl_options=options), out=tmp_path / "t0", algorithm=first)
    assert first.sizes == [(B, B)] * 2  # task 0: nothing to replay yet
    state0 = load_cl_state(tmp_path / "t0")
    assert state0 is not None
    memory0 = ReplayMemory.from_state_dict(state0)
    assert memory0.task_counts() == {0: 10}
    assert memory0 == first.memory
    assert first.ctx is not None
    episodes0 = _episodes(first.ctx)
    assert all(r.episode in episodes0 and 0 <= r.frame < episodes0[r.episode] for r in memory0.refs)
    assert len(set(memory0.refs)) == 10

    second = ErSpy(options)
    cfg = stream.config(steps=3, grad_accum=2, cl="er", cl_options=options, task="#1")
    run_train_task(cfg, out=tmp_path / "t1", prev=tmp_path / "t0", algorithm=second)
    assert second.ctx is not None
    episodes1 = _episodes(second.ctx)
    assert not set(episodes0) & set(episodes1)
    assert second.sizes == [(B, B + replay_batch_size(B, 0.5))] * 6 == [(B, 2 * B)] * 6
    assert all(second.kept_task_rows)
    # The added rows are the memory's samples of the draws 0, 1, ... of the replay sampler.
    remembered = {(r.episode, r.frame) for r in memory0.refs}
    assert all(row in remembered for rows in second.added for row in rows)
    sampler = ReplaySampler(memory0.tasks, B, sampling="uniform", seed=second.replay_seed(second.ctx), rank=0)
    expected = [[(memory0.refs[i].episode, memory0.refs[i].frame) for i in sampler.indices(d)] for d in range(6)]
    assert second.added == expected

    state1 = load_cl_state(tmp_path / "t1")
    assert state1 is not None
    assert state1["replay_batches"] == 6
    memory1 = ReplayMemory.from_state_dict(state1)
    assert memory1 == second.memory
    assert memory1.task_counts() == {0: 10, 1: 10}
    assert memory1.refs[:10] == memory0.refs
    assert all(r.episode in episodes1 and 0 <= r.frame < episodes1[r.episode] for r in memory1.refs[10:])
    assert memory1.seen == len(first.ctx.train_dataset) + len(second.ctx.train_dataset)


def test_replay_fraction_sets_the_replayed_rows(stream: Stream, tmp_path: Path) -> None:
    options = {"per_task": 4, "replay_fraction": 0.2, "sampling": "balanced"}
    run_train_task(stream.config(steps=1, cl="er", cl_options=options), out=tmp_path / "t0")
    spy = ErSpy(options)
    run_train_task(
        stream.config(steps=2, cl="er", cl_options=options, task="#1"),
        out=tmp_path / "t1",
        prev=tmp_path / "t0",
        algorithm=spy,
    )
    assert replay_batch_size(B, 0.2) == 2  # 8 * 0.2 / 0.8
    assert spy.sizes == [(B, B + 2)] * 2
    assert replay_batch_size(B, 0.0) == 0
    assert replay_batch_size(3, 0.75) == 9


class _FakeCtx(SimpleNamespace):
    """The part of a task context that filling the memory reads."""

    def __init__(self, task: int, samples: int) -> None:
        super().__init__(task=task, train_dataset=range(samples))

    def sample_refs(self, indices: Sequence[int]) -> list[SampleRef]:
        return [SampleRef("fp", self.task, int(i)) for i in indices]


def test_reservoir_is_a_bounded_uniform_sample_of_all_tasks() -> None:
    sizes, capacity, runs = (300, 600, 900), 200, 40
    counts = np.zeros(len(sizes))
    halves = np.zeros((len(sizes), 2))
    for seed in range(runs):
        memory = ReplayMemory()
        for task, n in enumerate(sizes):
            options = MemoryOptions(selection="reservoir", size=capacity, seed=seed)
            kept = memory.add_task(_FakeCtx(task, n), options)  # type: ignore[arg-type]
            assert len(memory) == min(capacity, sum(sizes[: task + 1]))
            assert kept <= capacity
        assert memory.seen == sum(sizes)
        assert len(set(memory.refs)) == capacity
        assert all(r.episode == t for r, t in zip(memory.refs, memory.tasks, strict=True))
        for t, c in memory.task_counts().items():
            counts[t] += c
        for r in memory.refs:
            halves[r.episode, int(r.frame >= sizes[r.episode] // 2)] += 1
    share = counts / (runs * capacity)
    expected = np.asarray(sizes) / sum(sizes)
    # Per run the count of a task is hypergeometric (sd <= 6.5 samples); over 40 runs the share's sd is < 0.006.
    assert np.abs(share - expected).max() < 0.025, (share, expected)
    # Within a task, both halves of its samples are kept equally often (early samples are not favoured).
    assert np.abs(halves[:, 0] / halves.sum(axis=1) - 0.5).max() < 0.05, halves


def test_er_resume_draws_the_same_replay_batches(stream: Stream, tmp_path: Path) -> None:
    options = {"per_task": 12, "replay_fraction": 0.25}
    run_train_task(stream.config(steps=1, cl="er", cl_options=options), out=tmp_path / "t0")
    cfg = stream.config(steps=5, cl="er", cl_options=options, task="#1")
    whole = ErSpy(options)
    run_train_task(cfg, out=tmp_path / "whole", prev=tmp_path / "t0", algorithm=whole)
    flag = StopFlag()
    cut = ErSpy(options, stop=flag, after=2)
    with pytest.raises(PreemptedError, match="at step 2 of 5"):
        run_train_task(cfg, out=tmp_path / "cut", prev=tmp_path / "t0", stop=flag, algorithm=cut)
    rest = ErSpy(options)
    run_train_task(cfg, out=tmp_path / "cut", prev=tmp_path / "t0", algorithm=rest)
    assert rest.ctx is not None
    assert rest.ctx.resumed
    assert len(whole.added) == 5
    assert cut.added + rest.added == whole.added
    assert rest.consumed == whole.consumed == 5


def test_cached_features_with_replay_are_refused(stream: Stream, tmp_path: Path) -> None:
    options = {"per_task": 4}
    run_train_task(stream.config(steps=1, cl="er", cl_options=options), out=tmp_path / "t0")
    cfg = stream.config(
        steps=2,
        cl="er",
        cl_options=options,
        task="#1",
        two_stage=True,
        stage1_steps=1,
        cache_features=True,
        feature_cache=tmp_path / "features",
    )
    with pytest.raises(ConfigError, match="--cache-features: --cl er joins replayed samples"):
        run_train_task(cfg, out=tmp_path / "t1", prev=tmp_path / "t0")
    assert not list((tmp_path / "features").glob("*"))  # refused before the features were computed


# -- MIR ---------------------------------------------------------------------------------------


def _brute_force_increase(
    policy: torch.nn.Module, names: Sequence[str], lr: float, batch: dict[str, Any], candidate: dict[str, Any]
) -> float:
    """One candidate's loss after minus before a real SGD step on ``batch`` of a copy of ``policy``."""
    clone = copy.deepcopy(policy)
    params = dict(clone.named_parameters())
    sgd = torch.optim.SGD([params[n] for n in names], lr=lr)
    with torch.no_grad():
        before = float(clone(candidate).loss)
    sgd.zero_grad()
    clone(batch).loss.backward()
    sgd.step()
    with torch.no_grad():
        after = float(clone(candidate).loss)
    return after - before


def test_mir_caches_the_truly_most_interfered_samples(stream: Stream, tmp_path: Path) -> None:
    options = {"per_task": 12, "refresh": 2, "candidates": 9, "top_k": 3, "virtual_lr": 0.5, "params": "all"}
    run_train_task(stream.config(steps=1, cl="mir", cl_options=options), out=tmp_path / "t0")
    mir = MaximallyInterferedRetrieval(options)
    run_train_task(
        stream.config(steps=3, cl="mir", cl_options=options, task="#1"),
        out=tmp_path / "t1",
        prev=tmp_path / "t0",
        algorithm=mir,
    )
    ctx = mir.ctx
    assert ctx is not None
    assert ctx.collate_refs is not None
    assert ctx.sample_refs is not None
    mir.on_task_start(ctx)  # as the next task would: over the memory of both tasks
    policy = ctx.policy
    batch = ctx.collate_refs(ctx.sample_refs(range(5, 5 + B)))
    ctx.step = 4
    weights = {n: p.detach().clone() for n, p in policy.named_parameters()}
    rng = torch.get_rng_state()
    mir.refresh_cache(ctx, batch)
    assert all(torch.equal(p, weights[n]) for n, p in policy.named_parameters())  # theta restored exactly
    assert torch.equal(torch.get_rng_state(), rng)

    slots = mir.candidate_slots(ctx, 4)
    assert len(slots) == 9
    params, lrs = mir.scored_params(ctx)
    assert lrs == [0.5] * len(params)
    by_id = {id(p): n for n, p in policy.named_parameters()}
    names = [by_id[id(p)] for p in params]
    assert set(names) == {n for n, p in policy.named_parameters() if p.requires_grad}
    truth = [_brute_force_increase(policy, names, 0.5, batch, ctx.collate_refs([mir.memory.refs[s]])) for s in slots]
    order = np.argsort(truth)[::-1]
    gap = truth[order[2]] - truth[order[3]]
    assert gap > 1e-5, f"near tie in the brute force ({truth}): the case does not decide"
    assert mir.cache == [slots[i] for i in order[:3]]
    assert len(set(truth)) == len(truth)

    candidates = ctx.collate_refs([mir.memory.refs[s] for s in slots])
    scores = interference_scores(policy, batch, candidates, params, lrs, seed=7)
    assert scores.shape == (9,)
    assert torch.allclose(scores, torch.tensor(truth), atol=1e-5, rtol=1e-3)


def test_mir_takes_the_learning_rates_and_the_lora_weights_from_the_run(stream: Stream, tmp_path: Path) -> None:
    options = {"per_task": 6, "refresh": 1, "candidates": 4, "top_k": 2}
    run_train_task(stream.config(steps=1, cl="mir", cl_options=options), out=tmp_path / "t0")
    spy = MirSpy(options)
    cfg = stream.config(steps=2, lr=1e-3, head_lr=3e-3, cl="mir", cl_options=options, task="#1")
    run_train_task(cfg, out=tmp_path / "t1", prev=tmp_path / "t0", algorithm=spy)
    ctx = spy.ctx
    assert ctx is not None
    params, lrs = spy.scored_params(ctx)
    by_id = {id(p): n for n, p in ctx.policy.named_parameters()}
    assert ctx.backbone_trainable
    assert {by_id[id(p)] for p in params} == set(ctx.backbone_trainable)
    assert set(lrs) == {1e-3}  # the cosine schedule ended at 0: the group's initial rate
    everything = MaximallyInterferedRetrieval({**options, "params": "all"})
    _, all_lrs = everything.scored_params(ctx)
    assert set(all_lrs) == {1e-3, 3e-3}
    assert spy.sizes == [(B, 2 * B)] * 2
    assert {row for rows in spy.added for row in rows} <= {(r.episode, r.frame) for r in spy.memory.refs}
    assert len(spy.cache) == 2


def test_mir_scores_a_stochastic_head_with_the_same_noise_before_and_after(stream: Stream, tmp_path: Path) -> None:
    options = {"per_task": 6, "candidates": 6, "top_k": 2}
    mir = MaximallyInterferedRetrieval(options)
    cfg = stream.config(
        steps=1, cl="mir", cl_options=options, model=dataclasses.replace(stream.config().model, head="flow")
    )
    run_train_task(cfg, out=tmp_path / "t0", algorithm=mir)
    ctx = mir.ctx
    assert ctx is not None
    assert ctx.collate_refs is not None
    policy = ctx.policy
    batch = ctx.collate_refs(mir.memory.refs[:3])
    candidates = [ctx.collate_refs(mir.memory.refs[:4]), ctx.collate_refs(mir.memory.refs[4:])]
    params = [p for p in policy.parameters() if p.requires_grad]
    tiny = interference_scores(policy, batch, candidates, params, [1e-12] * len(params), seed=1)
    assert tiny.shape == (6,)
    assert tiny.abs().max() < 1e-6  # no step, no change: the flow noise and time were the same both times
    real = interference_scores(policy, batch, candidates, params, [0.5] * len(params), seed=1)
    assert real.abs().max() > 1e-4
    assert torch.equal(real, interference_scores(policy, batch, iter(candidates), params, [0.5] * len(params), seed=1))


@pytest.mark.parametrize("algorithm", ["er", "mir"])
def test_resume_between_refreshes_replays_the_same_samples(stream: Stream, tmp_path: Path, algorithm: str) -> None:
    options: dict[str, Any] = {"per_task": 12, "replay_fraction": 0.25, "refresh": 3, "candidates": 8, "top_k": 5}
    if algorithm == "er":
        options = {"per_task": 12, "replay_fraction": 0.25, "sampling": "balanced"}
    spy_class: type[ErSpy | MirSpy] = MirSpy if algorithm == "mir" else ErSpy
    run_train_task(stream.config(steps=1, cl=algorithm, cl_options=options), out=tmp_path / "t0")
    cfg = stream.config(steps=5, grad_accum=2, cl=algorithm, cl_options=options, task="#1")
    whole = spy_class(options)
    run_train_task(cfg, out=tmp_path / "whole", prev=tmp_path / "t0", algorithm=whole)
    flag = StopFlag()
    cut = spy_class(options, stop=flag, after=8)  # the end of step 4: between the refreshes at steps 3 and 6
    with pytest.raises(PreemptedError, match="at step 4 of 5"):
        run_train_task(cfg, out=tmp_path / "cut", prev=tmp_path / "t0", stop=flag, algorithm=cut)
    rest = spy_class(options)
    run_train_task(cfg, out=tmp_path / "cut", prev=tmp_path / "t0", algorithm=rest)
    assert len(whole.added) == 10
    assert cut.added + rest.added == whole.added
    if algorithm == "mir":
        assert isinstance(whole, MaximallyInterferedRetrieval)
        assert isinstance(rest, MaximallyInterferedRetrieval)
        assert rest.cache == whole.cache
        assert len({row for rows in whole.added[6:] for row in rows}) <= 5  # from the cache of step 3


@pytest.mark.parametrize("mode", ["stack", "per-task"])
def test_mir_with_adapter_modes(stream: Stream, tmp_path: Path, mode: str) -> None:
    options = {"per_task": 6, "refresh": 1, "candidates": 4, "top_k": 2, "replay_fraction": 0.5}
    base = stream.config(steps=1, cl="mir", cl_options=options)
    adapter = dataclasses.replace(base.adapter, mode=cast("AdapterMode", mode))
    run_train_task(dataclasses.replace(base, adapter=adapter), out=tmp_path / "t0")
    spy = MirSpy(options)
    cfg = stream.config(steps=2, cl="mir", cl_options=options, task="#1", adapter=adapter)
    run_train_task(cfg, out=tmp_path / "t1", prev=tmp_path / "t0", algorithm=spy)
    assert spy.ctx is not None
    assert spy.ctx.backbone_trainable
    assert spy.sizes == [(B, 2 * B)] * 2
    state = load_cl_state(tmp_path / "t1")
    assert state is not None
    assert ReplayMemory.from_state_dict(state).task_counts() == {0: 6, 1: 6}


def test_mir_candidates_depend_on_rank_and_step() -> None:
    mir = MaximallyInterferedRetrieval({"candidates": 5, "top_k": 2})
    mir.memory = ReplayMemory([SampleRef("fp", 0, i) for i in range(50)], [0] * 50, 50)

    def ctx(rank: int) -> TaskContext:
        return SimpleNamespace(seed=3, task=1, accelerator=SimpleNamespace(process_index=rank))  # type: ignore[return-value]

    a, b, c = mir.candidate_slots(ctx(0), 10), mir.candidate_slots(ctx(1), 10), mir.candidate_slots(ctx(0), 11)
    assert len(set(a)) == 5
    assert a == sorted(a)
    assert a == mir.candidate_slots(ctx(0), 10)
    assert a != b
    assert a != c


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("er", {"per_taks": 5}, r"--cl er has no option 'per_taks' .*its options are selection, per_task, size"),
        (
            "er",
            {"replay_fraction": 1.0},
            r"`replay_fraction` \(--cl-opt replay_fraction\): must be in \[0, 1\), got 1.0",
        ),
        ("er", {"selection": "fifo"}, r"invalid value 'fifo' for `selection` .*one of 'quota', 'reservoir'"),
        ("er", {"per_task": 0}, r"`per_task` .*must be >= 1, got 0"),
        ("mir", {"refresh": 0}, r"`refresh` .*must be >= 1, got 0"),
        ("mir", {"top_k": 300}, r"`top_k` .*must be in \[1, candidates=256\], got 300"),
        ("mir", {"virtual_lr": -1.0}, r"`virtual_lr` .*must be > 0"),
        ("mir", {"params": "head"}, r"`params` .*one of 'lora', 'all'"),
    ],
)
def test_bad_options_give_one_clear_error(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_algorithm(name, options)


def test_defaults() -> None:
    er = get_algorithm("er")
    assert isinstance(er, ExperienceReplay)
    assert dataclasses.asdict(er.options) == {
        "selection": "quota",
        "per_task": 500,
        "size": 2000,
        "replay_fraction": 0.5,
        "sampling": "uniform",
        "seed": None,
    }
    mir = get_algorithm("mir", {"per_task": "200"})
    assert isinstance(mir, MaximallyInterferedRetrieval)
    assert (mir.mir.per_task, mir.mir.refresh, mir.mir.candidates, mir.mir.top_k) == (200, 200, 256, 64)
    assert (mir.mir.virtual_lr, mir.mir.params) == (None, "lora")
    assert AdapterConfig().mode == "shared"
