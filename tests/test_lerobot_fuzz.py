"""Damaged LeRobot datasets thrown at the readers: a result that keeps the interface's promises, or a VlaclError.

Each example copies a valid factory-written dataset (v3.0 or v2.1; no images, embedded images,
image files or mp4 videos; episodes whose rows are not in episode order) and damages it:
``info.json`` fields of wrong types, missing or null (features not an object, a feature spec not
an object, shapes that are not lists, fps a string);
episode metadata with columns of wrong types, negative or string lengths, offsets beyond the data
files, dropped, repeated or shuffled rows; task tables that are wrong; jsonl lines of wrong types;
data files with columns of wrong types or widths, missing or extra rows, truncated, empty or
garbage bytes; broken image files and videos. Then it opens the dataset, reads every feature of
every episode and iterates the numeric columns. Whatever succeeds must keep the promises of
:class:`~vlacl.data.episode.Episode`: ``(T, *feature.shape)`` arrays of the feature's dtype, and
``iter_columns`` yielding exactly the episodes' frames, in episode order.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lerobot_factories import make_episodes, write_lerobot
from vlacl.data.episode import as_2d, numeric_keys
from vlacl.data.open import open_datasets
from vlacl.errors import VlaclError

TEMPLATES = (
    ("v3.0", "none"),
    ("v3.0", "shuffled"),
    ("v3.0", "embedded"),
    ("v3.0", "video"),
    ("v2.1", "none"),
    ("v2.1", "files"),
)
JUNK: tuple[Any, ...] = (None, "abc", "10", 0, -1, 3, 1.5, float("nan"), True, [], [1, 2], ["a"], {}, {"a": 1})
"""Values of the wrong type (or range) for any JSON field."""
INFO_FIELDS = ("codebase_version", "features", "data_path", "video_path", "fps", "chunks_size")
FEATURE_KEYS = ("observation.state", "action", "observation.images.front", "timestamp", "task_index")
SPEC_FIELDS = ("dtype", "shape", "names")
SPEC_JUNK: tuple[Any, ...] = (*JUNK, "float64", "int64", "uint8", "string", "video", "image", [3], [0], [-2], [2, 2])
COLUMN_JUNK = (
    "str",
    "null",
    "neg",
    "float",
    "big",
    "shift",
    "bool",
    "list_str",
    "list_ragged",
    "list_wide",
    "list_nested",
    "struct",
    "bytes",
)
EPISODE_COLUMNS = (
    "episode_index",
    "tasks",
    "length",
    "dataset_from_index",
    "data/chunk_index",
    "data/file_index",
    "videos/observation.images.front/from_timestamp",
    "videos/observation.images.front/file_index",
)
DATA_COLUMNS = ("observation.state", "action", "observation.images.front", "episode_index", "index")


def _junk_array(kind: str, column: pa.ChunkedArray) -> pa.Array:
    n = len(column)
    values: list[Any]
    if kind == "str":
        values = ["x"] * n
    elif kind == "null":
        values = [None] * n
    elif kind == "neg":
        values = [-3] * n
    elif kind == "float":
        values = [1.5] * n
    elif kind == "big":
        values = [10**6] * n
    elif kind == "shift":
        if pa.types.is_integer(column.type):
            return pa.compute.add(column.combine_chunks(), 1)
        values = [7] * n
    elif kind == "bool":
        values = [True] * n
    elif kind == "list_str":
        values = [["a", "b"]] * n
    elif kind == "list_ragged":
        values = [[0.5] * (i % 3 + 1) for i in range(n)]
    elif kind == "list_wide":
        values = [[0.25] * 9] * n
    elif kind == "list_nested":
        values = [[[0.5, 1.0], [2.0, 3.0]]] * n
    elif kind == "struct":
        values = [{"bytes": b"\x89PNG broken", "path": None}] * n
    else:
        values = [b"\x00\x01"] * n
    return pa.array(values)


def _rewrite_parquet(path: Path, edit: Callable[[pa.Table], pa.Table]) -> None:
    if not path.is_file():
        return
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return  # already damaged by an earlier step
    pq.write_table(edit(table), path)


def _replace_column(name: str, kind: str) -> Callable[[pa.Table], pa.Table]:
    def edit(table: pa.Table) -> pa.Table:
        if name not in table.column_names:
            return table
        i = table.column_names.index(name)
        return table.set_column(i, name, _junk_array(kind, table.column(name)))

    return edit


def _rows(op: str) -> Callable[[pa.Table], pa.Table]:
    def edit(table: pa.Table) -> pa.Table:
        n = table.num_rows
        if op == "drop_last" and n:
            return table.slice(0, n - 1)
        if op == "drop_first" and n:
            return table.slice(1)
        if op == "repeat" and n:
            return pa.concat_tables([table, table.slice(0, 1)])
        if op == "reverse":
            return table.take(pa.array(np.arange(n)[::-1]))
        if op == "empty":
            return table.slice(0, 0)
        return table

    return edit


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(info, dict):
        edit(info)
        path.write_text(json.dumps(info))


def _set(mapping: Any, key: str, value: Any, delete: bool) -> None:
    if not isinstance(mapping, dict):
        return
    if delete:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def _bytes_damage(path: Path, how: str) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "middle":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + b"\x07" * min(64, len(data) - mid) + data[mid + 64 :])
    else:
        path.write_bytes(b"PAR1" + bytes(range(256)) + b"PAR1")


def _first(root: Path, pattern: str) -> Path | None:
    return next(iter(sorted(root.glob(pattern))), None)


Damage = tuple[str, Any, Any, Any]

_info_damage = st.tuples(
    st.just("info"), st.sampled_from(INFO_FIELDS), st.sampled_from((*JUNK, "v2.1", "v3.0", 10)), st.booleans()
)
_feature_damage = st.tuples(st.just("feature"), st.sampled_from(FEATURE_KEYS), st.sampled_from(JUNK), st.booleans())
_spec_damage = st.tuples(
    st.just("spec"),
    st.sampled_from(FEATURE_KEYS),
    st.sampled_from(SPEC_FIELDS),
    st.one_of(st.sampled_from(SPEC_JUNK), st.just("<delete>")),
)
_episodes_damage = st.tuples(
    st.just("episodes"), st.sampled_from(EPISODE_COLUMNS), st.sampled_from(COLUMN_JUNK), st.just(None)
)
_episode_rows = st.tuples(
    st.just("episode_rows"),
    st.sampled_from(("drop_last", "drop_first", "repeat", "reverse", "empty")),
    st.none(),
    st.none(),
)
_tasks_damage = st.tuples(
    st.just("tasks"), st.sampled_from(("task_index", "task")), st.sampled_from(COLUMN_JUNK), st.just(None)
)
_jsonl_damage = st.tuples(
    st.just("jsonl"),
    st.sampled_from(("episodes.jsonl", "tasks.jsonl")),
    st.sampled_from(("episode_index", "length", "tasks", "task_index", "task", "<line>")),
    st.sampled_from(JUNK),
)
_data_damage = st.tuples(st.just("data"), st.sampled_from(DATA_COLUMNS), st.sampled_from(COLUMN_JUNK), st.just(None))
_data_rows = st.tuples(
    st.just("data_rows"),
    st.sampled_from(("drop_last", "drop_first", "repeat", "reverse", "empty")),
    st.none(),
    st.none(),
)
_file_damage = st.tuples(
    st.just("file"),
    st.sampled_from(
        (
            "data/**/*.parquet",
            "meta/episodes/**/*.parquet",
            "meta/tasks.parquet",
            "meta/*.jsonl",
            "meta/info.json",
            "videos/**/*.mp4",
            "images/**/*.png",
        )
    ),
    st.sampled_from(("truncate", "empty", "middle", "garbage")),
    st.none(),
)
_damages = st.lists(
    st.one_of(
        _info_damage,
        _feature_damage,
        _spec_damage,
        _spec_damage,
        _episodes_damage,
        _episodes_damage,
        _episode_rows,
        _tasks_damage,
        _jsonl_damage,
        _jsonl_damage,
        _data_damage,
        _data_damage,
        _data_rows,
        _file_damage,
    ),
    min_size=1,
    max_size=3,
)


def _apply(root: Path, damage: Damage) -> None:
    kind, a, b, c = damage
    info = root / "meta/info.json"
    if kind == "info":
        _edit_json(info, lambda d: _set(d, a, b, c))
    elif kind == "feature":
        _edit_json(info, lambda d: _set(d.get("features"), a, b, c))
    elif kind == "spec":
        _edit_json(
            info,
            lambda d: _set(
                (d.get("features") or {}).get(a) if isinstance(d.get("features"), dict) else None, b, c, c == "<delete>"
            ),
        )
    elif kind in ("episodes", "episode_rows"):
        meta = _first(root, "meta/episodes/*/*.parquet")
        if meta is not None:
            _rewrite_parquet(meta, _replace_column(a, b) if kind == "episodes" else _rows(a))
    elif kind == "tasks":
        _rewrite_parquet(root / "meta/tasks.parquet", _replace_column(a, b))
    elif kind == "jsonl":
        path = root / "meta" / a
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        if not lines:
            return
        if b == "<line>":
            lines[len(lines) // 2] = json.dumps(c)
        else:
            row = json.loads(lines[0])
            row[b] = c
            lines[0] = json.dumps(row)
        path.write_text("\n".join(lines) + "\n")
    elif kind in ("data", "data_rows"):
        files = sorted(root.glob("data/*/*.parquet"))
        if files:
            target = files[len(files) // 2]
            _rewrite_parquet(target, _replace_column(a, b) if kind == "data" else _rows(a))
    else:
        path = _first(root, a)
        if path is not None:
            _bytes_damage(path, b)


@pytest.fixture(scope="module")
def templates() -> Iterator[dict[tuple[str, str], Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for version, mode in TEMPLATES:
            images = "none" if mode == "shuffled" else mode
            cameras = ("front",) if images != "none" else ()
            truth = make_episodes(
                [5, 4, 3, 6], ["pick the cube", "open the drawer"], cameras=cameras, image_size=(8, 8)
            )
            if mode == "shuffled":  # episodes 1 and 3 in the first data file, 0 and 2 in the second
                truth = [truth[1], truth[3], truth[0], truth[2]]
            root = Path(tmp) / f"{version}-{mode}"
            write_lerobot(root, truth, version=version, images=images)  # type: ignore[arg-type]
            out[(version, mode)] = root
        yield out


def _exercise(root: Path) -> None:
    """Open, read every feature of every episode, iterate the numeric columns; check what comes back."""
    for ds in open_datasets([root]):
        json.dumps(ds.identity(), default=str)
        keys = numeric_keys(ds.features)
        read: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        for ep in ds.episodes:
            assert ep.length >= 0
            for key, feature in ds.features.items():
                values = ep.read(key)
                assert values.shape == (ep.length, *feature.shape), (key, values.shape, feature)
                assert values.dtype == np.dtype(feature.dtype), (key, values.dtype, feature)
                if key in read:
                    read[key].append(as_2d(values))
        batches = list(ds.iter_columns(keys, rows_per_batch=4))
        for key in keys:
            got = [b.columns[key] for b in batches]
            want = read[key]
            if got or want:
                np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want), err_msg=key)
        tasks = [b.task_index for b in batches]
        want_tasks = [np.full(ep.length, ep.task_index) for ep in ds.episodes]
        if tasks or want_tasks:
            np.testing.assert_array_equal(np.concatenate(tasks), np.concatenate(want_tasks))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(TEMPLATES), damages=_damages)
def test_damaged_datasets_end_in_a_result_or_a_vlacl_error(
    templates: dict[tuple[str, str], Path], template: tuple[str, str], damages: list[Damage]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        shutil.copytree(templates[template], root)
        for damage in damages:
            _apply(root, damage)
        with contextlib.suppress(VlaclError):
            _exercise(root)


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_intact_templates_read(templates: dict[tuple[str, str], Path], template: tuple[str, str]) -> None:
    _exercise(templates[template])
