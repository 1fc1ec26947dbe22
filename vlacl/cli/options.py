"""Option types shared by every command, declared once with ``Annotated`` and reused."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PANEL_INPUT = "Input"
PANEL_OUTPUT = "Output"
PANEL_CONFIG = "Configuration"

OutDir = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Artifact directory to write; built under a temporary name and renamed into place when complete.",
        rich_help_panel=PANEL_OUTPUT,
        show_default=False,
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing artifact at --out (a directory that is not a vlacl artifact is never replaced).",
        rich_help_panel=PANEL_OUTPUT,
    ),
]
JsonOutput = Annotated[
    bool,
    typer.Option("--json", help="Print the result as JSON on stdout instead of a table.", rich_help_panel=PANEL_OUTPUT),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML file with settings; overridden by --set, which is overridden by the named flags.",
        rich_help_panel=PANEL_CONFIG,
        show_default=False,
        exists=False,
    ),
]
SetOverrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one setting, KEY=VALUE with a dotted KEY (repeatable), e.g. --set seed=3.",
        rich_help_panel=PANEL_CONFIG,
        metavar="KEY=VALUE",
        show_default=False,
    ),
]
