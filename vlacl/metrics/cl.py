r"""Continual-learning metrics from a result matrix.

Notation: tasks are numbered in training order :math:`1..T`; :math:`R_{i,j}` is the success rate on
task :math:`j` after training stage :math:`i`; :math:`b_j` is the success on task :math:`j` before
any training (the ``init`` row). Tasks that were evaluated but never trained are left out.

=========== ============================================================== =========================
metric      formula                                                        source
=========== ============================================================== =========================
asr         :math:`\frac1T \sum_j R_{T,j}`                                 average success rate
bwt         :math:`\frac1{T-1} \sum_{j<T} (R_{T,j} - R_{j,j})`            Lopez-Paz & Ranzato 2017
forgetting  :math:`\frac1{T-1} \sum_{j<T} (\max_{l < T} R_{l,j}             Chaudhry et al. 2018
            - R_{T,j})`
plasticity  :math:`\frac1T \sum_j R_{j,j}`                                 diagonal mean
fwt         :math:`\frac1{T-1} \sum_{j>1} (R_{j-1,j} - b_j)`              Lopez-Paz & Ranzato 2017
nbt         :math:`\frac1{T} \sum_{k<T} \frac1{T-k} \sum_{\tau>k}            Liu et al. 2023 (LIBERO)
            (R_{k,k} - R_{\tau,k})`
auc         :math:`\frac1T \sum_k \frac1{T-k+1} (R_{k,k} +                   Liu et al. 2023 (LIBERO)
            \sum_{\tau>k} R_{\tau,k})`
=========== ============================================================== =========================

In forgetting, the maximum runs over the earlier stages that were evaluated: always those from
task :math:`j`'s own stage on (required), and the stages before it when those cells exist.
LIBERO defines :math:`R_{k,k}` in NBT and AUC as the best success seen while training task
:math:`k`; from a matrix, the success after stage :math:`k` stands in for it. NBT keeps the
paper's normalization by :math:`T`; its :math:`k = T` term, which has no later stage, adds 0.

Every function here takes arrays with any leading batch dimensions, ``R`` of shape
``(..., T, T)`` and ``b`` of shape ``(..., T)``, so the same code computes point estimates and
bootstrap replicates.

A metric the data cannot support is *unavailable*, with the reason, never 0: too few stages, no
``init`` row, or a needed cell that was not evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Cell = tuple[int, int]


def asr(r: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Average success rate after the last stage over all trained tasks."""
    return np.asarray(r[..., -1, :].mean(axis=-1))


def bwt(r: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Backward transfer (Lopez-Paz & Ranzato, 2017, GEM): final minus just-trained success, averaged."""
    t = r.shape[-1]
    diag = np.diagonal(r, axis1=-2, axis2=-1)[..., : t - 1]  # (..., T-1)
    return np.asarray((r[..., -1, : t - 1] - diag).mean(axis=-1))


def forgetting(r: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Average forgetting (Chaudhry et al., 2018, RWalk): best earlier success minus final, averaged.

    The maximum runs over every earlier stage that was evaluated, including stages before the
    task was trained when those cells exist (cells not evaluated are ``NaN`` and skipped).
    """
    t = r.shape[-1]
    terms = [np.nanmax(r[..., : t - 1, j], axis=-1) - r[..., -1, j] for j in range(t - 1)]
    return np.asarray(np.stack(terms, axis=-1).mean(axis=-1))


def plasticity(r: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Mean success on each task right after training it (the diagonal)."""
    return np.asarray(np.diagonal(r, axis1=-2, axis2=-1).mean(axis=-1))


def fwt(r: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Forward transfer (Lopez-Paz & Ranzato, 2017): success on a task before training it, against ``init``."""
    if b is None:
        raise ValueError("fwt needs the init row b")
    t = r.shape[-1]
    before = np.stack([r[..., j - 1, j] for j in range(1, t)], axis=-1)  # (..., T-1)
    return np.asarray((before - b[..., 1:]).mean(axis=-1))


def nbt(r: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Negative backward transfer (Liu et al., 2023, LIBERO); positive means forgetting.

    Normalized by T as in the paper; the last task has no later stage and adds nothing.
    """
    t = r.shape[-1]
    terms = [r[..., k, k] - r[..., k + 1 :, k].mean(axis=-1) for k in range(t - 1)]
    return np.asarray(np.stack(terms, axis=-1).sum(axis=-1) / t)


def auc(r: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Area under the success curve (Liu et al., 2023, LIBERO): each task's mean success from its stage on."""
    t = r.shape[-1]
    terms = [r[..., k:, k].mean(axis=-1) for k in range(t)]
    return np.asarray(np.stack(terms, axis=-1).mean(axis=-1))


@dataclass(frozen=True)
class MetricSpec:
    """A metric, the least number of stages it needs, whether it needs ``init`` and the cells it reads."""

    fn: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    min_stages: int
    needs_init: bool
    cells: Callable[[int], list[Cell]]


def _final_row(t: int) -> list[Cell]:
    return [(t - 1, j) for j in range(t)]


def _diagonal(t: int) -> list[Cell]:
    return [(j, j) for j in range(t)]


def _lower_triangle(t: int, last_column: int) -> list[Cell]:
    return [(i, j) for j in range(last_column) for i in range(j, t)]


METRICS: dict[str, MetricSpec] = {
    "asr": MetricSpec(asr, min_stages=1, needs_init=False, cells=_final_row),
    "bwt": MetricSpec(bwt, min_stages=2, needs_init=False, cells=lambda t: _final_row(t)[:-1] + _diagonal(t)[:-1]),
    "forgetting": MetricSpec(forgetting, min_stages=2, needs_init=False, cells=lambda t: _lower_triangle(t, t - 1)),
    "plasticity": MetricSpec(plasticity, min_stages=1, needs_init=False, cells=_diagonal),
    "fwt": MetricSpec(fwt, min_stages=2, needs_init=True, cells=lambda t: [(j - 1, j) for j in range(1, t)]),
    "nbt": MetricSpec(nbt, min_stages=2, needs_init=False, cells=lambda t: _lower_triangle(t, t - 1)),
    "auc": MetricSpec(auc, min_stages=1, needs_init=False, cells=lambda t: _lower_triangle(t, t)),
}
"""Every metric by name, in the order reports list them."""

METRIC_NAMES: tuple[str, ...] = tuple(METRICS)


def unavailable_reason(
    spec: MetricSpec, r: np.ndarray, b: np.ndarray | None, stage_names: tuple[str, ...]
) -> str | None:
    """Why ``spec`` cannot be computed from the aligned matrix ``r`` (T, T) and ``b`` (T,), or ``None``."""
    t = r.shape[-1]
    if t < spec.min_stages:
        return f"needs at least {spec.min_stages} training stages, the matrix has {t}"
    if spec.needs_init and b is None:
        return "needs an `init` row (success before any training)"
    missing = [(i, j) for i, j in spec.cells(t) if np.isnan(r[i, j])]
    if missing:
        shown = ", ".join(f"(stage {stage_names[i]}, task {stage_names[j]})" for i, j in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"needs cells that were not evaluated: {shown}{more}"
    if spec.needs_init and b is not None:
        missing_b = [stage_names[j] for j in range(1, t) if np.isnan(b[j])]
        if missing_b:
            return "needs the `init` row on tasks that were not evaluated there: " + ", ".join(missing_b[:3])
    return None
