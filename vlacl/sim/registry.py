"""Simulators by name, each imported only when asked for (their packages are optional extras)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import cast

from vlacl.errors import ConfigError, VlaclError
from vlacl.sim.base import Simulator


@dataclass(frozen=True)
class _Entry:
    module: str
    factory: str
    extra: str
    packages: tuple[str, ...]


SIMULATORS: dict[str, _Entry] = {
    "metaworld": _Entry("vlacl.sim.metaworld", "MetaWorldSimulator", "sim", ("metaworld", "mujoco", "gymnasium")),
    "libero": _Entry("vlacl.sim.libero", "LiberoSimulator", "libero", ("libero", "robosuite", "mujoco")),
}
"""Simulator name -> the adapter's module and factory, the pip extra that installs it, its packages."""


class SimulatorUnavailableError(VlaclError):
    """A simulator was asked for whose optional packages are not installed."""


def simulator_names() -> tuple[str, ...]:
    """Every simulator name :func:`get_simulator` knows."""
    return tuple(SIMULATORS)


def get_simulator(name: str) -> Simulator:
    """The simulator ``name`` (``metaworld``, ``libero``), importing its adapter on first use.

    Raises:
        ConfigError: ``name`` is not a known simulator.
        SimulatorUnavailableError: The simulator's packages are not installed (the message names the
            pip extra that installs them).
    """
    entry = SIMULATORS.get(name)
    if entry is None:
        raise ConfigError(f"unknown simulator {name!r}: choose one of {', '.join(SIMULATORS)}")
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if error.name == entry.module:
            raise SimulatorUnavailableError(
                f"this vlacl installation has no {name} adapter ({entry.module} is missing): reinstall vlacl"
            ) from error
        if missing in entry.packages:
            raise SimulatorUnavailableError(
                f"simulator {name!r} needs the Python package {missing!r}, which is not installed: "
                f"pip install 'vlacl[{entry.extra}]'"
            ) from error
        raise
    return cast(Simulator, getattr(module, entry.factory)())
