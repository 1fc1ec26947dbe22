"""Annotated heatmaps of result matrices.

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot, so that
calling this from a library leaves the caller's backend and open figures alone.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vlacl.metrics.matrix import INIT_STAGE, ResultMatrix

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

CELL_INCHES = 0.62
"""Side of one cell for small matrices: room for "0.00" at 8 pt."""
MAX_PANEL_INCHES = 16.0
"""Largest side of one panel; bigger matrices get smaller cells, so the PNG stays a few MB at most."""
MAX_ANNOTATED = 30
"""Matrices with more rows or columns than this get no numbers in the cells (they would not fit)."""


def plot_matrices(panels: Sequence[tuple[str, ResultMatrix, str]], path: Path) -> None:
    """Write one PNG with an annotated heatmap per run, side by side (see :func:`heatmap_figure`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = heatmap_figure(panels)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    glyphs = [w for w in caught if "missing from font" in str(w.message)]
    if glyphs:
        log.warning("%s: the plotting font lacks %d glyph(s) of the task names; they show as boxes", path, len(glyphs))


def heatmap_figure(panels: Sequence[tuple[str, ResultMatrix, str]]) -> Figure:
    """Build one figure with a heatmap per run, side by side, on one colour scale.

    Args:
        panels: ``(run name, matrix, subtitle)`` per run; the subtitle carries headline metrics.

    Rows are ``init`` (when present) then the stages in training order; columns are the trained
    tasks in training order, then tasks only evaluated; so the diagonal is "just trained". Each
    cell shows its value (up to :data:`MAX_ANNOTATED` rows and columns); cells not evaluated are
    grey and marked ``-``.
    """
    import matplotlib
    from matplotlib.figure import Figure

    sizes = [(len(m.stages) + (m.init is not None), len(m.tasks)) for _, m, _ in panels]
    largest = max(max(rows, cols) for rows, cols in sizes)
    cell = min(CELL_INCHES, MAX_PANEL_INCHES / largest)
    width = sum(max(3.5, cols * cell + 2.6) for _, cols in sizes) + 0.8  # + tick labels and colorbar
    height = max(3.0, max(rows for rows, _ in sizes) * cell + 1.9)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = None
    for ax, (name, matrix, subtitle) in zip(axes[0], panels, strict=True):
        order = matrix.trained_columns + [matrix.tasks.index(t) for t in matrix.untrained_tasks]
        rows = ([matrix.init] if matrix.init is not None else []) + list(matrix.values)
        grid = np.asarray(rows, dtype=np.float64)[:, order]  # (rows, T) in training order
        labels_y = ([INIT_STAGE] if matrix.init is not None else []) + list(matrix.stages)
        labels_x = [matrix.tasks[j] for j in order]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        if max(grid.shape) <= MAX_ANNOTATED:
            for (i, j), value in np.ndenumerate(grid):
                if math.isnan(value):
                    ax.text(j, i, "-", ha="center", va="center", fontsize=8, color="#555555")
                else:
                    r, g, b, _ = cmap(value)
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=ink)
        tick_size = 8 if max(grid.shape) <= MAX_ANNOTATED else 5
        # parse_math=False: task names are plain text, a `$` in one must not start math mode
        ax.set_xticks(range(len(labels_x)), labels_x, rotation=45, ha="right", fontsize=tick_size, parse_math=False)
        ax.set_yticks(range(len(labels_y)), labels_y, fontsize=tick_size, parse_math=False)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after training")
        ax.set_title(f"{name}\n{subtitle}", fontsize=9, parse_math=False)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="success rate")
    return fig
