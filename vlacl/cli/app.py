"""The ``vlacl`` Typer app: global options, the one exception boundary, command registration.

Importing this module must stay cheap: no torch, transformers, peft (a test checks it), so that
``vlacl --help`` and tab completion answer at once. Commands import their core code when they run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from vlacl import __version__
from vlacl.cli.cl_metrics import cl_metrics
from vlacl.cli.collect_demos import collect_demos
from vlacl.cli.compose_adapters import compose_adapters
from vlacl.cli.context import ARGV_KEY
from vlacl.cli.ds_stats import ds_stats
from vlacl.cli.eval_suite import eval_suite
from vlacl.cli.inspect_ckpt import inspect_ckpt
from vlacl.cli.inspect_h5 import inspect_h5
from vlacl.cli.logging_setup import configure_logging
from vlacl.cli.merge_lora import merge_lora
from vlacl.cli.train_task import train_task
from vlacl.errors import Terminated, VlaclError


class VlaclGroup(TyperGroup):
    """The command group with vlacl's exception boundary.

    A :class:`~vlacl.errors.VlaclError` becomes one line on stderr, ``error: <message>``, and
    the error's exit code (1, or 2 for usage and config errors). ``VLACL_DEBUG=1`` prints the
    traceback before that line. Any other exception is a bug and keeps its traceback.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        """Remember the command line as typed, for the manifests the commands write."""
        argv = ["vlacl", *args]
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta[ARGV_KEY] = argv
        return ctx

    def invoke(self, ctx: Any) -> Any:
        """Run the command; turn a VlaclError into one stderr line and an exit code.

        SIGTERM and SIGHUP (a scheduler's time limit, a closed terminal) raise
        :class:`~vlacl.errors.Terminated` inside the command, so open artifact writers remove
        their temporary directories; the exit code is then 128 + the signal number.
        """
        previous = _raise_on_termination()
        try:
            return super().invoke(ctx)
        except VlaclError as exc:
            _debug_traceback()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except Terminated as exc:
            _debug_traceback()
            typer.echo(f"error: {exc}; nothing was written to --out", err=True)
            raise typer.Exit(128 + exc.signum) from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _debug_traceback() -> None:
    if os.environ.get("VLACL_DEBUG", "") not in ("", "0"):
        traceback.print_exc(file=sys.stderr)


def _raise_on_termination() -> dict[int, Any]:
    """Make SIGTERM and SIGHUP raise Terminated; return the handlers to restore afterwards."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, handler)
    return previous


app = typer.Typer(
    name="vlacl",
    cls=VlaclGroup,
    help="Continual learning of Vision-Language-Action robot policies with LoRA.\n\n"
    "Each command does one job and writes one artifact directory that the next command reads.",
    rich_markup_mode="markdown",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlacl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output on stderr (debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Continual learning of Vision-Language-Action robot policies with LoRA."""
    configure_logging(verbose, quiet)


app.command(
    "cl-metrics",
    epilog="Example: `vlacl cl-metrics examples/matrices/cw4-er.csv --out runs/cw4-metrics`\n\n"
    "Compare runs: `vlacl cl-metrics seq=runs/seq-eval er=runs/er-eval --out runs/compare`",
)(cl_metrics)
app.command(
    "collect-demos",
    epilog="Example: `vlacl collect-demos --stream cw10 --episodes-per-task 2 --out data/cw10-demos`\n\n"
    "With a 64x64 camera, noisy actions and 4 processes: `vlacl collect-demos --stream cw10 --cameras corner "
    "--image-size 64 --action-noise 0.1 --workers 4 --out data/cw10-noisy`",
)(collect_demos)
app.command(
    "ds-stats",
    epilog="Example: `vlacl ds-stats data/libero_10 --out runs/libero10-stats`\n\n"
    "Several datasets, a key map and min/max normalization: "
    "`vlacl ds-stats data/pick data/place --keymap keymap.yaml --norm-mode min_max --out runs/stats`",
)(ds_stats)
app.command(
    "eval-suite",
    epilog="Example: `vlacl eval-suite runs/seq --suite metaworld:cw10 --trials 10 --workers 4 --out runs/seq-eval`\n\n"
    "One of 8 array jobs on a GPU: `vlacl eval-suite runs/seq/task0 runs/seq/task1 --shard $SLURM_ARRAY_TASK_ID/8 "
    "--device cuda --out runs/seq-eval-$SLURM_ARRAY_TASK_ID`",
)(eval_suite)
app.command(
    "inspect-h5",
    epilog="Example: `vlacl inspect-h5 libero_goal --sample-images 4`\n\n"
    "In scripts: `vlacl inspect-h5 'data/**/*.hdf5' --no-tree --json --strict`",
)(inspect_h5)
app.command(
    "merge-lora",
    epilog="Example: `vlacl merge-lora runs/task3 --out runs/task3-merged`\n\n"
    "Plain PEFT adapters, summed: "
    "`vlacl merge-lora adapters/pick adapters/place --base models/qwen2-0.5b --out runs/merged`",
)(merge_lora)
app.command(
    "compose-adapters",
    epilog="Example: `vlacl compose-adapters runs/task1 runs/task2 --method linear --weights 0.5,0.5 --out runs/avg`"
    "\n\nTIES at rank 16: "
    "`vlacl compose-adapters runs/task1 runs/task2 runs/task3 --method ties --density 0.2 --rank 16 --out runs/ties`",
)(compose_adapters)
app.command(
    "inspect-ckpt",
    epilog="Example: `vlacl inspect-ckpt runs/task3`\n\n"
    "In scripts: `vlacl inspect-ckpt runs/task3-merged --verify --json | jq .lineage`",
)(inspect_ckpt)
app.command(
    "train-task",
    epilog="Example: `vlacl train-task --dataset data/libero_10 --stats runs/stats --task '#0' --out runs/task0`\n\n"
    "Next task of the stream: `vlacl train-task --dataset data/libero_10 --stats runs/stats --task '#1' "
    "--prev runs/task0 --out runs/task1`",
)(train_task)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``vlacl``)."""
    app(args=None if argv is None else list(argv), prog_name="vlacl")
