"""``collect-demos`` at the edges: the results table at 80 columns, and SIGTERM / Ctrl-C mid-collection."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from vlacl.cli.collect_demos import print_report
from vlacl.sim.base import Observation, RenderSettings, StepResult
from vlacl.sim.collect import CollectReport, SimSource, TaskReport

LONG = "pick up the puck and place it at the goal behind the wall on the far side of the table"


def report(tasks: Sequence[str]) -> CollectReport:
    rows = tuple(TaskReport(t, f"{LONG} ({t})", 12, 10, 10, 1234) for t in tasks)
    return CollectReport(Path("/tmp/demos"), "cw10", "metaworld", "3.1.1", 80, rows, 40, 4936, ("data/x.parquet",))


def printed(rep: CollectReport, width: int) -> list[str]:
    buf = io.StringIO()
    print_report(rep, Console(file=buf, width=width, soft_wrap=True, color_system=None))
    return buf.getvalue().splitlines()


def test_table_keeps_one_line_per_task_at_80_columns() -> None:
    tasks = ["button-press-topdown-wall-v3", "reach-v3", "pick-place-wall-v3"]
    lines = printed(report(tasks), 80)
    assert all(len(line) <= 80 for line in lines), lines
    for task in tasks:
        (row,) = [line for line in lines if task in line]
        assert [c.strip() for c in row.split("│")[2:-1]] == ["12", "10", "83%", "10", "1234"]
    assert not any(LONG[:20] in line for line in lines)
    assert any("instructions: meta/tasks.parquet" in line for line in lines)


def test_table_shows_full_instructions_when_wide() -> None:
    lines = printed(report(["reach-v3"]), 200)
    (row,) = [line for line in lines if "reach-v3" in line and "83%" in line]
    assert f"{LONG} (reach-v3)" in row
    assert not any("instructions:" in line for line in lines)


class SlowEnv:
    """Never succeeds and sleeps each step, so a collection is still running when the test signals it."""

    def __init__(self, task: str) -> None:
        self._task = task
        Path(os.environ["VLACL_TEST_PIDS"], f"{os.getpid()}").write_text(task)

    task = property(lambda self: self._task)
    instruction = property(lambda self: f"wait ({self._task})")
    max_steps = property(lambda self: 20)
    action_dim = property(lambda self: 1)

    def reset(self, seed: int) -> Observation:
        return {"observation.state": np.zeros(1, np.float32)}

    def step(self, action: np.ndarray) -> StepResult:
        time.sleep(0.05)
        return StepResult({"observation.state": np.zeros(1, np.float32)}, 0.0, False, False)

    def close(self) -> None:
        pass


class SlowExpert:
    def act(self, observation: Observation) -> np.ndarray:
        return np.zeros(1, np.float32)


class SlowSimulator:
    name = "slow"

    def tasks(self) -> Sequence[str]:
        return ("slow-a", "slow-b", "slow-c")

    def make_env(self, task: str, render: RenderSettings) -> SlowEnv:
        return SlowEnv(task)

    def make_envs(self, tasks: Sequence[str], render: RenderSettings) -> Any:
        raise NotImplementedError

    def expert(self, task: str) -> SlowExpert:
        return SlowExpert()


def slow_source(stream: str) -> SimSource:
    return SimSource(stream="slow", simulator="slow", tasks=("slow-a", "slow-b", "slow-c"), factory=SlowSimulator)


SCRIPT = """
import sys
from vlacl.sim import collect
from tests.test_collect_demos_cli import slow_source
collect.resolve_source = slow_source
from vlacl.cli import main
sys.argv = ["vlacl", "collect-demos", "--stream", "slow", "--fps", "10", "--keep-failures",
            "--episodes-per-task", "100", "--workers", "2", "--out", sys.argv[1]]
main()
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_signal_mid_collection_leaves_nothing_and_stops_workers(tmp_path: Path, how: str) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "area" / "demos"
    out.parent.mkdir()
    env = {**os.environ, "VLACL_TEST_PIDS": str(pids), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2:  # both workers are collecting
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        workers = [int(p.name) for p in pids.iterdir()]
        assert proc.pid not in workers
        temp = [p for p in out.parent.iterdir() if p.name.startswith(".demos.tmp-")]
        assert len(temp) == 1
        assert (temp[0] / ".collect-work").is_dir()
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    expected = 128 + signal.SIGTERM if how == "sigterm" else 130
    assert proc.returncode == expected, stderr.decode()
    assert list(out.parent.iterdir()) == []  # neither --out nor its temporary sibling
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
