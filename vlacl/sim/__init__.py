"""Simulator adapters behind one interface (:mod:`vlacl.sim.base`), task streams and scripted experts.

Importing this package sets MuJoCo's off-screen platform defaults (:mod:`vlacl.sim.gl`) and imports
no simulator: :func:`get_simulator` loads an adapter (and its optional packages) on first use, and
:func:`resolve_stream` imports LIBERO only for LIBERO streams.
"""

from vlacl.sim.gl import RenderingUnavailableError, configure_offscreen_gl

configure_offscreen_gl()  # MuJoCo reads MUJOCO_GL once, when first imported: set it before anyone does

from vlacl.sim.base import Expert, Observation, RenderSettings, SimEnv, Simulator, StepResult, VectorEnv  # noqa: E402
from vlacl.sim.registry import SimulatorUnavailableError, get_simulator, simulator_names  # noqa: E402
from vlacl.sim.streams import TaskStreamSpec, preset_names, resolve_stream  # noqa: E402
from vlacl.sim.vector import SequentialVectorEnv  # noqa: E402

__all__ = [
    "Expert",
    "Observation",
    "RenderSettings",
    "RenderingUnavailableError",
    "SequentialVectorEnv",
    "SimEnv",
    "Simulator",
    "SimulatorUnavailableError",
    "StepResult",
    "TaskStreamSpec",
    "VectorEnv",
    "get_simulator",
    "preset_names",
    "resolve_stream",
    "simulator_names",
]
