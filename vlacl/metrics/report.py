"""``cl-metrics`` as a library call: read runs, compute metrics and intervals, write the artifact."""

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
from vlacl.evaluation.results import read_eval_results
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
    """A run to report on: its name, where it came from and its matrix."""

    name: str
    path: Path
    matrix: ResultMatrix
    artifact: Artifact | None

    @property
    def source_csv(self) -> Path | None:
        """The CSV file whose bytes are the matrix as read, if there is one."""
        if self.artifact is not None:
            return self.artifact.file(MATRIX_CSV_NAME)
        return self.path if self.path.suffix.lower() == ".csv" else None


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


def parse_run_spec(spec: str) -> tuple[str, Path]:
    """Split ``NAME=PATH`` (or a bare ``PATH``, named after its file or directory) into name and path.

    Raises:
        InputFormatError: The name holds characters other than letters, digits, ``.``, ``_``, ``-``.
    """
    name, sep, rest = spec.partition("=")
    if sep and "/" not in name and not Path(spec).exists():
        path = Path(rest)
    else:
        path = Path(spec)
        name = path.stem if path.suffix.lower() in (".csv", ".json") else path.name
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "run"
    if not _NAME_RE.match(name):
        raise InputFormatError(f"run name {name!r} (from {spec!r}) may only hold letters, digits, '.', '_' and '-'")
    return name, path


def load_run(spec: str) -> RunInput:
    """Read one run: an ``eval_results`` artifact directory or a matrix ``.csv`` / ``.json`` file."""
    name, path = parse_run_spec(spec)
    if path.is_dir():
        artifact = open_artifact(path, "eval_results")
        run = RunInput(name=name, path=path, matrix=read_eval_results(artifact), artifact=artifact)
    else:
        run = RunInput(name=name, path=path, matrix=read_matrix(path), artifact=None)
    counts = run.matrix.counts
    log.debug(
        "run %s from %s: %d stages, %d tasks, %s episodes",
        name,
        path,
        len(run.matrix.stages),
        len(run.matrix.tasks),
        "no" if counts is None else counts.total,
    )
    return run


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
        name=run.name, source=str(run.path), matrix=matrix, metrics=results, notes=tuple(notes), matrix_file=matrix_file
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
            matrix ``.csv`` / ``.json`` file.
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
    runs = [load_run(spec) for spec in specs]
    seen: dict[str, str] = {}
    for run, spec in zip(runs, specs, strict=True):
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
            else:
                writer.add_file_input(f"run:{run.name}", run.path)
        (writer.path / METRICS_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        if cfg.plot:
            plot_matrices([(r.name, r.matrix, _headline(r)) for r in computed], writer.path / MATRIX_PNG_NAME)
        writer.details["runs"] = [r.name for r in computed]
    return result
