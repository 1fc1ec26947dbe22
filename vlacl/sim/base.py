"""The one interface every simulator adapter implements.

An adapter turns a simulator into environments that speak the dataset's language: observations
under the canonical keys (``observation.state``, ``observation.images.<camera>`` as ``(H, W, C)``
uint8 frames, upright), actions as float vectors of the dataset's action dimension, the task's
language instruction, a ``success`` flag and the task's step budget. Collection, replay tests and
evaluation use only this module's types, never a simulator's own API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

Observation = dict[str, np.ndarray]
"""Canonical key -> value of one frame: ``(D,)`` float32 vectors, ``(H, W, C)`` uint8 frames."""


@dataclass(frozen=True)
class RenderSettings:
    """Off-screen camera rendering.

    Attributes:
        cameras: Camera names to render; empty renders nothing (state only, the fastest).
        height: Frame height in pixels.
        width: Frame width in pixels.
        shadows: Cast shadows (off by default: a large share of CPU rendering time).
        reflections: Render reflections (off by default).
        multisample: Multisample anti-aliasing (off by default).
    """

    cameras: tuple[str, ...] = ()
    height: int = 64
    width: int = 64
    shadows: bool = False
    reflections: bool = False
    multisample: bool = False


@dataclass(frozen=True)
class StepResult:
    """What one environment step returns.

    Attributes:
        observation: The observation after the step.
        reward: The simulator's reward for the step.
        success: The task's success check after the step.
        done: The episode ended (the step budget is used up, or the simulator ended it).
        info: Simulator-specific extras, for logs only.
    """

    observation: Observation
    reward: float
    success: bool
    done: bool
    info: Mapping[str, object] = field(default_factory=dict)


@runtime_checkable
class SimEnv(Protocol):
    """One environment for one task."""

    @property
    def task(self) -> str:
        """The task's name (``reach-v3``, ``libero_goal/put_the_bowl_on_the_plate``, ...)."""
        ...

    @property
    def instruction(self) -> str:
        """The task's language instruction."""
        ...

    @property
    def max_steps(self) -> int:
        """The task's step budget per episode."""
        ...

    @property
    def action_dim(self) -> int:
        """Length of an action vector."""
        ...

    def reset(self, seed: int) -> Observation:
        """Start an episode; the same seed gives the same initial state."""
        ...

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one action ``(action_dim,)``."""
        ...

    def close(self) -> None:
        """Release the simulator (rendering contexts, processes)."""
        ...


class Expert(Protocol):
    """A scripted expert policy for one task."""

    def act(self, observation: Observation) -> np.ndarray:
        """The expert's action ``(action_dim,)`` for an observation of the task's environment."""
        ...


@runtime_checkable
class Simulator(Protocol):
    """A simulator family: its tasks, environments and experts."""

    name: str

    def tasks(self) -> Sequence[str]:
        """Every task name the simulator knows."""
        ...

    def make_env(self, task: str, render: RenderSettings) -> SimEnv:
        """One environment for ``task``."""
        ...

    def make_envs(self, tasks: Sequence[str], render: RenderSettings) -> VectorEnv:
        """Several environments stepped together (one per entry of ``tasks``; repeats allowed)."""
        ...

    def expert(self, task: str) -> Expert:
        """The scripted expert of ``task`` (an error naming the task when there is none)."""
        ...


class VectorEnv(Protocol):
    """``N`` environments stepped together, for batched policy inference in evaluation."""

    @property
    def num_envs(self) -> int:
        """``N``."""
        ...

    @property
    def envs(self) -> Sequence[SimEnv]:
        """The environments, in order."""
        ...

    def reset(self, seeds: Sequence[int]) -> dict[str, np.ndarray]:
        """Reset every environment; observations stacked: ``(N, ...)`` per key."""
        ...

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """Step with ``actions`` ``(N, A)``: stacked observations, rewards ``(N,)``, success ``(N,)``, done ``(N,)``.

        An environment that is done keeps returning its last observation and ``done=True`` until reset.
        """
        ...

    def close(self) -> None:
        """Close every environment."""
        ...
