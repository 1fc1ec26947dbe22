"""Action heads: shapes, masked losses, binary dims, determinism and step counts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from vlacl.config.policy import HEAD_KINDS, HeadKind, PolicyConfig
from vlacl.errors import ConfigError
from vlacl.models.base import ActionHead
from vlacl.models.heads import DiffusionHead, FlowMatchingHead, build_head, diffusion_betas, inference_timesteps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = PolicyConfig(hidden_sizes=(64,), lstm_hidden=32, denoiser_width=64, denoiser_depth=2)


def small(kind: HeadKind, **changes: Any) -> PolicyConfig:
    return dataclasses.replace(SMALL, head=kind, **changes)


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("history", [1, 3])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("action_dim", [3, 7])
def test_shapes(kind: HeadKind, history: int, chunk: int, action_dim: int) -> None:
    head = build_head(small(kind), 12, action_dim, chunk, history)
    assert isinstance(head, ActionHead)
    assert head.kind == kind
    cond = torch.randn(5, history, 12)
    target = torch.randn(5, chunk, action_dim)
    terms, actions = head.loss(cond, target, torch.ones_like(target))
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    if kind in ("mlp", "lstm"):
        assert actions is not None
        assert actions.shape == (5, chunk, action_dim)
    else:
        assert actions is None
    assert head.predict(cond, torch.Generator().manual_seed(0)).shape == (5, chunk, action_dim)


def _fixed_loss(head: ActionHead, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    torch.manual_seed(123)  # the same noise and times for the generative heads at every evaluation
    terms, _ = head.loss(cond, target, mask)
    return float(sum(v.detach() for v in terms.values()))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_loss_decreases_on_a_fixed_batch(kind: HeadKind) -> None:
    torch.manual_seed(0)
    cond = torch.randn(16, 2, 8)
    target = torch.tanh(cond[:, -1, :3]).unsqueeze(1).repeat(1, 2, 1)  # (16, 2, 3), a function of cond
    mask = torch.ones_like(target)
    head = build_head(small(kind), 8, 3, 2, 2)
    assert isinstance(head, torch.nn.Module)
    before = _fixed_loss(head, cond, target, mask)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(60):
        terms, _ = head.loss(cond, target, mask)
        loss = sum(terms.values())
        assert isinstance(loss, torch.Tensor)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    after = _fixed_loss(head, cond, target, mask)
    assert after < before / 3, (kind, before, after)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_masked_values_do_not_change_the_loss(kind: HeadKind) -> None:
    head = build_head(small(kind), 8, 4, 3, 1)
    cond = torch.randn(6, 1, 8)
    target = torch.randn(6, 3, 4)
    mask = torch.ones_like(target)
    mask[:, 2] = 0  # a padded step
    mask[..., 1] = 0  # a masked dimension
    changed = target.clone()
    changed[:, 2] = 100.0
    changed[..., 1] = -50.0
    assert _fixed_loss(head, cond, changed, mask) == pytest.approx(_fixed_loss(head, cond, target, mask), rel=1e-6)
    unmasked = target.clone()
    unmasked[:, 0, 0] += 5.0
    assert _fixed_loss(head, cond, unmasked, mask) != pytest.approx(_fixed_loss(head, cond, target, mask), rel=1e-3)


def test_loss_is_normalised_by_the_count_of_counted_values() -> None:
    head = build_head(small("mlp", loss="l1"), 8, 2, 1, 1)
    cond = torch.randn(4, 1, 8)
    with torch.no_grad():
        pred = head.predict(cond)
    target = pred.clone()
    target[:, :, 0] += 2.0  # error 2 on dim 0, 0 on dim 1
    mask = torch.ones_like(target)
    with torch.no_grad():
        terms, _ = head.loss(cond, target, mask)
    assert float(terms["l1"]) == pytest.approx(1.0, rel=1e-5)  # mean over all 8 values
    mask[..., 1] = 0
    with torch.no_grad():
        terms, _ = head.loss(cond, target, mask)
    assert float(terms["l1"]) == pytest.approx(2.0, rel=1e-5)  # mean over the 4 counted values


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_bce_term_only_with_binary_dims(kind: HeadKind) -> None:
    cond = torch.randn(4, 2, 8)
    target = torch.randn(4, 2, 3)
    target[..., 2] = torch.tensor([-1.0, 1.0, 1.0, -1.0])[:, None]
    plain = build_head(small(kind), 8, 3, 2, 2)
    terms, _ = plain.loss(cond, target, torch.ones_like(target))
    assert set(terms) == {"l1"}
    gripper = build_head(small(kind), 8, 3, 2, 2, binary_dims=[2])
    terms, actions = gripper.loss(cond, target, torch.ones_like(target))
    assert set(terms) == {"l1", "bce"}
    assert actions is not None
    assert set(actions[..., 2].flatten().tolist()) <= {-1.0, 1.0}
    # the binary dim leaves the regression term: changing its target changes only bce
    flipped = target.clone()
    flipped[..., 2] *= -1
    terms2, _ = gripper.loss(cond, flipped, torch.ones_like(target))
    assert terms2["l1"].item() == pytest.approx(terms["l1"].item())
    assert terms2["bce"].item() != pytest.approx(terms["bce"].item())


def test_binary_levels_zero_one_are_learned_and_predicted() -> None:
    torch.manual_seed(0)
    cond = torch.randn(32, 1, 8)
    target = torch.zeros(32, 1, 2)
    target[..., 0] = torch.tanh(cond[:, :, 0])
    target[..., 1] = (cond[:, :, 1] > 0).float()  # a 0/1 gripper
    head = build_head(small("mlp"), 8, 2, 1, 1, binary_dims=[1], binary_low=[0.0], binary_high=[1.0])
    assert isinstance(head, torch.nn.Module)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(80):
        terms, _ = head.loss(cond, target, torch.ones_like(target))
        loss = terms["l1"] + terms["bce"]
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    pred = head.predict(cond)
    assert set(pred[..., 1].flatten().tolist()) <= {0.0, 1.0}
    assert (pred[..., 1] == target[..., 1]).float().mean() > 0.9


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_generative_heads_threshold_binary_dims(kind: HeadKind) -> None:
    head = build_head(small(kind), 8, 3, 2, 1, binary_dims=[0], binary_low=[0.0], binary_high=[1.0])
    pred = head.predict(torch.randn(16, 1, 8), torch.Generator().manual_seed(0))
    assert set(pred[..., 0].flatten().tolist()) <= {0.0, 1.0}
    assert not set(pred[..., 1].flatten().tolist()) <= {0.0, 1.0}


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize(
    ("cfg", "calls"),
    [
        (small("flow", flow_steps=7), 7),
        (small("diffusion", sampler="ddim", diffusion_timesteps=50, inference_steps=5), 5),
        (small("diffusion", sampler="ddpm", diffusion_timesteps=20, inference_steps=20), 20),
        (small("diffusion", sampler="ddpm", diffusion_timesteps=50, inference_steps=4, clip_sample=1.0), 4),
    ],
)
def test_generative_predict_is_deterministic_and_counts_steps(cfg: PolicyConfig, calls: int) -> None:
    head = build_head(cfg, 8, 3, 4, 2)
    assert isinstance(head, FlowMatchingHead | DiffusionHead)
    counter = _count_calls(head.denoiser)
    cond = torch.randn(5, 2, 8)
    a = head.predict(cond, torch.Generator().manual_seed(7))
    assert counter[0] == calls
    b = head.predict(cond, torch.Generator().manual_seed(7))
    c = head.predict(cond, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_diffusion_schedules() -> None:
    cos = diffusion_betas(100, "squaredcos")
    lin = diffusion_betas(1000, "linear")
    assert cos.shape == (100,)
    assert (cos > 0).all()
    assert (cos <= 0.999).all()
    assert (cos[1:] >= cos[:-1]).all()  # noise only grows
    assert float(torch.cumprod(1 - cos, 0)[-1]) < 1e-3  # the last step is (nearly) pure noise
    assert float(lin[0]) == pytest.approx(1e-4)
    assert float(lin[-1]) == pytest.approx(0.02)
    assert inference_timesteps(100, 5) == [99, 74, 50, 25, 0]
    assert inference_timesteps(10, 1) == [9]
    with pytest.raises(ConfigError, match="inference steps"):
        inference_timesteps(10, 11)
    with pytest.raises(ConfigError, match="schedule"):
        diffusion_betas(10, "quadratic")


def test_diffusion_sampler_recovers_a_fixed_target() -> None:
    """A denoiser that knows x0 exactly turns noise into x0 with either sampler."""
    x0 = torch.tensor([[0.5, -0.25]])
    for sampler in ("ddim", "ddpm"):
        head = build_head(small("diffusion", sampler=sampler, diffusion_timesteps=100, inference_steps=10), 4, 2, 1, 1)
        assert isinstance(head, DiffusionHead)
        alpha_bar = head.alpha_bar

        def oracle(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            ab = alpha_bar[(t * 100).round().long()][:, None]  # noqa: B023 - called within this iteration
            return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

        head.denoiser.forward = oracle  # type: ignore[method-assign]
        out = head.predict(torch.zeros(1, 1, 4), torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.view(1, 2), x0, atol=1e-4, rtol=0)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="inference_steps"):
        PolicyConfig(diffusion_timesteps=10, inference_steps=20)
    with pytest.raises(ConfigError, match="masked_action_dims"):
        PolicyConfig(masked_action_dims=(1, 1))
    with pytest.raises(ConfigError, match="outside"):
        build_head(small("mlp"), 8, 3, 1, 1, binary_dims=[3])
    with pytest.raises(ConfigError, match="low < high"):
        build_head(small("mlp"), 8, 3, 1, 1, binary_dims=[2], binary_low=[1.0], binary_high=[0.0])
