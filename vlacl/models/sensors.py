"""Encoders of extra sensor streams (force, tactile, odometry, ...): one small MLP per stream.

A stream is any ``observation.<name>`` feature other than the state and the cameras (named in the
key map's ``extra``). Its ``W`` frames ``(B, W, D_s)`` are flattened and encoded into one vector
``(B, E)``, which the policy repeats over the ``W`` frames and joins to each frame's conditioning.
The values arrive as the stats normalized them (extra features are not normalized unless
``feature_norm_modes`` says so); the encoder's first layer is followed by a LayerNorm, which keeps
its activations in range whatever the stream's scale.
"""

from __future__ import annotations

import torch
from torch import nn

from vlacl.errors import ConfigError


class SensorEncoder(nn.Module):
    """``(B, W, D_s)`` -> ``(B, E)``: Linear, LayerNorm, GELU, Linear over the flattened history."""

    def __init__(self, sensor_dim: int, history: int, width: int) -> None:
        super().__init__()
        if sensor_dim < 1 or history < 1 or width < 1:
            raise ConfigError(
                f"a sensor encoder needs dimension, history and width >= 1, got {sensor_dim}, {history}, {width}"
            )
        self.sensor_dim = sensor_dim
        self.history = history
        self.width = width
        self.in_proj = nn.Linear(sensor_dim * history, width)
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, W, D_s)`` (or ``(B, W)`` for a scalar stream) -> ``(B, E)``."""
        x = x.reshape(x.shape[0], -1)  # (B, W*D_s)
        out: torch.Tensor = self.out_proj(nn.functional.gelu(self.norm(self.in_proj(x))))  # (B, E)
        return out
