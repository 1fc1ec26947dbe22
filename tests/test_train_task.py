"""train-task end to end on a micro backbone: checkpoint round trip, learning, guards, --prev chains, CLI tools."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.train_factories import Stream, make_stream
from vlacl.artifacts.names import (
    ACTION_HEAD_NAME,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    CL_META_NAME,
    CL_STATE_NAME,
)
from vlacl.artifacts.reader import open_artifact
from vlacl.cl.base import Algorithm, register, unregister
from vlacl.config.lora import AdapterConfig, FinetuneMode
from vlacl.config.policy import PolicyConfig
from vlacl.config.train_task import SMOKE_STEPS
from vlacl.data.keymap import KeyMap
from vlacl.data.normalize import StatsFile
from vlacl.data.windows import WindowSpec
from vlacl.errors import ArtifactError, ConfigError
from vlacl.training.checkpoint import METRICS_LOG_NAME
from vlacl.training.guards import TrainingError
from vlacl.training.loop import run_train_task
from vlacl.training.policy_io import load_policy


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stream]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machine is shared
    yield make_stream(tmp_path_factory.mktemp("stream"))
    torch.set_num_threads(threads)


def test_checkpoint_loads_back_to_the_same_predictions(stream: Stream, tmp_path: Path) -> None:
    out = tmp_path / "task0"
    result = run_train_task(stream.config(steps=3), out=out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        [
            f"{ADAPTERS_DIR}/shared/{ADAPTER_CONFIG_NAME}",
            f"{ADAPTERS_DIR}/shared/{ADAPTER_WEIGHTS_NAME}",
            ACTION_HEAD_NAME,
            CL_STATE_NAME,
            CL_META_NAME,
            METRICS_LOG_NAME,
            "config.yaml",
            "keymap.yaml",
            "stats.json",
            "vlacl_manifest.json",
        ]
    )
    manifest = open_artifact(out, "task_checkpoint", verify=True).manifest
    d = manifest.details
    assert d["adapter_stack"] == ["shared"]
    assert d["adapter_mode"] == "shared"
    assert d["steps"] == 3
    assert (out / d["base_model"]).resolve() == stream.model.resolve()
    assert d["task_index"] == 0
    assert d["cl_algorithm"] == "seq"
    assert math.isfinite(d["final_loss"])
    assert math.isfinite(d["val_loss"])
    assert {i.role for i in manifest.inputs} == {"stats", "dataset", "base_model"}
    lines = [json.loads(line) for line in (out / METRICS_LOG_NAME).read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert [r["step"] for r in logged] == [2, 3]
    assert set(logged[0]) >= {"step", "loss", "terms", "lr", "samples_per_s", "grad_norm"}

    trained = result.policy
    trained.train(False)
    loaded = load_policy(out)
    restored = loaded.policy
    assert not restored.training
    assert loaded.spec == _spec()
    assert loaded.cameras == ("observation.images.front",)
    assert loaded.active_adapters == ("shared",)
    assert loaded.normalizer.keys == ["observation.state", "action"]
    from vlacl.training.data import build_task_data

    data = build_task_data(
        [stream.data], _stats(stream), keymap=_keymap(), task=0, spec=_spec(), split_seed=0, short="skip"
    )
    batch = trained.collate([data.train[i] for i in range(6)])
    with torch.no_grad():
        a = trained.predict(batch)
        b = restored.predict(batch)
    assert torch.equal(a, b)


def _stats(stream: Stream) -> StatsFile:
    from vlacl.data.normalize import load_stats

    return load_stats(stream.stats)


def _keymap() -> KeyMap:
    from vlacl.data.keymap import KeyMap

    return KeyMap()


def _spec() -> WindowSpec:
    from vlacl.data.windows import WindowSpec

    return WindowSpec(history=1, chunk=4)


def test_the_policy_overfits_a_tiny_task(stream: Stream, tmp_path: Path) -> None:
    cfg = stream.config(
        steps=150,
        chunk=1,
        head_lr=5e-3,
        lr=2e-3,
        log_every=10,
        schedule="constant",
        model=PolicyConfig(hidden_sizes=(128,)),
    )
    run_train_task(cfg, out=tmp_path / "fit")
    records = [json.loads(x) for x in (tmp_path / "fit" / METRICS_LOG_NAME).read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] / 3, losses


def test_zero_loss_guard_names_the_terms_and_groups(stream: Stream, tmp_path: Path) -> None:
    cfg = stream.config(model=PolicyConfig(hidden_sizes=(64,), masked_action_dims=(0, 1, 2)))
    with pytest.raises(TrainingError, match=r"l1=0.*trainable parameters: .*head\.\w+: [\d,]+") as info:
        run_train_task(cfg, out=tmp_path / "zero")
    assert "gradient" in str(info.value)
    assert not (tmp_path / "zero").exists()


class _NanPenalty(Algorithm):
    def compute_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        return torch.tensor(float("nan"))


def test_nan_guard_skips_steps_then_stops(stream: Stream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    register("nan-test")(_NanPenalty)
    try:
        cfg = stream.config(steps=10, cl="nan-test", nonfinite_steps=3)
        with pytest.raises(TrainingError, match="NaN/Inf for 3 steps in a row"):
            run_train_task(cfg, out=tmp_path / "nan")
    finally:
        unregister("nan-test")
    assert sum("not finite; the step is skipped" in r.message for r in caplog.records) == 3


def test_prev_of_another_base_model_or_stats_is_refused(stream: Stream, tmp_path: Path) -> None:
    from tests.train_factories import MICRO
    from vlacl.config.ds_stats import DsStatsConfig
    from vlacl.data.stats import run_ds_stats
    from vlacl.models.tiny import save_tiny_model

    first = tmp_path / "task0"
    run_train_task(stream.config(steps=1), out=first)
    other_model = save_tiny_model(tmp_path / "other-model", MICRO, seed=1)
    with pytest.raises(ArtifactError, match=r"trained on base model .*but --model is .*other-model"):
        run_train_task(stream.config(task="#1", model_path=str(other_model)), out=tmp_path / "t1", prev=first)
    other_stats = tmp_path / "other-stats"
    run_ds_stats([stream.data], DsStatsConfig(image_frames=16, norm_mode="min_max"), out=other_stats)
    with pytest.raises(ArtifactError, match=r"trained with stats \w{12}, but --stats has fingerprint \w{12}"):
        run_train_task(stream.config(task="#1", stats=other_stats), out=tmp_path / "t1", prev=first)


class _StartSpy(Algorithm):
    started = 0

    def on_task_start(self, ctx: Any) -> None:
        type(self).started += 1


def test_prev_as_out_is_refused_before_training(stream: Stream, tmp_path: Path) -> None:
    first = tmp_path / "task0"
    run_train_task(stream.config(steps=1), out=first)
    head = (first / ACTION_HEAD_NAME).read_bytes()
    spy = _StartSpy()
    with pytest.raises(ConfigError, match=r"--prev .* and --out .* overlap"):
        run_train_task(stream.config(task="#1"), out=first, prev=first, overwrite=True, algorithm=spy)
    assert _StartSpy.started == 0
    assert (first / ACTION_HEAD_NAME).read_bytes() == head


def test_a_failure_while_writing_leaves_no_live_directory(
    stream: Stream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlacl.training import loop

    def fail(*args: Any, **kwargs: Any) -> None:
        raise ArtifactError("disk full")

    monkeypatch.setattr(loop._Trainer, "_record_inputs", fail)
    with pytest.raises(ArtifactError, match="disk full"):
        run_train_task(stream.config(steps=1), out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(("mode", "stack"), [("stack", 2), ("shared", 1)])
def test_prev_chains_task0_to_task1(stream: Stream, tmp_path: Path, mode: str, stack: int) -> None:
    adapter = AdapterConfig(rank=4, dropout=0.0, mode=mode)  # type: ignore[arg-type]
    run_train_task(stream.config(steps=1, adapter=adapter), out=tmp_path / "t0")
    run_train_task(stream.config(steps=1, adapter=adapter, task="#1"), out=tmp_path / "t1", prev=tmp_path / "t0")
    art = open_artifact(tmp_path / "t1", "task_checkpoint", verify=True)
    assert len(art.manifest.details["adapter_stack"]) == stack
    assert art.manifest.details["task_index"] == 1
    assert "prev" in {i.role for i in art.manifest.inputs}
    assert len([p for p in (tmp_path / "t1" / ADAPTERS_DIR).iterdir() if p.is_dir()]) == stack


def test_merge_lora_and_inspect_ckpt_read_what_train_task_wrote(stream: Stream, tmp_path: Path) -> None:
    from vlacl.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, [*stream.args("--steps", "2", "--out", str(tmp_path / "ck"))])
    assert result.exit_code == 0, result.output
    inspect = runner.invoke(app, ["inspect-ckpt", str(tmp_path / "ck"), "--verify", "--json"])
    assert inspect.exit_code == 0, inspect.output
    report = json.loads(inspect.stdout)
    assert report["kind"] == "task_checkpoint"
    merged = runner.invoke(
        app, ["merge-lora", str(tmp_path / "ck"), "--out", str(tmp_path / "merged")]
    )  # the base model comes from the checkpoint's manifest
    assert merged.exit_code == 0, merged.output
    assert open_artifact(tmp_path / "merged", "merged_model").manifest.kind == "merged_model"


class _LoraGradSpy(Algorithm):
    seen: ClassVar[list[bool]] = []

    def after_backward(self, model: torch.nn.Module) -> None:
        grads = [p.grad is not None for n, p in model.named_parameters() if "lora_" in n]
        _LoraGradSpy.seen.append(any(grads))


def test_two_stage_trains_the_head_alone_first(stream: Stream, tmp_path: Path) -> None:
    register("lora-grad-spy")(_LoraGradSpy)
    _LoraGradSpy.seen = []
    try:
        cfg = stream.config(steps=4, two_stage=True, stage1_steps=2, cl="lora-grad-spy")
        run_train_task(cfg, out=tmp_path / "two")
    finally:
        unregister("lora-grad-spy")
    assert _LoraGradSpy.seen == [False, False, True, True]


def test_off_a_terminal_each_log_step_is_one_plain_line(stream: Stream, tmp_path: Path) -> None:
    from vlacl.cli.app import app

    args = [*stream.args("--steps", "4", "--log-every", "2", "--val-every", "0", "--out", str(tmp_path / "ck"))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if " step " in line]
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["2/4", "4/4", "4/4"], lines
    assert "loss" in lines[0]
    assert "lr" in lines[0]
    assert sum("val_loss" in line for line in lines) == 1


def test_a_run_after_an_accelerator_of_other_settings_in_the_same_process(stream: Stream, tmp_path: Path) -> None:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]

    AcceleratorState._reset_state(reset_partial_state=False)
    Accelerator(mixed_precision="bf16", cpu=True)  # a caller's own, or an earlier run's, process-wide state
    result = run_train_task(stream.config(steps=2), out=tmp_path / "after")
    assert result.steps == 2


def test_smoke_runs_a_few_steps(stream: Stream, tmp_path: Path) -> None:
    result = run_train_task(stream.config(steps=None, smoke=True), out=tmp_path / "smoke")
    assert result.steps == SMOKE_STEPS
    assert result.val_loss is not None


def test_tensorboard_without_the_package_is_a_clear_error(
    stream: Stream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"--tensorboard needs the tensorboard package.*pip install tensorboard"):
        run_train_task(stream.config(steps=1, tensorboard=True), out=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_keep_best_and_epochs(stream: Stream, tmp_path: Path) -> None:
    result = run_train_task(stream.config(steps=None, epochs=2, keep_best=True, val_every=1), out=tmp_path / "best")
    assert result.steps == 2 * (36 // 8)
    best = tmp_path / "best" / "best"
    assert (best / ACTION_HEAD_NAME).is_file()
    assert (best / ADAPTERS_DIR / "shared" / ADAPTER_WEIGHTS_NAME).is_file()
    vals = [json.loads(x) for x in (tmp_path / "best" / METRICS_LOG_NAME).read_text().splitlines()]
    vals = [r["val_loss"] for r in vals if "val_loss" in r]
    assert len(vals) == result.steps
    assert result.best_val_loss == min(vals)


class _OutOfMemory(Algorithm):
    def compute_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_settings_that_drive_memory(stream: Stream, tmp_path: Path) -> None:
    register("oom-test")(_OutOfMemory)
    try:
        with pytest.raises(TrainingError) as info:
            run_train_task(stream.config(cl="oom-test", batch_size=8), out=tmp_path / "oom")
    finally:
        unregister("oom-test")
    message = str(info.value)
    assert message.startswith("out of device memory while training (CUDA out of memory.")
    for setting in ("--batch-size=8", "--chunk=4", "--history=1", "precision=no", "--activation-checkpointing=False"):
        assert setting in message
    assert "raise --grad-accum" in message
    assert not (tmp_path / "oom").exists()


def test_load_policy_refuses_an_edited_checkpoint(stream: Stream, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    run_train_task(stream.config(steps=1), out=out)
    head = out / ACTION_HEAD_NAME
    head.write_bytes(head.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="sha256"):
        load_policy(out)


# --cache-features ----------------------------------------------------------------------------


def _cached(directory: Path) -> list[Path]:
    return sorted(directory.glob("features-*.safetensors"))


def test_cached_features_are_the_backbones_and_give_the_same_loss(stream: Stream, tmp_path: Path) -> None:
    from torch.utils.data import default_collate

    from vlacl.models.policy import FEATURES
    from vlacl.training.features import FEATURES_TENSOR, FeatureDataset

    cache = tmp_path / "cache"
    cfg = stream.config(steps=2, two_stage=True, stage1_steps=2, cache_features=True, feature_cache=cache)
    result = run_train_task(cfg, out=tmp_path / "stage1")
    (file,) = _cached(cache)
    features = load_file(str(file))[FEATURES_TENSOR]  # (N, W, D)
    policy = result.policy.train(False)  # stage 1 only: the backbone is what the cache saw
    from vlacl.training.data import build_task_data

    data = build_task_data(
        [stream.data], _stats(stream), keymap=_keymap(), task=0, spec=_spec(), split_seed=0, short="skip"
    )
    assert features.shape == (len(data.train), 1, 32)
    rows = [0, 5, 17, len(data.train) - 1]
    batch = policy.collate([data.train[i] for i in rows])
    cached = FeatureDataset(data.train, features)
    light = default_collate([cached[i] for i in rows])
    assert not any(k.startswith("observation.images.") for k in light)
    with torch.no_grad():
        live = policy.backbone_features(batch)  # (B, W, D)
        torch.testing.assert_close(features[rows], live, rtol=1e-5, atol=1e-6)
        through_backbone = policy(batch).loss
        from_cache = policy.loss_from_features(light[FEATURES], light).loss
    torch.testing.assert_close(from_cache, through_backbone, rtol=1e-5, atol=1e-6)
    art = open_artifact(tmp_path / "stage1", "task_checkpoint", verify=True)
    assert art.manifest.details["steps"] == 2
    assert not any("features" in p.name for p in (tmp_path / "stage1").rglob("*"))


def test_training_from_the_cache_matches_training_through_the_backbone(stream: Stream, tmp_path: Path) -> None:
    plain = run_train_task(stream.config(steps=3, two_stage=True, stage1_steps=2), out=tmp_path / "plain")
    cached = run_train_task(
        stream.config(steps=3, two_stage=True, stage1_steps=2, cache_features=True), out=tmp_path / "cached"
    )
    a, b = plain.policy.head_state_dict(), cached.policy.head_state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / ".cached.features").exists()  # the default cache goes with the run
    lora = {n: p for n, p in cached.policy.named_parameters() if "lora_B" in n}
    assert lora
    assert all(p.abs().sum() > 0 for p in lora.values())


def test_the_cache_is_reused_and_a_changed_model_invalidates_it(
    stream: Stream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil

    from tests.train_factories import MICRO
    from vlacl.models.tiny import save_tiny_model

    caplog.set_level(logging.INFO, logger="vlacl.training.features")
    cache = tmp_path / "cache"
    model = tmp_path / "model"
    shutil.copytree(stream.model, model)
    cfg = stream.config(
        steps=1, two_stage=True, stage1_steps=1, cache_features=True, feature_cache=cache, model_path=str(model)
    )
    run_train_task(cfg, out=tmp_path / "a")
    (first,) = _cached(cache)
    stamp = first.stat().st_mtime_ns
    assert "feature cache: computed" in caplog.text
    caplog.clear()
    run_train_task(cfg, out=tmp_path / "b")
    assert "feature cache: reusing" in caplog.text
    assert _cached(cache) == [first]
    assert first.stat().st_mtime_ns == stamp
    caplog.clear()
    save_tiny_model(model, MICRO, seed=1)  # other weights at the same path
    run_train_task(cfg, out=tmp_path / "c", overwrite=True)
    assert "feature cache: computed" in caplog.text
    assert len(_cached(cache)) == 2
    assert open_artifact(tmp_path / "c", "task_checkpoint", verify=True).manifest.details["steps"] == 1


def test_cache_features_needs_two_stage() -> None:
    from vlacl.config.train_task import TrainTaskConfig

    with pytest.raises(ConfigError, match="--two-stage"):
        TrainTaskConfig(cache_features=True)


# Extra sensor streams --------------------------------------------------------------------------


def test_an_extra_force_stream_reaches_the_policy_normalized(tmp_path: Path) -> None:
    from tests.train_factories import FORCE

    force = make_stream(tmp_path / "force", force_dim=3)
    out = tmp_path / "ck"
    result = run_train_task(force.config(steps=2), out=out)
    policy = result.policy
    assert policy.sensor_dims == {FORCE: 3}
    assert len(policy.sensor_encoders) == 1
    loaded = load_policy(out)
    assert loaded.policy.sensor_dims == {FORCE: 3}
    assert FORCE in loaded.observation_keys
    assert loaded.keymap.extra == {FORCE: FORCE}
    from vlacl.data.keymap import load_keymap
    from vlacl.training.data import build_task_data

    assert force.keymap is not None
    data = build_task_data(
        [force.data], _stats(force), keymap=load_keymap(force.keymap), task=0, spec=_spec(), short="skip"
    )
    assert FORCE in data.train.observation_keys
    values = torch.stack([torch.as_tensor(data.train[i][FORCE]) for i in range(len(data.train))])  # (N, W, 3)
    assert values.shape[1:] == (1, 3)
    assert abs(float(values.mean())) < 0.5  # raw values are around 50: mean/std normalized
    assert loaded.normalizer.mode(FORCE) == "mean_std"
    batch = policy.collate([data.train[i] for i in range(4)])
    with torch.no_grad():
        a = policy.train(False).predict(batch)
        moved = dict(batch)
        moved[FORCE] = batch[FORCE] + 3.0
        b = policy.predict(moved)
    assert not torch.equal(a, b)  # the force stream changes the actions


@pytest.mark.parametrize("finetune", ["lora", "last-n"])
def test_weights_written_from_a_gathered_state_dict_equal_the_modules_own(
    stream: Stream, tmp_path: Path, finetune: FinetuneMode
) -> None:
    """Under FSDP the checkpoint is written from the full state dict; the files must not differ."""
    from vlacl.training.data import build_task_data
    from vlacl.training.model import build_model

    cfg = stream.config(adapter=AdapterConfig(rank=4, dropout=0.0, finetune=finetune, last_n=1))
    data = build_task_data(
        [stream.data], _stats(stream), keymap=_keymap(), task=0, spec=_spec(), split_seed=0, short="skip"
    )
    built = build_model(cfg, data, _stats(stream), None, mixed="no")
    with torch.no_grad():
        for param in built.policy.parameters():
            param.add_(torch.randn_like(param))  # B factors away from zero, so that no file is trivial
    (tmp_path / "own").mkdir()
    (tmp_path / "gathered").mkdir()
    own = built.save_weights(built.policy, tmp_path / "own")
    gathered = built.save_weights(built.policy, tmp_path / "gathered", dict(built.policy.state_dict()))
    assert own == gathered
    files = sorted(p.relative_to(tmp_path / "own") for p in (tmp_path / "own").rglob("*.safetensors"))
    assert len(files) == 2
    for rel in files:
        assert (tmp_path / "own" / rel).read_bytes() == (tmp_path / "gathered" / rel).read_bytes(), rel


def test_validation_episodes_shorter_than_a_window_leave_the_task_without_validation(tmp_path: Path) -> None:
    from tests.lerobot_factories import make_episodes, write_lerobot
    from vlacl.config.ds_stats import DsStatsConfig
    from vlacl.data.keymap import load_keymap
    from vlacl.data.normalize import load_stats
    from vlacl.data.stats import run_ds_stats
    from vlacl.training.data import build_task_data

    # task 0 holds episodes of 20 and 6 frames; a window needs 11: the split decides whether validation can be read
    truth = make_episodes([20, 20, 6, 6] * 3, ["a", "b"], cameras=["front"], image_size=(16, 16), seed=0)
    data = write_lerobot(tmp_path / "data", truth, images="embedded")
    run_ds_stats([data], DsStatsConfig(image_frames=16), out=tmp_path / "stats")
    stats = load_stats(tmp_path / "stats")
    without_val = 0
    for seed in range(6):
        built = build_task_data(
            [data],
            stats,
            keymap=load_keymap(None),
            task="#0",
            spec=WindowSpec(history=1, chunk=10),
            val_fraction=0.2,
            split_seed=seed,
        )
        assert len(built.train) > 0
        if built.val is None:
            without_val += 1
        else:
            assert len(built.val) > 0
    assert without_val > 0, "no split put only short episodes into validation: change the lengths"
