"""Task streams: partition modes, task order, the seeded train/validation split and their errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lerobot_factories import make_episodes, write_lerobot
from vlacl.data.episode import ColumnBatch, Episode, EpisodeDataset
from vlacl.data.features import Feature
from vlacl.data.keymap import KeyMap
from vlacl.data.open import open_datasets
from vlacl.data.stream import PARTITION_MODES, EpisodeRef, PartitionMode, StreamTask, TaskStream, build_stream
from vlacl.errors import ConfigError, InputFormatError


@dataclass(frozen=True)
class FakeEpisode:
    """Metadata only: streams never read frames."""

    index: int
    length: int
    task_index: int
    instruction: str
    subset: str

    @property
    def source(self) -> str:
        return f"{self.subset} (episode {self.index})"

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        raise AssertionError("a task stream must not read frames")


@dataclass
class FakeDataset:
    """An :class:`EpisodeDataset` over :class:`FakeEpisode` s."""

    root: Path
    episodes: Sequence[Episode]
    format: str = "fake"
    features: Mapping[str, Feature] = field(default_factory=dict)
    keymap: KeyMap = field(default_factory=KeyMap)
    fps: float | None = None

    def identity(self) -> dict[str, Any]:
        return {"root": str(self.root)}

    def iter_columns(self, keys: Sequence[str], *, rows_per_batch: int = 65536) -> Iterator[ColumnBatch]:
        raise AssertionError("a task stream must not read columns")


def fake(name: str, tasks: Sequence[int | tuple[int, str]]) -> EpisodeDataset:
    """A dataset named ``name`` with one episode per entry: a task index, or (task index, instruction)."""
    episodes: list[Episode] = []
    for i, entry in enumerate(tasks):
        task, text = entry if isinstance(entry, tuple) else (entry, f"task {entry}")
        episodes.append(FakeEpisode(i, 10 + i, task, text, name))
    return FakeDataset(Path("/data") / name, episodes)


def single_task(name: str, episodes: int, instruction: str | None = None) -> EpisodeDataset:
    """A sub-dataset of one task (``task_index`` 0), like one LIBERO file."""
    return fake(name, [(0, instruction if instruction is not None else f"do {name}")] * episodes)


def identities(stream: TaskStream, refs: Sequence[EpisodeRef]) -> list[tuple[str, int]]:
    """Episodes by (sub-dataset, episode index): comparable across streams built from other dataset lists."""
    return [(e.subset, e.index) for e in stream.episodes(refs)]


def all_refs(task: StreamTask) -> list[EpisodeRef]:
    return sorted(task.train + task.val, key=lambda r: (r.dataset, r.episode))


# Partition modes


def test_task_index_partition_groups_episodes_across_datasets() -> None:
    a = fake("a", [(0, "pick"), (1, "place"), (0, "pick"), (2, "push")])
    b = fake("b", [(1, "place"), (2, "push")])
    stream = build_stream([a, b], partition="task_index", val_fraction=0.0)
    assert stream.partition == "task_index"
    assert [t.key for t in stream.tasks] == ["0", "1", "2"]
    assert [t.instruction for t in stream.tasks] == ["pick", "place", "push"]
    assert [t.position for t in stream.tasks] == [0, 1, 2]
    assert stream.tasks[0].train == (EpisodeRef(0, 0), EpisodeRef(0, 2))
    assert stream.tasks[1].train == (EpisodeRef(0, 1), EpisodeRef(1, 0))
    assert stream.tasks[2].train == (EpisodeRef(0, 3), EpisodeRef(1, 1))
    assert all(t.val == () for t in stream.tasks)
    assert stream.datasets == (a, b)


def test_task_index_partition_orders_tasks_by_index_not_by_first_appearance() -> None:
    stream = build_stream([fake("a", [5, 2, 5, 0])], partition="task_index", val_fraction=0.0)
    assert [t.key for t in stream.tasks] == ["0", "2", "5"]
    assert [len(t.train) for t in stream.tasks] == [1, 1, 2]


def test_dataset_partition_is_one_task_per_sub_dataset_in_the_given_order() -> None:
    datasets = [single_task("KITCHEN_stove", 3), single_task("LIVING_basket", 2), fake("mixed", [0, 1, 2])]
    stream = build_stream(datasets, partition="dataset", val_fraction=0.0)
    assert stream.partition == "dataset"
    assert [t.key for t in stream.tasks] == ["KITCHEN_stove", "LIVING_basket", "mixed"]
    assert [t.instruction for t in stream.tasks] == ["do KITCHEN_stove", "do LIVING_basket", "task 0"]
    assert stream.tasks[1].train == (EpisodeRef(1, 0), EpisodeRef(1, 1))
    assert stream.tasks[2].train == (EpisodeRef(2, 0), EpisodeRef(2, 1), EpisodeRef(2, 2))


def test_dataset_partition_keys_are_file_stems_and_repeated_names_stay_apart() -> None:
    a1 = FakeDataset(Path("/x/scene.hdf5"), single_task("s", 1).episodes)
    a2 = FakeDataset(Path("/y/scene.hdf5"), single_task("s", 2).episodes)
    other = FakeDataset(Path("/z/other.h5"), single_task("o", 1).episodes)
    stream = build_stream([a1, other, a2], partition="dataset", val_fraction=0.0)
    assert [t.key for t in stream.tasks] == ["scene", "other", "scene#2"]
    assert [len(t.train) for t in stream.tasks] == [1, 1, 2]


def test_dataset_partition_never_merges_two_datasets_whose_names_collide_with_a_suffixed_key() -> None:
    datasets = [single_task("scene#2", 1), single_task("scene", 2), single_task("scene", 3)]
    stream = build_stream(datasets, partition="dataset", val_fraction=0.0)
    keys = [t.key for t in stream.tasks]
    assert len(set(keys)) == 3, keys
    assert sorted(len(t.train) for t in stream.tasks) == [1, 2, 3]


def test_auto_uses_task_index_when_it_gives_two_tasks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vlacl.data.stream")
    stream = build_stream([fake("a", [0, 1, 0]), fake("b", [0])], val_fraction=0.0)
    assert stream.partition == "task_index"
    assert [t.key for t in stream.tasks] == ["0", "1"]
    assert [len(t.train) for t in stream.tasks] == [3, 1]
    assert "task_index gives 2 tasks" in caplog.text


def test_auto_falls_back_to_sub_datasets_when_task_index_gives_one_task(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vlacl.data.stream")
    stream = build_stream([single_task("a", 2), single_task("b", 3)], val_fraction=0.0)
    assert stream.partition == "dataset"
    assert [t.key for t in stream.tasks] == ["a", "b"]
    assert "dataset gives 2 tasks" in caplog.text


def test_auto_with_one_single_task_dataset_is_one_task() -> None:
    stream = build_stream([single_task("only", 4)], val_fraction=0.0)
    assert stream.partition == "dataset"
    assert [(t.key, len(t.train)) for t in stream.tasks] == [("only", 4)]


def test_explicit_task_index_partition_keeps_a_single_task() -> None:
    datasets = [single_task("a", 2, "pick"), single_task("b", 1, "pick")]
    stream = build_stream(datasets, partition="task_index", val_fraction=0.0)
    assert stream.partition == "task_index"
    assert [(t.key, len(t.train)) for t in stream.tasks] == [("0", 3)]


def test_task_index_meaning_other_tasks_in_other_datasets_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"task_index 0 is 'do a' in a but 'do b' in b.*partition: dataset"):
        build_stream([single_task("a", 2), single_task("b", 1)], partition="task_index")


def test_auto_partitions_by_dataset_when_task_tables_disagree(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vlacl.data.stream")
    a = fake("a", [(0, "pick"), (1, "place")])
    b = fake("b", [(0, "open"), (1, "close")])
    stream = build_stream([a, b], val_fraction=0.0)
    assert stream.partition == "dataset"
    assert [t.key for t in stream.tasks] == ["a", "b"]
    assert "disagree on task_index" in caplog.text


# Task order


def test_order_by_key_and_by_instruction_leaves_unnamed_tasks_out() -> None:
    ds = fake("a", [(0, "pick"), (1, "place"), (2, "push"), (3, "pour")])
    stream = build_stream([ds], order=["push", "0", "pour"], val_fraction=0.0)
    assert [t.key for t in stream.tasks] == ["2", "0", "3"]
    assert [t.position for t in stream.tasks] == [0, 1, 2]
    assert [t.instruction for t in stream.tasks] == ["push", "pick", "pour"]


def test_order_of_sub_datasets_by_name_and_instruction() -> None:
    datasets = [single_task("a", 1, "open"), single_task("b", 1, "close"), single_task("c", 1, "lift")]
    stream = build_stream(datasets, order=["c", "open", "close"], val_fraction=0.0)
    assert [t.key for t in stream.tasks] == ["c", "a", "b"]
    assert stream.tasks[0].train == (EpisodeRef(2, 0),)


def test_a_key_wins_over_an_instruction_of_the_same_text() -> None:
    ds = fake("a", [(0, "1"), (1, "place")])
    stream = build_stream([ds], order=["1"], val_fraction=0.0)
    assert [(t.key, t.instruction) for t in stream.tasks] == [("1", "place")]


@pytest.mark.parametrize(
    ("order", "fragments"),
    [
        (["0", "stack"], ["'stack'", "not a task of the stream", "0, 1, 2"]),
        (["0", "1", "0"], ["task '0' twice"]),
        (["pick", "0"], ["task '0' twice"]),
        (["place", "place"], ["task '1' twice"]),
    ],
)
def test_bad_order_is_a_config_error(order: list[str], fragments: list[str]) -> None:
    ds = fake("a", [(0, "pick"), (1, "place"), (2, "push")])
    with pytest.raises(ConfigError) as info:
        build_stream([ds], order=order)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_an_instruction_shared_by_two_tasks_cannot_order_them() -> None:
    datasets = [
        single_task("scene1", 2, "put the bowl on the plate"),
        single_task("scene2", 2, "put the bowl on the plate"),
    ]
    with pytest.raises(ConfigError, match=r"scene1.*scene2"):
        build_stream(datasets, order=["put the bowl on the plate"])
    stream = build_stream(datasets, order=["scene2", "scene1"])
    assert [t.key for t in stream.tasks] == ["scene2", "scene1"]


def test_empty_order_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="order is empty"):
        build_stream([fake("a", [0, 1])], order=[])


# Errors


def test_empty_sub_dataset_is_an_input_format_error_naming_it() -> None:
    with pytest.raises(InputFormatError, match="task 'hollow' has no episodes"):
        build_stream([single_task("a", 2), fake("hollow", [])], partition="dataset")


def test_empty_sub_dataset_left_out_by_the_order_is_fine() -> None:
    stream = build_stream([single_task("a", 2), fake("hollow", [])], partition="dataset", order=["a"])
    assert [t.key for t in stream.tasks] == ["a"]


def test_empty_sub_dataset_named_in_the_order_is_an_input_format_error() -> None:
    with pytest.raises(InputFormatError, match="'hollow' has no episodes"):
        build_stream([single_task("a", 2), fake("hollow", [])], partition="dataset", order=["hollow", "a"])


@pytest.mark.parametrize("partition", PARTITION_MODES)
@pytest.mark.parametrize("names", [[], ["hollow"], ["hollow", "void"]])
def test_no_episodes_at_all_is_an_input_format_error(partition: PartitionMode, names: list[str]) -> None:
    with pytest.raises(InputFormatError, match=r"no episodes|no tasks"):
        build_stream([fake(n, []) for n in names], partition=partition)


def test_unknown_partition_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown partition 'task'.*task_index, dataset, auto"):
        build_stream([fake("a", [0, 1])], partition="task")  # type: ignore[arg-type]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_val_fraction_out_of_range_is_a_config_error(fraction: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        build_stream([fake("a", [0, 1])], val_fraction=fraction)


# Train/validation split


def _check_split(task: StreamTask, refs: Sequence[EpisodeRef], val_fraction: float) -> None:
    n = len(refs)
    assert set(task.train).isdisjoint(task.val)
    assert sorted(task.train + task.val, key=lambda r: (r.dataset, r.episode)) == sorted(
        refs, key=lambda r: (r.dataset, r.episode)
    )
    assert list(task.train) == [r for r in refs if r in task.train], "train keeps the episode order"
    assert list(task.val) == [r for r in refs if r in task.val], "val keeps the episode order"
    if val_fraction == 0 or n < 2:
        assert task.val == ()
    else:
        assert 1 <= len(task.val) <= n - 1
        assert len(task.val) == min(max(round(val_fraction * n), 1), n - 1)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    val_fraction=st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 0.99]),
    seed=st.integers(0, 2**31),
)
def test_split_is_disjoint_covers_the_task_and_has_the_promised_size(n: int, val_fraction: float, seed: int) -> None:
    stream = build_stream([single_task("t", n)], val_fraction=val_fraction, seed=seed)
    [task] = stream.tasks
    _check_split(task, [EpisodeRef(0, e) for e in range(n)], val_fraction)


@pytest.mark.parametrize(
    ("n", "val_fraction", "n_val"),
    [(1, 0.5, 0), (2, 0.1, 1), (10, 0.1, 1), (10, 0.25, 2), (10, 0.0, 0), (20, 0.1, 2), (3, 0.9, 2)],
)
def test_split_sizes(n: int, val_fraction: float, n_val: int) -> None:
    [task] = build_stream([single_task("t", n)], val_fraction=val_fraction).tasks
    assert (len(task.train), len(task.val)) == (n - n_val, n_val)


def test_split_is_reproducible_and_depends_on_the_seed() -> None:
    datasets = [single_task("t", 20)]
    vals = {seed: build_stream(datasets, val_fraction=0.2, seed=seed).tasks[0].val for seed in range(8)}
    assert vals[3] == build_stream(datasets, val_fraction=0.2, seed=3).tasks[0].val
    assert len(set(vals.values())) > 1, "the seed must change the split"


def test_split_depends_on_the_task_key() -> None:
    datasets = [single_task(f"t{i}", 20) for i in range(8)]
    stream = build_stream(datasets, val_fraction=0.2, seed=0)
    held_out = {tuple(r.episode for r in t.val) for t in stream.tasks}
    assert len(held_out) > 1, "tasks of equal size must not all hold out the same episodes"


def test_split_of_a_task_survives_reordering_and_other_tasks() -> None:
    a, b, c = single_task("a", 12), single_task("b", 9), single_task("c", 15)
    full = build_stream([a, b, c], val_fraction=0.3, seed=7)
    reordered = build_stream([a, b, c], order=["c", "a"], val_fraction=0.3, seed=7)
    fewer = build_stream([c, b], val_fraction=0.3, seed=7)
    for key in ("a", "b", "c"):
        want = full.task(key)
        for other in (reordered, fewer):
            if key not in [t.key for t in other.tasks]:
                continue
            got = other.task(key)
            assert identities(other, got.val) == identities(full, want.val)
            assert identities(other, got.train) == identities(full, want.train)


def test_task_index_split_survives_reordering() -> None:
    ds = fake("a", [i % 3 for i in range(30)])
    full = build_stream([ds], val_fraction=0.2, seed=1)
    reordered = build_stream([ds], order=["2", "0", "1"], val_fraction=0.2, seed=1)
    for key in ("0", "1", "2"):
        assert reordered.task(key).val == full.task(key).val
        assert reordered.task(key).train == full.task(key).train
        assert len(full.task(key).val) == 2


# TaskStream lookups


def test_task_lookup_by_position_key_and_instruction() -> None:
    stream = build_stream([fake("a", [(0, "pick"), (1, "place"), (1, "place")])], val_fraction=0.0)
    assert stream.task(1).key == "1"
    assert stream.task("#0").key == "0"
    assert stream.task("1").instruction == "place"
    assert stream.task("pick").key == "0"
    assert stream.task(1).name == "place"
    with pytest.raises(ConfigError, match="position 2 is out of range: the stream has 2 tasks"):
        stream.task(2)
    with pytest.raises(ConfigError, match="out of range"):
        stream.task(-1)
    with pytest.raises(ConfigError, match=r"no task 'stack' in the stream; tasks \(by key\): '0', '1'"):
        stream.task("stack")


def test_name_falls_back_to_the_key_without_an_instruction() -> None:
    stream = build_stream([single_task("a", 1, ""), single_task("b", 1, "lift")], val_fraction=0.0)
    assert [t.name for t in stream.tasks] == ["a", "lift"]


def test_refs_resolve_to_their_episodes() -> None:
    a, b = fake("a", [0, 1]), fake("b", [1, 0, 1])
    stream = build_stream([a, b], val_fraction=0.0)
    refs = stream.task("1").train
    assert [(e.subset, e.index) for e in stream.episodes(refs)] == [("a", 1), ("b", 0), ("b", 2)]
    assert stream.episode(EpisodeRef(1, 1)) is b.episodes[1]


# Real LeRobot datasets


def test_lerobot_dataset_with_several_tasks_streams_by_task_index(tmp_path: Path) -> None:
    truth = make_episodes([4, 5, 3, 6, 4, 5], ["pick the cube", "open the drawer", "push the block"])
    [ds] = open_datasets([write_lerobot(tmp_path / "multi", truth)])
    stream = build_stream([ds], val_fraction=0.5, seed=3)
    assert stream.partition == "task_index"
    assert [t.instruction for t in stream.tasks] == ["pick the cube", "open the drawer", "push the block"]
    for task in stream.tasks:
        episodes = stream.episodes(task.train + task.val)
        assert sorted(e.index for e in episodes) == [t.index for t in truth if t.task == task.instruction]
        assert (len(task.train), len(task.val)) == (1, 1)


def test_lerobot_single_task_datasets_stream_by_directory(tmp_path: Path) -> None:
    for name, task in (("close_drawer", "close the drawer"), ("lift_cup", "lift the cup")):
        write_lerobot(tmp_path / "suite" / name, make_episodes([3, 4, 5], [task]))
    datasets = open_datasets([tmp_path / "suite"])
    stream = build_stream(datasets, order=["lift the cup", "close_drawer"], val_fraction=0.3)
    assert stream.partition == "dataset"
    assert [(t.key, t.instruction) for t in stream.tasks] == [
        ("lift_cup", "lift the cup"),
        ("close_drawer", "close the drawer"),
    ]
    assert [(len(t.train), len(t.val)) for t in stream.tasks] == [(2, 1), (2, 1)]
    assert {e.subset for e in stream.episodes(stream.tasks[0].train)} == {"lift_cup"}


def test_task_lookup_by_a_shared_instruction_is_refused() -> None:
    stream = build_stream([single_task("a", 2, "same"), single_task("b", 2, "same")], partition="dataset")
    assert stream.task("b").key == "b"
    with pytest.raises(ConfigError, match="several tasks have the instruction 'same'"):
        stream.task("same")
