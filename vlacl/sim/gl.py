"""Off-screen OpenGL for MuJoCo-based simulators: the platform settings and the one rendering error.

MuJoCo picks its OpenGL platform from ``MUJOCO_GL`` when ``mujoco`` is first imported, so
:func:`configure_offscreen_gl` must run before that import; every adapter calls it at the top of its
module. It only sets defaults: a user's own ``MUJOCO_GL`` (``osmesa``, ``glfw``) wins.
"""

from __future__ import annotations

import os
import sys

from vlacl.errors import VlaclError

GL_DEFAULTS: dict[str, str] = {
    "MUJOCO_GL": "egl",  # headless, no display server; GPU drivers or Mesa
    "EGL_PLATFORM": "surfaceless",  # Mesa's EGL without a window system (e.g. Debian's libegl-mesa0)
}


class RenderingUnavailableError(VlaclError):
    """Camera frames were asked for but no off-screen OpenGL context could be created."""


def configure_offscreen_gl() -> None:
    """Default MuJoCo to headless EGL rendering unless the environment already chose a platform."""
    for name, value in GL_DEFAULTS.items():
        os.environ.setdefault(name, value)


def rendering_help(cause: BaseException) -> str:
    """The message of a :class:`RenderingUnavailableError` raised because of ``cause``."""
    platform = os.environ.get("MUJOCO_GL", "")
    late = "mujoco" in sys.modules and platform != GL_DEFAULTS["MUJOCO_GL"]
    hint = " (mujoco was imported before vlacl could set MUJOCO_GL=egl: set it in the environment)" if late else ""
    return (
        f"cannot render camera frames off-screen with MUJOCO_GL={platform!r}{hint}: {type(cause).__name__}: {cause}. "
        "Install an EGL driver (Debian/Ubuntu: apt-get install libegl1 libegl-mesa0; NVIDIA drivers ship "
        "their own) and run with MUJOCO_GL=egl EGL_PLATFORM=surfaceless, or use software rendering with "
        "MUJOCO_GL=osmesa (apt-get install libosmesa6); or collect state only (no cameras)"
    )
