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

Manifest ``details`` that readers use (``eval-suite`` writes them):

- ``suite``: the suite evaluated, e.g. ``metaworld:cw10``; ``offline`` for action errors, which hold
  no success rates and which :func:`read_eval_results` refuses.
- ``eval_id``, ``shard`` (``{"index": i, "count": n}``), ``stages`` and ``tasks``: one evaluation
  split with ``--shard i/n`` gives ``n`` artifacts of one ``eval_id``, each holding only its own
  episodes; :func:`join_shards` checks that all ``n`` are there once each and joins them into the
  matrix of the whole evaluation (rows ``stages``, columns ``tasks``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

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
OFFLINE_SUITE = "offline"
"""The ``suite`` of an offline evaluation (action errors against recorded episodes, no success)."""

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


def check_success_suite(artifact: Artifact) -> None:
    """Refuse an ``eval_results`` artifact of the offline suite, which holds no success rates.

    Raises:
        InputFormatError: Its manifest's ``details["suite"]`` is ``offline``.
    """
    if artifact.manifest.details.get("suite") == OFFLINE_SUITE:
        raise InputFormatError(
            f"{artifact.path} is an offline evaluation (action errors, no success rates): cl-metrics needs a "
            "rollout suite (metaworld:..., libero:...)"
        )


def read_eval_results(artifact: Artifact) -> ResultMatrix:
    """Read an ``eval_results`` artifact's matrix, with per-episode counts when it has them.

    Raises:
        InputFormatError: An offline evaluation, a malformed ``matrix.csv``, or one that
            ``results.parquet`` disagrees with.
    """
    matrix, episodes = _read_checked(artifact)
    if episodes is None:
        return matrix
    rows = ([INIT_STAGE] if matrix.init is not None else []) + list(matrix.stages)
    return matrix_from_episodes(episodes, rows, matrix.tasks)


def _read_checked(artifact: Artifact) -> tuple[ResultMatrix, pd.DataFrame | None]:
    """The artifact's ``matrix.csv`` and its per-episode rows (``None`` without them), checked to agree."""
    check_success_suite(artifact)
    matrix = read_matrix(artifact.file(MATRIX_CSV_NAME))
    if not artifact.has_file(RESULTS_NAME):
        return matrix, None
    episodes = read_episodes(artifact.file(RESULTS_NAME))
    rows = ([INIT_STAGE] if matrix.init is not None else []) + list(matrix.stages)
    _check_agree(matrix, matrix_from_episodes(episodes, rows, matrix.tasks), artifact.path)
    return matrix, episodes


@dataclass(frozen=True)
class ShardInfo:
    """Where one ``eval_results`` artifact lies in a sharded evaluation (its manifest's details).

    Attributes:
        eval_id: Equal for every shard of one evaluation.
        index: The shard's index, ``0 <= index < count``.
        count: How many shards the evaluation was split into.
        stages: Every stage of the evaluation, in training order.
        tasks: Every task column of the evaluation.
    """

    eval_id: str
    index: int
    count: int
    stages: tuple[str, ...]
    tasks: tuple[str, ...]

    @property
    def label(self) -> str:
        """``i/n``, as ``eval-suite --shard`` takes it."""
        return f"{self.index}/{self.count}"


def shard_info(artifact: Artifact) -> ShardInfo | None:
    """The shard fields of an ``eval_results`` artifact's details; ``None`` when it records no ``shard``.

    Raises:
        InputFormatError: A ``shard`` whose fields are missing or malformed.
    """
    details = artifact.manifest.details
    shard = details.get("shard")
    if shard is None:
        return None

    def damaged(what: str) -> InputFormatError:
        return InputFormatError(
            f"{artifact.path}: the manifest's shard details are damaged ({what}): rerun `vlacl eval-suite`"
        )

    if not isinstance(shard, dict):
        raise damaged(f"shard is {shard!r}")
    index, count = shard.get("index"), shard.get("count")
    if not _is_int(index) or not _is_int(count) or not 0 <= index < count:
        raise damaged(f"shard index {index!r} of count {count!r}")
    eval_id = details.get("eval_id")
    if not isinstance(eval_id, str) or not eval_id:
        raise damaged(f"eval_id is {eval_id!r}")
    names: dict[str, tuple[str, ...]] = {}
    for name in ("stages", "tasks"):
        value = details.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise damaged(f"{name} is {value!r}, not a list of names")
        names[name] = tuple(value)
    return ShardInfo(eval_id=eval_id, index=index, count=count, stages=names["stages"], tasks=names["tasks"])


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_shards(shards: Sequence[tuple[Artifact, ShardInfo]]) -> None:
    """Check that ``shards`` are every shard of one evaluation, each once.

    Raises:
        InputFormatError: Shards of several evaluations, of different shard counts, or of one count
            with indices missing or given twice; the message names them and what to pass.
    """
    ids = {info.eval_id for _, info in shards}
    if len(ids) > 1:
        raise InputFormatError(f"cannot join shards of different evaluations (eval_id {', '.join(sorted(ids))})")
    first, info = shards[0]
    for other, other_info in shards[1:]:
        if other_info.count != info.count:
            raise InputFormatError(
                f"shards of evaluation {info.eval_id[:12]} disagree on the shard count: {first.path} is shard "
                f"{info.label}, {other.path} is shard {other_info.label}; pass the shards of one `vlacl eval-suite "
                "--shard i/N` split (one N)"
            )
        if (other_info.stages, other_info.tasks) != (info.stages, info.tasks):
            raise InputFormatError(
                f"shards of evaluation {info.eval_id[:12]} disagree on the stages or tasks ({first.path} and "
                f"{other.path}): their manifests are inconsistent; rerun `vlacl eval-suite` for them"
            )
    seen = Counter(i.index for _, i in shards)
    missing = [i for i in range(info.count) if i not in seen]
    twice = sorted(i for i, c in seen.items() if c > 1)
    if not missing and not twice:
        return
    problems = []
    if missing:
        labels = ", ".join(f"{i}/{info.count}" for i in missing)
        problems.append(f"shard(s) {labels} missing")
    for index in twice:
        paths = ", ".join(str(a.path) for a, i in shards if i.index == index)
        problems.append(f"shard {index}/{info.count} given more than once ({paths})")
    run_first = "; run the missing ones first" if missing else ""
    raise InputFormatError(
        f"the shards of evaluation {info.eval_id[:12]} do not fit together: {'; '.join(problems)}; pass each of "
        f"its {info.count} shard directories once (`vlacl eval-suite ... --shard i/{info.count}` for i in "
        f"0..{info.count - 1}{run_first})"
    )


def join_shards(shards: Sequence[tuple[Artifact, ShardInfo]]) -> ResultMatrix:
    """The matrix, with counts, of a sharded evaluation from all its shards' per-episode rows.

    Each shard is checked as :func:`read_eval_results` checks an artifact; the joined matrix has
    the shards' ``stages`` (with ``init`` first when episodes were evaluated before training) and
    ``tasks``.

    Raises:
        InputFormatError: :func:`check_shards` fails, an offline or inconsistent shard, or a shard
            without ``results.parquet``.
    """
    check_shards(shards)
    frames = []
    for artifact, _ in shards:
        _, episodes = _read_checked(artifact)
        if episodes is None:
            raise InputFormatError(
                f"shard {artifact.path} has no {RESULTS_NAME}: shards are joined from their per-episode results; "
                "rerun `vlacl eval-suite` for it"
            )
        frames.append(episodes)
    episodes = pd.concat(frames, ignore_index=True)
    info = shards[0][1]
    stages = list(info.stages)
    if INIT_STAGE not in stages and (episodes[STAGE_COL] == INIT_STAGE).any():
        stages.insert(0, INIT_STAGE)
    return matrix_from_episodes(episodes, stages, info.tasks)


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
