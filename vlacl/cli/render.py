"""Rendering of command results on stdout (rich tables); logs and progress go to stderr."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from vlacl.metrics.cl import METRIC_NAMES

if TYPE_CHECKING:
    from vlacl.metrics.report import ClMetricsResult, MetricResult

stdout = Console(soft_wrap=True)


@contextmanager
def progress_bar(*columns: str, transient: bool = False) -> Iterator[Progress | None]:
    """A rich progress display on stderr, or ``None`` off a terminal or with ``-q``.

    Columns: the first of ``columns`` (a rich ``{task...}`` template, usually ``{task.description}``),
    a bar, ``done/total``, the other ``columns``, the elapsed time.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    console = progress_console()
    if console is None:
        yield None
        return
    first, *rest = columns
    with Progress(
        TextColumn(first),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(c) for c in rest),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    ) as bar:
        yield bar


def progress_console() -> Console | None:
    """The stderr console a progress bar draws on; ``None`` off a terminal, or with ``-q`` (logging above INFO)."""
    if logging.getLogger("vlacl").getEffectiveLevel() > logging.INFO:
        return None
    console = Console(stderr=True)
    return console if console.is_terminal else None


_LABELS = {
    "asr": "ASR (final mean success)",
    "bwt": "BWT (backward transfer)",
    "forgetting": "forgetting",
    "plasticity": "plasticity (diagonal)",
    "fwt": "FWT (forward transfer)",
    "nbt": "NBT (LIBERO)",
    "auc": "AUC (LIBERO)",
}


def _cell(metric: MetricResult) -> str:
    if metric.value is None:
        return "n/a"
    text = f"{metric.value:.3f}"
    if metric.ci is not None:
        text += f" [{metric.ci[0]:.3f}, {metric.ci[1]:.3f}]"
    return text


def print_metrics(result: ClMetricsResult) -> None:
    """Print one table with a column per run, then each run's notes."""
    has_ci = any(m.ci is not None for run in result.runs for m in run.metrics.values())
    ci = f" with {result.config.confidence * 100:g}% bootstrap intervals" if has_ci else ""
    table = Table(title=f"Continual-learning metrics{ci}", title_justify="left")
    table.add_column("metric", style="bold")
    for run in result.runs:
        stages = len(run.matrix.stages)
        table.add_column(f"{run.name}\n({stages} stage{'s' if stages != 1 else ''})", justify="right")
    for key in METRIC_NAMES:
        table.add_row(_LABELS[key], *(_cell(run.metrics[key]) for run in result.runs))
    stdout.print(table)
    for run in result.runs:
        for note in run.notes:
            stdout.print(f"note {run.name}: {note}", highlight=False, markup=False)
