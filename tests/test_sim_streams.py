"""Task streams (presets and task lists) and the simulator registry; no simulator needs to be installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from vlacl.errors import ConfigError
from vlacl.sim import get_simulator, preset_names, registry, resolve_stream, simulator_names, streams
from vlacl.sim.instructions import METAWORLD_INSTRUCTIONS, metaworld_instruction
from vlacl.sim.registry import SimulatorUnavailableError

CW10_PAPER = (  # Wolczyk et al. 2021, section 3, in the paper's order
    "hammer",
    "push-wall",
    "faucet-close",
    "push-back",
    "stick-pull",
    "handle-press-side",
    "push",
    "shelf-place",
    "window-close",
    "peg-unplug-side",
)
FAKE_LIBERO = (
    "libero_goal/open_the_middle_drawer_of_the_cabinet",
    "libero_goal/put_the_bowl_on_the_plate",
    "libero_spatial/pick_up_the_black_bowl_on_the_plate",
    "libero_10/put_both_the_alphabet_soup_and_the_cream_cheese_box_in_the_basket",
)
HAS_METAWORLD = importlib.util.find_spec("metaworld") is not None


@pytest.fixture
def fake_libero(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Serve LIBERO's task list from a fixed tuple; returns a one-element call counter."""
    calls = [0]

    def tasks() -> Sequence[str]:
        calls[0] += 1
        return FAKE_LIBERO

    monkeypatch.setattr(streams, "_libero_tasks", tasks)
    return calls


def test_continual_world_presets_follow_the_paper(fake_libero: list[int]) -> None:
    cw10 = resolve_stream("cw10")
    assert cw10.tasks == tuple(f"{name}-v3" for name in CW10_PAPER)
    assert (cw10.name, cw10.simulator) == ("cw10", "metaworld")
    assert "Wolczyk" in cw10.source
    cw20 = resolve_stream(" CW20 ")
    assert cw20.tasks == cw10.tasks + cw10.tasks
    assert all(task in METAWORLD_INSTRUCTIONS for task in cw20.tasks)
    assert resolve_stream("mt10").tasks[:3] == ("reach-v3", "push-v3", "pick-place-v3")
    assert fake_libero == [0], "Meta-World presets must not ask LIBERO for its tasks"


@pytest.mark.skipif(not HAS_METAWORLD, reason="Meta-World is an optional extra: pip install 'vlacl[sim]'")
def test_metaworld_presets_exist_in_the_installed_metaworld() -> None:
    code = textwrap.dedent(
        """
        import vlacl.sim
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
        from vlacl.sim import resolve_stream
        from vlacl.sim.instructions import METAWORLD_INSTRUCTIONS
        assert set(METAWORLD_INSTRUCTIONS) == set(ALL_V3_ENVIRONMENTS)
        assert set(resolve_stream("cw10").tasks) <= set(ALL_V3_ENVIRONMENTS)
        assert resolve_stream("mt10").tasks == tuple(MT10_V3), (resolve_stream("mt10").tasks, tuple(MT10_V3))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_a_task_list_resolves_in_order_with_repeats() -> None:
    stream = resolve_stream("reach-v3, push-v3,reach-v3")
    assert stream.tasks == ("reach-v3", "push-v3", "reach-v3")
    assert (stream.name, stream.simulator) == ("reach-v3,push-v3,reach-v3", "metaworld")
    assert resolve_stream("door-open-v3").tasks == ("door-open-v3",)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("reach-v3,psuh-v3", "unknown metaworld task 'psuh-v3'.*did you mean 'push-v3'"),
        ("hammer-v2", "did you mean 'hammer-v3'"),
        ("cw11", "unknown metaworld preset or task 'cw11'.*did you mean 'cw10'"),
        ("nothing-like-this-at-all", r"presets: cw10, cw20, mt10, libero_goal"),
        ("", "empty"),
        ("reach-v3,,push-v3", "empty task name"),
    ],
)
def test_bad_specs_fail_with_the_closest_name(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_stream(spec)


def test_libero_suites_come_from_the_adapter_lazily(fake_libero: list[int]) -> None:
    assert "libero_goal" in preset_names()
    goal = resolve_stream("libero_goal")
    assert goal.tasks == FAKE_LIBERO[:2]
    assert (goal.simulator, goal.name) == ("libero", "libero_goal")
    assert resolve_stream("libero_10").tasks == FAKE_LIBERO[3:]
    listed = resolve_stream(f"{FAKE_LIBERO[2]},{FAKE_LIBERO[0]}")
    assert listed.tasks == (FAKE_LIBERO[2], FAKE_LIBERO[0])
    assert listed.simulator == "libero"
    with pytest.raises(ConfigError, match="did you mean 'libero_goal/put_the_bowl_on_the_plate'"):
        resolve_stream("libero_goal/put_the_bowl_on_a_plate")
    with pytest.raises(ConfigError, match="mixes"):
        resolve_stream(f"reach-v3,{FAKE_LIBERO[0]}")
    with pytest.raises(ConfigError, match="no task of suite 'libero_object'"):
        resolve_stream("libero_object")


def test_instruction_lookup_names_the_closest_task() -> None:
    assert metaworld_instruction("reach-v3") == "reach the goal position"
    assert all(text == text.strip() and text[0].islower() for text in METAWORLD_INSTRUCTIONS.values())
    with pytest.raises(ConfigError, match="did you mean 'drawer-open-v3'"):
        metaworld_instruction("drawer-opn-v3")


def test_importing_vlacl_sim_imports_no_simulator() -> None:
    code = "import sys, vlacl.sim; print(sorted(m for m in ('metaworld', 'mujoco', 'libero') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_registry_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert simulator_names() == ("metaworld", "libero")
    with pytest.raises(ConfigError, match="unknown simulator 'gazebo'"):
        get_simulator("gazebo")
    (tmp_path / "vlacl_fake_adapter.py").write_text("import vlacl_missing_simulator_package\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = {
        "fake": registry._Entry("vlacl_fake_adapter", "FakeSimulator", "fake", ("vlacl_missing_simulator_package",)),
        "gone": registry._Entry("vlacl_adapter_that_does_not_exist", "GoneSimulator", "gone", ("x",)),
    }
    monkeypatch.setattr(registry, "SIMULATORS", entries)
    with pytest.raises(SimulatorUnavailableError, match=r"pip install 'vlacl\[fake\]'"):
        get_simulator("fake")
    with pytest.raises(SimulatorUnavailableError, match="has no gone adapter"):
        get_simulator("gone")
