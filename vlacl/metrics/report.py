"""``cl-metrics`` as a library call: read runs, compute metrics and intervals, write the artifact.

Runs given as ``eval_results`` artifacts that are shards of one sharded ``eval-suite`` run (the
same ``eval_id`` in their manifests, ``--shard i/n`` with ``n > 1``) become one run: their
per-episode rows joined, the matrix rebuilt in the evaluation's stage and task order.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlacl.artifacts.names import MATRIX_CSV_NAME, MATRIX_PNG_NAME, METRICS_NAME, RESULTS_NAME
from vlacl.artifacts.reader import Artifact, open_artifact
from vlacl.artifacts.writer import ArtifactWriter, check_output_dir
from vlacl.config.cl_metrics import ClMetricsConfig
from vlacl.config.core import dump_config
from vlacl.errors import InputFormatError
from vlacl.evaluation.results import ShardInfo, check_success_suite, join_shards, read_eval_results, shard_info
from vlacl.metrics.bootstrap import bootstrap_intervals
from vlacl.metrics.cl import METRIC_NAMES, METRICS, unavailable_reason
from vlacl.metrics.matrix import ResultMatrix, read_matrix

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class MetricResult:
    """One metric of one run: a value with its interval, or the reason it is unavailable."""

    value: float | None
    ci: tuple[float, float] | None
    reason: str | None


@dataclass(frozen=True)
class RunInput:
    """A run to report on: its name, where it came from and its matrix.

    Attributes:
        name: The run's name.
        path: The matrix file or ``eval_results`` directory (the first shard's, for a joined run).
        matrix: The matrix, with counts where per-episode results exist.
        artifact: The ``eval_results`` artifact, for a run read from one artifact.
        shards: The ``eval_results`` shards joined into this run, in shard order (empty otherwise).
    """

    name: str
    path: Path
    matrix: ResultMatrix
    artifact: Artifact | None
    shards: tuple[Artifact, ...] = ()

    @property
    def source_csv(self) -> Path | None:
        """The CSV file whose bytes are the matrix as read, if there is one (none for joined shards)."""
        if self.artifact is not None:
            return self.artifact.file(MATRIX_CSV_NAME)
        if self.shards:
            return None
        return self.path if self.path.suffix.lower() == ".csv" else None

    @property
    def source(self) -> str:
        """Where the run came from, for reports: its path, or its shards' paths joined by ``, ``."""
        if self.shards:
            return ", ".join(str(a.path) for a in self.shards)
        return str(self.path)


@dataclass(frozen=True)
class RunMetrics:
    """Every metric of one run, plus notes on what was left out and why."""

    name: str
    source: str
    matrix: ResultMatrix
    metrics: dict[str, MetricResult]
    notes: tuple[str, ...]
    matrix_file: str | None

    def to_dict(self) -> dict[str, Any]:
        """The run's entry in ``metrics.json``."""
        counts = self.matrix.counts
        entry: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "num_tasks": len(self.matrix.stages),
            "num_evaluated_tasks": len(self.matrix.tasks),
            "num_episodes": None if counts is None else counts.total,
            "matrix_file": self.matrix_file,
        }
        for key in METRIC_NAMES:
            entry[key] = self.metrics[key].value
        entry["ci"] = {k: None if m.ci is None else list(m.ci) for k, m in self.metrics.items()}
        entry["unavailable"] = {k: m.reason for k, m in self.metrics.items() if m.reason is not None}
        entry["notes"] = list(self.notes)
        return entry


@dataclass(frozen=True)
class ClMetricsResult:
    """What ``cl-metrics`` computed."""

    runs: tuple[RunMetrics, ...]
    config: ClMetricsConfig

    def to_dict(self) -> dict[str, Any]:
        """The content of ``metrics.json``."""
        return {
            "metrics": list(METRIC_NAMES),
            "n_bootstrap": self.config.n_bootstrap,
            "confidence": self.config.confidence,
            "seed": self.config.seed,
            "runs": [r.to_dict() for r in self.runs],
        }


def _split_spec(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; a bare ``PATH`` -> ``(None, PATH)``."""
    name, sep, rest = spec.partition("=")
    if sep and "/" not in name and not Path(spec).exists():
        _check_name(name, spec)
        return name, Path(rest)
    return None, Path(spec)


def _check_name(name: str, spec: str) -> None:
    if not _NAME_RE.match(name):
        raise InputFormatError(f"run name {name!r} (from {spec!r}) may only hold letters, digits, '.', '_' and '-'")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def parse_run_spec(spec: str) -> tuple[str, Path]:
    """Split ``NAME=PATH`` (or a bare ``PATH``, named after its file or directory) into name and path.

    Raises:
        InputFormatError: The name holds characters other than letters, digits, ``.``, ``_``, ``-``.
    """
    name, path = _split_spec(spec)
    if name is None:
        name = _safe_name(path.stem if path.suffix.lower() in (".csv", ".json") else path.name) or "run"
    return name, path


def load_run(spec: str) -> RunInput:
    """Read one run: an ``eval_results`` artifact directory or a matrix ``.csv`` / ``.json`` file."""
    return _load_single(spec, None)


def _load_single(spec: str, artifact: Artifact | None) -> RunInput:
    """:func:`load_run`, with the ``eval_results`` artifact of a directory ``spec`` when it is already open."""
    name, path = parse_run_spec(spec)
    if path.is_dir():
        artifact = artifact or open_artifact(path, "eval_results")
        run = RunInput(name=name, path=path, matrix=read_eval_results(artifact), artifact=artifact)
    else:
        run = RunInput(name=name, path=path, matrix=read_matrix(path), artifact=None)
    _log_run(run)
    return run


@dataclass(frozen=True)
class _Shard:
    """One RUN argument that is a shard of a sharded evaluation."""

    spec: str
    name: str | None
    artifact: Artifact
    info: ShardInfo


def load_runs(specs: Sequence[str]) -> list[tuple[RunInput, str]]:
    """Read the runs of ``specs``, joining the shards of one sharded evaluation into one run.

    A RUN argument that is an ``eval_results`` artifact whose manifest records shard ``i/n`` with
    ``n > 1`` is joined with the other RUN arguments of the same ``eval_id`` (see
    :func:`~vlacl.evaluation.results.join_shards`), at the place of the first of them. The joined
    run is named by the ``NAME=`` given (on every shard or on one), else by the longest common
    prefix of the shards' directory names (``.``, ``_``, ``-`` stripped off its end), else by the
    first 8 characters of the ``eval_id``. An artifact of shard ``0/1`` is a run of its own.

    Returns:
        Each run with the RUN argument(s) it came from (joined by spaces), in the order given.

    Raises:
        InputFormatError: Unreadable or malformed input; an offline evaluation; shards missing,
            given twice, of different shard counts, or named differently.
    """
    order: list[int | str] = []  # per run: the index of its spec, or the eval_id of its shards
    artifacts: dict[int, Artifact | None] = {}
    groups: dict[str, list[_Shard]] = {}
    for i, spec in enumerate(specs):
        name, path = _split_spec(spec)
        artifact = None
        if path.is_dir():
            artifact = open_artifact(path, "eval_results")
            check_success_suite(artifact)
            info = shard_info(artifact)
            if info is not None and info.count > 1:
                if info.eval_id not in groups:
                    groups[info.eval_id] = []
                    order.append(info.eval_id)
                groups[info.eval_id].append(_Shard(spec, name, artifact, info))
                continue
        artifacts[i] = artifact
        order.append(i)
    out: list[tuple[RunInput, str]] = []
    for slot in order:
        if isinstance(slot, int):
            out.append((_load_single(specs[slot], artifacts[slot]), specs[slot]))
        else:
            shards = groups[slot]
            out.append((_join_run(shards), " ".join(s.spec for s in shards)))
    return out


def _join_run(shards: Sequence[_Shard]) -> RunInput:
    ordered = sorted(shards, key=lambda s: s.info.index)
    matrix = join_shards([(s.artifact, s.info) for s in ordered])
    run = RunInput(
        name=_shard_run_name(ordered),
        path=ordered[0].artifact.path,
        matrix=matrix,
        artifact=None,
        shards=tuple(s.artifact for s in ordered),
    )
    log.debug("joined %d shards of evaluation %s into run %s", len(ordered), ordered[0].info.eval_id, run.name)
    _log_run(run)
    return run


def _shard_run_name(shards: Sequence[_Shard]) -> str:
    given = sorted({s.name for s in shards if s.name is not None})
    if len(given) > 1:
        raise InputFormatError(
            f"the shards of evaluation {shards[0].info.eval_id[:12]} are named differently ({', '.join(given)}): "
            "they make one run; give one NAME= (on every shard, or on one of them)"
        )
    if given:
        return given[0]
    names = [_safe_name(s.artifact.path.name) for s in shards]
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("._-") or shards[0].info.eval_id[:8]


def _log_run(run: RunInput) -> None:
    counts = run.matrix.counts
    log.debug(
        "run %s from %s: %d stages, %d tasks, %s episodes",
        run.name,
        run.source,
        len(run.matrix.stages),
        len(run.matrix.tasks),
        "no" if counts is None else counts.total,
    )


def compute_run_metrics(run: RunInput, cfg: ClMetricsConfig, matrix_file: str | None = None) -> RunMetrics:
    """Compute every metric of :data:`~vlacl.metrics.cl.METRICS` for one run, with intervals where possible."""
    matrix = run.matrix
    order = matrix.trained_columns
    aligned = matrix.values[:, order]  # (T, T): row = stage, column = task trained at that stage
    init = None if matrix.init is None else matrix.init[order]  # (T,)
    notes: list[str] = []
    if matrix.untrained_tasks:
        notes.append("tasks evaluated but never trained, left out of the metrics: " + ", ".join(matrix.untrained_tasks))
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    for key in METRIC_NAMES:
        reason = unavailable_reason(METRICS[key], aligned, init, matrix.stages)
        if reason is None:
            values[key] = float(METRICS[key].fn(aligned, init))
        else:
            reasons[key] = reason
            notes.append(f"{key} unavailable: {reason}")
    intervals: dict[str, tuple[float, float]] = {}
    if cfg.n_bootstrap > 0 and matrix.counts is not None:
        log.debug("run %s: %d bootstrap resamples, seed %d", run.name, cfg.n_bootstrap, cfg.seed)
        intervals = bootstrap_intervals(
            matrix.counts,
            order,
            {key: METRICS[key].fn for key in values},
            cfg.n_bootstrap,
            cfg.confidence,
            np.random.default_rng(cfg.seed),
        )
    elif cfg.n_bootstrap > 0 and run.artifact is not None:
        notes.append(f"no confidence intervals: the eval_results artifact has no per-episode {RESULTS_NAME}")
    elif cfg.n_bootstrap > 0:
        notes.append("no confidence intervals: a matrix file has no per-episode results (an eval_results artifact has)")
    results = {
        key: MetricResult(value=values.get(key), ci=intervals.get(key), reason=reasons.get(key)) for key in METRIC_NAMES
    }
    return RunMetrics(
        name=run.name, source=run.source, matrix=matrix, metrics=results, notes=tuple(notes), matrix_file=matrix_file
    )


def _headline(run: RunMetrics) -> str:
    parts = []
    for key in ("asr", "bwt"):
        value = run.metrics[key].value
        parts.append(f"{key.upper()} {'n/a' if value is None else f'{value:.3f}'}")
    return "  ".join(parts)


def run_cl_metrics(
    specs: Sequence[str],
    cfg: ClMetricsConfig,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    command: Sequence[str] = (),
) -> ClMetricsResult:
    """Compute CL metrics for one or more runs and, with ``out``, write a ``cl_metrics`` artifact.

    Args:
        specs: Runs as ``PATH`` or ``NAME=PATH``; a path is an ``eval_results`` directory or a
            matrix ``.csv`` / ``.json`` file. The shards of one sharded evaluation make one run
            (:func:`load_runs`).
        cfg: Bootstrap and plot settings.
        out: Artifact directory to write (``metrics.json``, the matrices, ``matrix.png``).
        overwrite: Replace an existing artifact at ``out``.
        command: The command line, recorded in the manifest.

    Raises:
        VlaclError: Unreadable or malformed input, duplicate run names, or an ``out`` that may not
            be written. Nothing is written then.
    """
    if not specs:
        raise InputFormatError("no runs given: pass a matrix .csv/.json file or an eval_results directory")
    if out is not None:
        check_output_dir(out, overwrite, kind="cl_metrics")
    loaded = load_runs(specs)
    runs = [run for run, _ in loaded]
    seen: dict[str, str] = {}
    for run, spec in loaded:
        if run.name in seen:
            raise InputFormatError(
                f"two runs are named {run.name!r} ({seen[run.name]} and {spec}): name them with NAME=PATH"
            )
        seen[run.name] = spec
    single = len(runs) == 1
    files = [MATRIX_CSV_NAME if single else f"matrices/{run.name}.csv" for run in runs]
    computed = tuple(
        compute_run_metrics(run, cfg, f if out is not None else None) for run, f in zip(runs, files, strict=True)
    )
    result = ClMetricsResult(runs=computed, config=cfg)
    if out is None:
        return result
    from vlacl.metrics.plots import plot_matrices

    with ArtifactWriter(
        out, "cl_metrics", command=command, config_yaml=dump_config(cfg), seed=cfg.seed, overwrite=overwrite
    ) as writer:
        for run, rel in zip(runs, files, strict=True):
            target = writer.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            source_csv = run.source_csv
            if source_csv is not None:
                shutil.copyfile(source_csv, target)
            else:
                target.write_text(run.matrix.to_csv(), encoding="utf-8")
            if run.artifact is not None:
                writer.add_input(f"run:{run.name}", run.artifact)
            elif run.shards:
                for shard in run.shards:
                    info = shard_info(shard)
                    label = "" if info is None else f":shard{info.index}"
                    writer.add_input(f"run:{run.name}{label}", shard)
            else:
                writer.add_file_input(f"run:{run.name}", run.path)
        (writer.path / METRICS_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        if cfg.plot:
            plot_matrices([(r.name, r.matrix, _headline(r)) for r in computed], writer.path / MATRIX_PNG_NAME)
        writer.details["runs"] = [r.name for r in computed]
    return result
