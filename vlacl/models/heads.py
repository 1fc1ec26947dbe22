"""Action heads: frame features ``(B, W, C)`` -> an action chunk ``(B, K, A)`` in normalized units.

Four kinds implement :class:`vlacl.models.base.ActionHead`:

- ``mlp``: an MLP regression from the newest frame's conditioning (or all ``W`` frames
  concatenated) to ``K x A`` values, trained with L1 or MSE.
- ``lstm``: an LSTM over the ``W`` frame conditionings, then an MLP from its last output to
  ``K x A`` values (the RoboVLMs "policy head" layout), trained like ``mlp``.
- ``flow``: flow matching as in pi0: ``x_t = t * noise + (1 - t) * actions`` with ``t`` drawn from
  ``Beta(1.5, 1)`` (scaled to ``[0.001, 1]``) or uniformly; a residual MLP predicts the velocity
  ``noise - actions`` from ``x_t``, ``t`` and the conditioning; inference integrates from ``t = 1``
  (noise) to ``t = 0`` in ``flow_steps`` Euler steps, one network call each.
- ``diffusion``: DDPM epsilon prediction (Ho et al. 2020) over ``diffusion_timesteps`` steps with the
  squared-cosine schedule of Nichol & Dhariwal 2021 (eq. 17, betas clipped at 0.999) or the linear
  one of Ho et al. (1e-4 to 0.02, scaled by ``1000 / T``); inference runs ``inference_steps`` evenly
  spaced timesteps, always starting at ``T - 1`` (Lin et al. 2024's "trailing" spacing), with the
  DDPM posterior or DDIM with eta 0 (Song et al. 2021).

Masks. ``mask`` ``(B, K, A)`` is 1 where a value counts: padded chunk steps and masked dimensions
are 0. Every term is the sum over counted values divided by their number. The generative heads also
zero the target where the mask is 0 before noising it, so a masked value never reaches the network.

Binary dimensions (a gripper). The stats leave them unnormalized, so they hold their raw two
values, such as ``-1/+1`` or ``0/1``: each has a ``low`` and a ``high`` level (``-1`` and ``+1``
unless given). The regression heads output a logit for them, trained with BCE against ``value >
(low + high) / 2`` (for ``-1/+1`` and ``0/1`` data that is ``value > 0``), and predict ``high`` where
the logit is positive, else ``low``. The generative heads treat them as continuous and predict
``high`` where the generated value is above the midpoint, else ``low``.

Every ``predict`` is deterministic given a ``torch.Generator`` (the regression heads are always).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from vlacl.config.policy import PolicyConfig
from vlacl.errors import ConfigError

TIME_EMBED_DIM: Final = 64
FLOW_BETA_ALPHA: Final = 1.5
"""pi0 samples the flow time from Beta(1.5, 1): more training on the noisier times."""


def mlp(sizes: Sequence[int], *, final_activation: bool = False) -> nn.Sequential:
    """Linear layers of ``sizes[i] -> sizes[i + 1]`` with GELU between them."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, *, per_sample: bool = False) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is 1 (0 when none counts).

    With ``per_sample``, one mean per sample (the first dimension): ``(B,)``.
    """
    mask = mask.to(values.dtype)
    if per_sample:
        flat_values = (values * mask).flatten(1)  # (B, ...) -> (B, N)
        return flat_values.sum(dim=1) / mask.flatten(1).sum(dim=1).clamp_min(1.0)  # (B,)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class _Binary(nn.Module):
    """Which action dimensions are binary and their two levels (buffers, not saved: they come from the config)."""

    def __init__(
        self,
        action_dim: int,
        binary_dims: Sequence[int],
        binary_low: Sequence[float] | None,
        binary_high: Sequence[float] | None,
    ) -> None:
        super().__init__()
        if any(not 0 <= d < action_dim for d in binary_dims):
            raise ConfigError(f"binary action dimensions {list(binary_dims)} are outside the {action_dim} dimensions")
        low = [-1.0] * len(binary_dims) if binary_low is None else list(binary_low)
        high = [1.0] * len(binary_dims) if binary_high is None else list(binary_high)
        if len(low) != len(binary_dims) or len(high) != len(binary_dims):
            raise ConfigError(
                f"binary levels need one low and one high value per binary dimension {list(binary_dims)}, got low "
                f"{low} and high {high}"
            )
        if any(lo >= hi for lo, hi in zip(low, high, strict=True)):
            raise ConfigError(f"binary levels must have low < high, got low {low} and high {high}")
        is_binary = torch.zeros(action_dim, dtype=torch.bool)
        lows = torch.full((action_dim,), -1.0)
        highs = torch.full((action_dim,), 1.0)
        for d, lo, hi in zip(binary_dims, low, high, strict=True):
            is_binary[d] = True
            lows[d], highs[d] = lo, hi
        self.has_any = bool(binary_dims)
        self.register_buffer("is_binary", is_binary, persistent=False)
        self.register_buffer("low", lows, persistent=False)
        self.register_buffer("high", highs, persistent=False)
        self.is_binary: torch.Tensor
        self.low: torch.Tensor
        self.high: torch.Tensor

    @property
    def midpoint(self) -> torch.Tensor:
        """``(A,)`` the threshold between the levels."""
        return (self.low + self.high) / 2

    def from_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Regression output ``(B, K, A)`` -> actions: binary logits become their levels."""
        level = torch.where(raw > 0, self.high, self.low).to(raw.dtype)
        return torch.where(self.is_binary, level, raw)

    def threshold(self, values: torch.Tensor) -> torch.Tensor:
        """Generated values ``(B, K, A)`` -> actions: binary dims snap to their nearer level."""
        level = torch.where(values > self.midpoint, self.high, self.low).to(values.dtype)
        return torch.where(self.is_binary, level, values)


class _Regression(nn.Module):
    """Shared loss and decoding of the ``mlp`` and ``lstm`` heads."""

    kind = "regression"

    def __init__(self, action_dim: int, chunk: int, loss: str, binary: _Binary) -> None:
        super().__init__()
        if loss not in ("l1", "mse"):
            raise ConfigError(f"unknown regression loss {loss!r}: use l1 or mse")
        self.action_dim = action_dim
        self.chunk = chunk
        self.loss_kind = loss
        self.binary = binary

    def raw(self, cond: torch.Tensor) -> torch.Tensor:
        """Values and binary logits ``(B, K, A)``."""
        raise NotImplementedError

    def loss(
        self, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, per_sample: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``l1`` or ``mse`` over the continuous dims, plus ``bce`` over the binary ones when there are any."""
        out = self.raw(cond)  # (B, K, A)
        mask = mask.to(out.dtype)
        binary = self.binary.is_binary.to(out.dtype)
        err = (out - target).abs() if self.loss_kind == "l1" else (out - target).square()
        terms = {self.loss_kind: masked_mean(err, mask * (1 - binary), per_sample=per_sample)}
        if self.binary.has_any:
            labels = (target > self.binary.midpoint).to(out.dtype)
            bce = F.binary_cross_entropy_with_logits(out, labels, reduction="none")
            terms["bce"] = masked_mean(bce, mask * binary, per_sample=per_sample)
        return terms, self.binary.from_logits(out.detach())

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The chunk ``(B, K, A)``; deterministic (``generator`` is unused)."""
        return self.binary.from_logits(self.raw(cond))


class MlpHead(_Regression):
    """MLP regression from the newest frame's conditioning or all ``W`` frames concatenated."""

    kind = "mlp"

    def __init__(
        self,
        cond_dim: int,
        action_dim: int,
        chunk: int,
        history: int,
        *,
        hidden_sizes: Sequence[int] = (256, 256),
        history_input: str = "flatten",
        loss: str = "l1",
        binary: _Binary | None = None,
    ) -> None:
        super().__init__(action_dim, chunk, loss, binary or _Binary(action_dim, (), None, None))
        self.flatten = history_input == "flatten"
        in_dim = cond_dim * (history if self.flatten else 1)
        self.norm = nn.LayerNorm(in_dim)
        self.net = mlp([in_dim, *hidden_sizes, chunk * action_dim])

    def raw(self, cond: torch.Tensor) -> torch.Tensor:
        """``(B, W, C)`` -> ``(B, K, A)``."""
        x = cond.flatten(1) if self.flatten else cond[:, -1]  # (B, W*C) or (B, C)
        out: torch.Tensor = self.net(self.norm(x))  # (B, K*A)
        return out.view(-1, self.chunk, self.action_dim)  # (B, K, A)


class LstmHead(_Regression):
    """An LSTM over the ``W`` frame conditionings, then an MLP from its last output to the chunk."""

    kind = "lstm"

    def __init__(
        self,
        cond_dim: int,
        action_dim: int,
        chunk: int,
        history: int,
        *,
        lstm_hidden: int = 256,
        lstm_layers: int = 1,
        hidden_sizes: Sequence[int] = (256, 256),
        loss: str = "l1",
        binary: _Binary | None = None,
    ) -> None:
        super().__init__(action_dim, chunk, loss, binary or _Binary(action_dim, (), None, None))
        self.norm = nn.LayerNorm(cond_dim)
        self.lstm = nn.LSTM(cond_dim, lstm_hidden, num_layers=lstm_layers, batch_first=True)
        self.net = mlp([lstm_hidden, *hidden_sizes, chunk * action_dim])

    def raw(self, cond: torch.Tensor) -> torch.Tensor:
        """``(B, W, C)`` -> ``(B, K, A)``."""
        out, _ = self.lstm(self.norm(cond))  # (B, W, H)
        flat: torch.Tensor = self.net(out[:, -1])  # (B, K*A)
        return flat.view(-1, self.chunk, self.action_dim)  # (B, K, A)


def time_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of times ``t`` ``(B,)`` in ``[0, 1]`` (scaled by 1000, as DDPM's steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * 1000.0)[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Denoiser(nn.Module):
    """A residual MLP ``(x_t, t, cond) -> (B, K*A)`` (the flow head's velocity, the diffusion head's noise)."""

    def __init__(self, x_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_EMBED_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_norm = nn.LayerNorm(cond_dim)
        self.cond_proj = nn.Linear(cond_dim, width)
        self.in_proj = nn.Linear(x_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
            for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, x_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, K*A)``, ``t`` ``(B,)`` in ``[0, 1]``, ``cond`` ``(B, C')`` -> ``(B, K*A)``."""
        e = self.time_mlp(time_embedding(t).to(x.dtype)) + self.cond_proj(self.cond_norm(cond))  # (B, width)
        h = self.in_proj(x)
        for block in self.blocks:
            h = h + block(h + e)
        out: torch.Tensor = self.out_proj(self.out_norm(h))
        return out


class _Generative(nn.Module):
    """Shared parts of the ``flow`` and ``diffusion`` heads."""

    kind = "generative"
    term = "generative"

    def __init__(
        self,
        cond_dim: int,
        action_dim: int,
        chunk: int,
        history: int,
        *,
        history_input: str,
        width: int,
        depth: int,
        binary: _Binary | None,
    ) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.chunk = chunk
        self.flatten = history_input == "flatten"
        self.binary = binary or _Binary(action_dim, (), None, None)
        self.denoiser = Denoiser(chunk * action_dim, cond_dim * (history if self.flatten else 1), width, depth)

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """``(B, W, C)`` -> ``(B, W*C)`` or ``(B, C)``."""
        return cond.flatten(1) if self.flatten else cond[:, -1]

    def noise_like(self, cond: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Initial noise ``(B, K*A)`` (drawn on the CPU from ``generator``, so a seed gives the same draws anywhere)."""
        shape = (cond.shape[0], self.chunk * self.action_dim)
        if generator is None:
            return torch.randn(shape, device=cond.device, dtype=cond.dtype)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(device=cond.device, dtype=cond.dtype)

    def targets(self, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened target ``(B, K*A)`` with uncounted values zeroed, and the flattened mask."""
        mask = mask.to(target.dtype).flatten(1)  # (B, K*A)
        return target.flatten(1) * mask, mask


class FlowMatchingHead(_Generative):
    """Flow matching (pi0's convention: ``t = 1`` is noise, ``t = 0`` the actions)."""

    kind = "flow"
    term = "flow"

    def __init__(
        self,
        cond_dim: int,
        action_dim: int,
        chunk: int,
        history: int,
        *,
        steps: int = 10,
        time_sampling: str = "beta",
        history_input: str = "flatten",
        width: int = 256,
        depth: int = 3,
        binary: _Binary | None = None,
    ) -> None:
        super().__init__(
            cond_dim, action_dim, chunk, history, history_input=history_input, width=width, depth=depth, binary=binary
        )
        if time_sampling not in ("beta", "uniform"):
            raise ConfigError(f"unknown flow time sampling {time_sampling!r}: use beta or uniform")
        self.steps = steps
        self.time_sampling = time_sampling

    def sample_time(self, batch: int, device: torch.device) -> torch.Tensor:
        """Training times ``(B,)``: Beta(1.5, 1) (inverse CDF ``u ** (1 / 1.5)``) scaled to [0.001, 1], or uniform."""
        u = torch.rand(batch, device=device)
        if self.time_sampling == "uniform":
            return u
        return u.pow(1.0 / FLOW_BETA_ALPHA) * 0.999 + 0.001

    def loss(
        self, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, per_sample: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``flow``: the masked MSE of the predicted velocity against ``noise - actions``."""
        actions, flat_mask = self.targets(target, mask)  # (B, K*A)
        noise = torch.randn_like(actions)
        t = self.sample_time(actions.shape[0], actions.device).to(actions.dtype)  # (B,)
        x_t = t[:, None] * noise + (1 - t[:, None]) * actions
        v = self.denoiser(x_t, t, self.condition(cond))
        return {self.term: masked_mean((v - (noise - actions)).square(), flat_mask, per_sample=per_sample)}, None

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler integration from noise (``t = 1``) to actions (``t = 0``) in ``steps`` network calls."""
        c = self.condition(cond)
        x = self.noise_like(cond, generator)  # (B, K*A)
        dt = 1.0 / self.steps
        for i in range(self.steps):
            t = torch.full((x.shape[0],), 1.0 - i * dt, device=x.device, dtype=x.dtype)
            x = x - dt * self.denoiser(x, t, c)
        return self.binary.threshold(x.view(-1, self.chunk, self.action_dim))  # (B, K, A)


def diffusion_betas(timesteps: int, schedule: str) -> torch.Tensor:
    """``(T,)`` betas, float64.

    ``squaredcos``: ``alpha_bar(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2`` with ``s = 0.008`` and
    ``beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t)`` clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17).
    ``linear``: Ho et al. 2020's 1e-4 to 0.02 over 1000 steps, scaled by ``1000 / T`` for other ``T``.
    """
    if schedule == "squaredcos":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if schedule == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), timesteps, dtype=torch.float64)
    raise ConfigError(f"unknown diffusion schedule {schedule!r}: use squaredcos or linear")


def inference_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps from ``T - 1`` down to 0, evenly spaced ("trailing" spacing), distinct."""
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"inference steps must be in [1, {timesteps}] (the training timesteps), got {steps}")
    if steps == 1:
        return [timesteps - 1]
    return [round((timesteps - 1) * (steps - 1 - i) / (steps - 1)) for i in range(steps)]


class DiffusionHead(_Generative):
    """DDPM epsilon prediction; DDPM or DDIM (eta 0) sampling."""

    kind = "diffusion"
    term = "diffusion"

    def __init__(
        self,
        cond_dim: int,
        action_dim: int,
        chunk: int,
        history: int,
        *,
        timesteps: int = 100,
        schedule: str = "squaredcos",
        sampler: str = "ddim",
        inference_steps: int = 10,
        clip_sample: float | None = None,
        history_input: str = "flatten",
        width: int = 256,
        depth: int = 3,
        binary: _Binary | None = None,
    ) -> None:
        super().__init__(
            cond_dim, action_dim, chunk, history, history_input=history_input, width=width, depth=depth, binary=binary
        )
        if sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"unknown diffusion sampler {sampler!r}: use ddpm or ddim")
        self.timesteps = timesteps
        self.sampler = sampler
        self.clip_sample = clip_sample
        self.schedule_steps = inference_timesteps(timesteps, inference_steps)
        betas = diffusion_betas(timesteps, schedule)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, dim=0).float(), persistent=False)
        self.alpha_bar: torch.Tensor

    def loss(
        self, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, per_sample: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``diffusion``: the masked MSE of the predicted noise."""
        actions, flat_mask = self.targets(target, mask)  # (B, K*A)
        noise = torch.randn_like(actions)
        t = torch.randint(0, self.timesteps, (actions.shape[0],), device=actions.device)  # (B,)
        ab = self.alpha_bar[t].to(actions.dtype)[:, None]  # (B, 1)
        x_t = ab.sqrt() * actions + (1 - ab).sqrt() * noise
        eps = self.denoiser(x_t, t.to(actions.dtype) / self.timesteps, self.condition(cond))
        return {self.term: masked_mean((eps - noise).square(), flat_mask, per_sample=per_sample)}, None

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise from noise over :attr:`schedule_steps`, one network call per step."""
        c = self.condition(cond)
        x = self.noise_like(cond, generator)  # (B, K*A)
        b = x.shape[0]
        for i, t in enumerate(self.schedule_steps):
            prev = self.schedule_steps[i + 1] if i + 1 < len(self.schedule_steps) else -1
            ab = self.alpha_bar[t].to(x.dtype)
            ab_prev = self.alpha_bar[prev].to(x.dtype) if prev >= 0 else torch.ones((), dtype=x.dtype, device=x.device)
            eps = self.denoiser(x, torch.full((b,), t / self.timesteps, device=x.device, dtype=x.dtype), c)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            if self.clip_sample is not None:
                x0 = x0.clamp(-self.clip_sample, self.clip_sample)
                eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            if self.sampler == "ddim":
                x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
                continue
            beta = 1 - ab / ab_prev  # the effective beta between the two spaced timesteps
            mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
            if prev >= 0:
                variance = (beta * (1 - ab_prev) / (1 - ab)).clamp_min(1e-20)
                mean = mean + variance.sqrt() * self.noise_like(cond, generator)
            x = mean
        return self.binary.threshold(x.view(-1, self.chunk, self.action_dim))  # (B, K, A)


def build_head(
    cfg: PolicyConfig,
    cond_dim: int,
    action_dim: int,
    chunk: int,
    history: int,
    *,
    binary_dims: Sequence[int] = (),
    binary_low: Sequence[float] | None = None,
    binary_high: Sequence[float] | None = None,
) -> MlpHead | LstmHead | FlowMatchingHead | DiffusionHead:
    """The head of kind ``cfg.head`` for ``cond_dim``-wide frame conditionings and ``(chunk, action_dim)`` chunks.

    Args:
        cfg: The policy settings.
        cond_dim: ``C``, the width of one frame's conditioning.
        action_dim: ``A``.
        chunk: ``K``.
        history: ``W``.
        binary_dims: Binary action dimensions (see the module docstring).
        binary_low: Their low levels (``-1`` each when None).
        binary_high: Their high levels (``+1`` each when None).
    """
    for name, value in (("cond_dim", cond_dim), ("action_dim", action_dim), ("chunk", chunk), ("history", history)):
        if value < 1:
            raise ConfigError(f"an action head needs {name} >= 1, got {value}")
    binary = _Binary(action_dim, binary_dims, binary_low, binary_high)
    if cfg.head == "mlp":
        return MlpHead(
            cond_dim,
            action_dim,
            chunk,
            history,
            hidden_sizes=cfg.hidden_sizes,
            history_input=cfg.history_input,
            loss=cfg.loss,
            binary=binary,
        )
    if cfg.head == "lstm":
        return LstmHead(
            cond_dim,
            action_dim,
            chunk,
            history,
            lstm_hidden=cfg.lstm_hidden,
            lstm_layers=cfg.lstm_layers,
            hidden_sizes=cfg.hidden_sizes,
            loss=cfg.loss,
            binary=binary,
        )
    if cfg.head == "flow":
        return FlowMatchingHead(
            cond_dim,
            action_dim,
            chunk,
            history,
            steps=cfg.flow_steps,
            time_sampling=cfg.flow_time,
            history_input=cfg.history_input,
            width=cfg.denoiser_width,
            depth=cfg.denoiser_depth,
            binary=binary,
        )
    if cfg.head == "diffusion":
        return DiffusionHead(
            cond_dim,
            action_dim,
            chunk,
            history,
            timesteps=cfg.diffusion_timesteps,
            schedule=cfg.diffusion_schedule,
            sampler=cfg.sampler,
            inference_steps=cfg.inference_steps,
            clip_sample=cfg.clip_sample,
            history_input=cfg.history_input,
            width=cfg.denoiser_width,
            depth=cfg.denoiser_depth,
            binary=binary,
        )
    raise ConfigError(f"unknown action head {cfg.head!r}: use mlp, lstm, flow or diffusion")
