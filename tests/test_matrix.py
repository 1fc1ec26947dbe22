"""Reading result matrices: the CSV and JSON forms, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlacl.errors import InputFormatError
from vlacl.metrics.matrix import parse_matrix_csv, parse_matrix_json, read_matrix


def test_csv_with_init_and_empty_cells() -> None:
    m = parse_matrix_csv("stage,a,b\ninit,0,0.5\na,0.9,\nb,0.8,0.7\n")
    assert m.tasks == ("a", "b")
    assert m.stages == ("a", "b")
    assert m.init is not None
    np.testing.assert_array_equal(m.init, [0.0, 0.5])
    assert m.values[0, 0] == 0.9
    assert math.isnan(m.values[0, 1])
    assert m.counts is None


def test_init_row_anywhere_and_whitespace_and_blank_lines() -> None:
    m = parse_matrix_csv(" stage , a , b \n\na , 0.9 , 0.1\ninit,0.0,0.0\n\nb,0.5,0.6\n")
    assert m.tasks == ("a", "b")
    assert m.stages == ("a", "b")
    assert m.init is not None


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("stage,a,b\na,0.5,high\n", ["line 2", "stage 'a'", "task 'b'", "'high' is not a number"]),
        ("stage,a,b\na,0.5,1.5\n", ["line 2", "task 'b'", "1.5 is outside [0, 1]"]),
        ("stage,a,b\na,85,0.1\n", ["task 'a'", "85 is outside [0, 1]", "divide by 100"]),
        ("stage,a,b\na,-0.1,0.1\n", ["-0.1 is outside [0, 1]"]),
        ("stage,a,b\na,nan,0.1\n", ["'nan' is not finite"]),
        ("stage,a,b\na,0.5\n", ["line 2", "has 2 cells but the header has 3"]),
        ("stage,a,b\na,0.5,0.1,0.3\n", ["has 4 cells but the header has 3"]),
        ("stage,a,a\na,0.5,0.1\n", ["task 'a' appears twice (columns 1 and 2)"]),
        ("stage,a,b\na,0.5,0.1\na,0.5,0.1\n", ["line 3", "stage 'a' appears twice (also line 2)"]),
        ("stage,a,b\nc,0.5,0.1\n", ["stage 'c' is not one of the task columns"]),
        ("task,a,b\na,0.5,0.1\n", ["first header cell is 'task'", "expected `stage`"]),
        ("stage,a,b\ninit,0.0,0.0\n", ["no training stages"]),
        ("stage\na\n", ["no task columns"]),
        ("stage,a,,b\na,0.1,0.2,0.3\n", ["task column 2 has an empty name"]),
        ("stage,init,a\na,0.1,0.2\n", ["`init` is reserved"]),
        ("", ["is empty"]),
    ],
)
def test_bad_csv_gets_one_clear_error(text: str, fragments: list[str]) -> None:
    with pytest.raises(InputFormatError) as info:
        parse_matrix_csv(text, source="m.csv")
    message = str(info.value)
    assert message.startswith("m.csv")
    for fragment in fragments:
        assert fragment in message


def test_json_form_matches_csv_form() -> None:
    text = json.dumps(
        {"tasks": ["a", "b"], "stages": ["init", "a", "b"], "values": [[0.0, 0.5], [0.9, None], [0.8, 0.7]]}
    )
    j = parse_matrix_json(text)
    c = parse_matrix_csv("stage,a,b\ninit,0,0.5\na,0.9,\nb,0.8,0.7\n")
    assert (j.tasks, j.stages) == (c.tasks, c.stages)
    np.testing.assert_array_equal(j.values, c.values)
    assert j.init is not None
    assert c.init is not None
    np.testing.assert_array_equal(j.init, c.init)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"tasks": ["a"], "stages": ["a"]}, 'keys "tasks", "stages" and "values"'),
        ({"tasks": ["a"], "stages": ["a"], "values": [[0.1], [0.2]]}, "one row per stage (1), got 2"),
        ({"tasks": ["a", "b"], "stages": ["a"], "values": [[0.1]]}, "values[0] (stage 'a') has 1 cells"),
        ({"tasks": ["a"], "stages": ["a"], "values": [["x"]]}, "'x' is not a number"),
        ({"tasks": ["a"], "stages": ["a"], "values": [[True]]}, "True is not a number"),
        ({"tasks": [1], "stages": ["a"], "values": [[0.1]]}, '"tasks" must be a list of task names'),
    ],
)
def test_bad_json_gets_one_clear_error(data: object, fragment: str) -> None:
    with pytest.raises(InputFormatError) as info:
        parse_matrix_json(json.dumps(data), source="m.json")
    assert fragment in str(info.value)


def test_read_matrix_dispatches_on_suffix_and_refuses_others(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("stage,a\na,1\n")
    assert read_matrix(tmp_path / "m.csv").stages == ("a",)
    (tmp_path / "m.txt").write_text("stage,a\na,1\n")
    with pytest.raises(InputFormatError, match=r"must end in \.csv or \.json"):
        read_matrix(tmp_path / "m.txt")
    with pytest.raises(InputFormatError, match="does not exist"):
        read_matrix(tmp_path / "missing.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputFormatError, match="not UTF-8"):
        read_matrix(tmp_path / "bin.csv")


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda t: st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=t * (t + 1), max_size=t * (t + 1))
    )
)
def test_csv_round_trip_is_exact(cells: list[float | None]) -> None:
    t = int((math.isqrt(4 * len(cells) + 1) - 1) / 2)
    tasks = [f"task-{i}" for i in range(t)]
    rows = ["stage," + ",".join(tasks)]
    for i, stage in enumerate(["init", *tasks]):
        row = cells[i * t : (i + 1) * t]
        rows.append(stage + "," + ",".join("" if v is None else repr(v) for v in row))
    first = parse_matrix_csv("\n".join(rows) + "\n")
    second = parse_matrix_csv(first.to_csv())
    np.testing.assert_array_equal(first.values, second.values)
    assert first.init is not None
    assert second.init is not None
    np.testing.assert_array_equal(first.init, second.init)
    assert (first.tasks, first.stages) == (second.tasks, second.stages)


def test_spreadsheet_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("stage,a\r\na,0.5\r\n".encode("utf-8-sig"))
    assert read_matrix(path).values[0, 0] == 0.5
    assert parse_matrix_csv("\ufeffstage,a\na,0.5\n").tasks == ("a",)


def test_semicolon_csv_gets_a_hint() -> None:
    with pytest.raises(InputFormatError, match=r"separated by ';'.*export the table as comma-separated CSV"):
        parse_matrix_csv("stage;a;b\na;0,5;0,1\n", source="m.csv")


def test_oversized_csv_field_is_an_input_error() -> None:
    with pytest.raises(InputFormatError, match="line 2 is not valid CSV"):
        parse_matrix_csv("stage,a\na," + "1" * 200_000 + "\n", source="m.csv")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"tasks": ["a"], "stages": ["a"], "values": [[' + "1" * 400 + "]]}", "the number is too large"),
        ('{"tasks": ["a"], "stages": ["a"], "values": [[' + "1" * 5000 + "]]}", "not a readable JSON matrix"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_pathological_json_is_an_input_error(text: str, fragment: str) -> None:
    with pytest.raises(InputFormatError) as info:
        parse_matrix_json(text, source="m.json")
    assert fragment in str(info.value)


def test_a_device_file_is_not_a_matrix() -> None:
    with pytest.raises(InputFormatError, match="is not a regular file"):
        read_matrix(Path("/dev/null"))
