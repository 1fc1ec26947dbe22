"""The exceptions vlacl raises on bad input.

Core code raises a :class:`VlaclError` (or a subclass) whose message says what was wrong, with the
offending value, and what to do about it. The CLI turns it into one line on stderr and the exit
code carried by the class: 2 for usage and configuration mistakes, 1 for everything else.
"""

from __future__ import annotations


class VlaclError(Exception):
    """Base class of every error that is the user's input rather than a bug in vlacl."""

    exit_code: int = 1


class ConfigError(VlaclError):
    """A configuration file, a ``--set`` override or a flag value is invalid."""

    exit_code = 2


class ArtifactError(VlaclError):
    """An artifact directory is missing, incomplete, of the wrong kind or fails verification."""


class OutputExistsError(ArtifactError):
    """The ``--out`` directory already holds something that would be replaced."""

    exit_code = 2


class InputFormatError(VlaclError):
    """An input file (a matrix, a table, a dataset file) does not have the expected format."""


class Terminated(BaseException):  # named for the event, like KeyboardInterrupt
    """A termination signal (SIGTERM, SIGHUP) arrived; raised so that cleanup code runs.

    It derives from ``BaseException`` so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")
