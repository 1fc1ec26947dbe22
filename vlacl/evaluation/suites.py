"""What ``eval-suite`` evaluates on: a simulator's task stream, or held-out episodes (``offline``).

``metaworld:<stream>`` and ``libero:<suite>`` name a simulator and a stream of its tasks (the
stream specs of :func:`vlacl.sim.streams.resolve_stream`); ``auto`` reads them from the dataset the
first checkpoint was trained on, when ``vlacl collect-demos`` wrote it. Each checkpoint's trained
task is found among the suite's tasks by its instruction (or its key), which names its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlacl.artifacts.names import MANIFEST_NAME
from vlacl.errors import ConfigError
from vlacl.evaluation.policies import CheckpointRef

OFFLINE = "offline"
AUTO = "auto"
SIMULATORS = ("metaworld", "libero")


@dataclass(frozen=True)
class Suite:
    """A resolved suite.

    Attributes:
        spec: The suite as written in results (``metaworld:cw10``, ``offline``).
        simulator: ``metaworld``, ``libero``, or ``None`` for ``offline``.
        tasks: The columns: the simulator's task names (a rollout suite).
        instructions: Each task's language instruction.
    """

    spec: str
    simulator: str | None
    tasks: tuple[str, ...] = ()
    instructions: tuple[str, ...] = ()

    @property
    def offline(self) -> bool:
        """Whether the suite scores action errors on recorded episodes."""
        return self.simulator is None


def training_datasets(ref: CheckpointRef) -> list[Path]:
    """The dataset directories (or files) a checkpoint (or the checkpoint a merged model came from) was trained on."""
    return _datasets_of(ref.path, depth=2)


def _datasets_of(directory: Path, depth: int) -> list[Path]:
    from vlacl.artifacts.reader import open_artifact

    found: list[Path] = []
    for item in open_artifact(directory).manifest.inputs:
        path = Path(item.path) if Path(item.path).is_absolute() else directory / item.path
        if item.kind == "task_checkpoint" and item.role.startswith("adapter:") and depth > 1:
            if (path / MANIFEST_NAME).is_file():
                found.extend(_datasets_of(path, depth - 1))  # a merged model: its checkpoint's datasets
            continue
        if item.role != "dataset" and not item.role.startswith("dataset:"):
            continue
        if item.kind == "file" and path.name == "info.json":
            path = path.parent.parent  # <dataset>/meta/info.json
        found.append(path)
    return found


def _auto_spec(refs: Sequence[CheckpointRef]) -> str:
    from vlacl.artifacts.reader import open_artifact

    for path in training_datasets(refs[0]):
        if (path / MANIFEST_NAME).is_file():
            details = open_artifact(path, "dataset").manifest.details
            simulator, stream = details.get("simulator"), details.get("stream")
            if isinstance(simulator, str) and isinstance(stream, str):
                return f"{simulator}:{stream}"
    raise ConfigError(
        f"--suite auto cannot tell the simulator: {refs[0].path} was not trained on a dataset of "
        "`vlacl collect-demos`; pass --suite metaworld:<stream>, --suite libero:<suite> or --suite offline"
    )


def _instructions(simulator: str, tasks: Sequence[str]) -> tuple[str, ...]:
    if simulator == "metaworld":
        from vlacl.sim.instructions import metaworld_instruction

        return tuple(metaworld_instruction(t) for t in tasks)
    from vlacl.sim.libero import LiberoSimulator
    from vlacl.sim.registry import get_simulator

    sim = get_simulator(simulator)
    assert isinstance(sim, LiberoSimulator)
    return tuple(sim.task_info(t).instruction for t in tasks)


def resolve_suite(spec: str, refs: Sequence[CheckpointRef]) -> Suite:
    """Resolve ``--suite`` against the checkpoints.

    Raises:
        ConfigError: An unknown form or simulator, a stream that does not resolve, or ``auto``
            without a collect-demos dataset behind the first checkpoint.
    """
    text = spec.strip()
    if text == OFFLINE:
        return Suite(spec=OFFLINE, simulator=None)
    if text == AUTO:
        text = _auto_spec(refs)
    simulator, sep, stream = text.partition(":")
    if not sep or simulator not in SIMULATORS or not stream.strip():
        raise ConfigError(
            f"--suite {spec!r} is not metaworld:<stream>, libero:<suite>, offline or auto (e.g. metaworld:cw10, "
            "libero:libero_goal, metaworld:reach-v3,push-v3)"
        )
    from vlacl.sim.streams import resolve_stream

    resolved = resolve_stream(stream)
    if resolved.simulator != simulator:
        raise ConfigError(f"--suite {spec!r}: stream {stream!r} is a {resolved.simulator} stream, not {simulator}")
    tasks = tuple(resolved.tasks)
    if len(set(tasks)) != len(tasks):
        raise ConfigError(
            f"--suite {spec!r} repeats tasks; a result matrix has one column per task: evaluate a stream without "
            "repeats (e.g. cw10 for cw20)"
        )
    instructions = _instructions(simulator, tasks)
    return Suite(spec=f"{simulator}:{resolved.name}", simulator=simulator, tasks=tasks, instructions=instructions)


def stage_of(ref: CheckpointRef, suite: Suite) -> str:
    """The suite task a checkpoint trained (its row's name): matched by instruction, then by key.

    Raises:
        ConfigError: The checkpoint's task is not a task of the suite.
    """
    for task, instruction in zip(suite.tasks, suite.instructions, strict=True):
        if ref.task_name and ref.task_name == instruction:
            return task
    for task in suite.tasks:
        if ref.task_key in (task, task.rsplit("/", 1)[-1]):
            return task
    raise ConfigError(
        f"{ref.path} trained task {ref.task_name or ref.task_key!r}, which is not a task of --suite {suite.spec} "
        f"({', '.join(suite.tasks)}): evaluate it on the stream it was trained on"
    )
