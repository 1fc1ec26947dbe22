"""Preemption and resume: SIGTERM mid-run saves the state, --resume auto finishes with the same bits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train_factories import Stream, make_stream
from vlacl.artifacts.names import ACTION_HEAD_NAME, ADAPTER_WEIGHTS_NAME, ADAPTERS_DIR
from vlacl.cl.base import Algorithm
from vlacl.errors import ConfigError, OutputExistsError
from vlacl.training.checkpoint import METRICS_LOG_NAME, STATE_NAME, resume_dir, resume_tmp
from vlacl.training.loop import EXIT_PREEMPTED, PreemptedError, StopFlag, run_train_task

STEPS = 20


def _cli(stream: Stream, out: Path, *extra: str) -> list[str]:
    args = stream.args("--steps", str(STEPS), "--save-every", "3", "--out", str(out), *extra)
    return [sys.executable, "-m", "vlacl", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _weights(out: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    files = [out / ADAPTERS_DIR / "shared" / ADAPTER_WEIGHTS_NAME, out / ACTION_HEAD_NAME]
    return {f"{f.relative_to(out)}/{k}": v.numpy().tobytes() for f in files for k, v in load_file(str(f)).items()}


def test_sigterm_then_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    stream = make_stream(tmp_path / "stream")
    whole = tmp_path / "whole"
    done = subprocess.run(_cli(stream, whole), env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr

    cut = tmp_path / "cut"
    state = resume_dir(cut) / STATE_NAME
    proc = subprocess.Popen(_cli(stream, cut), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first resume state was saved: raise STEPS"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "SIGTERM" in err
    assert "--resume auto" in err
    assert not cut.exists()
    assert state.is_file()

    again = subprocess.run(
        _cli(stream, cut, "--resume", "auto"), env=_env(), capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr
    assert not resume_dir(cut).exists()
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_resume_must_without_state_fails(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlacl.cli.app import app

    stream = Stream(tmp_path / "data", tmp_path / "stats", tmp_path / "model")
    result = CliRunner().invoke(app, [*stream.args("--out", str(tmp_path / "x"), "--resume", "must")])
    assert result.exit_code == 1
    assert "no resume state" in result.stderr


@pytest.mark.parametrize("value", ["sometimes"])
def test_resume_mode_is_checked(tmp_path: Path, value: str) -> None:
    from typer.testing import CliRunner

    from vlacl.cli.app import app

    stream = Stream(tmp_path / "data", tmp_path / "stats", tmp_path / "model")
    result = CliRunner().invoke(app, [*stream.args("--out", str(tmp_path / "x"), "--resume", value)])
    assert result.exit_code == 2
    assert "--resume 'sometimes'" in result.stderr


class _StopAt:
    """A CL algorithm (the no-op one) that asks the loop to stop after a given micro-batch, as SIGUSR1 would."""

    def __init__(self, flag: StopFlag, after: int) -> None:
        self.flag = flag
        self.after = after
        self.seen = 0

    def __call__(self, config: object) -> Algorithm:
        outer = self

        class Stopper(Algorithm):
            def after_backward(self, model: torch.nn.Module) -> None:
                outer.seen += 1
                if outer.seen == outer.after:
                    outer.flag.set(signal.SIGUSR1)

        return Stopper()


def test_stop_flag_then_resume_in_process_across_epochs_and_accumulation(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    stream = make_stream(tmp_path / "stream")
    cfg = stream.config(steps=7, grad_accum=2, lr=1e-3, head_lr=3e-3)  # 2 steps per epoch: crosses 3 epochs
    run_train_task(cfg, out=tmp_path / "whole")

    flag = StopFlag()
    algo = _StopAt(flag, after=5)(None)  # stops at the end of step 3 (micro-batch 5 is in step 3)
    with pytest.raises(PreemptedError, match="stopped by SIGUSR1 at step 3 of 7") as info:
        run_train_task(cfg, out=tmp_path / "cut", stop=flag, algorithm=algo)
    assert info.value.exit_code == EXIT_PREEMPTED
    saved = json.loads((resume_dir(tmp_path / "cut") / STATE_NAME).read_text())
    assert saved["step"] == 3
    assert (saved["epoch"], saved["batches_in_epoch"]) == (1, 2)
    result = run_train_task(cfg, out=tmp_path / "cut")
    assert result.steps == 7
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert [k for k in a if a[k] != b[k]] == []
    whole_log = (tmp_path / "whole" / METRICS_LOG_NAME).read_text().splitlines()
    cut_log = (tmp_path / "cut" / METRICS_LOG_NAME).read_text().splitlines()
    assert [json.loads(x)["step"] for x in cut_log] == [json.loads(x)["step"] for x in whole_log]


def test_a_changed_setting_is_refused_on_resume_unless_it_only_changes_speed(tmp_path: Path) -> None:
    """--compile, its mode, activation checkpointing and loader workers change speed, not the run."""
    from vlacl.config.core import config_to_dict
    from vlacl.training.loop import resume_differences

    torch.set_num_threads(1)
    stream = make_stream(tmp_path / "stream")
    flag = StopFlag()
    flag.set(signal.SIGTERM)
    with pytest.raises(PreemptedError):
        run_train_task(stream.config(steps=4), out=tmp_path / "cut", stop=flag)
    with pytest.raises(ConfigError, match=r"saved with other settings \(lr differ\)"):
        run_train_task(stream.config(steps=4, lr=5e-4), out=tmp_path / "cut")
    result = run_train_task(stream.config(steps=4, activation_checkpointing=True, workers=1), out=tmp_path / "cut")
    assert result.steps == 4
    saved = config_to_dict(stream.config(steps=4))
    faster = config_to_dict(stream.config(steps=4, compile=True, compile_mode="reduce-overhead"))
    assert resume_differences(saved, faster) == []
    assert resume_differences(saved, config_to_dict(stream.config(steps=4, batch_size=3))) == ["batch_size"]


def test_a_changed_prev_is_refused_on_resume(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    stream = make_stream(tmp_path / "stream")
    for name in ("a", "b"):
        run_train_task(stream.config(steps=1), out=tmp_path / name)
    flag = StopFlag()
    flag.set(signal.SIGTERM)
    with pytest.raises(PreemptedError):
        run_train_task(stream.config(steps=4, task="#1"), out=tmp_path / "cut", prev=tmp_path / "a", stop=flag)
    with pytest.raises(ConfigError, match=r"saved continuing from --prev .*a, this run continues from --prev .*b"):
        run_train_task(stream.config(steps=4, task="#1"), out=tmp_path / "cut", prev=tmp_path / "b")
    result = run_train_task(stream.config(steps=4, task="#1"), out=tmp_path / "cut", prev=tmp_path / "a")
    assert result.steps == 4


def test_a_resume_state_left_next_to_a_finished_checkpoint_does_not_replace_it(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    stream = make_stream(tmp_path / "stream")
    out = tmp_path / "cut"
    flag = StopFlag()
    flag.set(signal.SIGTERM)
    with pytest.raises(PreemptedError):
        run_train_task(stream.config(steps=4), out=out, stop=flag)
    stale = tmp_path / "stale"
    shutil.copytree(resume_dir(out), stale)
    run_train_task(stream.config(steps=4), out=out)
    shutil.copytree(stale, resume_dir(out))  # a run killed between writing --out and removing its resume state
    before = _weights(out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_train_task(stream.config(steps=4), out=out)
    assert _weights(out) == before


def test_resume_inside_stage_one_of_two_stage(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    stream = make_stream(tmp_path / "stream")
    cfg = stream.config(steps=5, two_stage=True, stage1_steps=3, lr=1e-3)
    run_train_task(cfg, out=tmp_path / "whole")
    flag = StopFlag()
    algo = _StopAt(flag, after=2)(None)
    with pytest.raises(PreemptedError, match="at step 2 of 5"):
        run_train_task(cfg, out=tmp_path / "cut", stop=flag, algorithm=algo)
    run_train_task(cfg, out=tmp_path / "cut")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert [k for k in a if a[k] != b[k]] == []


def test_a_finished_run_removes_a_resume_save_cut_short(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    stream = make_stream(tmp_path / "stream")
    out = tmp_path / "out"
    cut = resume_tmp(resume_dir(out))  # what a SIGKILL during a save leaves
    cut.mkdir()
    (cut / "trainable.safetensors").write_bytes(b"partial")
    run_train_task(stream.config(steps=2), out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stream"]
