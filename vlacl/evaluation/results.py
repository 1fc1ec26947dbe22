"""The ``eval_results`` artifact: per-episode rows plus the result matrix built from them.

Files (names in :mod:`vlacl.artifacts.names`):

- ``results.parquet``: one row per evaluated episode. Columns read by ``cl-metrics``:
  ``stage`` (the task trained last by the evaluated checkpoint, or ``init`` before training),
  ``task`` (the task evaluated) and ``success`` (bool). ``eval-suite`` also writes
  ``checkpoint``, ``seed``, ``return``, ``steps`` and ``seconds``.
- ``matrix.csv``: the success-rate matrix in the form of :mod:`vlacl.metrics.matrix`; each cell
  is the mean of ``success`` over that (stage, task)'s episodes, and its row order is the
  training order.

The two must agree; a reader that finds them disagreeing refuses the artifact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vlacl.artifacts.names import MATRIX_CSV_NAME, RESULTS_NAME
from vlacl.artifacts.reader import Artifact
from vlacl.errors import InputFormatError
from vlacl.metrics.matrix import INIT_STAGE, EpisodeCounts, ResultMatrix, read_matrix

STAGE_COL = "stage"
TASK_COL = "task"
SUCCESS_COL = "success"
REQUIRED_COLUMNS: tuple[str, ...] = (STAGE_COL, TASK_COL, SUCCESS_COL)

_TOLERANCE = 1e-9


def read_episodes(path: Path) -> pd.DataFrame:
    """Read the columns ``cl-metrics`` needs from a ``results.parquet``, checking names and values.

    Raises:
        InputFormatError: The file is not parquet, lacks a required column, or ``success`` holds
            values other than true/false (or 1/0).
    """
    import pyarrow.lib
    import pyarrow.parquet as pq

    try:
        schema_names = set(pq.read_schema(path).names)
    except (pyarrow.lib.ArrowException, OSError) as exc:
        raise InputFormatError(f"{path} is not a readable parquet file ({exc}): rerun `vlacl eval-suite`") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema_names]
    if missing:
        raise InputFormatError(
            f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(schema_names))}); "
            "per-episode results need stage, task and success"
        )
    try:
        frame: pd.DataFrame = pq.read_table(path, columns=list(REQUIRED_COLUMNS)).to_pandas()
    except (pyarrow.lib.ArrowException, OSError) as exc:
        raise InputFormatError(f"{path} has unreadable data ({exc}): rerun `vlacl eval-suite`") from None
    success = frame[SUCCESS_COL]
    if success.isna().any():
        row = int(np.flatnonzero(success.isna().to_numpy())[0])
        raise InputFormatError(f"{path} row {row}: success is empty; every episode needs true or false")
    if not success.isin([0, 1, True, False]).all():
        bad = success[~success.isin([0, 1, True, False])].iloc[0]
        bad = bad.item() if isinstance(bad, np.generic) else bad
        raise InputFormatError(f"{path}: success holds {bad!r}; it must be true/false (or 1/0)")
    frame[SUCCESS_COL] = success.astype(bool)
    frame[STAGE_COL] = frame[STAGE_COL].astype(str)
    frame[TASK_COL] = frame[TASK_COL].astype(str)
    return frame


def matrix_from_episodes(episodes: pd.DataFrame, stages: Sequence[str], tasks: Sequence[str]) -> ResultMatrix:
    """Aggregate per-episode rows into a matrix with counts.

    Args:
        episodes: Rows with ``stage``, ``task`` and boolean ``success``.
        stages: Row order; may include ``init``.
        tasks: Column order.

    Raises:
        InputFormatError: A row names a stage or task outside ``stages`` / ``tasks``.
    """
    stage_pos = {s: i for i, s in enumerate(stages)}
    task_pos = {t: j for j, t in enumerate(tasks)}
    unknown_stage = sorted(set(episodes[STAGE_COL]) - set(stage_pos))
    unknown_task = sorted(set(episodes[TASK_COL]) - set(task_pos))
    if unknown_stage or unknown_task:
        what = f"stages {unknown_stage}" if unknown_stage else f"tasks {unknown_task}"
        raise InputFormatError(f"per-episode results name {what} that the matrix does not have")
    agg = episodes.groupby([STAGE_COL, TASK_COL], sort=False)[SUCCESS_COL].agg(["sum", "count"]).reset_index()
    k = np.zeros((len(stages), len(tasks)), dtype=np.int64)  # (rows, T) successes
    n = np.zeros((len(stages), len(tasks)), dtype=np.int64)  # (rows, T) episodes
    for stage, task, hits, count in zip(agg[STAGE_COL], agg[TASK_COL], agg["sum"], agg["count"], strict=True):
        i, j = stage_pos[str(stage)], task_pos[str(task)]
        k[i, j], n[i, j] = int(hits), int(count)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    init_row = stage_pos.get(INIT_STAGE)
    train_rows = [i for i, s in enumerate(stages) if s != INIT_STAGE]
    counts = EpisodeCounts(
        successes=k[train_rows],
        episodes=n[train_rows],
        init_successes=None if init_row is None else k[init_row],
        init_episodes=None if init_row is None else n[init_row],
    )
    return ResultMatrix(
        tasks=tuple(tasks),
        stages=tuple(stages[i] for i in train_rows),
        values=rates[train_rows],
        init=None if init_row is None else rates[init_row],
        counts=counts,
    )


def read_eval_results(artifact: Artifact) -> ResultMatrix:
    """Read an ``eval_results`` artifact's matrix, with per-episode counts when it has them.

    Raises:
        InputFormatError: ``matrix.csv`` is malformed, or it and ``results.parquet`` disagree.
    """
    matrix = read_matrix(artifact.file(MATRIX_CSV_NAME))
    if not artifact.has_file(RESULTS_NAME):
        return matrix
    episodes = read_episodes(artifact.file(RESULTS_NAME))
    rows = ([INIT_STAGE] if matrix.init is not None else []) + list(matrix.stages)
    from_episodes = matrix_from_episodes(episodes, rows, matrix.tasks)
    _check_agree(matrix, from_episodes, artifact.path)
    return from_episodes


def _check_agree(matrix: ResultMatrix, built: ResultMatrix, where: Path) -> None:
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = list(zip(matrix.stages, matrix.values, built.values, strict=True))
    if matrix.init is not None and built.init is not None:
        pairs.insert(0, (INIT_STAGE, matrix.init, built.init))
    for stage, expected, got in pairs:
        for task, a, b in zip(matrix.tasks, expected, got, strict=True):
            same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= _TOLERANCE
            if not same:
                raise InputFormatError(
                    f"{where}: {MATRIX_CSV_NAME} and {RESULTS_NAME} disagree at stage {stage!r}, task {task!r} "
                    f"({a:g} vs {b:g} from the episodes): the artifact is inconsistent; rerun `vlacl eval-suite`"
                )
