"""The result matrix of a continual-learning run: success on every task after every training stage.

CSV form (what ``eval-suite`` writes as ``matrix.csv`` and what users may write by hand)::

    stage,reach,push,pick-place
    init,0.00,0.05,0.00
    reach,0.95,0.10,0.00
    push,0.80,0.90,
    pick-place,0.70,0.60,0.85

Each row is the policy after training the task named in ``stage``, rows in training order; cells
are success rates in [0, 1], or empty when not evaluated. The optional ``init`` row holds the
success of the policy before any training. JSON form: ``{"tasks": [...], "stages": [...],
"values": [[...], ...]}`` with ``null`` for cells not evaluated and ``"init"`` allowed as a stage.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlacl.errors import InputFormatError

INIT_STAGE = "init"
STAGE_COLUMN = "stage"


@dataclass(frozen=True)
class EpisodeCounts:
    """Per-cell episode counts behind a matrix, for bootstrap intervals.

    Attributes:
        successes: (S, T) successful episodes per cell, rows as :attr:`ResultMatrix.stages`.
        episodes: (S, T) episodes per cell; 0 where the cell was not evaluated.
        init_successes: (T,) for the ``init`` row, or ``None``.
        init_episodes: (T,) for the ``init`` row, or ``None``.
    """

    successes: np.ndarray
    episodes: np.ndarray
    init_successes: np.ndarray | None = None
    init_episodes: np.ndarray | None = None

    @property
    def total(self) -> int:
        """Number of episodes in all cells."""
        extra = int(self.init_episodes.sum()) if self.init_episodes is not None else 0
        return int(self.episodes.sum()) + extra


@dataclass(frozen=True)
class ResultMatrix:
    """Success rates after each training stage (rows) on each task (columns).

    Attributes:
        tasks: Column names, as read.
        stages: The task trained at each stage, in training order; every stage is a column.
        values: (S, T) success rates, ``NaN`` where not evaluated.
        init: (T,) success before any training, or ``None`` when there is no ``init`` row.
        counts: Per-episode counts when the matrix comes from per-episode results, else ``None``.
    """

    tasks: tuple[str, ...]
    stages: tuple[str, ...]
    values: np.ndarray
    init: np.ndarray | None = None
    counts: EpisodeCounts | None = None

    @property
    def trained_columns(self) -> list[int]:
        """Column index of the task trained at each stage, in training order."""
        return [self.tasks.index(s) for s in self.stages]

    @property
    def untrained_tasks(self) -> list[str]:
        """Columns that no stage trained (evaluated only)."""
        return [t for t in self.tasks if t not in self.stages]

    def to_csv(self) -> str:
        """Serialize in the CSV form above (shortest round-trip floats, empty cells for NaN)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([STAGE_COLUMN, *self.tasks])
        rows: list[tuple[str, np.ndarray]] = []
        if self.init is not None:
            rows.append((INIT_STAGE, self.init))
        rows.extend(zip(self.stages, self.values, strict=True))
        for stage, row in rows:
            writer.writerow([stage, *("" if math.isnan(v) else repr(float(v)) for v in row)])
        return buf.getvalue()


def read_matrix(path: Path) -> ResultMatrix:
    """Read a matrix from a ``.csv`` or ``.json`` file.

    Raises:
        InputFormatError: The file is missing, of another type, or malformed; the message names
            the row and column of the first bad cell.
    """
    path = Path(path)
    if not path.exists():
        raise InputFormatError(f"{path} does not exist: pass a matrix .csv/.json file or an eval_results directory")
    if not path.is_file():
        raise InputFormatError(
            f"{path} is not a regular file: pass a matrix .csv/.json file or an eval_results directory"
        )
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start CSV files with a BOM
    except UnicodeDecodeError:
        raise InputFormatError(f"{path} is not UTF-8 text: a matrix file is CSV or JSON") from None
    except OSError as exc:
        raise InputFormatError(f"cannot read {path}: {exc.strerror}") from None
    if suffix == ".csv":
        return parse_matrix_csv(text, source=str(path))
    if suffix == ".json":
        return parse_matrix_json(text, source=str(path))
    raise InputFormatError(f"{path} has suffix {suffix!r}: a matrix file must end in .csv or .json")


def parse_matrix_csv(text: str, source: str = "<csv>") -> ResultMatrix:
    """Parse the CSV form; see the module docstring."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    try:
        lines = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise InputFormatError(f"{source} line {reader.line_num} is not valid CSV: {exc}") from None
    if not lines:
        raise InputFormatError(f"{source} is empty: expected a header `stage,<task_1>,...,<task_T>` and rows")
    _, header = lines[0]
    header = [h.strip() for h in header]
    if len(header) == 1 and ";" in header[0]:
        raise InputFormatError(
            f"{source}: the header is separated by ';'; vlacl reads comma-separated CSV with '.' as the "
            "decimal point: export the table as comma-separated CSV"
        )
    if header[0] != STAGE_COLUMN:
        raise InputFormatError(
            f"{source}: the first header cell is {header[0]!r}, expected `stage` (header: stage,<task_1>,...,<task_T>)"
        )
    rows: list[tuple[str, Sequence[Any], str]] = []
    for line_no, row in lines[1:]:
        cells = [c.strip() for c in row]
        where = f"line {line_no}"
        if len(cells) != len(header):
            raise InputFormatError(
                f"{source} {where} (stage {cells[0]!r}) has {len(cells)} cells but the header has "
                f"{len(header)}: every row needs one cell per task (leave a cell empty if not evaluated)"
            )
        rows.append((cells[0], cells[1:], where))
    return _build(header[1:], rows, source)


def parse_matrix_json(text: str, source: str = "<json>") -> ResultMatrix:
    """Parse the JSON form; see the module docstring."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFormatError(f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise InputFormatError(f"{source} is nested too deeply to be a matrix file") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise InputFormatError(f"{source} is not a readable JSON matrix: {exc}") from None
    if not isinstance(data, dict) or not {"tasks", "stages", "values"} <= set(data):
        raise InputFormatError(f'{source} must be an object with keys "tasks", "stages" and "values"')
    tasks, stages, values = data["tasks"], data["stages"], data["values"]
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise InputFormatError(f'{source}: "tasks" must be a list of task names')
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise InputFormatError(f'{source}: "stages" must be a list of stage names')
    if not isinstance(values, list) or len(values) != len(stages):
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise InputFormatError(f'{source}: "values" must be a list with one row per stage ({len(stages)}), got {got}')
    rows: list[tuple[str, Sequence[Any], str]] = []
    for i, (stage, row) in enumerate(zip(stages, values, strict=True)):
        where = f"values[{i}]"
        if not isinstance(row, list) or len(row) != len(tasks):
            n = len(row) if isinstance(row, list) else type(row).__name__
            raise InputFormatError(
                f"{source} {where} (stage {stage!r}) has {n} cells but there are {len(tasks)} tasks: "
                "every row needs one cell per task (null if not evaluated)"
            )
        rows.append((stage, row, where))
    return _build([t.strip() for t in tasks], rows, source)


def _cell(raw: Any, source: str, where: str, stage: str, task: str) -> float:
    at = f"{source} {where}, stage {stage!r}, task {task!r}"
    if raw is None or (isinstance(raw, str) and raw == ""):
        return math.nan
    if isinstance(raw, bool):
        raise InputFormatError(f"{at}: {raw!r} is not a number; cells are success rates in [0, 1]")
    if isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise InputFormatError(
                f"{at}: {raw!r} is not a number; cells are success rates in [0, 1] or empty"
            ) from None
    elif isinstance(raw, int | float):
        try:
            value = float(raw)
        except OverflowError:
            raise InputFormatError(f"{at}: the number is too large; cells are success rates in [0, 1]") from None
    else:
        raise InputFormatError(f"{at}: {raw!r} is not a number; cells are success rates in [0, 1]")
    if not math.isfinite(value):
        raise InputFormatError(f"{at}: {raw!r} is not finite; leave the cell empty if it was not evaluated")
    if not 0.0 <= value <= 1.0:
        hint = " (if the table is in percent, divide by 100)" if 1.0 < value <= 100.0 else ""
        raise InputFormatError(f"{at}: {value:g} is outside [0, 1]; cells are success rates{hint}")
    return value


def _build(tasks: Sequence[str], rows: Sequence[tuple[str, Sequence[Any], str]], source: str) -> ResultMatrix:
    if not tasks:
        raise InputFormatError(f"{source} has no task columns: expected a header `stage,<task_1>,...,<task_T>`")
    seen_tasks: dict[str, int] = {}
    for col, task in enumerate(tasks, start=1):
        if not task:
            raise InputFormatError(f"{source}: task column {col} has an empty name")
        if task == INIT_STAGE:
            raise InputFormatError(f"{source}: `{INIT_STAGE}` is reserved for the row before training, not a task name")
        if task in seen_tasks:
            raise InputFormatError(
                f"{source}: task {task!r} appears twice (columns {seen_tasks[task]} and {col}); "
                "task names must be unique"
            )
        seen_tasks[task] = col
    stages: list[str] = []
    values: list[list[float]] = []
    init: list[float] | None = None
    seen_stages: dict[str, str] = {}
    for stage, cells, where in rows:
        stage = stage.strip() if isinstance(stage, str) else stage
        if stage in seen_stages:
            raise InputFormatError(
                f"{source} {where}: stage {stage!r} appears twice (also {seen_stages[stage]}); "
                "each task is trained once per stream"
            )
        if stage != INIT_STAGE and stage not in seen_tasks:
            raise InputFormatError(
                f"{source} {where}: stage {stage!r} is not one of the task columns; a stage names the task "
                f"just trained (or is `{INIT_STAGE}`)"
            )
        seen_stages[stage] = where
        parsed = [_cell(raw, source, where, stage, task) for raw, task in zip(cells, tasks, strict=True)]
        if stage == INIT_STAGE:
            init = parsed
        else:
            stages.append(stage)
            values.append(parsed)
    if not stages:
        raise InputFormatError(f"{source} has no training stages: add one row per trained task, in training order")
    return ResultMatrix(
        tasks=tuple(tasks),
        stages=tuple(stages),
        values=np.asarray(values, dtype=np.float64),  # (S, T)
        init=None if init is None else np.asarray(init, dtype=np.float64),  # (T,)
    )
