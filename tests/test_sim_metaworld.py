"""The Meta-World v3 adapter: all tasks, seeded and replayable episodes, experts, upright frames."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest

if importlib.util.find_spec("metaworld") is None:  # not imported here: vlacl.sim sets MUJOCO_GL first
    pytest.skip("Meta-World is an optional extra: pip install 'vlacl[sim]'", allow_module_level=True)

from vlacl.errors import ConfigError
from vlacl.sim import RenderingUnavailableError, RenderSettings, SimEnv, Simulator, get_simulator
from vlacl.sim.instructions import METAWORLD_INSTRUCTIONS
from vlacl.sim.metaworld import (
    CAMERAS,
    STATE_KEY,
    MetaWorldEnv,
    MetaWorldExpert,
    MetaWorldSimulator,
)

STATE_ONLY = RenderSettings()


@pytest.fixture(scope="module")
def sim() -> MetaWorldSimulator:
    simulator = get_simulator("metaworld")
    assert isinstance(simulator, MetaWorldSimulator)
    return simulator


@pytest.fixture
def reach(sim: MetaWorldSimulator) -> Iterator[MetaWorldEnv]:
    env = sim.make_env("reach-v3", STATE_ONLY)
    yield env
    env.close()


def _episode(env: SimEnv, expert: MetaWorldExpert, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """Run the expert: the actions, the states (initial one first) and the success flags."""
    observation = env.reset(seed)
    states, actions, success = [observation[STATE_KEY]], [], []
    for _ in range(steps):
        action = expert.act(observation)
        result = env.step(action)
        observation = result.observation
        actions.append(action)
        states.append(observation[STATE_KEY])
        success.append(result.success)
    return np.stack(actions), np.stack(states), success


def test_every_task_has_an_instruction_an_expert_and_constructs(sim: MetaWorldSimulator) -> None:
    assert isinstance(sim, Simulator)
    tasks = sim.tasks()
    assert len(tasks) == 50
    assert set(tasks) == set(METAWORLD_INSTRUCTIONS)
    assert len(set(METAWORLD_INSTRUCTIONS.values())) == 50, "two tasks share an instruction"
    for task in tasks:
        env = sim.make_env(task, STATE_ONLY)
        try:
            assert isinstance(env, SimEnv)
            assert (env.task, env.instruction) == (task, METAWORLD_INSTRUCTIONS[task])
            assert (env.max_steps, env.action_dim) == (500, 4)
            state = env.reset(0)[STATE_KEY]
            assert state.shape == (39,)
            assert state.dtype == np.float32
            assert np.array_equal(state, env.raw_state.astype(np.float32))
            assert sim.expert(task).act({STATE_KEY: state}).shape == (4,)
        finally:
            env.close()


def test_seeded_reset_reproduces_the_initial_state(sim: MetaWorldSimulator) -> None:
    first, second = sim.make_env("push-v3", STATE_ONLY), sim.make_env("push-v3", STATE_ONLY)
    a = first.reset(7)[STATE_KEY]
    first.step(np.ones(4, dtype=np.float32))
    assert np.array_equal(first.reset(7)[STATE_KEY], a), "a second reset with the seed differs"
    assert np.array_equal(second.reset(7)[STATE_KEY], a), "a fresh env with the seed differs"
    other = second.reset(8)[STATE_KEY]
    assert not np.allclose(other[36:], a[36:]), "another seed should move the goal"
    assert not np.allclose(other[4:7], a[4:7]), "another seed should move the puck"


def test_replaying_a_recorded_episode_reproduces_states_and_success(sim: MetaWorldSimulator) -> None:
    recorder = sim.make_env("pick-place-v3", STATE_ONLY)
    actions, states, success = _episode(recorder, sim.expert("pick-place-v3"), seed=3, steps=120)
    recorder.close()
    assert any(success), "the expert should finish pick-place within 120 steps"

    replayer = sim.make_env("pick-place-v3", STATE_ONLY)
    replayed = [replayer.reset(3)[STATE_KEY]]
    replayed_success = []
    for action in actions:
        result = replayer.step(action)
        replayed.append(result.observation[STATE_KEY])
        replayed_success.append(result.success)
    replayer.close()
    assert np.array_equal(np.stack(replayed), states)
    assert replayed_success == success


@pytest.mark.parametrize("task", ["reach-v3", "button-press-v3"])
def test_the_expert_solves_easy_tasks_within_budget(sim: MetaWorldSimulator, task: str) -> None:
    env = sim.make_env(task, STATE_ONLY)
    expert = sim.expert(task)
    for seed in (0, 1, 2):
        observation = env.reset(seed)
        for _ in range(env.max_steps):
            result = env.step(expert.act(observation))
            observation = result.observation
            if result.success:
                break
        else:
            pytest.fail(f"the {task} expert did not succeed in {env.max_steps} steps from seed {seed}")
    env.close()


def test_contact_check_matches_metaworlds_own(sim: MetaWorldSimulator) -> None:
    env = sim.make_env("pick-place-v3", STATE_ONLY)
    expert = sim.expert("pick-place-v3")
    raw = env.unwrapped
    original = type(raw).touching_object
    object_id = raw._get_id_main_object()
    observation = env.reset(5)
    seen = set()
    for _ in range(80):
        observation = env.step(expert.act(observation)).observation
        fast = raw.touching_object(object_id)
        assert fast == original(raw, object_id)
        seen.add(fast)
    env.close()
    assert seen == {True, False}, "the episode should both touch and not touch the puck"


def test_episode_end_and_bad_input_are_reported(reach: MetaWorldEnv) -> None:
    with pytest.raises(ConfigError, match="before reset"):
        reach.step(np.zeros(4))
    with pytest.raises(ConfigError, match="non-negative integer seed"):
        reach.reset(-1)
    reach.reset(0)
    with pytest.raises(ConfigError, match=r"shape \(4,\)"):
        reach.step(np.zeros(3))
    done = [reach.step(np.zeros(4, dtype=np.float32)).done for _ in range(reach.max_steps)]
    assert done == [False] * (reach.max_steps - 1) + [True]
    with pytest.raises(ConfigError, match="call reset"):
        reach.step(np.zeros(4))


def test_unknown_task_and_camera_name_the_closest(sim: MetaWorldSimulator) -> None:
    with pytest.raises(ConfigError, match="did you mean 'reach-v3'"):
        sim.make_env("reach-v2", STATE_ONLY)
    with pytest.raises(ConfigError, match="did you mean 'push-wall-v3'"):
        sim.expert("push-wal-v3")
    with pytest.raises(ConfigError, match="no camera 'front'"):
        sim.make_env("reach-v3", RenderSettings(cameras=("front",)))


def test_vector_env_stacks_and_holds_done_envs(sim: MetaWorldSimulator) -> None:
    vector = sim.make_envs(["reach-v3", "reach-v3"], STATE_ONLY)
    assert vector.num_envs == 2
    observations = vector.reset([0, 1])
    assert observations[STATE_KEY].shape == (2, 39)
    assert not np.array_equal(observations[STATE_KEY][0], observations[STATE_KEY][1])
    actions = np.zeros((2, 4), dtype=np.float32)
    for _ in range(vector.envs[0].max_steps):
        observations, rewards, success, done = vector.step(actions)
    assert done.tolist() == [True, True]
    assert rewards.shape == success.shape == (2,)
    held, rewards, _, done = vector.step(actions)
    assert np.array_equal(held[STATE_KEY], observations[STATE_KEY])
    assert done.tolist() == [True, True]
    assert rewards.tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="one per env"):
        vector.reset([0])
    vector.close()


def _rendering_env(sim: MetaWorldSimulator, render: RenderSettings) -> MetaWorldEnv:
    try:
        return sim.make_env("reach-v3", render)
    except RenderingUnavailableError as error:
        pytest.skip(f"no off-screen OpenGL here (EGL): {error}")


def _moved_up(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether the Sawyer arm's red pixels moved up the frame: where it went is above where it left."""

    def red(frame: np.ndarray) -> np.ndarray:
        rgb = frame.astype(np.int16)
        return (rgb[..., 0] > 120) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)

    went, left = red(after) & ~red(before), red(before) & ~red(after)
    assert went.sum() > 3, "the arm should move in view"
    assert left.sum() > 3, "the arm should move in view"
    return bool(np.nonzero(went)[0].mean() < np.nonzero(left)[0].mean())


def test_frames_have_the_requested_size_and_are_upright(sim: MetaWorldSimulator) -> None:
    cameras = ("corner", "corner2", "topview")
    env = _rendering_env(sim, RenderSettings(cameras=cameras, height=48, width=64))
    observation = env.reset(0)
    for camera in cameras:
        frame = observation[f"observation.images.{camera}"]
        assert frame.shape == (48, 64, 3)
        assert frame.dtype == np.uint8
        assert frame.std() > 5, f"{camera} rendered a blank frame"

    def move(action: list[float], steps: int) -> dict[str, np.ndarray]:
        result = None
        for _ in range(steps):
            result = env.step(np.array(action, dtype=np.float32))
        assert result is not None
        return result.observation

    low = move([0, 0, -1, 0], 12)
    high = move([0, 0, 1, 0], 20)
    for camera in ("corner", "corner2"):  # the hand going up goes up in an upright frame
        key = f"observation.images.{camera}"
        assert _moved_up(low[key], high[key]), camera
    near = move([0, -1, 0, 0], 10)
    far = move([0, 1, 0, 0], 15)
    key = "observation.images.topview"  # looking down with +y up: the hand going away goes up
    assert _moved_up(near[key], far[key])
    env.close()


def test_every_listed_camera_renders(sim: MetaWorldSimulator) -> None:
    env = _rendering_env(sim, RenderSettings(cameras=CAMERAS, height=16, width=24, shadows=True, multisample=True))
    observation = env.reset(1)
    assert sorted(observation) == sorted([STATE_KEY, *(f"observation.images.{c}" for c in CAMERAS)])
    assert all(observation[f"observation.images.{c}"].shape == (16, 24, 3) for c in CAMERAS)
    env.close()
