"""train-task under ``accelerate launch``: two CPU processes (gloo) train and the main one writes one checkpoint.

``accelerate launch --cpu`` starts a single process; ``--multi_gpu --num_processes 2`` with
``--device cpu`` starts two through ``torch.distributed.run``, and the Accelerator picks gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.train_factories import make_stream
from vlacl.artifacts.reader import open_artifact
from vlacl.training.checkpoint import METRICS_LOG_NAME


def _launch(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` of ``python -m module args`` on two CPU processes."""
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # torch.distributed.run; with --cpu accelerate would start one process
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        module,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=300)


def test_two_cpu_processes_write_one_checkpoint(tmp_path: Path) -> None:
    stream = make_stream(tmp_path / "stream")
    out = tmp_path / "ck"
    args = stream.args("--device", "cpu", "--steps", "4", "--batch-size", "4", "--out", str(out))
    done = _launch("vlacl", *args)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("wrote ") == 1  # only the main process writes and reports
    art = open_artifact(out, "task_checkpoint", verify=True)
    assert art.manifest.details["num_processes"] == 2
    assert art.manifest.details["steps"] == 4
    siblings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ck"))
    assert siblings == []
    logged = [json.loads(x) for x in (out / METRICS_LOG_NAME).read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == [2, 4]  # one line per logged step, not one per process


def test_two_cpu_processes_train_mir_and_ewc_chains(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    stream = make_stream(tmp_path / "stream")
    root = tmp_path / "runs"
    root.mkdir()
    done = _launch("tests.accelerate_cl_chain", str(stream.data), str(stream.stats), str(stream.model), str(root))
    assert done.returncode == 0, done.stderr[-4000:]
    for name in ("mir", "ewc"):
        for task in (0, 1):
            art = open_artifact(root / f"{name}{task}", "task_checkpoint", verify=True)
            assert art.manifest.details["num_processes"] == 2
            assert art.manifest.details["cl_algorithm"] == name
            assert art.manifest.details["steps"] == 4
    ranks = [load_file(str(root / f"ewc1.rank{r}.safetensors")) for r in (0, 1)]
    fisher = sorted(k for k in ranks[0] if k.startswith("fisher."))
    assert fisher
    assert sorted(k for k in ranks[1] if k.startswith("fisher.")) == fisher
    for key in fisher:  # the Fisher is summed over processes: every process holds the same one
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert any(float(ranks[0][k].abs().sum()) > 0 for k in fisher)
    logged = [json.loads(x) for x in (root / "ewc1" / METRICS_LOG_NAME).read_text().splitlines()]
    assert any(r.get("terms", {}).get("cl_penalty", 0) > 0 for r in logged if "loss" in r)
    mir = [load_file(str(root / f"mir1.rank{r}.safetensors")) for r in (0, 1)]
    for key in ("memory.episode", "memory.frame", "memory.task"):  # the same memory on every process
        assert torch.equal(mir[0][key], mir[1][key]), key
    assert sorted(set(mir[0]["memory.task"].tolist())) == [0, 1]


def _agree(rank: int, port: int, signal_at: int, polls: int, out: str) -> None:
    """One gloo process: poll the agreement ``polls`` times, this rank's flag set from poll ``signal_at``."""
    import torch.distributed as dist

    from vlacl.training.loop import StopAgreement

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        agreement = StopAgreement(torch.device("cpu"))
        answers = [agreement.poll(rank == 1 and i >= signal_at) for i in range(polls)]
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(answers))


def test_a_stop_on_one_process_is_agreed_by_all_one_step_later(tmp_path: Path) -> None:
    import socket

    from torch.multiprocessing.spawn import spawn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn(_agree, args=(port, 3, 6, str(tmp_path)), nprocs=2, join=True)  # type: ignore[no-untyped-call]
    answers = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert answers[0] == answers[1] == [False, False, False, False, True, True]


def test_ddp_keeps_buffers_as_built_and_finds_unused_parameters_only_for_two_stage() -> None:
    """No buffer broadcast before each forward: every process builds the same constant buffers."""
    from vlacl.config.train_task import TrainTaskConfig
    from vlacl.training.loop import _make_accelerator

    handler = _make_accelerator(TrainTaskConfig(device="cpu")).ddp_handler
    assert handler.broadcast_buffers is False
    assert handler.find_unused_parameters is False
    two_stage = _make_accelerator(TrainTaskConfig(device="cpu", two_stage=True)).ddp_handler
    assert two_stage.find_unused_parameters is True
