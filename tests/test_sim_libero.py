"""The LIBERO adapter: frame orientation, budgets and state without LIBERO; suites, seeds and replay with it.

The tests at the top need only vlacl. The rest need the ``libero`` extra and skip without it; those
that build simulated scenes take seconds each and are marked ``integration``:
``pytest tests/test_sim_libero.py -m integration`` in an environment with ``vlacl[libero]``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.hdf5_factories import Hdf5Factory, upright_frames
from vlacl.data import hdf5
from vlacl.data.features import image_key
from vlacl.data.open import open_datasets
from vlacl.errors import ConfigError, VlaclError
from vlacl.sim import RenderSettings, SimEnv, Simulator, SimulatorUnavailableError, get_simulator
from vlacl.sim import libero as libero_adapter
from vlacl.sim.libero import (
    ACTION_DIM,
    CAMERAS,
    SETTLE_ACTION,
    SETTLE_STEPS,
    STATE_DIM,
    STATE_KEY,
    SUITE_MAX_STEPS,
    SUITES,
    LiberoEnv,
    LiberoSimulator,
    libero_state,
    max_steps_of,
    quat_to_axis_angle,
    split_task,
    upright_frame,
)

LIBERO_INSTALLED = importlib.util.find_spec("libero") is not None and importlib.util.find_spec("robosuite") is not None
needs_libero = pytest.mark.skipif(
    not LIBERO_INSTALLED, reason="LIBERO is an optional extra: pip install 'vlacl[libero]'"
)
STATE_ONLY = RenderSettings()
CAMERA_RENDER = RenderSettings(cameras=("agentview", "wrist"), height=48, width=64)


# Without LIBERO.


def test_upright_frame_matches_the_hdf5_reader_on_a_libero_file(tmp_path: Path) -> None:
    path = Hdf5Factory(tmp_path).robomimic(lengths=(6,), image_shape=(6, 10, 3))
    try:
        [dataset] = open_datasets([path])
        episode = dataset.episodes[0]
        for stored, camera in (("agentview_rgb", "agentview"), ("eye_in_hand_rgb", "eye_in_hand")):
            with h5py.File(path, "r") as f:
                raw = np.asarray(f[f"data/demo_0/obs/{stored}"])  # (T, H, W, C) as LIBERO stores them
            read = episode.read(image_key(camera))
            ours = np.stack([upright_frame(frame) for frame in raw])
            np.testing.assert_array_equal(ours, read)
            assert camera in CAMERAS  # the reader's camera names work as simulator cameras too
            assert ours.flags.c_contiguous
    finally:
        hdf5.close_cached_files()
    upright = upright_frames(1, (6, 10, 3), 0, 0)[0]
    # A rotation, not a vertical flip: the column gradient turns around too.
    assert not np.array_equal(upright_frame(upright), upright[::-1])


def test_upright_frame_gives_the_same_frame_under_either_robosuite_convention() -> None:
    raw_gl = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)  # (H, W, C), bottom row first
    raw_cv = raw_gl[::-1]  # what robosuite returns with IMAGE_CONVENTION = "opencv"
    np.testing.assert_array_equal(upright_frame(raw_gl, "opengl"), upright_frame(raw_cv, "opencv"))
    np.testing.assert_array_equal(upright_frame(raw_gl)[0, 0], raw_gl[-1, -1])
    depth = np.arange(12, dtype=np.float32).reshape(3, 4)  # (H, W)
    assert upright_frame(depth)[0, 0] == depth[-1, -1]
    with pytest.raises(ConfigError, match="unknown robosuite image convention 'opengl2'"):
        upright_frame(raw_gl, "opengl2")
    with pytest.raises(ConfigError, match=r"got shape \(5,\)"):
        upright_frame(np.zeros(5))


def test_step_budgets_are_libero_evaluation_convention() -> None:
    assert dict(SUITE_MAX_STEPS) == {"libero_goal": 300, "libero_spatial": 220, "libero_object": 280, "libero_10": 520}
    assert SUITES == ("libero_goal", "libero_spatial", "libero_object", "libero_10")
    assert max_steps_of("libero_10") == 520
    assert max_steps_of("libero_spatial/pick_up_the_black_bowl") == 220
    assert SETTLE_STEPS == 10
    assert SETTLE_ACTION == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    with pytest.raises(ConfigError, match="unknown LIBERO suite 'libero_90'"):
        max_steps_of("libero_90")


def test_task_names_need_a_known_suite() -> None:
    assert split_task("libero_goal/open_the_top_drawer") == ("libero_goal", "open_the_top_drawer")
    with pytest.raises(ConfigError, match="'<suite>/<task>'"):
        split_task("open_the_top_drawer")
    with pytest.raises(ConfigError, match="unknown LIBERO suite 'libero_100'"):
        split_task("libero_100/open_the_top_drawer")


def test_axis_angle_of_known_rotations() -> None:
    np.testing.assert_array_equal(quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
    half = math.sqrt(0.5)
    np.testing.assert_allclose(quat_to_axis_angle(np.array([0.0, 0.0, half, half])), [0.0, 0.0, math.pi / 2])
    np.testing.assert_allclose(quat_to_axis_angle(np.array([1.0, 0.0, 0.0, 0.0])), [math.pi, 0.0, 0.0])
    # w a hair above 1 from rounding is a zero rotation, and the input is left alone.
    quat = np.array([0.0, 0.0, 0.0, 1.0 + 1e-12])
    np.testing.assert_array_equal(quat_to_axis_angle(quat), np.zeros(3))
    assert quat[3] == 1.0 + 1e-12
    with pytest.raises(ConfigError, match=r"shape \(4,\)"):
        quat_to_axis_angle(np.zeros(3))


def test_state_is_eef_position_axis_angle_and_gripper() -> None:
    half = math.sqrt(0.5)
    raw = {
        "robot0_eef_pos": np.array([0.1, -0.2, 1.0]),
        "robot0_eef_quat": np.array([half, 0.0, 0.0, half]),
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
        "robot0_joint_pos": np.zeros(7),
    }
    state = libero_state(raw)
    assert state.dtype == np.float32
    assert state.shape == (STATE_DIM,)
    np.testing.assert_allclose(state, [0.1, -0.2, 1.0, math.pi / 2, 0.0, 0.0, 0.04, -0.04], rtol=1e-6)


def test_missing_extra_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    if LIBERO_INSTALLED:  # hide it: an import of a module mapped to None fails as a missing one
        for module in ("libero", "libero.libero", "robosuite", "robosuite.macros"):
            monkeypatch.setitem(sys.modules, module, None)
    libero_adapter._libero.cache_clear()
    try:
        with pytest.raises(SimulatorUnavailableError, match=r"pip install 'vlacl\[libero\]'"):
            LiberoSimulator()
        with pytest.raises(SimulatorUnavailableError, match=r"pip install 'vlacl\[libero\]'"):
            get_simulator("libero")
    finally:
        libero_adapter._libero.cache_clear()


# With LIBERO: the catalog (fast).


@pytest.fixture(scope="module")
def sim() -> LiberoSimulator:
    if not LIBERO_INSTALLED:
        pytest.skip("LIBERO is an optional extra: pip install 'vlacl[libero]'")
    simulator = get_simulator("libero")
    assert isinstance(simulator, LiberoSimulator)
    return simulator


@needs_libero
def test_suites_list_their_tasks_in_the_benchmarks_order(sim: LiberoSimulator) -> None:
    from libero.libero import benchmark

    assert isinstance(sim, Simulator)
    assert sim.name == "libero"
    tasks = sim.tasks()
    assert len(tasks) == 40
    assert len(set(tasks)) == 40
    for suite in SUITES:
        bench = benchmark.get_benchmark_dict()[suite]()
        listed = sim.suite_tasks(suite)
        assert isinstance(listed, list)
        assert listed == [f"{suite}/{name}" for name in bench.get_task_names()]
        for index, task in enumerate(listed):
            info = sim.task_info(task)
            assert info.index == index
            assert info.instruction == bench.get_task(index).language
            assert info.instruction
            assert info.bddl_file.is_file()
    assert [t for t in tasks if t.startswith("libero_goal/")] == sim.suite_tasks("libero_goal")


@needs_libero
def test_unknown_names_and_experts_are_reported(sim: LiberoSimulator) -> None:
    task = sim.suite_tasks("libero_goal")[0]
    with pytest.raises(VlaclError, match="LIBERO has no scripted expert for 'libero_goal/"):
        sim.expert(task)
    with pytest.raises(ConfigError, match="did you mean 'libero_goal/open_the_middle_drawer_of_the_cabinet'"):
        sim.make_env("libero_goal/open_the_midle_drawer_of_the_cabinet", STATE_ONLY)
    with pytest.raises(ConfigError, match="unknown LIBERO suite 'libero_90'"):
        sim.suite_tasks("libero_90")
    with pytest.raises(ConfigError, match="LIBERO has no camera 'frontview'"):
        sim.make_env(task, RenderSettings(cameras=("frontview",)))
    with pytest.raises(ConfigError, match="frame size must be positive"):
        sim.make_env(task, RenderSettings(cameras=("wrist",), height=0))


# With LIBERO: simulated scenes (seconds each).


def _first_task(sim: LiberoSimulator, suite: str) -> str:
    return sim.suite_tasks(suite)[0]


@pytest.fixture
def goal_env(sim: LiberoSimulator) -> Iterator[LiberoEnv]:
    env = sim.make_env(_first_task(sim, "libero_goal"), STATE_ONLY)
    yield env
    env.close()


def _episode(env: LiberoEnv, seed: int, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """MuJoCo states and ``observation.state`` (the reset's first), and success flags of one episode."""
    observation = env.reset(seed)
    sim_states, states, success = [env.sim_state()], [observation[STATE_KEY]], []
    for action in actions:
        result = env.step(action)
        sim_states.append(env.sim_state())
        states.append(result.observation[STATE_KEY])
        success.append(result.success)
    return np.stack(sim_states), np.stack(states), success


@needs_libero
@pytest.mark.integration
@pytest.mark.parametrize("suite", SUITES)
def test_one_task_of_each_suite_resets_steps_and_renders_upright(sim: LiberoSimulator, suite: str) -> None:
    from robosuite.utils import transform_utils

    env = sim.make_env(_first_task(sim, suite), CAMERA_RENDER)
    try:
        assert isinstance(env, SimEnv)
        assert env.instruction == sim.task_info(env.task).instruction != ""
        assert env.max_steps == SUITE_MAX_STEPS[suite]
        assert env.action_dim == ACTION_DIM
        assert env.num_init_states == 50

        first = env.reset(1)
        start = env.sim_state()
        fixtures = env.unwrapped.sim.model.body_pos.copy()  # jittered at reset, outside the state
        assert set(first) == {STATE_KEY, "observation.images.agentview", "observation.images.wrist"}
        assert first[STATE_KEY].shape == (STATE_DIM,)
        assert first[STATE_KEY].dtype == np.float32
        raw = env.raw_observation
        np.testing.assert_allclose(first[STATE_KEY][:3], raw["robot0_eef_pos"], rtol=1e-6)
        expected_rot = transform_utils.quat2axisangle(np.array(raw["robot0_eef_quat"]))
        np.testing.assert_allclose(first[STATE_KEY][3:6], expected_rot, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(first[STATE_KEY][6:], raw["robot0_gripper_qpos"], rtol=1e-6)
        for camera, source in (("agentview", "agentview_image"), ("wrist", "robot0_eye_in_hand_image")):
            frame = first[f"observation.images.{camera}"]
            assert frame.shape == (48, 64, 3)
            assert frame.dtype == np.uint8
            assert frame.std() > 5.0  # a scene, not a blank buffer
            np.testing.assert_array_equal(frame, upright_frame(raw[source], env.image_convention))

        # Upright: the agentview camera looks down at the table, so near surfaces are at the bottom.
        _, depth = env.unwrapped.sim.render(camera_name="agentview", width=64, height=48, depth=True)
        upright_depth = upright_frame(np.asarray(depth), "opengl")  # sim.render is always OpenGL's rows
        assert upright_depth[-12:].mean() < upright_depth[:12].mean()

        again = env.reset(1)
        np.testing.assert_array_equal(env.sim_state(), start)
        np.testing.assert_array_equal(env.unwrapped.sim.model.body_pos, fixtures)
        for key, value in first.items():
            np.testing.assert_array_equal(again[key], value)
        env.reset(1 + env.num_init_states)
        np.testing.assert_array_equal(env.sim_state(), start)
        env.reset(2)
        assert not np.array_equal(env.sim_state(), start)
        assert env.init_state_index == 2

        for _ in range(3):
            result = env.step(np.zeros(ACTION_DIM))
            assert isinstance(result.success, bool)
            assert result.success is False
            assert result.done is False
            assert result.reward == 0.0
            assert set(result.observation) == set(first)
    finally:
        env.close()


@needs_libero
@pytest.mark.integration
def test_replaying_actions_from_a_seed_reproduces_the_states(sim: LiberoSimulator, goal_env: LiberoEnv) -> None:
    actions = np.random.default_rng(0).uniform(-1.0, 1.0, size=(12, ACTION_DIM))
    np.random.seed(123)
    sim_states, states, success = _episode(goal_env, 5, actions)
    drawn = np.random.random()
    np.random.seed(123)
    assert drawn == np.random.random()  # the caller's global generator is where it was
    assert not np.allclose(states[0], states[-1])  # the actions moved the arm

    _episode(goal_env, 6, actions[::-1])  # another episode in between
    replay = _episode(goal_env, 5, actions)
    np.testing.assert_array_equal(replay[0], sim_states)
    np.testing.assert_array_equal(replay[1], states)
    assert replay[2] == success

    # The soft reset gives the states of LIBERO's default, rebuilding the model at every reset.
    rebuilt = sim.make_env(goal_env.task, STATE_ONLY)
    try:
        rebuilt.unwrapped.env.hard_reset = True
        np.testing.assert_array_equal(_episode(rebuilt, 5, actions)[0], sim_states)
    finally:
        rebuilt.close()


@needs_libero
@pytest.mark.integration
def test_episode_ends_at_the_budget_and_bad_calls_are_reported(
    sim: LiberoSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libero_adapter, "SUITE_MAX_STEPS", {**SUITE_MAX_STEPS, "libero_object": 3})
    env = sim.make_env(_first_task(sim, "libero_object"), STATE_ONLY)
    try:
        with pytest.raises(ConfigError, match="call reset"):
            env.step(np.zeros(ACTION_DIM))
        with pytest.raises(ConfigError, match="non-negative integer seed"):
            env.reset(-1)
        env.reset(0)
        with pytest.raises(ConfigError, match=r"shape \(7,\), got \(4,\)"):
            env.step(np.zeros(4))
        done = [env.step(np.zeros(ACTION_DIM)).done for _ in range(3)]
        assert done == [False, False, True]
        with pytest.raises(ConfigError, match="the episode ended"):
            env.step(np.zeros(ACTION_DIM))
        env.reset(0)
        assert env.step(np.zeros(ACTION_DIM)).done is False
    finally:
        env.close()


@needs_libero
@pytest.mark.integration
def test_vector_env_stacks_two_tasks(sim: LiberoSimulator) -> None:
    tasks = sim.suite_tasks("libero_spatial")[:2]
    vector = sim.make_envs(tasks, STATE_ONLY)
    try:
        assert vector.num_envs == 2
        observations = vector.reset([0, 0])
        assert observations[STATE_KEY].shape == (2, STATE_DIM)
        observations, rewards, success, done = vector.step(np.zeros((2, ACTION_DIM)))
        assert observations[STATE_KEY].shape == (2, STATE_DIM)
        assert rewards.shape == success.shape == done.shape == (2,)
        assert not done.any()
    finally:
        vector.close()
