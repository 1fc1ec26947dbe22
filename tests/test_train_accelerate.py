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

from tests.train_factories import make_stream
from vlacl.artifacts.reader import open_artifact
from vlacl.training.checkpoint import METRICS_LOG_NAME


def test_two_cpu_processes_write_one_checkpoint(tmp_path: Path) -> None:
    stream = make_stream(tmp_path / "stream")
    out = tmp_path / "ck"
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
        "vlacl",
    ]
    args = stream.args("--device", "cpu", "--steps", "4", "--batch-size", "4", "--out", str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=240)
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
