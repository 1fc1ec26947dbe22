"""What a command knows about its own invocation."""

from __future__ import annotations

import sys

import typer

ARGV_KEY = "vlacl.argv"
"""Key in ``ctx.meta`` under which the command group stores the command line as typed."""


def command_line(ctx: typer.Context) -> list[str]:
    """The command line of the running command, as typed (``vlacl`` plus its arguments)."""
    return list(ctx.meta.get(ARGV_KEY, ["vlacl", *sys.argv[1:]]))
