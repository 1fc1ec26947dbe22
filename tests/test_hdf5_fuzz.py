"""Malformed HDF5 structures thrown at ``inspect-h5`` and the readers: a result or a VlaclError, nothing else.

Each example writes a file from random groups, datasets (any dtype and shape, empty, scalar,
strings, compounds), attributes (broken JSON, bytes, numbers) and links (dangling soft and external
links), over names that the readers look for; some files are then truncated, replaced by garbage,
or get a damaged compressed chunk. Whatever comes back must keep the interface's promises: JSON
without NaN, and arrays of ``(T, *feature.shape)`` with the feature's dtype.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from tests.hdf5_factories import garbage, truncate
from vlacl.cli.inspect_h5 import print_report
from vlacl.config.inspect_h5 import InspectH5Config
from vlacl.data import hdf5
from vlacl.data.inspect_h5 import run_inspect_h5
from vlacl.data.keymap import KeyMap
from vlacl.errors import VlaclError

PREFIXES = {
    "libero": ("data/demo_0/", "data/demo_1/", "data/demo_0/obs/", "data/demo_1/obs/", "data/demo_10/", "data/", ""),
    "flat": ("", "", "obs/", "observations/images/"),
    "none": ("", "data/", "data/demo_0/", "data/demo_0/obs/", "data/demo_10/obs/", "obs/", "observations/images/"),
}
"""Where random entries go: mostly inside the template's episodes, sometimes beside them."""
NAMES = (
    "actions",
    "action",
    "dones",
    "rewards",
    "states",
    "agentview_rgb",
    "eye_in_hand_rgb",
    "images",
    "joint_states",
    "ee_pos",
    "velocity",
    "language_instruction",
    "action_event_types",
    "timestamps",
    "obs",
    "demo_2",
    "[bold]x",
)
DTYPES = ("uint8", "float32", "float64", "int32", "bool", "S5", "vlen", "compound", "complex64", "float16")
ATTR_NAMES = (
    "problem_info",
    "env_args",
    "num_samples",
    "language_instruction",
    "instruction",
    "task",
    "bddl_file_name",
    "macros_image_convention",
    "fps",
    "goal",
)
ATTR_VALUES: tuple[Any, ...] = (
    json.dumps({"language_instruction": "open the drawer"}),
    json.dumps({"language_instruction": 3}),
    json.dumps(["libero"]),
    "{not json",
    "opengl",
    "opencv",
    "LIBERO bddl",
    b"\xff\xfe bytes",
    np.bytes_(b"pick"),
    7,
    -1,
    2.5,
    float("nan"),
    np.arange(3),
    np.array([b"a", b"b"]),
    True,
)
KEYMAPS = (
    KeyMap(),
    KeyMap(state=("joint_states",), action="action"),
    KeyMap(cameras={"front": "images"}, extra={"events": "action_event_types"}),
    KeyMap(state=("ee_pos", "velocity"), instruction_key="goal", flip_images=True),
    KeyMap(instruction="x", cameras={"a": "agentview_rgb", "b": "observations/images/images"}),
)


@dataclass(frozen=True)
class Entry:
    """One thing to create in the file."""

    kind: str
    path: str
    dtype: str = "float32"
    shape: tuple[int, ...] | None = ()
    fill: str = "ramp"
    chunked: bool = False
    value: Any = None


def _paths(template: str) -> st.SearchStrategy[str]:
    return st.builds(lambda p, n: p + n, st.sampled_from(PREFIXES[template]), st.sampled_from(NAMES))


_shapes = st.one_of(
    st.none(),
    st.tuples(),
    st.tuples(st.sampled_from((0, 1, 3, 5))),
    st.tuples(st.sampled_from((0, 1, 3, 5)), st.integers(0, 4)),
    st.tuples(st.sampled_from((1, 3, 5)), st.integers(1, 4), st.integers(1, 4), st.sampled_from((1, 3, 4))),
    st.tuples(st.sampled_from((3, 5)), st.integers(1, 3), st.integers(1, 3)),
)


def _entries(template: str) -> st.SearchStrategy[list[Entry]]:
    datasets = st.builds(
        Entry,
        kind=st.just("dataset"),
        path=_paths(template),
        dtype=st.sampled_from(DTYPES),
        shape=_shapes,
        fill=st.sampled_from(("ramp", "zeros", "nan", "inf", "big")),
        chunked=st.booleans(),
    )
    groups = st.builds(Entry, kind=st.just("group"), path=_paths(template))
    attrs = st.builds(
        Entry,
        kind=st.just("attr"),
        path=st.sampled_from(("", "data", "data/demo_0", "data/demo_1", "images", "data/demo_0/actions")),
        dtype=st.sampled_from(ATTR_NAMES),
        value=st.sampled_from(ATTR_VALUES),
    )
    links = st.builds(
        Entry,
        kind=st.sampled_from(("soft", "external", "hard")),
        path=_paths(template),
        value=st.sampled_from(("/data/demo_0/actions", "/nowhere", "/images", "/data/demo_1")),
    )
    return st.lists(st.one_of(datasets, datasets, groups, attrs, attrs, links), max_size=8)


_damage = st.sampled_from(("none", "none", "none", "none", "truncate", "garbage", "empty", "chunk"))


def _array(entry: Entry) -> Any:
    shape = entry.shape
    if shape is None:
        return h5py.Empty("f4")
    size = int(np.prod(shape))
    if entry.dtype == "vlen":
        return np.array(["instruction"] * size, dtype=object).reshape(shape)
    if entry.dtype == "S5":
        return np.full(shape, b"abcde", dtype="S5")
    if entry.dtype == "compound":
        return np.zeros(shape, dtype=[("a", "f4"), ("b", "i4")])
    values = np.arange(size, dtype=np.float64).reshape(shape)
    if entry.fill == "zeros":
        values = np.zeros(shape)
    elif entry.fill == "big":
        values = values * 1e3 - 5
    elif entry.fill in ("nan", "inf") and size:
        values.flat[size // 2] = np.nan if entry.fill == "nan" else -np.inf
    if entry.dtype in ("uint8", "int32", "bool"):
        values = np.nan_to_num(values, nan=0, posinf=0, neginf=0)
    with np.errstate(over="ignore"):
        return values.astype(entry.dtype)


def _write(path: Path, entries: list[Entry]) -> None:
    with h5py.File(path, "w") as f:
        for entry in entries:
            try:
                if entry.kind == "group":
                    f.require_group(entry.path)
                elif entry.kind == "dataset":
                    data = _array(entry)
                    chunks = entry.chunked and entry.shape is not None and len(entry.shape) > 0 and 0 not in entry.shape
                    if entry.dtype == "vlen":
                        f.create_dataset(entry.path, data=data, dtype=h5py.string_dtype())
                    else:
                        f.create_dataset(
                            entry.path,
                            data=data,
                            chunks=True if chunks else None,
                            compression="gzip" if chunks else None,
                        )
                elif entry.kind == "attr":
                    f[entry.path or "/"].attrs[entry.dtype] = entry.value
                elif entry.kind == "soft":
                    f[entry.path] = h5py.SoftLink(entry.value)
                elif entry.kind == "external":
                    f[entry.path] = h5py.ExternalLink("missing.h5", entry.value)
                elif entry.value in f:
                    f[entry.path] = f[entry.value]
            except (ValueError, TypeError, KeyError, OSError, RuntimeError):
                continue  # a name already taken, a parent that is a dataset: the structure stays as it is


def _damage_chunk(path: Path) -> None:
    with h5py.File(path, "r") as f:
        found: list[tuple[int, int]] = []

        def visit(_: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and obj.compression and obj.id.get_num_chunks() and not found:
                info = obj.id.get_chunk_info(0)
                found.append((info.byte_offset, info.size))

        f.visititems(visit)
    if found:
        offset, size = found[0]
        data = bytearray(path.read_bytes())
        data[offset : offset + size] = b"\x07" * size
        path.write_bytes(bytes(data))


@contextmanager
def _file(entries: list[Entry], damage: str, suffix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        _write(path, entries)
        if damage == "truncate":
            truncate(path, 0.6)
        elif damage == "garbage":
            garbage(path, 512)
        elif damage == "empty":
            path.write_bytes(b"")
        elif damage == "chunk":
            _damage_chunk(path)
        try:
            yield path
        finally:
            hdf5.close_cached_files()


def _check_readers(path: Path, keymap: KeyMap) -> None:
    try:
        datasets = hdf5.open_hdf5(path, keymap)
        for ds in datasets:
            json.dumps(ds.identity(), allow_nan=False)
            for ep in ds.episodes:
                for key, feature in ds.features.items():
                    values = ep.read(key)
                    assert values.shape == (ep.length, *feature.shape), (key, values.shape, feature)
                    assert values.dtype == np.dtype(feature.dtype), (key, values.dtype, feature)
    except VlaclError:
        pass


def _check_inspect(path: Path, sample_images: int) -> None:
    try:
        report = run_inspect_h5([path], InspectH5Config(window=1, chunk=1, sample_images=sample_images))
    except VlaclError:
        return
    json.dumps(report.to_dict(), allow_nan=False)
    console = Console(file=io.StringIO(), width=100)
    with mock.patch("vlacl.cli.render.stdout", console):
        print_report(report)


LIBERO_LIKE = (
    Entry("dataset", "data/demo_0/actions", "float64", (5, 7)),
    Entry("dataset", "data/demo_0/obs/agentview_rgb", "uint8", (5, 4, 4, 3), chunked=True),
    Entry("dataset", "data/demo_0/obs/joint_states", "float64", (5, 7)),
    Entry("dataset", "data/demo_0/rewards", "float64", (5,)),
    Entry("dataset", "data/demo_1/actions", "float64", (3, 7)),
    Entry("dataset", "data/demo_1/obs/agentview_rgb", "uint8", (3, 4, 4, 3), chunked=True),
    Entry("dataset", "data/demo_1/obs/joint_states", "float64", (3, 7)),
    Entry("dataset", "data/demo_1/rewards", "float64", (3,)),
    Entry("attr", "data", "problem_info", value=json.dumps({"language_instruction": "open the drawer"})),
)
FLAT_LIKE = (
    Entry("dataset", "images", "uint8", (5, 4, 4, 3), chunked=True),
    Entry("dataset", "actions", "float32", (5, 2)),
    Entry("dataset", "action_event_types", "int32", (5,)),
    Entry("dataset", "velocity", "float32", (5, 3)),
    Entry("attr", "", "language_instruction", value="drive to the dock"),
)
TEMPLATES = {"libero": LIBERO_LIKE, "flat": FLAT_LIKE, "none": ()}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    template_entries=st.sampled_from(("libero", "libero", "flat", "flat", "none")).flatmap(
        lambda t: st.tuples(st.just(t), _entries(t))
    ),
    drop=st.sets(st.integers(0, 8), max_size=1),
    damage=_damage,
    keymap=st.sampled_from((KeyMap(), KeyMap(), *KEYMAPS)),
    sample_images=st.sampled_from((0, 2)),
    suffix=st.sampled_from((".hdf5", ".h5")),
)
def test_malformed_files_end_in_a_result_or_a_vlacl_error(
    template_entries: tuple[str, list[Entry]],
    drop: set[int],
    damage: str,
    keymap: KeyMap,
    sample_images: int,
    suffix: str,
) -> None:
    template, entries = template_entries
    base = [e for i, e in enumerate(TEMPLATES[template]) if i not in drop]
    with _file(base + entries, damage, suffix) as path:
        _check_inspect(path, sample_images)
        _check_readers(path, keymap)


def test_the_intact_templates_read() -> None:
    with _file(list(LIBERO_LIKE), "none", ".hdf5") as path:
        [ds] = hdf5.open_hdf5(path, KeyMap())
        assert [ep.length for ep in ds.episodes] == [5, 3]
        assert ds.episodes[0].instruction == "open the drawer"
        assert not run_inspect_h5([path], InspectH5Config(window=1, chunk=1)).has_errors
    with _file(list(FLAT_LIKE), "none", ".h5") as path:
        [ds] = hdf5.open_hdf5(path, KeyMap())
        assert ds.episodes[0].instruction == "drive to the dock"
        assert not run_inspect_h5([path], InspectH5Config(window=1, chunk=1)).has_errors
