"""Frozen config dataclasses of every command, and their YAML / ``--set`` / flag resolution."""

from vlacl.config.cl_metrics import ClMetricsConfig
from vlacl.config.core import config_keys, config_to_dict, dump_config, help_for, resolve_config, setting

__all__ = [
    "ClMetricsConfig",
    "config_keys",
    "config_to_dict",
    "dump_config",
    "help_for",
    "resolve_config",
    "setting",
]
