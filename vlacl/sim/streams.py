"""Task streams for simulators: named presets from the literature and user-given task lists.

A stream is the ordered list of tasks a continual learner meets one after the other. Presets:

- ``cw10``: Continual World's CW10 (Wolczyk et al., "Continual World: A Robotic Benchmark For
  Continual Reinforcement Learning", NeurIPS 2021, section 3): hammer, push-wall, faucet-close,
  push-back, stick-pull, handle-press-side, push, shelf-place, window-close, peg-unplug-side; the
  paper used Meta-World v1/v2 names, mapped here to the same tasks' v3 names.
- ``cw20``: CW10 twice in a row (the same paper), for forgetting and forward transfer on a second pass.
- ``mt10``: Meta-World's MT10 (Yu et al., CoRL 2019), in the order of Meta-World's own ``MT10_V3``.
- ``libero_goal``, ``libero_spatial``, ``libero_object``, ``libero_10``: the LIBERO suites (Liu et al.,
  "LIBERO: Benchmarking Knowledge Transfer for Lifelong Robot Learning", NeurIPS 2023 Datasets and
  Benchmarks); their tasks come from the LIBERO adapter when the stream is resolved, so resolving
  them needs LIBERO installed and nothing else does.

Any other spec is a comma-separated list of task names (``reach-v3,push-v3``, or LIBERO's
``libero_goal/<task>``), checked against the simulator's tasks; an unknown name fails with the
closest known one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from vlacl.errors import ConfigError
from vlacl.sim.instructions import METAWORLD_INSTRUCTIONS

METAWORLD = "metaworld"
LIBERO = "libero"

CW10_TASKS: tuple[str, ...] = (
    "hammer-v3",
    "push-wall-v3",
    "faucet-close-v3",
    "push-back-v3",
    "stick-pull-v3",
    "handle-press-side-v3",
    "push-v3",
    "shelf-place-v3",
    "window-close-v3",
    "peg-unplug-side-v3",
)
MT10_TASKS: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
LIBERO_SUITES: tuple[str, ...] = ("libero_goal", "libero_spatial", "libero_object", "libero_10")

_CW_SOURCE = "Continual World (Wolczyk et al., NeurIPS 2021)"


@dataclass(frozen=True)
class TaskStreamSpec:
    """A resolved task stream.

    Attributes:
        name: The preset's name, or the task list as given.
        simulator: The simulator whose tasks these are (``metaworld``, ``libero``).
        tasks: The task names, in stream order (a task may come back, as in ``cw20``).
        source: Where the list comes from (a paper, or "task list given by the user").
    """

    name: str
    simulator: str
    tasks: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class _Preset:
    simulator: str
    source: str
    tasks: Callable[[], tuple[str, ...]]


def _libero_suite(suite: str) -> Callable[[], tuple[str, ...]]:
    def tasks() -> tuple[str, ...]:
        found = tuple(task for task in _libero_tasks() if task.startswith(f"{suite}/"))
        if not found:
            raise ConfigError(f"the LIBERO adapter lists no task of suite {suite!r}: check the LIBERO installation")
        return found

    return tasks


PRESETS: dict[str, _Preset] = {
    "cw10": _Preset(METAWORLD, f"CW10, {_CW_SOURCE}", lambda: CW10_TASKS),
    "cw20": _Preset(METAWORLD, f"CW20 (CW10 twice), {_CW_SOURCE}", lambda: CW10_TASKS + CW10_TASKS),
    "mt10": _Preset(METAWORLD, "Meta-World MT10 (Yu et al., CoRL 2019)", lambda: MT10_TASKS),
    **{
        suite: _Preset(LIBERO, f"LIBERO {suite} (Liu et al., NeurIPS 2023)", _libero_suite(suite))
        for suite in LIBERO_SUITES
    },
}
"""Preset name -> its simulator, source and task list (LIBERO's resolved lazily)."""


def preset_names() -> tuple[str, ...]:
    """Every preset stream name."""
    return tuple(PRESETS)


def closest_hint(name: str, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the known name closest to ``name``, or ``""`` when none is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _libero_tasks() -> Sequence[str]:
    from vlacl.sim.registry import get_simulator

    return get_simulator(LIBERO).tasks()


def resolve_stream(spec: str) -> TaskStreamSpec:
    """Resolve a stream spec: a preset name or a comma-separated list of task names.

    Only LIBERO streams (a LIBERO preset or LIBERO task names) import LIBERO; Meta-World streams are
    checked against the instruction table, which covers exactly Meta-World's v3 tasks.

    Raises:
        ConfigError: The spec is empty, names an unknown task or preset (with the closest known
            name), or mixes simulators.
    """
    text = spec.strip()
    preset = PRESETS.get(text.lower())
    if preset is not None:
        return TaskStreamSpec(name=text.lower(), simulator=preset.simulator, tasks=preset.tasks(), source=preset.source)
    names = tuple(part.strip() for part in text.split(","))
    if not text or not all(names):
        raise ConfigError(
            f"stream {spec!r} is empty or has an empty task name: give a preset ({', '.join(PRESETS)}) or "
            "comma-separated task names, e.g. reach-v3,push-v3"
        )
    simulators = {LIBERO if _looks_libero(name) else METAWORLD for name in names}
    if len(simulators) > 1:
        raise ConfigError(f"stream {spec!r} mixes Meta-World and LIBERO tasks: one stream runs on one simulator")
    simulator = simulators.pop()
    known: Sequence[str] = _libero_tasks() if simulator == LIBERO else tuple(METAWORLD_INSTRUCTIONS)
    known_set = set(known)
    for name in names:
        if name not in known_set:
            what = "preset or task" if len(names) == 1 else "task"
            raise ConfigError(
                f"unknown {simulator} {what} {name!r} in stream {spec!r}{closest_hint(name, [*known, *PRESETS])}; "
                f"presets: {', '.join(PRESETS)}"
            )
    return TaskStreamSpec(name=",".join(names), simulator=simulator, tasks=names, source="task list given by the user")


def _looks_libero(name: str) -> bool:
    return "/" in name and name.split("/", 1)[0].lower().startswith("libero")
