"""The README's first command: `make quickstart` runs examples/quickstart.sh, here on a shortened stream."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vlacl.artifacts.reader import lineage, open_artifact

pytest.importorskip("metaworld")

ROOT = Path(__file__).resolve().parents[1]


def test_make_quickstart_runs_the_example_script() -> None:
    makefile = (ROOT / "Makefile").read_text().splitlines()
    recipe = makefile[makefile.index("quickstart: install") + 1].strip()
    assert shlex.split(recipe)[-2:] == ["examples/quickstart.sh", "runs/quickstart"]


def test_the_quickstart_chain_runs_and_continues(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TASKS": "reach-v3,button-press-topdown-v3",
        "EPISODES": "2",
        "STEPS": "3",
        "TRIALS": "1",
    }
    run = tmp_path / "qs"
    script = ROOT / "examples" / "quickstart.sh"
    first = subprocess.run(["bash", str(script), str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "seq: task 1 trained" in first.stdout
    assert "er: evaluated" in first.stdout
    metrics = open_artifact(run / "metrics", "cl_metrics", verify=True)
    kinds = {node.kind for node in lineage(metrics)}
    assert kinds >= {"eval_results", "task_checkpoint", "ds_stats", "dataset"}
    runs = {r["name"]: r for r in json.loads((run / "metrics" / "metrics.json").read_text())["runs"]}
    assert set(runs) == {"seq", "er"}
    assert all(runs[name]["num_episodes"] == 4 for name in runs)  # 2 stages x 2 tasks x 1 trial
    for cl in ("seq", "er"):
        ckpt = open_artifact(run / cl / "task1", "task_checkpoint").manifest.details
        assert ckpt["cl_algorithm"] == cl
    second = subprocess.run(["bash", str(script), str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already holds this evaluation" in (run / "seq-eval.txt").read_text()  # nothing retrained or rerun
