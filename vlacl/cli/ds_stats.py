"""``vlacl ds-stats``: normalization statistics of datasets, global and per task."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vlacl.cli.context import command_line
from vlacl.cli.options import PANEL_INPUT, ConfigFile, JsonOutput, OutDir, Overwrite, SetOverrides
from vlacl.config.core import help_for, resolve_config
from vlacl.config.ds_stats import DsStatsConfig

if TYPE_CHECKING:
    from vlacl.data.stats import ProgressFn

log = logging.getLogger(__name__)

PANEL_STATS = "Statistics"
DRIFT_ROWS = 40
"""Tasks x features shown in the drift table; the rest are in stats.json (and --json)."""


def ds_stats(
    ctx: typer.Context,
    datasets: Annotated[
        list[Path],
        typer.Argument(
            help="Datasets: LeRobot v3.0/v2.1 directories, HDF5 files (robomimic/LIBERO or flat), or directories "
            "of them. Several are combined, with per-task stats keyed `dataset/task_index`.",
            metavar="DATASET",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ],
    out: OutDir = None,
    overwrite: Overwrite = False,
    json_output: JsonOutput = False,
    config: ConfigFile = None,
    set_: SetOverrides = None,
    keymap: Annotated[
        Path | None,
        typer.Option(
            "--keymap", help=help_for(DsStatsConfig, "keymap"), rich_help_panel=PANEL_STATS, show_default=False
        ),
    ] = None,
    norm_mode: Annotated[
        str | None,
        typer.Option(
            "--norm-mode",
            help=help_for(DsStatsConfig, "norm_mode"),
            rich_help_panel=PANEL_STATS,
            show_default=False,
            metavar="q99|min_max|mean_std|none",
        ),
    ] = None,
    image_frames: Annotated[
        int | None,
        typer.Option(
            "--image-frames",
            help=help_for(DsStatsConfig, "image_frames"),
            rich_help_panel=PANEL_STATS,
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help=help_for(DsStatsConfig, "seed"), rich_help_panel=PANEL_STATS, show_default=False),
    ] = None,
    max_tasks: Annotated[
        int | None,
        typer.Option(
            "--max-tasks", help=help_for(DsStatsConfig, "max_tasks"), rich_help_panel=PANEL_STATS, show_default=False
        ),
    ] = None,
) -> None:
    """Compute normalization stats (min, max, mean, std, q01..q99), globally and per task.

    Moments and extremes are exact; quantiles come from a histogram whose error bound (at most
    9.8e-5 of each dimension's range) is written beside them. Binary dimensions (a gripper with
    two levels) are detected and left out of normalization. Prints a table per feature and how
    far each task's stats drift from the global ones. With --out, writes a ds_stats artifact:
    stats.json (LeRobot's key names plus mask, norm_mode and per-task stats) and the key map.
    """
    from vlacl.data import stats as core

    cfg = resolve_config(
        DsStatsConfig,
        config_file=config,
        overrides=set_ or (),
        flags={
            "keymap": keymap,
            "norm_mode": norm_mode,
            "image_frames": image_frames,
            "seed": seed,
            "max_tasks": max_tasks,
        },
    )
    with _progress() as progress:
        result = core.run_ds_stats(
            datasets, cfg, out=out, overwrite=overwrite, command=command_line(ctx), progress=progress
        )
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_stats(result)
    if out is not None:
        log.info("wrote ds_stats artifact %s (fingerprint %s)", out, result["fingerprint"][:12])


@contextmanager
def _progress() -> Iterator[ProgressFn | None]:
    """A rich progress bar on stderr: frames reduced, then image frames sampled; none off a terminal or with -q."""
    from vlacl.cli.render import progress_bar

    labels = {"frames": "frames", "images": "image frames"}
    with progress_bar("{task.description}", transient=True) as bar:
        if bar is None:
            yield None
            return
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(labels.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _dims_text(dims: list[int], limit: int = 8) -> str:
    if not dims:
        return "-"
    shown = ", ".join(str(d) for d in dims[:limit])
    return shown + (f" (+{len(dims) - limit})" if len(dims) > limit else "")


def print_stats(result: Mapping[str, Any]) -> None:
    """Print the per-feature table and the per-task drift summary on stdout."""
    from rich.console import Console
    from rich.table import Table

    stdout = Console(soft_wrap=True, file=sys.stdout)
    datasets = ", ".join(f"{d['path']} ({d['format']})" for d in result["datasets"])
    title = f"Stats of {datasets}: {result['num_frames']} frames, {result['num_episodes']} episodes"
    table = Table(title=title, title_justify="left")
    table.add_column("feature", no_wrap=True)
    table.add_column("dims", justify="right")
    table.add_column("binary dims")
    table.add_column("norm")
    for column in ("min", "q01", "q99", "max", "q. error / range"):
        table.add_column(column, justify="right")
    for key, feat in result["features"].items():
        flat = {k: _flatten(feat[k]) for k in ("min", "max", "q01", "q99", "quantile_error_bound") if k in feat}
        span = [hi - lo for lo, hi in zip(flat["min"], flat["max"], strict=True)]
        rel = [b / s for b, s in zip(flat["quantile_error_bound"], span, strict=True) if s > 0]
        table.add_row(
            key,
            str(len(flat["min"])),
            _dims_text(feat.get("binary_dims", [])),
            str(feat["norm_mode"]),
            _fmt(min(flat["min"])),
            _fmt(min(flat["q01"])) if "q01" in flat else "-",
            _fmt(max(flat["q99"])) if "q99" in flat else "-",
            _fmt(max(flat["max"])),
            f"{max(rel):.1e}" if rel else "0",
        )
    stdout.print(table)
    q = result["quantiles"]
    stdout.print(
        f"quantiles: {q['method']}, {q['bins']} bins per dimension, error at most "
        f"{q['relative_error_bound']:.1e} of the range; min, max, mean and std are exact; "
        f"image stats from {result['image_frames']} sampled frames",
        highlight=False,
        markup=False,
    )
    if result.get("tasks_omitted"):
        stdout.print(f"per-task stats left out: {result['tasks_omitted']}", highlight=False, markup=False)
    _print_drift(stdout, result)


def _print_drift(stdout: Any, result: Mapping[str, Any]) -> None:
    from rich.table import Table

    rows = [
        (task, key, entry)
        for task, features in result["drift"].items()
        for key, entry in features.items()
        if entry["mean_shift"] is not None
    ]
    if len(result["tasks"]) < 2 or not rows:
        return
    rows.sort(key=lambda r: -float(r[2]["mean_shift"]))
    table = Table(
        title="Normalization drift per task (normalized dimensions; worst dimension in brackets)", title_justify="left"
    )
    table.add_column("task", no_wrap=True)
    table.add_column("instruction")
    table.add_column("frames", justify="right")
    table.add_column("feature", no_wrap=True)
    table.add_column("|mean - global| / std", justify="right")
    table.add_column("(q99-q01) / global", justify="right")
    for task, key, entry in rows[:DRIFT_ROWS]:
        info = result["tasks"][task]
        instruction = info["instruction"] if len(info["instruction"]) <= 48 else info["instruction"][:45] + "..."
        ratio = entry["range_ratio"]
        table.add_row(
            task,
            instruction,
            str(info["num_frames"]),
            key,
            f"{entry['mean_shift']:.3f} [{entry['mean_shift_dim']}]",
            "-" if ratio is None else f"{ratio:.3f} [{entry['range_ratio_dim']}]",
        )
    stdout.print(table)
    if len(rows) > DRIFT_ROWS:
        stdout.print(f"... {len(rows) - DRIFT_ROWS} more rows in stats.json (drift)", highlight=False, markup=False)


def _flatten(values: Any) -> list[float]:
    """Nested lists (image stats are (C, 1, 1)) as one flat list."""
    if isinstance(values, list):
        return [v for item in values for v in _flatten(item)]
    return [float(values)]
