"""``vlacl cl-metrics``: continual-learning metrics from result matrices."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Annotated

import typer

from vlacl.cli.context import command_line
from vlacl.cli.options import PANEL_INPUT, PANEL_OUTPUT, ConfigFile, JsonOutput, OutDir, Overwrite, SetOverrides
from vlacl.config.cl_metrics import ClMetricsConfig
from vlacl.config.core import help_for, resolve_config

if TYPE_CHECKING:
    from vlacl.metrics.report import ClMetricsResult

log = logging.getLogger(__name__)

PANEL_METRICS = "Metrics"


def cl_metrics(
    ctx: typer.Context,
    runs: Annotated[
        list[str],
        typer.Argument(
            help="Runs to report: an eval_results directory or a matrix .csv/.json file, optionally "
            "named as NAME=PATH. Several runs give a side-by-side comparison.",
            metavar="RUN",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ],
    out: OutDir = None,
    overwrite: Overwrite = False,
    json_output: JsonOutput = False,
    config: ConfigFile = None,
    set_: SetOverrides = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(
            "--bootstrap",
            help=help_for(ClMetricsConfig, "n_bootstrap"),
            rich_help_panel=PANEL_METRICS,
            show_default=False,
        ),
    ] = None,
    confidence: Annotated[
        float | None,
        typer.Option(
            "--confidence",
            help=help_for(ClMetricsConfig, "confidence"),
            rich_help_panel=PANEL_METRICS,
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help=help_for(ClMetricsConfig, "seed"), rich_help_panel=PANEL_METRICS, show_default=False
        ),
    ] = None,
    plot: Annotated[
        bool | None,
        typer.Option(
            "--plot/--no-plot", help=help_for(ClMetricsConfig, "plot"), rich_help_panel=PANEL_OUTPUT, show_default=False
        ),
    ] = None,
) -> None:
    """Compute ASR, BWT, forgetting, plasticity, FWT, NBT and AUC from result matrices.

    A matrix has one row per training stage (the task just trained, in training order, plus an
    optional `init` row before training) and one column per task; cells are success
    rates in [0, 1]. With per-episode results (an eval_results artifact) every metric gets a
    seeded bootstrap confidence interval. With --out, writes a cl_metrics artifact:
    metrics.json, the matrices as read and matrix.png.
    """
    from vlacl.cli.render import print_metrics
    from vlacl.metrics import report

    cfg = resolve_config(
        ClMetricsConfig,
        config_file=config,
        overrides=set_ or (),
        flags={"n_bootstrap": bootstrap, "confidence": confidence, "seed": seed, "plot": plot},
    )
    result: ClMetricsResult = report.run_cl_metrics(runs, cfg, out=out, overwrite=overwrite, command=command_line(ctx))
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_metrics(result)
    if out is not None:
        log.info("wrote cl_metrics artifact %s", out)
