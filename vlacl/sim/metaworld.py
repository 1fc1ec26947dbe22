"""Meta-World v3 behind vlacl's simulator interface: the 50 tasks, seeded episodes, cameras, experts.

Environments are Meta-World's own task classes (``metaworld.env_dict.ALL_V3_ENVIRONMENTS``, the list
MT1/MT10/MT50 are built from) in the multi-task setting: the goal is observed, so
``observation.state`` is Meta-World's 39-d observation (hand xyz, gripper opening, two objects'
position and quaternion, the same 18 values of the previous step, the goal xyz) as float32.
Object and goal positions are drawn from the environment's generator seeded by ``reset(seed)``,
Meta-World's ``seeded_rand_vec`` mode, so a seed fixes the initial state and, with the same actions,
the whole trajectory. An episode lasts Meta-World's ``max_path_length`` (500) steps; ``success`` is
``info["success"]``; the episode does not end at success (Meta-World's convention).

Cameras are rendered with one ``mujoco.Renderer`` per environment, with shadows, reflections and
multisampling off unless :class:`~vlacl.sim.base.RenderSettings` asks for them (they are most of the
CPU rendering time), and only when asked for: state-only environments never open an OpenGL context.
Meta-World's corner cameras look at the table with their image's up axis pointing down; frames are
turned upright in one place, :func:`_upside_down`, from each camera's orientation.

The expert of a task is Meta-World's scripted policy for it (``metaworld.policies``), reading the
raw 39-d state from ``observation.state``.
"""

from __future__ import annotations

from vlacl.sim.gl import RenderingUnavailableError, configure_offscreen_gl, rendering_help

configure_offscreen_gl()  # before mujoco is imported

import atexit  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from typing import Any  # noqa: E402

import metaworld  # noqa: E402, F401  (registers the envs; metaworld.env_dict needs the package initialised)
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

from vlacl.errors import ConfigError, VlaclError  # noqa: E402
from vlacl.sim.base import Observation, RenderSettings, StepResult  # noqa: E402
from vlacl.sim.instructions import metaworld_instruction  # noqa: E402
from vlacl.sim.vector import SequentialVectorEnv  # noqa: E402

logger = logging.getLogger(__name__)

STATE_KEY = "observation.state"
IMAGE_KEY_PREFIX = "observation.images."
ACTION_DIM = 4
STATE_DIM = 39
CAMERAS: tuple[str, ...] = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
"""The cameras of Meta-World's Sawyer scene, as named in its XML."""
MULTISAMPLES = 4
"""Multisample count when :attr:`RenderSettings.multisample` is on (MuJoCo's default)."""


def metaworld_tasks() -> tuple[str, ...]:
    """Every Meta-World v3 task name, in Meta-World's order."""
    return tuple(ALL_V3_ENVIRONMENTS)


def library_versions() -> dict[str, str]:
    """Versions of the simulator's packages, for an artifact's manifest."""
    found: dict[str, str] = {}
    for package in ("metaworld", "mujoco", "gymnasium"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _check_task(task: str) -> None:
    if task not in ALL_V3_ENVIRONMENTS:
        metaworld_instruction(task)  # raises ConfigError with the closest name
        raise ConfigError(f"Meta-World {version('metaworld')} has no task {task!r}")


def _touching_object(env: Any, object_geom_id: int) -> bool:
    """Meta-World's ``SawyerXYZEnv.touching_object`` over MuJoCo's contact arrays instead of a Python loop.

    The same test (both finger pads in contact with the object with a positive summed normal force),
    summed in the same order; Meta-World's loop builds one Python object per contact, twice, and was
    half of a step's time in tasks that ask it every step (``push``, ``pick-place``, ...).
    """
    data = env.data
    if data.ncon == 0:
        return False
    contact = data.contact
    geom1, geom2 = contact.geom1, contact.geom2  # (ncon,)
    with_object = (geom1 == object_geom_id) | (geom2 == object_geom_id)
    forces = data.efc_force[contact.efc_address]  # (ncon,)
    left, right = env._vlacl_pad_geoms
    left_force = sum(forces[with_object & ((geom1 == left) | (geom2 == left))].tolist())
    right_force = sum(forces[with_object & ((geom1 == right) | (geom2 == right))].tolist())
    return bool(left_force > 0 and right_force > 0)


def _check_gl_platform() -> None:
    """Refuse, with the fix, a GLFW context without a display: GLFW aborts the process there."""
    context = getattr(mujoco.gl_context, "GLContext", None)
    module = getattr(context, "__module__", "")
    no_display = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if context is None or (sys.platform.startswith("linux") and module.startswith("mujoco.glfw") and no_display):
        raise RenderingUnavailableError(rendering_help(RuntimeError(f"MuJoCo's GL context is {module or 'disabled'}")))


def _upside_down(up_world: np.ndarray) -> bool:
    """Whether a camera whose image up axis is ``up_world`` (world frame) renders the scene upside down."""
    return bool(up_world[2] < 0.0)


_OPEN_RIGS: weakref.WeakSet[_CameraRig] = weakref.WeakSet()


def _close_open_rigs() -> None:
    """Free the GL contexts of environments never closed, while EGL is still initialised.

    Left to the garbage collector at interpreter exit, MuJoCo's renderer frees its EGL context after
    MuJoCo's own exit hook has terminated the EGL display, and prints an EGLError traceback. This hook
    is registered after the first context is made, so it runs before MuJoCo's (exit hooks run last
    registered first).
    """
    for rig in list(_OPEN_RIGS):
        rig.close()


_exit_hook_registered = False


def _track(rig: _CameraRig) -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_close_open_rigs)
        _exit_hook_registered = True
    _OPEN_RIGS.add(rig)


class _CameraRig:
    """One off-screen renderer for an environment's cameras, with the frames turned upright."""

    def __init__(self, model: Any, data: Any, render: RenderSettings) -> None:
        known = [model.camera(index).name for index in range(model.ncam)]
        for camera in render.cameras:
            if camera not in known:
                raise ConfigError(f"Meta-World has no camera {camera!r}: choose from {', '.join(known)}")
        if render.height < 1 or render.width < 1:
            raise ConfigError(f"frame size must be positive, got {render.height}x{render.width} (height x width)")
        model.vis.quality.offsamples = MULTISAMPLES if render.multisample else 0  # read when the context is made
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, render.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, render.height)
        _check_gl_platform()
        try:
            self._renderer = mujoco.Renderer(model, height=render.height, width=render.width)
        except Exception as error:  # EGL/OSMesa failures surface as several exception types
            raise RenderingUnavailableError(rendering_help(error)) from error
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = render.shadows
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = render.reflections
        mujoco.mj_forward(model, data)
        self._cameras: list[tuple[str, Any, bool]] = []
        for camera in render.cameras:
            index = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
            view = mujoco.MjvCamera()
            view.type = mujoco.mjtCamera.mjCAMERA_FIXED
            view.fixedcamid = index
            up_world = data.cam_xmat[index].reshape(3, 3)[:, 1]  # camera y axis = image up
            self._cameras.append((IMAGE_KEY_PREFIX + camera, view, _upside_down(up_world)))
        _track(self)

    def frames(self, data: Any) -> dict[str, np.ndarray]:
        """Every camera's frame ``(H, W, 3)`` uint8, upright, under its observation key."""
        frames: dict[str, np.ndarray] = {}
        for key, view, flip in self._cameras:
            self._renderer.update_scene(data, camera=view)
            frame = self._renderer.render()
            frames[key] = np.ascontiguousarray(frame[::-1, ::-1]) if flip else frame
        return frames

    def close(self) -> None:
        self._renderer.close()
        _OPEN_RIGS.discard(self)


class MetaWorldEnv:
    """One Meta-World v3 task as a :class:`~vlacl.sim.base.SimEnv`.

    Args:
        task: A v3 task name (``reach-v3``).
        render: Cameras and frame settings; no cameras gives state-only observations.
    """

    def __init__(self, task: str, render: RenderSettings) -> None:
        _check_task(task)
        self._task = task
        self._instruction = metaworld_instruction(task)
        env: Any = ALL_V3_ENVIRONMENTS[task]()  # metaworld types its private fields loosely
        # The multi-task setting with seeded goals, as Meta-World's goal-observable classes set it up.
        env._partially_observable = False
        del env.sawyer_observation_space  # recomputed for the observed goal (a cached property)
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._vlacl_pad_geoms = (env.data.geom("leftpad_geom").id, env.data.geom("rightpad_geom").id)
        env.touching_object = types.MethodType(_touching_object, env)
        self._env: Any = env
        self._max_steps = int(env.max_path_length)
        self._raw_state: np.ndarray | None = None
        self._steps = 0
        self._rig = _CameraRig(env.model, env.data, render) if render.cameras else None

    @property
    def task(self) -> str:
        """The task's v3 name."""
        return self._task

    @property
    def instruction(self) -> str:
        """The task's language instruction."""
        return self._instruction

    @property
    def max_steps(self) -> int:
        """Meta-World's step budget per episode (``max_path_length``)."""
        return self._max_steps

    @property
    def action_dim(self) -> int:
        """4: hand displacement xyz and gripper effort, each in [-1, 1]."""
        return ACTION_DIM

    @property
    def raw_state(self) -> np.ndarray:
        """The last observation exactly as Meta-World returned it: ``(39,)`` float64."""
        if self._raw_state is None:
            raise ConfigError(f"{self._task}: no observation yet, call reset(seed) first")
        return self._raw_state

    @property
    def unwrapped(self) -> Any:
        """Meta-World's own environment object (for inspection; stepping it directly desynchronises this one)."""
        return self._env

    def reset(self, seed: int) -> Observation:
        """Start an episode whose object and goal positions follow from ``seed`` (a non-negative int)."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"{self._task}: reset needs a non-negative integer seed, got {seed!r}")
        self._env.seed(int(seed))
        raw, _ = self._env.reset()
        self._steps = 0
        return self._observe(raw)

    def step(self, action: np.ndarray) -> StepResult:
        """Apply ``action`` ``(4,)``; Meta-World clips it to [-1, 1]."""
        if self._raw_state is None:
            raise ConfigError(f"{self._task}: step was called before reset: call reset(seed) first")
        if self._steps >= self._max_steps:
            raise ConfigError(
                f"{self._task}: the episode ended after its {self._max_steps} steps: call reset(seed) before stepping"
            )
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (ACTION_DIM,):
            raise ConfigError(f"{self._task}: an action has shape ({ACTION_DIM},), got {action.shape}")
        raw, reward, terminated, truncated, info = self._env.step(action)
        self._steps += 1
        return StepResult(
            observation=self._observe(raw),
            reward=float(reward),
            success=bool(info["success"]),
            done=bool(terminated or truncated),
            info=info,
        )

    def close(self) -> None:
        """Free the renderer and the simulation."""
        if self._rig is not None:
            self._rig.close()
            self._rig = None
        self._env.close()

    def _observe(self, raw: np.ndarray) -> Observation:
        self._raw_state = raw
        observation: Observation = {STATE_KEY: raw.astype(np.float32)}
        if self._rig is not None:
            observation.update(self._rig.frames(self._env.data))
        return observation


class MetaWorldExpert:
    """Meta-World's scripted policy for one task, acting on ``observation.state``."""

    def __init__(self, task: str) -> None:
        _check_task(task)
        policy_class: Any = ENV_POLICY_MAP.get(task)
        if policy_class is None:
            raise VlaclError(f"Meta-World {version('metaworld')} has no scripted policy for {task!r}")
        self._task = task
        self._policy = policy_class()

    @property
    def task(self) -> str:
        """The task the expert solves."""
        return self._task

    def act(self, observation: Mapping[str, np.ndarray]) -> np.ndarray:
        """The expert's action ``(4,)`` float32, clipped to [-1, 1]."""
        state = np.asarray(observation[STATE_KEY], dtype=np.float64)
        with warnings.catch_warnings():
            # metaworld.policies.move warns on every step whose gain saturates the action (the env clips).
            warnings.simplefilter("ignore", UserWarning)
            action = self._policy.get_action(state)
        return np.minimum(np.maximum(np.asarray(action, dtype=np.float32), -1.0), 1.0)  # np.clip's wrapper is slower


class MetaWorldSimulator:
    """Meta-World v3 as a :class:`~vlacl.sim.base.Simulator`."""

    name = "metaworld"

    def tasks(self) -> Sequence[str]:
        """All 50 v3 task names."""
        return metaworld_tasks()

    def make_env(self, task: str, render: RenderSettings) -> MetaWorldEnv:
        """One environment for ``task``."""
        return MetaWorldEnv(task, render)

    def make_envs(self, tasks: Sequence[str], render: RenderSettings) -> SequentialVectorEnv:
        """One environment per entry of ``tasks`` (repeats allowed), stepped in turn in this process."""
        envs: list[MetaWorldEnv] = []
        try:
            for task in tasks:
                envs.append(MetaWorldEnv(task, render))
        except BaseException:
            for env in envs:
                env.close()
            raise
        return SequentialVectorEnv(envs)

    def expert(self, task: str) -> MetaWorldExpert:
        """Meta-World's scripted policy for ``task``."""
        return MetaWorldExpert(task)
