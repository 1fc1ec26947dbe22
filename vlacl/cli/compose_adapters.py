"""``vlacl compose-adapters``: several LoRA adapters into one, computed on the true weight updates."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlacl.cli.context import command_line
from vlacl.cli.merge_lora import RequiredOutDir
from vlacl.cli.options import PANEL_INPUT, PANEL_OUTPUT, ConfigFile, JsonOutput, Overwrite, SetOverrides
from vlacl.config.compose_adapters import ComposeAdaptersConfig
from vlacl.config.core import help_for, resolve_config

if TYPE_CHECKING:
    from vlacl.adapters.compose import ComposeResult

log = logging.getLogger(__name__)

PANEL_METHOD = "Method"
WORST_ROWS = 10
"""Modules shown with their reconstruction error; every module's is in the manifest (and --json)."""


def compose_adapters(
    ctx: typer.Context,
    adapters: Annotated[
        list[Path],
        typer.Argument(
            help="Adapters to compose, in the order of --weights: PEFT adapter directories, composed adapters or "
            "task checkpoints (a checkpoint counts as the sum of its adapter stack).",
            metavar="ADAPTER",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ],
    out: RequiredOutDir,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help=help_for(ComposeAdaptersConfig, "method"),
            rich_help_panel=PANEL_METHOD,
            show_default=False,
            metavar="cat|linear|svd|ties|dare_linear|dare_ties|magnitude_prune",
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            "-w",
            help=help_for(ComposeAdaptersConfig, "weights"),
            rich_help_panel=PANEL_METHOD,
            show_default=False,
            metavar="W1,W2,...",
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", help=help_for(ComposeAdaptersConfig, "rank"), rich_help_panel=PANEL_METHOD, show_default=False
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density",
            help=help_for(ComposeAdaptersConfig, "density"),
            rich_help_panel=PANEL_METHOD,
            show_default=False,
        ),
    ] = None,
    majority_sign: Annotated[
        str | None,
        typer.Option(
            "--majority-sign",
            help=help_for(ComposeAdaptersConfig, "majority_sign"),
            rich_help_panel=PANEL_METHOD,
            show_default=False,
            metavar="total|frequency",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help=help_for(ComposeAdaptersConfig, "seed"), rich_help_panel=PANEL_METHOD, show_default=False
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help=help_for(ComposeAdaptersConfig, "dtype"),
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
            metavar="auto|bfloat16|float16|float32",
        ),
    ] = None,
    overwrite: Overwrite = False,
    json_output: JsonOutput = False,
    config: ConfigFile = None,
    set_: SetOverrides = None,
) -> None:
    """Compose adapters into one PEFT adapter, on the true updates dW_i = scale_i * B_i @ A_i.

    cat and linear are exact (ranks concatenated); svd truncates the exact weighted sum to --rank;
    ties, dare_linear, dare_ties and magnitude_prune merge the dense updates and factorize the result
    to --rank by SVD. Approximate methods report each module's relative reconstruction error. Writes
    a composed_adapter artifact that PeftModel.from_pretrained loads; the manifest records the
    method, weights, density, seed and errors.
    """
    from vlacl.adapters.compose import compose_adapters as run

    cfg = resolve_config(
        ComposeAdaptersConfig,
        config_file=config,
        overrides=set_ or (),
        flags={
            "method": method,
            "weights": weights,
            "rank": rank,
            "density": density,
            "majority_sign": majority_sign,
            "seed": seed,
            "dtype": dtype,
        },
    )
    result = run(adapters, cfg, out=out, overwrite=overwrite, command=command_line(ctx))
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_compose(result)
    log.info("wrote composed_adapter artifact %s", out)


def print_compose(result: ComposeResult) -> None:
    """Print the method, the inputs, and the worst reconstruction errors of an approximate method."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    cfg = result.config
    ranks = sorted({m.rank for m in result.modules})
    head = [
        f"method: {cfg.method} ({'exact' if result.exact else f'approximate, target rank {result.target_rank}'})",
        "adapters: " + ", ".join(f"{s['label']} x {w:g}" for s, w in zip(result.sources, result.weights, strict=True)),
        f"out: {result.out} ({len(result.modules)} modules, rank {ranks[0]}"
        + (f"-{ranks[-1]}" if len(ranks) > 1 else "")
        + f", {result.dtype})",
    ]
    for line in head:
        console.print(line, highlight=False, markup=False)
    summary = result.error_summary()
    if summary is None:
        return
    console.print(
        f"relative reconstruction error: mean {summary['mean']:.4g}, "
        f"max {summary['max']:.4g} ({summary['worst_module']})",
        highlight=False,
        markup=False,
    )
    worst = sorted((m for m in result.modules if m.rel_error is not None), key=lambda m: -(m.rel_error or 0.0))
    table = Table(title=f"Largest errors (of {len(worst)} modules)", title_justify="left")
    table.add_column("module")
    table.add_column("rank", justify="right")
    table.add_column("rel. error", justify="right")
    for m in worst[:WORST_ROWS]:
        table.add_row(m.module, str(m.rank), f"{m.rel_error:.4g}")
    console.print(table)
