"""Offline action-error evaluation: errors of known predictions against hand-computed values, pooling, seeds."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.lerobot_factories import make_episodes, write_lerobot
from tests.train_factories import MICRO, Stream
from vlacl.config.ds_stats import DsStatsConfig
from vlacl.config.policy import PolicyConfig
from vlacl.data.episode import Episode
from vlacl.data.keymap import KeyMap
from vlacl.data.normalize import load_stats
from vlacl.data.open import open_datasets
from vlacl.data.stats import run_ds_stats
from vlacl.data.windows import WindowSpec
from vlacl.errors import ConfigError, InputFormatError
from vlacl.evaluation.offline import OfflineEpisodeResult, evaluate_offline, pool
from vlacl.models.policy import binary_action_dims, build_policy
from vlacl.models.tiny import TinyBackbone
from vlacl.training.data import task_normalizer
from vlacl.training.loop import run_train_task
from vlacl.training.policy_io import LoadedPolicy, load_policy

LENGTHS = [9, 7, 12, 5]
"""Episode lengths; with history 2 + chunk 4 the 5-frame episode is too short and left out."""
HISTORY, CHUNK = 2, 4
STATE, CAMERA = "observation.state", "observation.images.front"
GRIPPER = 2
"""The binary action dimension (0 / 1, like a gripper)."""


@dataclasses.dataclass(frozen=True)
class Data:
    """A tiny dataset with a binary action dimension, its episodes and its stats."""

    episodes: list[Episode]
    stats_dir: Path
    action_stats: dict[str, Any]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Data]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared machine
    root = tmp_path_factory.mktemp("offline")
    truth = make_episodes(LENGTHS, ["pick the cube", "open the drawer"], cameras=["front"], seed=3)
    rng = np.random.default_rng(3)
    for ep in truth:
        ep.action[:, GRIPPER] = rng.integers(0, 2, size=ep.length).astype(np.float32)
        ep.action[0, 0] = 5.0  # far outside the q01..q99 range: clipped when normalized, not in raw units
    path = write_lerobot(root / "data", truth, images="embedded")
    run_ds_stats([path], DsStatsConfig(image_frames=8), out=root / "stats")
    stats = json.loads((root / "stats" / "stats.json").read_text())
    action = stats["features"]["action"]
    assert action["mask"] == [True, True, False]  # the gripper was detected binary
    yield Data(list(open_datasets([path])[0].episodes), root / "stats", action)
    torch.set_num_threads(threads)


def loaded_policy(data: Data, cfg: PolicyConfig, *, history: int = HISTORY, chunk: int = CHUNK) -> LoadedPolicy:
    stats = load_stats(data.stats_dir)
    dims, low, high = binary_action_dims(stats.data)
    policy = build_policy(
        cfg,
        TinyBackbone(MICRO, seed=0),
        cameras=["front"],
        state_dim=4,
        action_dim=3,
        history=history,
        chunk=chunk,
        binary_dims=dims,
        binary_low=low,
        binary_high=high,
    )
    policy.requires_grad_(False)
    policy.train(False)
    keys = (STATE, CAMERA)
    return LoadedPolicy(
        policy=policy,
        normalizer=task_normalizer(stats, [STATE]),
        keymap=KeyMap(),
        spec=WindowSpec(history=history, chunk=chunk),
        cameras=(CAMERA,),
        observation_keys=keys,
        active_adapters=(),
        details={},
        path=data.stats_dir,
    )


def constant_policy(data: Data, chunk_value: np.ndarray, **cfg: Any) -> LoadedPolicy:
    """An mlp head whose every prediction is ``chunk_value`` ``(K, A)`` (normalized units; binary dims: the sign)."""
    loaded = loaded_policy(data, PolicyConfig(hidden_sizes=(16,), **cfg))
    last = loaded.policy.head.net[-1]  # type: ignore[index]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.as_tensor(chunk_value.reshape(-1), dtype=torch.float32))
    return loaded


# A chunk in normalized units; the gripper column is a logit: positive -> level 1, negative -> level 0.
C = np.array([[0.5, -0.25, 3.0], [-0.8, 0.1, 3.0], [0.0, 0.9, -3.0], [1.5, -1.2, 3.0]])  # (K, A)


def expected(data: Data, episodes: list[Episode], counted_dims: tuple[int, ...] = (0, 1, 2)) -> dict[str, np.ndarray]:
    """Per-dim sums ``(A,)`` of the four errors and counts, by straight loops over frames and chunk steps."""
    a = data.action_stats
    q01, q99 = np.asarray(a["q01"]), np.asarray(a["q99"])
    mask = np.asarray(a["mask"], dtype=bool)
    center, half = (q01 + q99) / 2, (q99 - q01) / 2
    pred = np.where(C[:, GRIPPER] > 0, 1.0, 0.0)
    pred_norm = C.copy()
    pred_norm[:, GRIPPER] = pred  # the binary level the head decodes
    pred_raw = np.where(mask, pred_norm * half + center, pred_norm)  # (K, A)
    out = {name: np.zeros(3) for name in ("mse", "mae", "mse_raw", "mae_raw", "count")}
    for ep in episodes:
        actions = ep.read("action").astype(np.float64)  # (T, A)
        for t in range(ep.length):
            for s in range(CHUNK):
                if t + s >= ep.length:
                    continue  # a pad
                x = actions[t + s]
                x_norm = np.where(mask, np.clip((x - center) / half, -1, 1), x)
                for d in counted_dims:
                    out["mse"][d] += (pred_norm[s, d] - x_norm[d]) ** 2
                    out["mae"][d] += abs(pred_norm[s, d] - x_norm[d])
                    out["mse_raw"][d] += (pred_raw[s, d] - x[d]) ** 2
                    out["mae_raw"][d] += abs(pred_raw[s, d] - x[d])
                    out["count"][d] += 1
    return out


def assert_matches(result: Any, want: dict[str, np.ndarray], counted_dims: tuple[int, ...]) -> None:
    count = want["count"]
    assert result.count_per_dim == tuple(int(c) for c in count)
    assert result.values == int(count.sum())
    for name in ("mse", "mae", "mse_raw", "mae_raw"):
        per_dim = getattr(result, f"{name}_per_dim")
        for d in range(3):
            if d in counted_dims:
                assert per_dim[d] == pytest.approx(want[name][d] / count[d], rel=1e-5, abs=1e-7), (name, d)
            else:
                assert math.isnan(per_dim[d]), (name, d)
        assert getattr(result, name) == pytest.approx(want[name].sum() / count.sum(), rel=1e-5), name


def test_constant_prediction_gives_hand_computed_errors(data: Data, caplog: pytest.LogCaptureFixture) -> None:
    loaded = constant_policy(data, C)
    with caplog.at_level(logging.WARNING):
        results = evaluate_offline(loaded, data.episodes, batch_size=7)
    assert "skipped 1 of 4 episodes" in caplog.text  # the 5-frame episode
    kept = [ep for ep in data.episodes if ep.length >= HISTORY + CHUNK]
    assert [r.episode for r in results] == [ep.index for ep in kept]
    assert [r.frames for r in results] == [ep.length for ep in kept]
    for result, ep in zip(results, kept, strict=True):
        assert_matches(result, expected(data, [ep]), (0, 1, 2))
        assert result.seconds >= 0
    # `expected` compares raw predictions with the recorded outlier 5.0, normalized ones with its clipped 1.0
    first = results[0]
    # the gripper is binary: its two units agree
    assert first.mse_per_dim[GRIPPER] == pytest.approx(first.mse_raw_per_dim[GRIPPER])
    assert first.mse_per_dim[GRIPPER] > 0


def test_pool_equals_one_direct_computation_over_all_episodes(data: Data) -> None:
    results = evaluate_offline(constant_policy(data, C), data.episodes, batch_size=64)
    kept = [ep for ep in data.episodes if ep.length >= HISTORY + CHUNK]
    summary = pool(results)
    assert summary.episodes == 3
    assert summary.frames == sum(ep.length for ep in kept)
    assert summary.seconds == pytest.approx(sum(r.seconds for r in results))
    assert_matches(summary, expected(data, kept), (0, 1, 2))
    part = pool(results[1:])
    assert_matches(part, expected(data, kept[1:]), (0, 1, 2))
    with pytest.raises(InputFormatError, match="no offline episode results"):
        pool([])
    other = dataclasses.replace(results[0], count_per_dim=(1, 2), mse_per_dim=(0.0, 0.0))
    with pytest.raises(InputFormatError, match="different action widths"):
        pool([results[0], other])


def test_masked_dimensions_do_not_count(data: Data) -> None:
    loaded = constant_policy(data, C, masked_action_dims=(1,))
    results = evaluate_offline(loaded, data.episodes, batch_size=10)
    kept = [ep for ep in data.episodes if ep.length >= HISTORY + CHUNK]
    for result, ep in zip(results, kept, strict=True):
        assert result.count_per_dim[1] == 0
        assert_matches(result, expected(data, [ep], (0, 2)), (0, 2))
    assert math.isnan(pool(results).mae_raw_per_dim[1])


def test_batch_size_does_not_change_a_regression_heads_results(data: Data) -> None:
    loaded = loaded_policy(data, PolicyConfig(hidden_sizes=(16,)))  # random weights: predictions vary by frame
    one = evaluate_offline(loaded, data.episodes, batch_size=1)
    many = evaluate_offline(loaded, data.episodes, batch_size=64)
    for a, b in zip(one, many, strict=True):
        assert a.mse == pytest.approx(b.mse, rel=1e-5)
        assert a.mae_raw_per_dim == pytest.approx(b.mae_raw_per_dim, rel=1e-5)


def _errors(results: list[OfflineEpisodeResult]) -> list[tuple[float, ...]]:
    return [r.mse_per_dim + r.mae_raw_per_dim for r in results]


def test_a_seed_makes_a_flow_head_reproducible(data: Data) -> None:
    loaded = loaded_policy(data, PolicyConfig(head="flow", flow_steps=2, denoiser_width=16, denoiser_depth=1))
    a = evaluate_offline(loaded, data.episodes, batch_size=16, seed=5)
    b = evaluate_offline(loaded, data.episodes, batch_size=16, seed=5)
    c = evaluate_offline(loaded, data.episodes, batch_size=16, seed=6)
    assert _errors(a) == _errors(b)
    assert _errors(a) != _errors(c)


def test_bad_arguments_are_refused(data: Data) -> None:
    loaded = constant_policy(data, C)
    with pytest.raises(ConfigError, match="batch size"):
        evaluate_offline(loaded, data.episodes, batch_size=0)
    with pytest.raises(InputFormatError, match="no episodes"):
        evaluate_offline(loaded, [])
    short = [ep for ep in data.episodes if ep.length < HISTORY + CHUNK]
    with pytest.raises(InputFormatError, match="nothing to evaluate offline"):
        evaluate_offline(loaded, short)
    with pytest.raises(InputFormatError, match="fewer than history"):
        evaluate_offline(loaded, data.episodes, short="error")
    with pytest.raises(ConfigError, match="the policy is on cpu"):
        evaluate_offline(loaded, data.episodes, device="meta")


def test_a_trained_task_checkpoint_evaluates_as_its_own_predictions_say(stream: Stream, tmp_path: Path) -> None:
    out = tmp_path / "task0"
    run_train_task(stream.config(steps=2), out=out)
    loaded = load_policy(out)
    episodes = list(open_datasets([stream.data])[0].episodes)[:3]
    results = evaluate_offline(loaded, episodes, batch_size=5)
    assert [r.episode for r in results] == [ep.index for ep in episodes]
    # Direct: one batch per episode, errors over the non-pad steps (no dimension is masked).
    from vlacl.data.windows import WindowedDataset

    for result, ep in zip(results, episodes, strict=True):
        ds = WindowedDataset([ep], loaded.spec, observation_keys=loaded.observation_keys, normalizer=loaded.normalizer)
        samples = [ds[i] for i in range(len(ds))]
        batch = loaded.policy.collate(samples)
        pred = loaded.policy.predict(batch).double()  # (B, K, A)
        keep = ~batch["action_is_pad"]  # (B, K)
        diff = (pred - batch["action"].double())[keep]  # (N, A)
        raw = loaded.normalizer.unnormalize("action", pred)[keep]  # (N, A)
        recorded = torch.tensor(np.array(ep.read("action")), dtype=torch.float64)  # (T, A)
        rows = torch.arange(loaded.spec.chunk)[None, :] + torch.arange(ep.length)[:, None]  # (B, K)
        raw_target = recorded[rows.clamp(max=ep.length - 1)][keep]  # (N, A)
        assert result.frames == ep.length
        assert result.values == diff.numel()
        assert result.mse == pytest.approx(float(diff.square().mean()), rel=1e-5)
        assert result.mae_per_dim == pytest.approx(diff.abs().mean(0).tolist(), rel=1e-5)
        assert result.mse_raw == pytest.approx(float((raw - raw_target).square().mean()), rel=1e-5)
