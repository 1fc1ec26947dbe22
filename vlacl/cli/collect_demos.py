"""``vlacl collect-demos``: scripted-expert demonstrations of a task stream, as a LeRobot v3.0 dataset."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vlacl.cli.context import command_line
from vlacl.cli.options import PANEL_OUTPUT, ConfigFile, JsonOutput, Overwrite, SetOverrides
from vlacl.config.collect_demos import CollectDemosConfig
from vlacl.config.core import help_for, resolve_config

if TYPE_CHECKING:
    from rich.console import Console

    from vlacl.sim.collect import CollectReport, ProgressFn, TaskProgress

log = logging.getLogger(__name__)

PANEL_COLLECT = "Collection"

RequiredOutDir = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Dataset directory to write (LeRobot v3.0 plus vlacl's manifest); built under a temporary name and "
        "renamed into place when complete.",
        rich_help_panel=PANEL_OUTPUT,
        show_default=False,
    ),
]


def _flag(name: str, key: str, **kwargs: Any) -> Any:
    return typer.Option(
        name, help=help_for(CollectDemosConfig, key), rich_help_panel=PANEL_COLLECT, show_default=False, **kwargs
    )


def collect_demos(
    ctx: typer.Context,
    out: RequiredOutDir,
    stream: Annotated[str | None, _flag("--stream", "stream", metavar="PRESET|TASK,TASK")] = None,
    episodes_per_task: Annotated[int | None, _flag("--episodes-per-task", "episodes_per_task")] = None,
    cameras: Annotated[str | None, _flag("--cameras", "cameras", metavar="CAM,CAM")] = None,
    image_size: Annotated[int | None, _flag("--image-size", "image_size")] = None,
    keep_failures: Annotated[bool | None, _flag("--keep-failures", "keep_failures")] = None,
    action_noise: Annotated[float | None, _flag("--action-noise", "action_noise", metavar="STD")] = None,
    seed: Annotated[int | None, _flag("--seed", "seed")] = None,
    workers: Annotated[int | None, _flag("--workers", "workers")] = None,
    fps: Annotated[int | None, _flag("--fps", "fps")] = None,
    overwrite: Overwrite = False,
    json_output: JsonOutput = False,
    config: ConfigFile = None,
    set_: SetOverrides = None,
) -> None:
    """Run the scripted experts of a task stream and write their episodes as a LeRobot v3.0 dataset.

    Records observation.state, the cameras asked for (PNG frames embedded in the parquet files),
    action, next.reward and next.success, with each task's instruction in meta/tasks.parquet. Keeps
    only successful episodes unless --keep-failures, and prints each task's expert success rate.
    Every episode's reset seed is stored (meta/episodes, vlacl_seed), so it can be replayed; the
    same seed gives byte-identical data files whatever --workers.
    """
    from vlacl.sim import collect as core

    cfg = resolve_config(
        CollectDemosConfig,
        config_file=config,
        overrides=set_ or (),
        flags={
            "stream": stream,
            "episodes_per_task": episodes_per_task,
            "cameras": None if cameras is None else tuple(c.strip() for c in cameras.split(",") if c.strip()),
            "image_size": image_size,
            "keep_failures": keep_failures,
            "action_noise": action_noise,
            "seed": seed,
            "workers": workers,
            "fps": fps,
        },
    )
    with _progress() as progress:
        report = core.collect_demos(cfg, out, overwrite=overwrite, command=command_line(ctx), progress=progress)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    log.info("wrote dataset artifact %s", out)


@contextmanager
def _progress() -> Iterator[ProgressFn | None]:
    """One rich bar per task on stderr (episodes kept of the target); none off a terminal or with -q."""
    from vlacl.cli.render import progress_bar

    with progress_bar("{task.description}", "{task.fields[attempts]}") as bar:
        if bar is None:
            yield None
            return
        bars: dict[int, Any] = {}

        def update(event: TaskProgress) -> None:
            if event.position not in bars:
                bars[event.position] = bar.add_task(event.task, total=event.target, attempts="")
            note = f"{event.successes}/{event.attempts} successful" + (" (done)" if event.finished else "")
            bar.update(bars[event.position], completed=event.kept, attempts=note)

        yield update


def print_report(report: CollectReport, console: Console | None = None) -> None:
    """Print each task's expert success rate and what was kept, then the dataset's totals.

    The instruction column is shown only where it fits on one line per task (the full instructions are in
    the manifest and meta/tasks.parquet); numbers never wrap.
    """
    from rich.console import Console
    from rich.table import Table

    stdout = console or Console(soft_wrap=True, file=sys.stdout)
    version = f" {report.simulator_version}" if report.simulator_version else ""
    rows = [
        (
            task.task,
            task.instruction,
            str(task.attempts),
            str(task.successes),
            f"{task.success_rate:.0%}",
            str(task.episodes),
            str(task.frames),
        )
        for task in report.tasks
    ]
    headers = ("task", "instruction", "attempts", "successes", "rate", "kept", "frames")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    with_instruction = sum(widths) + 3 * len(widths) + 1 <= stdout.width
    table = Table(title=f"Expert demonstrations of {report.stream} ({report.simulator}{version})", title_justify="left")
    for i, header in enumerate(headers):
        if i == 1 and not with_instruction:
            continue
        table.add_column(header, no_wrap=True, justify="left" if i < 2 else "right")
    for task, row in zip(report.tasks, rows, strict=True):
        cells = list(row)
        if task.task in report.short_tasks:
            cells[5] = f"[red]{cells[5]}[/red]"
        if not with_instruction:
            del cells[1]
        table.add_row(*cells)
    stdout.print(table)
    stdout.print(
        f"{report.episodes} episodes, {report.frames} frames at {report.fps} fps in {len(report.data_files)} data "
        f"file(s): {report.out}",
        highlight=False,
        markup=False,
    )
    if not with_instruction:
        stdout.print(
            "instructions: meta/tasks.parquet, or the manifest's tasks[].instruction",
            highlight=False,
            markup=False,
        )
    if report.short_tasks:
        stdout.print(
            f"fewer episodes than asked for: {', '.join(report.short_tasks)} (the expert failed too often)",
            highlight=False,
            markup=False,
        )
