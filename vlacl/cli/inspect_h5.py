"""``vlacl inspect-h5``: a read-only report on HDF5 files (tree, episodes, findings)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlacl.cli.options import PANEL_INPUT, PANEL_OUTPUT, ConfigFile, JsonOutput, SetOverrides
from vlacl.config.core import help_for, resolve_config
from vlacl.config.inspect_h5 import InspectH5Config
from vlacl.errors import InputFormatError

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text
    from rich.tree import Tree

    from vlacl.data.inspect_h5 import CameraSample, FileReport, InspectH5Report, Node, Severity

PANEL_CHECKS = "Checks"
COLLAPSE_GROUPS = 3
"""A group with more child groups than this (50 demos) shows the first in full and counts the rest."""
STYLES: dict[Severity, str] = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def inspect_h5(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="HDF5 files, directories (their .hdf5/.h5/.he5 files) or quoted globs ('data/**/*.hdf5').",
            metavar="PATH",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ],
    json_output: JsonOutput = False,
    config: ConfigFile = None,
    set_: SetOverrides = None,
    window: Annotated[
        int | None,
        typer.Option(
            "--window", help=help_for(InspectH5Config, "window"), rich_help_panel=PANEL_CHECKS, show_default=False
        ),
    ] = None,
    chunk: Annotated[
        int | None,
        typer.Option(
            "--chunk", help=help_for(InspectH5Config, "chunk"), rich_help_panel=PANEL_CHECKS, show_default=False
        ),
    ] = None,
    sample_images: Annotated[
        int | None,
        typer.Option(
            "--sample-images",
            help=help_for(InspectH5Config, "sample_images"),
            rich_help_panel=PANEL_CHECKS,
            metavar="N",
            show_default=False,
        ),
    ] = None,
    strict: Annotated[
        bool | None,
        typer.Option(
            "--strict", help=help_for(InspectH5Config, "strict"), rich_help_panel=PANEL_CHECKS, show_default=False
        ),
    ] = None,
    tree: Annotated[
        bool | None,
        typer.Option(
            "--tree/--no-tree", help=help_for(InspectH5Config, "tree"), rich_help_panel=PANEL_OUTPUT, show_default=False
        ),
    ] = None,
) -> None:
    """Report on HDF5 datasets (robomimic/LIBERO or flat one-episode files) without changing them.

    Prints each file's tree (groups; datasets with shape, dtype, chunks, compression; attributes),
    an episode table (length, action min/max per dimension, instruction) and findings with a
    severity: missing keys, length mismatches, NaN/Inf, actions outside [-1, 1], episodes shorter
    than --window + --chunk, constant action dimensions, LIBERO's upside-down frames. Reads no
    image payload unless --sample-images asks for frames.
    """
    from vlacl.data.inspect_h5 import run_inspect_h5

    cfg = resolve_config(
        InspectH5Config,
        config_file=config,
        overrides=set_ or (),
        flags={"window": window, "chunk": chunk, "sample_images": sample_images, "strict": strict, "tree": tree},
    )
    report = run_inspect_h5(paths, cfg)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    if cfg.strict and report.has_errors:
        errors = report.count("error")
        raise InputFormatError(
            f"{errors} finding{'s' if errors != 1 else ''} with severity error (--strict): see the report on stdout"
        )


def print_report(report: InspectH5Report) -> None:
    """Trees, episode tables (one per dataset), findings and a summary line, on stdout."""
    from rich.table import Table
    from rich.text import Text

    from vlacl.cli.render import stdout

    for file in report.files:
        if file.tree:
            stdout.print(_tree(file))
    for title, files in _datasets(report.files):
        table = Table(title=title, title_justify="left")
        for column, justify in (
            ("episode", "left"),
            ("length", "right"),
            ("action min", "right"),
            ("action max", "right"),
        ):
            table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        table.add_column("instruction")
        for file in files:
            for row in file.episodes:
                table.add_row(
                    Text(row.episode),
                    "?" if row.length is None else f"{row.length:,}",
                    _vector(row.action_min),
                    _vector(row.action_max),
                    Text(row.instruction),
                )
        stdout.print(table)
    samples = [(file.path, sample) for file in report.files for sample in file.image_samples]
    if samples:
        stdout.print(_samples_table(samples))
    for finding in report.findings:
        episode = finding.episode if finding.episode and finding.episode != Path(finding.file).name else None
        where = finding.file + (f" {episode}" if episode else "")
        line = Text()
        line.append(f"{finding.severity:<7} ", style=STYLES[finding.severity])
        line.append(f"{finding.code} ", style="bold")
        line.append(f"{where}: {finding.message}")
        stdout.print(line)
    episodes = sum(len(f.episodes) for f in report.files)
    frames = sum(row.length or 0 for f in report.files for row in f.episodes)
    counts = ", ".join(_plural(report.count(s), s) for s in STYLES)
    stdout.print(
        f"{_plural(len(report.files), 'file')}, {_plural(episodes, 'episode')}, {_plural(frames, 'frame')}: {counts}",
        highlight=False,
        markup=False,
    )


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' if count != 1 else ''}"


def _datasets(files: Sequence[FileReport]) -> list[tuple[str, list[FileReport]]]:
    """Files grouped as the readers group them: a robomimic file alone, flat files by directory."""
    out: dict[str, tuple[str, list[FileReport]]] = {}
    for file in files:
        if file.format == "hdf5_flat":
            parent = str(Path(file.path).parent)
            key = f"flat:{parent}"
            title = f"{parent} (flat files, one episode each)"
        else:
            key = title = file.path
        out.setdefault(key, (title, []))[1].append(file)
    return list(out.values())


def _samples_table(samples: Sequence[tuple[str, CameraSample]]) -> Table:
    """Per file and camera dataset: frames sampled, mean brightness of the top and bottom thirds, blank frames."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Sampled camera frames (as stored)", title_justify="left")
    for column in ("file", "camera", "frames", "top third", "bottom third", "blank"):
        table.add_column(column, justify="left" if column in ("file", "camera") else "right")
    totals: dict[tuple[str, str], list[float]] = {}
    for path, sample in samples:
        total = totals.setdefault((path, sample.dataset), [0, 0.0, 0.0, 0])
        total[0] += sample.frames
        total[1] += sample.top_mean * sample.frames
        total[2] += sample.bottom_mean * sample.frames
        total[3] += sample.blank_frames
    for (path, dataset), (frames, top, bottom, blank) in totals.items():
        numbers = (f"{frames:,.0f}", f"{top / frames:.1f}", f"{bottom / frames:.1f}", f"{blank:,.0f}")
        table.add_row(Text(path), Text(dataset), *numbers)
    return table


def _vector(values: Sequence[float | None]) -> str:
    return " ".join("nan" if v is None else f"{v:.2f}" for v in values)


def _tree(file: FileReport) -> Tree:
    from rich.text import Text
    from rich.tree import Tree

    children: dict[str, list[Node]] = {}
    for node in file.tree[1:]:
        parent = node.path.rsplit("/", 1)[0] or "/"
        children.setdefault(parent, []).append(node)
    root = Tree(Text(f"{file.path}  ({file.format}, {file.bytes:,} bytes)", style="bold"))
    _attr_lines(root, file.tree[0])

    def add(branch: Tree, path: str) -> None:
        groups = [n for n in children.get(path, []) if n.kind == "group"]
        shown = groups[:1] if len(groups) > COLLAPSE_GROUPS else groups
        for node in children.get(path, []):
            if node.kind == "group" and node not in shown:
                continue
            sub = branch.add(_label(node))
            _attr_lines(sub, node)
            if node.kind == "group":
                add(sub, node.path)
        if len(shown) < len(groups):
            hidden = [n.path.rsplit("/", 1)[-1] for n in groups[1:]]
            branch.add(Text(f"... {len(hidden)} more groups ({hidden[0]} .. {hidden[-1]})", style="dim"))

    add(root, "/")
    return root


def _label(node: Node) -> Text:
    from rich.text import Text

    name = node.path.rsplit("/", 1)[-1]
    if node.kind != "dataset":
        return Text(f"{name}/", style="bold blue")
    label = Text(name, style="green")
    shape = "empty" if node.shape is None else str(node.shape)
    details = [shape, str(node.dtype)]
    if node.chunks is not None:
        details.append(f"chunks {node.chunks}")
    if node.compression is not None:
        details.append(node.compression)
    label.append("  " + "  ".join(details))
    return label


def _attr_lines(branch: Tree, node: Node) -> None:
    from rich.text import Text

    for name, value in node.attrs:
        branch.add(Text(f"@{name} = {value}", style="dim"))
