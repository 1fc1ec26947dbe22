"""An in-process :class:`~vlacl.sim.base.VectorEnv` over any simulator's environments, stepped in turn.

Policy inference is batched over the ``N`` environments; the environments themselves step one after
the other in this process (for more cores, run several processes, one vector each).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlacl.errors import ConfigError
from vlacl.sim.base import Observation, SimEnv


class SequentialVectorEnv:
    """``N`` environments of one simulator stepped one after the other.

    Every environment must give the same observation keys with the same shapes (one simulator, one
    :class:`~vlacl.sim.base.RenderSettings`), so that they stack.
    """

    def __init__(self, envs: Sequence[SimEnv]) -> None:
        if not envs:
            raise ConfigError("a vector of environments needs at least one environment (no task was given)")
        dims = {env.action_dim for env in envs}
        if len(dims) > 1:
            raise ConfigError(f"environments of one vector must share the action size, got {sorted(dims)}")
        self._envs = tuple(envs)
        self._last: list[Observation | None] = [None] * len(envs)
        self._done = np.zeros(len(envs), dtype=bool)
        self._success = np.zeros(len(envs), dtype=bool)

    @property
    def num_envs(self) -> int:
        """``N``."""
        return len(self._envs)

    @property
    def envs(self) -> Sequence[SimEnv]:
        """The environments, in order."""
        return self._envs

    def reset(self, seeds: Sequence[int]) -> dict[str, np.ndarray]:
        """Reset every environment with its seed; observations stacked: ``(N, ...)`` per key."""
        if len(seeds) != len(self._envs):
            raise ConfigError(f"reset got {len(seeds)} seeds for {len(self._envs)} environments: give one per env")
        for index, (env, seed) in enumerate(zip(self._envs, seeds, strict=True)):
            self._last[index] = env.reset(seed)
        self._done[:] = False
        self._success[:] = False
        return self._stack()

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """Step every environment not yet done with its row of ``actions`` ``(N, A)``.

        Returns:
            Stacked observations, rewards ``(N,)`` float32, success ``(N,)`` and done ``(N,)`` bools. An
            environment that is done keeps its last observation, reward 0, its last success and
            ``done=True`` until the next :meth:`reset`.
        """
        if any(last is None for last in self._last):
            raise ConfigError("step was called before reset: reset the vector with one seed per environment first")
        actions = np.asarray(actions)
        expected = (len(self._envs), self._envs[0].action_dim)
        if actions.shape != expected:
            raise ConfigError(f"actions have shape {actions.shape}, expected {expected} (environments, action size)")
        rewards = np.zeros(len(self._envs), dtype=np.float32)
        for index, env in enumerate(self._envs):
            if self._done[index]:
                continue
            result = env.step(actions[index])
            self._last[index] = result.observation
            rewards[index] = result.reward
            self._success[index] = result.success
            self._done[index] = result.done
        return self._stack(), rewards, self._success.copy(), self._done.copy()

    def close(self) -> None:
        """Close every environment."""
        for env in self._envs:
            env.close()

    def _stack(self) -> dict[str, np.ndarray]:
        first = self._last[0]
        assert first is not None
        stacked: dict[str, np.ndarray] = {}
        for key in first:
            try:
                stacked[key] = np.stack([obs[key] for obs in self._last if obs is not None])  # (N, ...)
            except (KeyError, ValueError) as error:
                raise ConfigError(
                    f"observations of the vector's environments differ at {key!r} ({error}): one vector takes "
                    "environments of one simulator with one render setting"
                ) from None
        return stacked
