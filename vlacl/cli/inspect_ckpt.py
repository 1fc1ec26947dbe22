"""``vlacl inspect-ckpt``: what an artifact is, where it came from and what it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlacl.cli.options import PANEL_INPUT, PANEL_OUTPUT, JsonOutput

if TYPE_CHECKING:
    from vlacl.adapters.inspect import InspectReport


def inspect_ckpt(
    path: Annotated[
        Path,
        typer.Argument(
            help="Any vlacl artifact directory (task checkpoint, merged model, composed adapter, stats, results), "
            "or a plain PEFT adapter directory.",
            metavar="PATH",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ],
    json_output: JsonOutput = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Also hash every file and compare with the manifest.", rich_help_panel=PANEL_OUTPUT
        ),
    ] = False,
    lineage: Annotated[
        bool,
        typer.Option(
            "--lineage/--no-lineage",
            help="Walk the inputs' manifests; plain-file inputs (a base model's shards) are hashed to tell whether "
            "they changed.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = True,
) -> None:
    """Show an artifact: kind, lineage, adapter stack, stats fingerprint, training summary and files.

    Reads manifests, configs and safetensors headers only, never weights. With --verify, exits with
    1 when a file is missing, changed or not listed in the manifest.
    """
    from vlacl.adapters.inspect import inspect_artifact

    report = inspect_artifact(path, verify=verify, walk_lineage=lineage)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    if report.problems:
        raise typer.Exit(1)


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def print_report(report: InspectReport) -> None:
    """Print the report: a header, then lineage, adapters, training and files."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)

    def line(text: str) -> None:
        console.print(text, highlight=False, markup=False)

    manifest = report.manifest
    line(f"{report.path}: {report.kind}")
    if manifest:
        line(f"written by `{manifest['producer']}` (vlacl {manifest['vlacl_version']}) at {manifest['created_utc']}")
        line("command: " + " ".join(manifest["command"]))
    if report.stats_fingerprint:
        line(f"stats fingerprint: {report.stats_fingerprint}")
    if report.training:
        line("training: " + ", ".join(f"{k} {v}" for k, v in report.training.items()))
    if report.lineage:
        table = Table(title="Lineage", title_justify="left")
        for column in ("input", "kind", "path", "status"):
            table.add_column(column)
        for node in report.lineage:
            table.add_row("  " * (node["depth"] - 1) + node["role"], node["kind"], node["path"], node["status"])
        console.print(table)
    if report.adapters:
        table = Table(title="Adapters (in stacking order)", title_justify="left")
        for column in ("adapter", "r", "alpha", "rsLoRA", "ranks", "targets", "modules", "parameters"):
            table.add_column(column, justify="left" if column in ("adapter", "targets") else "right")
        for adapter in report.adapters:
            targets = adapter["target_modules"]
            shown = ",".join(targets) if isinstance(targets, list) else str(targets)
            name = f"{adapter['source']}/{adapter['name']}" if adapter.get("source") else adapter["name"]
            table.add_row(
                name,
                str(adapter["r"]),
                f"{adapter['lora_alpha']:g}",
                "yes" if adapter["use_rslora"] else "no",
                ",".join(str(r) for r in adapter["ranks"]),
                shown if len(shown) <= 60 else shown[:57] + "...",
                str(adapter["num_modules"]),
                f"{adapter['num_parameters']:,}",
            )
        console.print(table)
    table = Table(title=f"Files ({_size(report.total_bytes)})", title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, nbytes in report.files.items():
        table.add_row(name, _size(nbytes))
    console.print(table)
    if report.problems is not None:
        if report.problems:
            for problem in report.problems:
                line(f"problem: {problem}")
        else:
            line("verified: every file matches the manifest")
