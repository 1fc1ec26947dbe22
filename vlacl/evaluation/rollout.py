"""Closed-loop rollouts of a loaded policy in ``N`` environments at once, with one batched policy call per step.

The environments of one group run one episode each (trial ``t`` reset with its seed); every
``execute`` steps the policy is asked once for the action chunks of all environments still running.
An episode ends at its first successful step or at its step budget. The time of every environment
step and of every policy call is measured, so a rollout step splits into simulator and policy time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlacl.data.features import STATE, role_of
from vlacl.errors import ConfigError, InputFormatError
from vlacl.sim.base import Observation, SimEnv
from vlacl.training.policy_io import LoadedPolicy


@dataclass
class EpisodeResult:
    """One episode of a rollout.

    Attributes:
        trial: The trial's number within its (checkpoint, task) cell.
        seed: The reset seed.
        success: Whether any step succeeded.
        ret: The sum of the rewards of its steps.
        steps: Environment steps taken (to the first success, or the budget).
        sim_seconds: Time spent in this environment's steps and reset.
        policy_seconds: This episode's share of the batched policy calls.
        frames: Video frames, when recorded.
    """

    trial: int
    seed: int
    success: bool = False
    ret: float = 0.0
    steps: int = 0
    sim_seconds: float = 0.0
    policy_seconds: float = 0.0
    frames: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def seconds(self) -> float:
        """Simulator plus policy time of the episode."""
        return self.sim_seconds + self.policy_seconds


class _History:
    """The last ``W`` normalized observations of one environment (the first one repeated before it, as padding)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.frames: list[dict[str, np.ndarray]] = []
        self.pad: list[bool] = []

    def push(self, obs: dict[str, np.ndarray]) -> None:
        if not self.frames:
            self.frames = [obs] * self.width
            self.pad = [True] * (self.width - 1) + [False]
        else:
            self.frames = [*self.frames[1:], obs]
            self.pad = [*self.pad[1:], False]

    def sample(self) -> dict[str, Any]:
        keys = self.frames[-1].keys()
        out: dict[str, Any] = {k: torch.from_numpy(np.stack([f[k] for f in self.frames])) for k in keys}  # (W, ...)
        out["observation_is_pad"] = torch.tensor(self.pad)
        return out


class PolicyActor:
    """Turns simulator observations into the policy's inputs and its action chunks into simulator actions.

    Args:
        loaded: The policy and its normalizer, key map and window.
        device: Where the policy runs.
    """

    def __init__(self, loaded: LoadedPolicy, device: torch.device) -> None:
        self.loaded = loaded
        self.device = device
        self.keys = loaded.observation_keys

    def check(self, observation: Observation, task: str) -> None:
        """Refuse an environment that does not give every observation the policy reads.

        Raises:
            InputFormatError: A key is missing or has another shape than in training.
        """
        missing = [k for k in self.keys if k not in observation]
        if missing:
            raise InputFormatError(
                f"the {task} environment gives {sorted(observation)} but the policy of {self.loaded.path} reads "
                f"{missing}: evaluate it on the simulator and cameras it was trained with"
            )
        if STATE in self.keys and self.loaded.policy.state_dim != observation[STATE].shape[-1]:
            raise InputFormatError(
                f"the {task} environment's {STATE} has {observation[STATE].shape[-1]} values, the policy of "
                f"{self.loaded.path} was trained on {self.loaded.policy.state_dim}: another simulator or robot"
            )

    def prepare(self, observation: Observation) -> dict[str, np.ndarray]:
        """The policy's keys of one observation, normalized as in training (frames stay uint8)."""
        out: dict[str, np.ndarray] = {}
        for key in self.keys:
            value = observation[key]
            if role_of(key) == "image" and value.dtype == np.uint8:
                out[key] = np.ascontiguousarray(value)
            else:
                norm = self.loaded.normalizer.normalize(key, value.astype(np.float32, copy=False))
                out[key] = np.ascontiguousarray(norm, dtype=np.float32)
        return out

    @torch.no_grad()
    def act(self, histories: Sequence[_History], instruction: str, generator: torch.Generator | None) -> np.ndarray:
        """Action chunks ``(N, K, A)`` in the simulator's units for the environments' histories."""
        policy = self.loaded.policy
        samples = [{**h.sample(), "instruction": instruction} for h in histories]
        batch = _to_device(policy.collate(samples), self.device)
        chunk = policy.predict(batch, generator=generator)  # (N, K, A) normalized
        actions = self.loaded.normalizer.unnormalize("action", chunk.float().cpu().numpy())
        return np.asarray(actions, dtype=np.float64)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def rollout(
    envs: Sequence[SimEnv],
    actor: PolicyActor,
    trials: Sequence[int],
    seeds: Sequence[int],
    *,
    max_steps: int | None = None,
    execute: int | None = None,
    generator: torch.Generator | None = None,
    record: Sequence[bool] = (),
    video_key: str | None = None,
) -> list[EpisodeResult]:
    """Run one episode per environment, all at once, with batched policy calls.

    Args:
        envs: One environment per episode, all of one task.
        actor: The policy.
        trials: Trial number of each episode.
        seeds: Reset seed of each episode.
        max_steps: Step budget; none takes the environments' own.
        execute: Actions of each chunk executed before the next policy call; none runs the whole chunk.
        generator: Noise of generative heads (seeded by the caller for reproducible rollouts).
        record: Per episode, whether to keep its ``video_key`` frames.
        video_key: The observation key of the video frames.

    Raises:
        ConfigError: Mismatched argument lengths.
        InputFormatError: The environments do not give what the policy reads.
    """
    n = len(envs)
    if not (len(trials) == len(seeds) == n) or (record and len(record) != n):
        raise ConfigError(f"a rollout group needs one trial and one seed per environment, got {n} environments")
    record = tuple(record) if record else (False,) * n
    budget = max_steps if max_steps is not None else min(env.max_steps for env in envs)
    chunk = actor.loaded.spec.chunk
    execute = chunk if execute is None else min(execute, chunk)
    instruction = envs[0].instruction
    results = [EpisodeResult(trial=t, seed=s) for t, s in zip(trials, seeds, strict=True)]
    histories = [_History(actor.loaded.spec.history) for _ in envs]
    for env, result, history, keep in zip(envs, results, histories, record, strict=True):
        start = time.perf_counter()
        obs = env.reset(result.seed)
        result.sim_seconds += time.perf_counter() - start
        actor.check(obs, env.task)
        history.push(actor.prepare(obs))
        if keep and video_key is not None:
            result.frames.append(obs[video_key])
    running = list(range(n))
    while running:
        start = time.perf_counter()
        actions = actor.act([histories[i] for i in running], instruction, generator)  # (R, K, A)
        share = (time.perf_counter() - start) / len(running)
        still: list[int] = []
        for row, i in enumerate(running):
            env, result = envs[i], results[i]
            result.policy_seconds += share
            done = False
            for action in actions[row, :execute]:
                start = time.perf_counter()
                step = env.step(action)
                result.sim_seconds += time.perf_counter() - start
                result.ret += float(step.reward)
                result.steps += 1
                if record[i] and video_key is not None:
                    result.frames.append(step.observation[video_key])
                if step.success or step.done or result.steps >= budget:
                    result.success = bool(step.success)
                    done = True
                    break
                histories[i].push(actor.prepare(step.observation))
            if not done:
                still.append(i)
        running = still
    return results


def write_video(frames: Sequence[np.ndarray], path: Any, fps: int) -> None:
    """Frames ``(H, W, 3)`` uint8 to an mp4 file (H.264 where the bundled FFmpeg has it, else MPEG-4)."""
    import av

    if not frames:
        return
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        codecs = av.codecs_available
        stream = container.add_stream("libx264" if "libx264" in codecs else "mpeg4", rate=fps)
        stream.width, stream.height = width + width % 2, height + height % 2  # even sizes for yuv420p
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            if frame.shape[0] != stream.height or frame.shape[1] != stream.width:
                frame = np.pad(frame, ((0, stream.height - height), (0, stream.width - width), (0, 0)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
