"""Each backbone family with each head: a few training steps, a checkpoint, and load_policy back to the same actions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.hf_factories import FACTORIES
from tests.train_factories import Stream, make_stream
from vlacl.artifacts.reader import open_artifact
from vlacl.config.lora import AdapterConfig
from vlacl.config.policy import PolicyConfig
from vlacl.data.normalize import load_stats
from vlacl.training.data import build_task_data
from vlacl.training.loop import run_train_task
from vlacl.training.policy_io import load_policy

FAMILIES = ("tiny", "qwen2_5_vl", "paligemma", "idefics3", "kosmos2")
HEADS = ("mlp", "lstm", "flow", "diffusion")
IMAGE_SIZE = {"idefics3": 32}
"""Camera size per family (its tiny vision tower's image size); 16 otherwise."""


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stream]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Stream] = {}
    for size in sorted({16, *IMAGE_SIZE.values()}):
        built[f"data{size}"] = make_stream(root / f"s{size}", episodes=4, length=8, image_size=size)
    for family in FAMILIES:
        base = built[f"data{IMAGE_SIZE.get(family, 16)}"]
        model = base.model if family == "tiny" else FACTORIES[family](root / family)
        built[family] = Stream(base.data, base.stats, model)
    yield built
    torch.set_num_threads(threads)


def _head(kind: str) -> PolicyConfig:
    return PolicyConfig(
        head=kind,  # type: ignore[arg-type]
        hidden_sizes=(32,),
        lstm_hidden=16,
        denoiser_width=32,
        denoiser_depth=1,
        flow_steps=2,
        diffusion_timesteps=10,
        inference_steps=2,
    )


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_and_head_train_and_load_back(
    streams: dict[str, Stream], tmp_path: Path, family: str, head: str
) -> None:
    stream = streams[family]
    history = 2 if head == "lstm" else 1
    cfg = stream.config(
        steps=2,
        batch_size=2,
        history=history,
        chunk=2,
        model=_head(head),
        adapter=AdapterConfig(rank=2, dropout=0.0),
        val_fraction=0.0,
    )
    out = tmp_path / "ck"
    result = run_train_task(cfg, out=out)
    details = open_artifact(out, "task_checkpoint", verify=True).manifest.details
    assert details["steps"] == 2
    assert details["head_config"]["kind"] == head
    assert details["backbone_family"] == family

    loaded = load_policy(out)
    assert loaded.spec.history == history
    data = build_task_data(
        [stream.data], load_stats(stream.stats), keymap=loaded.keymap, task=0, spec=loaded.spec, val_fraction=0.0
    )
    trained = result.policy.train(False)
    batch = trained.collate([data.train[i] for i in (0, 3)])
    a = trained.predict(batch, generator=torch.Generator().manual_seed(0))
    b = loaded.policy.predict(batch, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 2, 3)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
