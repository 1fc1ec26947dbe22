"""Log lines go to stderr as plain, greppable text; results go to stdout."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def configure_logging(verbose: int, quiet: bool) -> None:
    """Send ``vlacl`` log records to stderr: INFO by default, DEBUG with -v, WARNING with -q."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 0 else logging.INFO
    logger = logging.getLogger("vlacl")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
