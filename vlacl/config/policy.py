"""Settings of a policy's action head and its conditioning (the ``model`` section of ``train-task``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vlacl.config.core import invalid, resolve_config, setting

HeadKind = Literal["mlp", "lstm", "flow", "diffusion"]
HEAD_KINDS: tuple[HeadKind, ...] = ("mlp", "lstm", "flow", "diffusion")
RegressionLoss = Literal["l1", "mse"]
HistoryInput = Literal["last", "flatten"]
FlowTime = Literal["beta", "uniform"]
DiffusionSchedule = Literal["squaredcos", "linear"]
DiffusionSampler = Literal["ddpm", "ddim"]


@dataclass(frozen=True)
class PolicyConfig:
    """The action head and how the frame features, the state and the extra sensors condition it."""

    head: HeadKind = setting(
        "mlp",
        "Action head: mlp (regression from the frame features), lstm (an LSTM over the history frames, then an "
        "MLP), flow (flow matching, pi0-style) or diffusion (DDPM/DDIM epsilon prediction).",
        flag="--head",
    )
    hidden_sizes: tuple[int, ...] = setting(
        (256, 256), "Hidden layer widths of the mlp head and of the MLP after the lstm head's LSTM."
    )
    history_input: HistoryInput = setting(
        "flatten",
        "How the mlp, flow and diffusion heads see the W history frames: flatten (all frames concatenated) or "
        "last (the newest frame only); the same when the history is 1 frame.",
    )
    lstm_hidden: int = setting(256, "Hidden size of the lstm head's LSTM.")
    lstm_layers: int = setting(1, "Layers of the lstm head's LSTM.")
    loss: RegressionLoss = setting(
        "l1", "Loss of the continuous dimensions for the mlp and lstm heads: l1 or mse.", flag="--loss"
    )
    binary_dims: tuple[int, ...] | None = setting(
        None,
        "Action dimensions that are binary (a gripper open/close); none takes the dimensions the stats found "
        "binary (left unnormalized). The mlp and lstm heads predict a logit for them, trained with BCE.",
    )
    bce_weight: float = setting(
        0.1,
        "Weight of the BCE term of the binary dimensions against the continuous term (RoboVLMs uses 0.01 for "
        "its gripper; 0.1 makes the gripper learn faster on short CPU runs).",
    )
    masked_action_dims: tuple[int, ...] = setting(
        (),
        "Action dimensions left out of the loss (padding or dimensions not to learn), e.g. --set "
        "model.masked_action_dims=6.",
    )
    state_width: int = setting(
        64, "Width of the state projection joined to the conditioning when the backbone does not embed the state."
    )
    sensor_width: int = setting(64, "Output width of each extra sensor stream's encoder (force, tactile, ...).")
    denoiser_width: int = setting(256, "Width of the flow and diffusion heads' residual MLP.")
    denoiser_depth: int = setting(3, "Residual blocks of the flow and diffusion heads' MLP.")
    flow_steps: int = setting(10, "Euler integration steps of the flow head at inference (one network call each).")
    flow_time: FlowTime = setting(
        "beta",
        "Flow-matching time sampling in training: beta (pi0's Beta(1.5, 1), more weight on the noisier times) or "
        "uniform.",
    )
    diffusion_timesteps: int = setting(100, "Training timesteps T of the diffusion head (Diffusion Policy uses 100).")
    diffusion_schedule: DiffusionSchedule = setting(
        "squaredcos",
        "Noise schedule: squaredcos (Nichol & Dhariwal 2021) or linear (Ho et al. 2020, betas 1e-4 to 0.02 scaled "
        "to T).",
    )
    sampler: DiffusionSampler = setting(
        "ddim", "Diffusion sampler at inference: ddim (deterministic given the initial noise) or ddpm (stochastic)."
    )
    inference_steps: int = setting(
        10, "Diffusion denoising steps at inference (one network call each), at most the training timesteps."
    )
    clip_sample: float | None = setting(
        None,
        "Clip the diffusion head's predicted clean actions to [-v, v] at each step (1.0 suits q99 and min_max "
        "normalized actions); none does not clip.",
    )

    def __post_init__(self) -> None:
        positive = {
            "lstm_hidden": self.lstm_hidden,
            "lstm_layers": self.lstm_layers,
            "state_width": self.state_width,
            "sensor_width": self.sensor_width,
            "denoiser_width": self.denoiser_width,
            "denoiser_depth": self.denoiser_depth,
            "flow_steps": self.flow_steps,
            "diffusion_timesteps": self.diffusion_timesteps,
            "inference_steps": self.inference_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise invalid(key, f"must be >= 1, got {value}", PolicyConfig)
        if any(h < 1 for h in self.hidden_sizes):
            raise invalid("hidden_sizes", f"widths must be >= 1, got {list(self.hidden_sizes)}", PolicyConfig)
        if self.inference_steps > self.diffusion_timesteps:
            raise invalid(
                "inference_steps",
                f"{self.inference_steps} steps exceed the {self.diffusion_timesteps} training timesteps: use at most "
                "diffusion_timesteps",
                PolicyConfig,
            )
        if not self.bce_weight >= 0.0:
            raise invalid("bce_weight", f"must be >= 0, got {self.bce_weight}", PolicyConfig)
        if self.clip_sample is not None and not self.clip_sample > 0.0:
            raise invalid("clip_sample", f"must be > 0 (or none), got {self.clip_sample}", PolicyConfig)
        for key, dims in (("binary_dims", self.binary_dims or ()), ("masked_action_dims", self.masked_action_dims)):
            if any(d < 0 for d in dims):
                raise invalid(key, f"dimension indices must be >= 0, got {list(dims)}", PolicyConfig)
            if len(set(dims)) != len(dims):
                raise invalid(key, f"dimension indices repeat: {list(dims)}", PolicyConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyConfig:
        """Rebuild a config from :func:`vlacl.config.core.config_to_dict`'s form (unknown keys are errors)."""
        return resolve_config(cls, flags=dict(data))
