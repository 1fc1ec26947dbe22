"""``vlacl eval-suite``: success matrices from simulator rollouts, or action errors on held-out episodes."""

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
from vlacl.cli.options import PANEL_INPUT, ConfigFile, JsonOutput, OutDir, Overwrite, SetOverrides
from vlacl.config.core import help_for, resolve_config
from vlacl.config.eval_suite import EvalSuiteConfig

if TYPE_CHECKING:
    from rich.console import Console

    from vlacl.evaluation.runner import EvalReport, ProgressFn

log = logging.getLogger(__name__)

PANEL_SUITE = "Suite"
PANEL_WORK = "Work"


def _flag(name: str, key: str, panel: str = PANEL_SUITE, **kwargs: Any) -> Any:
    return typer.Option(name, help=help_for(EvalSuiteConfig, key), rich_help_panel=panel, show_default=False, **kwargs)


def eval_suite(
    ctx: typer.Context,
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Task checkpoints in training order, a directory holding a run's checkpoints, or merged policies.",
            metavar="CHECKPOINT",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ],
    out: OutDir = None,
    suite: Annotated[str | None, _flag("--suite", "suite", metavar="SIM:STREAM|offline|auto")] = None,
    trials: Annotated[int | None, _flag("--trials", "trials")] = None,
    seed: Annotated[int | None, _flag("--seed", "seed")] = None,
    max_steps: Annotated[int | None, _flag("--max-steps", "max_steps")] = None,
    last_only: Annotated[bool | None, _flag("--last-only", "last_only")] = None,
    execute: Annotated[int | None, _flag("--execute", "execute")] = None,
    image_size: Annotated[int | None, _flag("--image-size", "image_size")] = None,
    stats: Annotated[Path | None, _flag("--stats", "stats", PANEL_INPUT)] = None,
    dataset: Annotated[list[Path] | None, _flag("--dataset", "datasets", PANEL_INPUT)] = None,
    split: Annotated[str | None, _flag("--split", "split")] = None,
    videos: Annotated[int | None, _flag("--videos", "videos")] = None,
    video_camera: Annotated[str | None, _flag("--video-camera", "video_camera")] = None,
    envs: Annotated[int | None, _flag("--envs", "envs", PANEL_WORK)] = None,
    workers: Annotated[int | None, _flag("--workers", "workers", PANEL_WORK)] = None,
    device: Annotated[str | None, _flag("--device", "device", PANEL_WORK)] = None,
    shard: Annotated[str | None, _flag("--shard", "shard", PANEL_WORK, metavar="INDEX/COUNT")] = None,
    batch_size: Annotated[int | None, _flag("--batch-size", "batch_size", PANEL_WORK)] = None,
    overwrite: Overwrite = False,
    json_output: JsonOutput = False,
    config: ConfigFile = None,
    set_: SetOverrides = None,
) -> None:
    """Evaluate every checkpoint of a stream on every task: a success matrix from rollouts, or action errors.

    Rollout suites (metaworld:<stream>, libero:<suite>) run --trials episodes per (checkpoint,
    task) cell, trial t of a task always from the same initial state (seed --seed + t), with the
    adapters of each checkpoint swapped onto one loaded base model. The offline suite scores the
    predicted action chunks on held-out episodes (MSE and MAE per dimension, normalized and raw).
    With --out, writes an eval_results artifact: results.parquet (one row per episode),
    matrix.csv (what cl-metrics reads) and eval_info.json (LeRobot's layout, Wilson 95%
    intervals). Rerunning an interrupted evaluation continues it.
    """
    from vlacl.evaluation.runner import run_eval_suite

    cfg = resolve_config(
        EvalSuiteConfig,
        config_file=config,
        overrides=set_ or (),
        flags={
            "suite": suite,
            "trials": trials,
            "seed": seed,
            "max_steps": max_steps,
            "last_only": last_only,
            "execute": execute,
            "image_size": image_size,
            "stats": stats,
            "datasets": None if not dataset else tuple(dataset),
            "split": split,
            "videos": videos,
            "video_camera": video_camera,
            "envs": envs,
            "workers": workers,
            "device": device,
            "shard": shard,
            "batch_size": batch_size,
        },
    )
    with _progress() as progress:
        report = run_eval_suite(
            checkpoints, cfg, out=out, overwrite=overwrite, command=command_line(ctx), progress=progress
        )
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    if out is not None and not report.already_complete:
        log.info("wrote eval_results artifact %s", out)


@contextmanager
def _progress() -> Iterator[ProgressFn | None]:
    """One rich bar on stderr (episodes done of the total, success so far); none off a terminal or with -q."""
    from vlacl.cli.render import progress_bar

    with progress_bar("{task.description}", "{task.fields[note]}") as bar:
        if bar is None:
            yield None
            return
        task = bar.add_task("episodes", total=None, note="")

        def update(done: int, total: int, successes: int | None) -> None:
            rate = f"{successes / done:.0%} successful" if done and successes is not None else ""
            bar.update(task, completed=done, total=total, note=rate)

        yield update


def print_report(report: EvalReport, console: Console | None = None) -> None:
    """The matrix: one row per checkpoint, one column per task, success rate (or error) with episodes."""
    from rich.console import Console
    from rich.table import Table

    stdout = console or Console(soft_wrap=True, file=sys.stdout)
    info = report.info
    if info.get("kind") == "offline":
        title = f"Offline action error of {report.suite} (normalized MSE; raw MSE in eval_info.json)"
    else:
        episodes = len(report.episodes)
        title = f"Success rate on {report.suite} ({episodes} episodes; Wilson 95% intervals in eval_info.json)"
    table = Table(title=title, title_justify="left")
    table.add_column("after training", style="bold", no_wrap=True)
    for task in report.tasks:
        table.add_column(task, justify="right", no_wrap=True)
    cells = {(e["task_group"], e["task_id"]): e["metrics"] for e in info.get("per_task", [])}
    for stage in report.stages:
        row = []
        for task in report.tasks:
            metrics = cells.get((stage, task))
            if metrics is None:
                row.append("")
            elif "pc_success" in metrics and metrics["pc_success"] is not None:
                row.append(f"{metrics['pc_success'] / 100:.2f} ({metrics['n_successes']}/{metrics['n_episodes']})")
            else:
                row.append(f"{metrics.get('mse', float('nan')):.4f}")
        table.add_row(stage, *row)
    stdout.print(table)
    overall = info.get("overall", {})
    if overall.get("pc_success") is not None:
        lo, hi = overall["ci95"]
        stdout.print(
            f"overall {overall['pc_success']:.1f}% success [{lo:.1f}, {hi:.1f}] over {overall['n_episodes']} episodes",
            highlight=False,
            markup=False,
        )
    if report.already_complete:
        stdout.print(f"{report.out} already holds this evaluation: nothing ran", highlight=False, markup=False)
    elif report.env_steps:
        stdout.print(
            f"{report.env_steps} steps in {report.seconds:.1f} s: simulator "
            f"{1e3 * report.sim_seconds / report.env_steps:.2f} ms/step, policy "
            f"{1e3 * report.policy_seconds / report.env_steps:.2f} ms/step",
            highlight=False,
            markup=False,
        )
