"""``vlacl merge-lora``: merge LoRA adapters into a base model, streaming shard by shard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlacl.cli.context import command_line
from vlacl.cli.options import PANEL_INPUT, PANEL_OUTPUT, ConfigFile, JsonOutput, Overwrite, SetOverrides
from vlacl.config.core import help_for, resolve_config
from vlacl.config.merge_lora import MergeLoraConfig

if TYPE_CHECKING:
    from vlacl.adapters.merge import MergeResult

log = logging.getLogger(__name__)

RequiredOutDir = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Directory to write; built under a temporary name and renamed into place when complete.",
        rich_help_panel=PANEL_OUTPUT,
        show_default=False,
    ),
]


def merge_lora(
    ctx: typer.Context,
    adapters: Annotated[
        list[Path],
        typer.Argument(
            help="Adapters to merge, summed: PEFT adapter directories, composed adapters, or one task checkpoint "
            "(its whole adapter stack, plus its action head and stats).",
            metavar="ADAPTER",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ],
    out: RequiredOutDir,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            "-b",
            help="Hugging Face model directory (safetensors, sharded or not) the adapters were trained on; "
            "by default the base model a task checkpoint names.",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help=help_for(MergeLoraConfig, "dtype"),
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
    """Merge LoRA adapters into a base model: a model directory that from_pretrained loads.

    Streams the base shard by shard: every adapted weight gets the sum of its updates,
    scale * B @ A, added in float32 and cast back to its dtype; memory stays near one shard. Handles
    rsLoRA, rank and alpha patterns, modules_to_save and stacked adapters; refuses DoRA and other
    variants. Copies config, tokenizer and processor files and writes model.safetensors.index.json.
    From a task checkpoint it also copies the action head, stats and key map: a complete policy.
    Run again on a finished merge of the same inputs, it reports that and stops.
    """
    from vlacl.adapters.merge import merge_lora as run

    cfg = resolve_config(MergeLoraConfig, config_file=config, overrides=set_ or (), flags={"dtype": dtype})
    result = run(adapters, cfg, out=out, base=base, overwrite=overwrite, command=command_line(ctx))
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_merge(result)
    if not result.already_merged:
        log.info("wrote merged_model artifact %s", out)


def print_merge(result: MergeResult) -> None:
    """Print what was merged: one row per adapter, then the output."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if result.already_merged:
        console.print(
            f"{result.out} already holds this merge (same base, adapters and settings): nothing to do",
            highlight=False,
            markup=False,
        )
        return
    table = Table(title=f"Merged into {result.base}", title_justify="left")
    for column in ("adapter", "ranks", "scales", "modules", "saved tensors"):
        table.add_column(column, justify="left" if column == "adapter" else "right")
    for source in result.adapters:
        for adapter in source["adapters"]:
            name = source["label"] if adapter["name"] == source["label"] else f"{source['label']}/{adapter['name']}"
            table.add_row(
                name,
                ",".join(str(r) for r in adapter["ranks"]),
                ",".join(f"{s:g}" for s in adapter["scales"]),
                str(adapter["num_modules"]),
                str(len(adapter["saved_tensors"])),
            )
    console.print(table)
    lines = [
        f"out: {result.out} ({len(result.shards)} shard(s), {result.bytes_written / 1e9:.2f} GB, {result.dtype})",
        f"tensors: {result.updated_tensors} updated, {result.replaced_tensors} replaced",
        f"time: {result.seconds:.1f} s",
    ]
    if result.policy_files:
        lines.append("policy files: " + ", ".join(result.policy_files))
    for line in lines:
        console.print(line, highlight=False, markup=False)
