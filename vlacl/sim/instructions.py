"""The language instruction of every Meta-World v3 task.

Meta-World's tasks have names, not instructions. These were written for vlacl from the task
descriptions of the Meta-World paper (Yu et al., "Meta-World: A Benchmark and Evaluation for
Multi-Task and Meta Reinforcement Learning", CoRL 2019, appendix table of the 50 tasks; the same
text is on the project's documentation page "Task Descriptions") and checked against the v3
environments' code where the paper is vague (the lever of ``lever-pull`` ends up, the puck of
``push-back`` goes back towards the robot, ``peg-unplug-side`` pulls the peg out sideways).

They are imperative, lower case, without a final period, the style of LIBERO's instructions, so a
policy trained on both sees one style. The table is keyed by the v3 task name; a test checks that it
covers exactly the tasks the installed Meta-World knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from vlacl.errors import ConfigError

METAWORLD_INSTRUCTIONS: Mapping[str, str] = MappingProxyType(
    {
        "assembly-v3": "pick up the nut and place it onto the peg",
        "basketball-v3": "pick up the basketball and dunk it into the basket",
        "bin-picking-v3": "pick up the puck from one bin and place it into the other bin",
        "box-close-v3": "pick up the lid and close the box with it",
        "button-press-topdown-v3": "press the button from the top",
        "button-press-topdown-wall-v3": "reach over the wall and press the button from the top",
        "button-press-v3": "press the button from the front",
        "button-press-wall-v3": "reach around the wall and press the button",
        "coffee-button-v3": "press the button on the coffee machine",
        "coffee-pull-v3": "pull the mug out from under the coffee machine",
        "coffee-push-v3": "push the mug under the coffee machine",
        "dial-turn-v3": "turn the dial half a turn",
        "disassemble-v3": "pick the nut up off the peg",
        "door-close-v3": "close the door",
        "door-lock-v3": "lock the door by turning the lock",
        "door-open-v3": "open the door",
        "door-unlock-v3": "unlock the door by turning the lock",
        "hand-insert-v3": "insert the gripper into the hole",
        "drawer-close-v3": "close the drawer",
        "drawer-open-v3": "open the drawer",
        "faucet-open-v3": "turn the faucet handle counter-clockwise to open the faucet",
        "faucet-close-v3": "turn the faucet handle clockwise to close the faucet",
        "hammer-v3": "pick up the hammer and hammer the nail into the wall",
        "handle-press-side-v3": "press the handle down from the side",
        "handle-press-v3": "press the handle down",
        "handle-pull-side-v3": "pull the handle up from the side",
        "handle-pull-v3": "pull the handle up",
        "lever-pull-v3": "pull the lever up",
        "peg-insert-side-v3": "pick up the peg and insert it sideways into the hole",
        "pick-place-wall-v3": "pick up the puck, move it over the wall and place it at the goal",
        "pick-out-of-hole-v3": "pick the puck up out of the hole",
        "reach-v3": "reach the goal position",
        "push-back-v3": "push the puck back towards the robot to the goal",
        "push-v3": "push the puck to the goal",
        "pick-place-v3": "pick up the puck and place it at the goal",
        "plate-slide-v3": "slide the plate into the goal",
        "plate-slide-side-v3": "slide the plate sideways into the goal",
        "plate-slide-back-v3": "slide the plate back out of the goal",
        "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
        "peg-unplug-side-v3": "pull the peg out of the hole sideways",
        "soccer-v3": "push the ball into the soccer goal",
        "stick-push-v3": "pick up the stick and push the thermos to the goal with it",
        "stick-pull-v3": "pick up the stick and pull the thermos to the goal with it",
        "push-wall-v3": "push the puck around the wall to the goal",
        "reach-wall-v3": "reach over the wall to the goal position",
        "shelf-place-v3": "pick up the puck and place it on the shelf",
        "sweep-into-v3": "sweep the puck into the hole",
        "sweep-v3": "sweep the puck off the table",
        "window-open-v3": "slide the window open",
        "window-close-v3": "slide the window closed",
    }
)
"""Meta-World v3 task name -> instruction (all 50 tasks)."""


def metaworld_instruction(task: str) -> str:
    """The instruction of a Meta-World v3 task.

    Raises:
        ConfigError: ``task`` is not a Meta-World v3 task name.
    """
    try:
        return METAWORLD_INSTRUCTIONS[task]
    except KeyError:
        from vlacl.sim.streams import closest_hint

        raise ConfigError(
            f"no Meta-World v3 task named {task!r}{closest_hint(task, METAWORLD_INSTRUCTIONS)}; "
            "task names end in -v3, e.g. reach-v3"
        ) from None
