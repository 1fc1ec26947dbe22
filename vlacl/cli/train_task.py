"""``vlacl train-task``: train one task of a stream (LoRA on a VLM backbone + an action head) into a task checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vlacl.cli.context import command_line
from vlacl.cli.options import PANEL_INPUT, ConfigFile, OutDir, Overwrite, SetOverrides
from vlacl.config.core import help_for, resolve_config
from vlacl.config.train_task import TrainTaskConfig

if TYPE_CHECKING:
    from vlacl.training.loop import Progress, StopFlag

log = logging.getLogger(__name__)

PANEL_STREAM = "Stream and task"
PANEL_MODEL = "Model and adapters"
PANEL_OPTIM = "Optimization"
PANEL_RUN = "Run, logging and resume"


def _opt(flag: str, key: str, panel: str, **extra: Any) -> Any:
    return typer.Option(flag, help=help_for(TrainTaskConfig, key), rich_help_panel=panel, show_default=False, **extra)


def train_task(
    ctx: typer.Context,
    out: OutDir = None,
    overwrite: Overwrite = False,
    config: ConfigFile = None,
    set_: SetOverrides = None,
    dataset: Annotated[list[Path] | None, _opt("--dataset", "datasets", PANEL_INPUT)] = None,
    stats: Annotated[Path | None, _opt("--stats", "stats", PANEL_INPUT)] = None,
    keymap: Annotated[Path | None, _opt("--keymap", "keymap", PANEL_INPUT)] = None,
    prev: Annotated[
        Path | None,
        typer.Option(
            "--prev",
            help="The previous task's checkpoint: continue the stream from its adapters, head and CL state "
            "(its base model and stats must be those given here).",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ] = None,
    stream: Annotated[str | None, _opt("--stream", "stream_name", PANEL_STREAM)] = None,
    task: Annotated[str | None, _opt("--task", "task", PANEL_STREAM)] = None,
    partition: Annotated[str | None, _opt("--partition", "partition", PANEL_STREAM)] = None,
    order: Annotated[list[str] | None, _opt("--order", "task_order", PANEL_STREAM)] = None,
    history: Annotated[int | None, _opt("--history", "history", PANEL_STREAM)] = None,
    chunk: Annotated[int | None, _opt("--chunk", "chunk", PANEL_STREAM)] = None,
    model: Annotated[str | None, _opt("--model", "model_path", PANEL_MODEL)] = None,
    trust_remote_code: Annotated[
        bool | None, _opt("--trust-remote-code/--no-trust-remote-code", "trust_remote_code", PANEL_MODEL)
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            "--head", help=help_for(TrainTaskConfig, "model.head"), rich_help_panel=PANEL_MODEL, show_default=False
        ),
    ] = None,
    finetune: Annotated[
        str | None,
        typer.Option(
            "--finetune",
            help=help_for(TrainTaskConfig, "adapter.finetune"),
            rich_help_panel=PANEL_MODEL,
            show_default=False,
        ),
    ] = None,
    adapter_mode: Annotated[
        str | None,
        typer.Option(
            "--adapter-mode",
            help=help_for(TrainTaskConfig, "adapter.mode"),
            rich_help_panel=PANEL_MODEL,
            show_default=False,
        ),
    ] = None,
    lora_rank: Annotated[
        int | None,
        typer.Option(
            "--lora-rank",
            help=help_for(TrainTaskConfig, "adapter.rank"),
            rich_help_panel=PANEL_MODEL,
            show_default=False,
        ),
    ] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            "--lora-targets",
            help=help_for(TrainTaskConfig, "adapter.targets"),
            rich_help_panel=PANEL_MODEL,
            show_default=False,
        ),
    ] = None,
    cl: Annotated[str | None, _opt("--cl", "cl", PANEL_MODEL)] = None,
    cl_opt: Annotated[
        list[str] | None,
        typer.Option(
            "--cl-opt",
            help="An option of the CL algorithm as KEY=VALUE (repeatable), e.g. --cl-opt per_task=200; merged over "
            "cl_options of the config file and --set.",
            rich_help_panel=PANEL_MODEL,
            show_default=False,
        ),
    ] = None,
    lr: Annotated[float | None, _opt("--lr", "lr", PANEL_OPTIM)] = None,
    head_lr: Annotated[float | None, _opt("--head-lr", "head_lr", PANEL_OPTIM)] = None,
    steps: Annotated[int | None, _opt("--steps", "steps", PANEL_OPTIM)] = None,
    epochs: Annotated[float | None, _opt("--epochs", "epochs", PANEL_OPTIM)] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", "batch_size", PANEL_OPTIM)] = None,
    grad_accum: Annotated[int | None, _opt("--grad-accum", "grad_accum", PANEL_OPTIM)] = None,
    grad_clip: Annotated[float | None, _opt("--grad-clip", "grad_clip", PANEL_OPTIM)] = None,
    warmup_steps: Annotated[int | None, _opt("--warmup-steps", "warmup_steps", PANEL_OPTIM)] = None,
    schedule: Annotated[str | None, _opt("--schedule", "schedule", PANEL_OPTIM)] = None,
    precision: Annotated[str | None, _opt("--precision", "precision", PANEL_OPTIM)] = None,
    two_stage: Annotated[bool | None, _opt("--two-stage/--one-stage", "two_stage", PANEL_OPTIM)] = None,
    stage1_steps: Annotated[int | None, _opt("--stage1-steps", "stage1_steps", PANEL_OPTIM)] = None,
    cache_features: Annotated[
        bool | None, _opt("--cache-features/--no-cache-features", "cache_features", PANEL_OPTIM)
    ] = None,
    feature_cache: Annotated[Path | None, _opt("--feature-cache", "feature_cache", PANEL_OPTIM)] = None,
    activation_checkpointing: Annotated[
        bool | None,
        _opt("--activation-checkpointing/--no-activation-checkpointing", "activation_checkpointing", PANEL_OPTIM),
    ] = None,
    compile_: Annotated[bool | None, _opt("--compile/--no-compile", "compile", PANEL_OPTIM)] = None,
    compile_mode: Annotated[str | None, _opt("--compile-mode", "compile_mode", PANEL_OPTIM)] = None,
    seed: Annotated[int | None, _opt("--seed", "seed", PANEL_RUN)] = None,
    device: Annotated[str | None, _opt("--device", "device", PANEL_RUN)] = None,
    workers: Annotated[int | None, _opt("--workers", "workers", PANEL_RUN)] = None,
    log_every: Annotated[int | None, _opt("--log-every", "log_every", PANEL_RUN)] = None,
    val_every: Annotated[int | None, _opt("--val-every", "val_every", PANEL_RUN)] = None,
    save_every: Annotated[int | None, _opt("--save-every", "save_every", PANEL_RUN)] = None,
    keep_best: Annotated[bool | None, _opt("--keep-best/--no-keep-best", "keep_best", PANEL_RUN)] = None,
    tensorboard: Annotated[bool | None, _opt("--tensorboard/--no-tensorboard", "tensorboard", PANEL_RUN)] = None,
    smoke: Annotated[bool | None, _opt("--smoke", "smoke", PANEL_RUN)] = None,
    resume: Annotated[
        str,
        typer.Option(
            "--resume",
            help="auto: continue from the resume state of --out when there is one (after SIGTERM/SIGUSR1 or a "
            "crash); never: start over; must: fail without one.",
            rich_help_panel=PANEL_RUN,
            metavar="auto|never|must",
        ),
    ] = "auto",
) -> None:
    """Train one task of a stream and write a task checkpoint (adapters, action head, stats, CL state).

    The stream is built from --dataset(s) (tasks by task_index or by dataset); --task picks the task,
    --prev continues from the previous task's checkpoint. Runs as is on one device, or under
    `accelerate launch` on several (DDP, FSDP, DeepSpeed by accelerate config). SIGTERM or SIGUSR1
    (SLURM preemption) saves the resume state and exits with code 75; rerun the same command to continue.
    """
    from vlacl.errors import ConfigError
    from vlacl.training.loop import StopFlag, run_train_task

    if out is None:
        raise ConfigError("train-task needs --out DIR, the task checkpoint to write")
    if resume not in ("auto", "never", "must"):
        raise ConfigError(f"--resume {resume!r}: use auto, never or must")
    cfg = resolve_config(
        TrainTaskConfig,
        config_file=config,
        overrides=set_ or (),
        flags={
            "datasets": tuple(dataset) if dataset else None,
            "stats": stats,
            "keymap": keymap,
            "stream_name": stream,
            "task": task,
            "partition": partition,
            "task_order": tuple(order) if order else None,
            "history": history,
            "chunk": chunk,
            "model_path": model,
            "trust_remote_code": trust_remote_code,
            "model.head": head,
            "adapter.finetune": finetune,
            "adapter.mode": adapter_mode,
            "adapter.rank": lora_rank,
            "adapter.targets": lora_targets,
            "cl": cl,
            "lr": lr,
            "head_lr": head_lr,
            "steps": steps,
            "epochs": epochs,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "grad_clip": grad_clip,
            "warmup_steps": warmup_steps,
            "schedule": schedule,
            "precision": precision,
            "two_stage": two_stage,
            "stage1_steps": stage1_steps,
            "cache_features": cache_features,
            "feature_cache": feature_cache,
            "activation_checkpointing": activation_checkpointing,
            "compile": compile_,
            "compile_mode": compile_mode,
            "seed": seed,
            "device": device,
            "workers": workers,
            "log_every": log_every,
            "val_every": val_every,
            "save_every": save_every,
            "keep_best": keep_best,
            "tensorboard": tensorboard,
            "smoke": smoke,
        },
    )
    if cl_opt:
        cfg = dataclasses.replace(cfg, cl_options={**(cfg.cl_options or {}), **_cl_options(cl_opt)})
    stop = StopFlag()
    with _stop_on_signals(stop), _progress() as progress:
        result = run_train_task(
            cfg,
            out=out,
            prev=prev,
            resume=resume,  # type: ignore[arg-type]
            overwrite=overwrite,
            command=command_line(ctx),
            progress=progress,
            stop=stop,
        )
    if result.out is not None:
        val = "-" if result.val_loss is None else f"{result.val_loss:.4g}"
        typer.echo(
            f"wrote {result.out}: {result.steps} steps, final loss {result.final_loss:.4g}, val loss {val}, "
            f"{result.samples_per_s:.1f} samples/s"
        )


def _cl_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> options; values are read as YAML scalars (``200``, ``0.5``, ``true``, ``quota``)."""
    import yaml

    from vlacl.errors import ConfigError

    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid --cl-opt {item!r}: expected KEY=VALUE, e.g. --cl-opt per_task=200")
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            options[key.strip()] = raw
    return options


@contextmanager
def _stop_on_signals(stop: StopFlag) -> Iterator[None]:
    """SIGTERM, SIGUSR1 (SLURM's warning before preemption) and SIGHUP stop the loop at the next step boundary."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [signal.SIGTERM, signal.SIGHUP, *([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])]

    def handler(signum: int, frame: Any) -> None:
        log.warning("%s received: saving the resume state after this step", signal.Signals(signum).name)
        stop.set(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress bar on stderr with loss, lr and samples/s.

    Off a terminal (a SLURM log), one plain log line per log step instead; with ``-q`` neither.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    from vlacl.cli.render import progress_console

    if logging.getLogger("vlacl").getEffectiveLevel() > logging.INFO:
        yield None
        return
    console = progress_console()
    if console is None:
        yield _log_metrics
        return
    with RichProgress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    ) as bar:
        handle = bar.add_task("train", total=None, info="")
        shown: dict[str, str] = {}

        def update(event: Progress) -> None:
            if event.metrics:
                m = event.metrics
                if "loss" in m:
                    shown["loss"] = f"loss {m['loss']:.4g}"
                    shown["lr"] = f"lr {m['lr']:.2e}"
                    if m.get("samples_per_s"):
                        shown["sps"] = f"{m['samples_per_s']:.1f} samples/s"
                if "val_loss" in m:
                    shown["val"] = f"val {m['val_loss']:.4g}"
            bar.update(handle, completed=event.step, total=event.total, info="  ".join(shown.values()))

        yield update


def _log_metrics(event: Progress) -> None:
    """One plain line per logged step and per validation, for logs read with grep."""
    m = event.metrics
    if not m:
        return
    if "loss" in m:
        sps = m.get("samples_per_s")
        log.info(
            "step %d/%d loss %.4g lr %.2e samples/s %s",
            event.step,
            event.total,
            m["loss"],
            m["lr"],
            f"{sps:.1f}" if sps else "-",
        )
    if "val_loss" in m:
        log.info("step %d/%d val_loss %.4g", event.step, event.total, m["val_loss"])
