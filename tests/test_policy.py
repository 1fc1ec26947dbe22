"""The policy: collate, conditioning, losses, sensors, saving the head part, overfitting a tiny dataset."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from vlacl.config.policy import HEAD_KINDS, HeadKind, PolicyConfig
from vlacl.errors import ArtifactError, ConfigError, InputFormatError
from vlacl.models.base import BACKBONE_INPUTS
from vlacl.models.policy import Policy, binary_action_dims, build_policy, policy_from_head_config
from vlacl.models.tiny import ByteTokenizer, TinyBackbone, TinyConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TinyConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=2, image_size=16, patch_size=4)
HEAD = PolicyConfig(hidden_sizes=(64, 64), denoiser_width=64, denoiser_depth=2, state_width=16, sensor_width=8)


def make_samples(
    n: int, *, history: int = 1, chunk: int = 2, action_dim: int = 3, state_dim: int = 4, seed: int = 0, **sensors: int
) -> list[dict[str, Any]]:
    """Samples as WindowedDataset gives them; the action is a function of the image, the state and the task."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = torch.randint(0, 256, (history, 16, 16, 3), dtype=torch.uint8, generator=g)
        state = torch.rand(history, state_dim, generator=g) * 2 - 1
        brightness = img[-1].float().mean() / 127.5 - 1
        action = torch.stack(
            [
                torch.full((chunk,), float(brightness) * 4),
                state[-1, :1].repeat(chunk),
                torch.full((chunk,), (-1.0) ** i),
            ]
            + [torch.zeros(chunk)] * (action_dim - 3),
            dim=-1,
        )  # (K, A)
        sample: dict[str, Any] = {
            "observation.state": state,
            "observation.images.front": img,
            "action": action,
            "action_is_pad": torch.zeros(chunk, dtype=torch.bool),
            "observation_is_pad": torch.zeros(history, dtype=torch.bool),
            "task_index": i % 2,
            "episode_index": i,
            "frame_index": 0,
            "instruction": ["reach the goal", "push the button"][i % 2],
        }
        for key, dim in sensors.items():
            sample[f"observation.{key}"] = torch.rand(history, dim, generator=g)
        out.append(sample)
    return out


def tiny_policy(cfg: PolicyConfig = HEAD, *, history: int = 1, chunk: int = 2, **kwargs: Any) -> Policy:
    backbone = TinyBackbone(TINY, seed=0)
    return build_policy(
        cfg,
        backbone,
        cameras=["front"],
        state_dim=4,
        action_dim=kwargs.pop("action_dim", 3),
        history=history,
        chunk=chunk,
        **kwargs,
    )


def test_collate_prepares_the_frames_of_every_sample() -> None:
    policy = tiny_policy(history=3)
    samples = make_samples(2, history=3)
    batch = policy.collate(samples)
    assert "observation.images.front" not in batch
    inputs = batch[BACKBONE_INPUTS]
    assert inputs["pixel_values"].shape == (6, 1, 16, 16, 3)  # (B*W, cameras, H, W, C)
    assert torch.equal(inputs["pixel_values"][4, 0], samples[1]["observation.images.front"][1])  # frame b*W + w
    tok = ByteTokenizer(TINY.max_text_len)
    assert [tok.decode(row.tolist()) for row in inputs["input_ids"]] == ["reach the goal"] * 3 + ["push the button"] * 3
    assert batch["observation.state"].shape == (2, 3, 4)
    out = policy(batch)
    assert out.actions is not None
    assert out.actions.shape == (2, 2, 3)


def test_forward_without_collate_prepares_on_the_fly() -> None:
    policy = tiny_policy()
    samples = make_samples(3)
    batch = torch.utils.data.default_collate(samples)
    with torch.no_grad():
        a = policy(batch).loss
        b = policy(policy.collate(samples)).loss
    assert float(a) == pytest.approx(float(b))


def test_loss_is_the_weighted_sum_of_detached_terms() -> None:
    policy = tiny_policy(binary_dims=[2])
    out = policy(policy.collate(make_samples(4)))
    assert set(out.terms) == {"l1", "bce"}
    assert all(not t.requires_grad for t in out.terms.values())
    expected = out.terms["l1"] + HEAD.bce_weight * out.terms["bce"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    plain = tiny_policy()
    assert set(plain(plain.collate(make_samples(4))).terms) == {"l1"}


def test_padded_steps_and_masked_dims_do_not_count() -> None:
    policy = tiny_policy(dataclasses.replace(HEAD, masked_action_dims=(1,)))
    samples = make_samples(4)
    for s in samples:
        s["action_is_pad"][1] = True

    def loss_of(samples: list[dict[str, Any]]) -> float:
        with torch.no_grad():
            return float(policy(policy.collate(samples)).loss)

    loss = loss_of(samples)
    for s in samples:
        s["action"][1] = 50.0  # a padded step
        s["action"][:, 1] = -20.0  # a masked dimension
    assert loss_of(samples) == pytest.approx(loss, rel=1e-6)
    samples[0]["action"][0, 0] += 3.0
    assert loss_of(samples) != pytest.approx(loss, rel=1e-4)
    with pytest.raises(ConfigError, match="masked action dimensions"):
        tiny_policy(dataclasses.replace(HEAD, masked_action_dims=(3,)))


def test_policy_overfits_a_tiny_dataset() -> None:
    torch.manual_seed(0)
    policy = tiny_policy(dataclasses.replace(HEAD, bce_weight=1.0), binary_dims=[2])
    batch = policy.collate(make_samples(8))
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 250)
    with torch.no_grad():
        first = float(policy(batch).terms["l1"])
    for _ in range(250):
        out = policy(batch)
        opt.zero_grad()
        torch.autograd.backward(out.loss)
        opt.step()
        schedule.step()
    with torch.no_grad():
        final = policy(batch)
    assert float(final.terms["l1"]) < first / 10, (first, float(final.terms["l1"]))
    assert float(final.terms["bce"]) < 0.05
    pred = policy.predict(batch)
    assert torch.equal(pred[..., 2], batch["action"][..., 2])  # the binary dim, exactly its levels


class StatelessBackbone(nn.Module):
    """A backbone that does not take the state (like most VLMs), for the state projection path."""

    family = "fake"
    hidden_size = 6
    takes_state = False

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)

    def prepare(self, images: Mapping[str, torch.Tensor], instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"pix": torch.stack([f.float().mean(dim=(1, 2)) for f in images.values()]).mean(0)}  # (N, 3)

    def forward(self, inputs: Mapping[str, torch.Tensor], state: torch.Tensor | None = None) -> torch.Tensor:
        assert state is None
        out: torch.Tensor = self.proj(inputs["pix"] / 255)
        return out

    def lora_target_modules(self, preset: str) -> list[str]:
        return ["proj"]

    def layer_modules(self) -> Sequence[nn.Module]:
        return [self.proj]

    def pad_inputs(self, inputs: Mapping[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        return dict(inputs)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_state_projection_and_sensor_stream(kind: HeadKind) -> None:
    cfg = dataclasses.replace(HEAD, head=kind)
    policy = build_policy(
        cfg,
        StatelessBackbone(),
        cameras=["front"],
        state_dim=4,
        action_dim=3,
        history=2,
        chunk=2,
        sensor_dims={"observation.force": 5},
    )
    assert policy.state_proj is not None
    assert policy.cond_dim == 6 + 16 + 8
    samples = make_samples(4, history=2, force=5)
    batch = policy.collate(samples)
    cond = policy.conditioning(batch)
    assert cond.shape == (4, 2, 30)  # (B, W, D + state + sensor)
    torch.autograd.backward(policy(batch).loss)
    assert all(p.grad is not None for p in policy.sensor_encoders.parameters())
    assert policy.state_proj.weight.grad is not None
    before = policy.predict(batch, torch.Generator().manual_seed(0))
    for s in samples:
        s["observation.force"] = s["observation.force"] + 3.0
    after = policy.predict(policy.collate(samples), torch.Generator().manual_seed(0))
    assert not torch.allclose(before, after)  # the sensor stream reaches the actions
    del batch["observation.force"]
    with pytest.raises(InputFormatError, match="sensor stream"):
        policy(batch)


def test_head_state_dict_round_trip() -> None:
    cfg = dataclasses.replace(HEAD, head="flow", flow_steps=3)
    policy = tiny_policy(
        cfg, sensor_dims={"observation.tactile": 2}, binary_dims=[2], binary_low=[0.0], binary_high=[1.0]
    )
    state = policy.head_state_dict()
    assert state
    assert not any(k.startswith("backbone.") for k in state)
    assert any(k.startswith("sensor_encoders.0.") for k in state)
    config = policy.head_config()
    assert config["kind"] == "flow"
    assert config["binary_low"] == [0.0]
    rebuilt = policy_from_head_config(config, TinyBackbone(TINY, seed=0))
    batch = policy.collate(make_samples(3, tactile=2))
    assert not torch.equal(
        rebuilt.predict(batch, torch.Generator().manual_seed(1)),
        policy.predict(batch, torch.Generator().manual_seed(1)),
    )
    rebuilt.load_head_state_dict(state)
    a = policy.predict(batch, torch.Generator().manual_seed(1))
    assert torch.equal(rebuilt.predict(batch, torch.Generator().manual_seed(1)), a)
    assert set(a[..., 2].flatten().tolist()) <= {0.0, 1.0}
    with pytest.raises(ArtifactError, match="missing"):
        rebuilt.load_head_state_dict({k: v for k, v in state.items() if "sensor" not in k})
    with pytest.raises(ArtifactError, match="width"):
        policy_from_head_config(config, TinyBackbone(dataclasses.replace(TINY, hidden_size=64), seed=0))
    with pytest.raises(ArtifactError, match="upgrade"):
        policy_from_head_config({**config, "head_config_version": 2}, TinyBackbone(TINY))


def test_config_binary_dims_replace_the_stats() -> None:
    policy = tiny_policy(
        dataclasses.replace(HEAD, binary_dims=(0,)), binary_dims=[2], binary_low=[0.0], binary_high=[1.0]
    )
    assert policy.binary_dims == (0,)
    assert policy.binary_low == (-1.0,)
    with pytest.raises(ConfigError, match="outside"):
        tiny_policy(dataclasses.replace(HEAD, binary_dims=(5,)))


def test_binary_action_dims_from_stats() -> None:
    stats = {
        "features": {
            "action": {"mask": [True, False, False], "min": [-2.0, 0.0, 3.0], "max": [2.0, 1.0, 3.0]},
            "observation.state": {"mask": [False]},
        }
    }
    assert binary_action_dims(stats) == ((1, 2), (0.0, -1.0), (1.0, 1.0))
    assert binary_action_dims({"features": {}}) == ((), (), ())


def test_head_state_dict_is_the_policy_state_dict_without_the_backbone() -> None:
    policy = tiny_policy(HEAD, binary_dims=[2])
    want = {k: v for k, v in policy.state_dict().items() if not k.startswith("backbone.")}
    got = policy.head_state_dict()
    assert got.keys() == want.keys()
    assert want
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_concat_of_batches_prepared_apart_equals_one_batch_prepared_together() -> None:
    policy = tiny_policy()
    policy.eval()
    samples = make_samples(4)
    samples[0]["instruction"] = "go"
    samples[2]["instruction"] = "put the red cube on the shelf"
    first, second = policy.collate(samples[:2]), policy.collate(samples[2:])
    lengths = {first[BACKBONE_INPUTS]["input_ids"].shape[1], second[BACKBONE_INPUTS]["input_ids"].shape[1]}
    assert len(lengths) == 2  # the two batches were padded to different token lengths
    joined = policy.concat([first, second])
    together = policy.collate(samples)
    assert joined.keys() == together.keys()
    for key, value in together[BACKBONE_INPUTS].items():
        assert torch.equal(joined[BACKBONE_INPUTS][key], value), key
    assert torch.equal(joined["action"], together["action"])
    assert joined["instruction"] == together["instruction"]
    with torch.no_grad():
        assert torch.allclose(policy(joined, per_sample=True).loss, policy(together, per_sample=True).loss)


def test_per_sample_losses_average_to_the_batch_loss() -> None:
    policy = tiny_policy()
    policy.eval()
    batch = policy.collate(make_samples(4))
    with torch.no_grad():
        per_sample = policy(batch, per_sample=True).loss
        whole = policy(batch).loss
        one = policy(policy.collate(make_samples(4)[1:2]), per_sample=True).loss
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample.mean(), whole, atol=1e-6)
    assert torch.allclose(one[0], per_sample[1], atol=1e-6)


def test_concat_refuses_batches_with_other_keys() -> None:
    policy = tiny_policy()
    batch = policy.collate(make_samples(2))
    other = dict(batch)
    other.pop("frame_index")
    with pytest.raises(InputFormatError, match="cannot join batches with different keys"):
        policy.concat([batch, other])
