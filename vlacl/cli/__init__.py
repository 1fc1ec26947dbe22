"""The ``vlacl`` command line: one module per command, each calling one core function."""

from vlacl.cli.app import app, main

__all__ = ["app", "main"]
