"""CL metric values on hand-computed matrices, unavailable cases, and a brute-force cross-check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlacl.config import ClMetricsConfig
from vlacl.metrics.cl import METRIC_NAMES, METRICS
from vlacl.metrics.matrix import parse_matrix_csv
from vlacl.metrics.report import RunInput, RunMetrics, compute_run_metrics

# Tasks a, b, c trained in that order, with an init row. Expected values worked out by hand:
#   asr        (0.5 + 0.7 + 1.0) / 3                                   = 0.733333
#   bwt        ((0.5 - 0.8) + (0.7 - 0.9)) / 2                         = -0.25
#   forgetting (max(0.8, 0.6) - 0.5 + max(0.3, 0.9) - 0.7) / 2         = 0.25
#   plasticity (0.8 + 0.9 + 1.0) / 3                                   = 0.9
#   fwt        ((0.3 - 0.2) + (0.4 - 0.0)) / 2                         = 0.25
#   nbt        ((0.8 - (0.6 + 0.5) / 2) + (0.9 - 0.7)) / 3             = 0.15
#   auc        ((0.8 + 0.6 + 0.5) / 3 + (0.9 + 0.7) / 2 + 1.0) / 3     = 0.811111
FULL = """stage,a,b,c
init,0.1,0.2,0.0
a,0.8,0.3,0.1
b,0.6,0.9,0.4
c,0.5,0.7,1.0
"""
FULL_EXPECTED = {
    "asr": 2.2 / 3,
    "bwt": -0.25,
    "forgetting": 0.25,
    "plasticity": 0.9,
    "fwt": 0.25,
    "nbt": 0.15,
    "auc": (1.9 / 3 + 0.8 + 1.0) / 3,
}

# Only the lower triangle evaluated, no init row; task x peaks after stage y (0.9 > 0.5), so
# forgetting (max over earlier stages) differs from -BWT (diagonal only):
#   asr (0.7 + 0.2 + 0.8) / 3 = 0.566667    bwt ((0.7 - 0.5) + (0.2 - 0.6)) / 2 = -0.1
#   forgetting ((0.9 - 0.7) + (0.6 - 0.2)) / 2 = 0.3    plasticity (0.5 + 0.6 + 0.8) / 3
#   nbt ((0.5 - (0.9 + 0.7) / 2) + (0.6 - 0.2)) / 3 = 0.033333
#   auc ((0.5 + 0.9 + 0.7) / 3 + (0.6 + 0.2) / 2 + 0.8) / 3 = 0.633333
LOWER = """stage,x,y,z
x,0.5,,
y,0.9,0.6,
z,0.7,0.2,0.8
"""
LOWER_EXPECTED = {
    "asr": 1.7 / 3,
    "bwt": -0.1,
    "forgetting": 0.3,
    "plasticity": 1.9 / 3,
    "nbt": 0.1 / 3,
    "auc": 1.9 / 3,
}


def metrics_of(text: str, **cfg: object) -> RunMetrics:
    matrix = parse_matrix_csv(text)
    run = RunInput(name="run", path=Path("run.csv"), matrix=matrix, artifact=None)
    return compute_run_metrics(run, ClMetricsConfig(**cfg))  # type: ignore[arg-type]


def test_full_matrix_gives_hand_computed_values() -> None:
    result = metrics_of(FULL)
    for key, expected in FULL_EXPECTED.items():
        assert result.metrics[key].value == pytest.approx(expected, abs=1e-12), key
        assert result.metrics[key].reason is None


def test_lower_triangle_without_init_leaves_only_fwt_unavailable() -> None:
    result = metrics_of(LOWER)
    for key, expected in LOWER_EXPECTED.items():
        assert result.metrics[key].value == pytest.approx(expected, abs=1e-12), key
    fwt = result.metrics["fwt"]
    assert fwt.value is None
    assert fwt.reason is not None
    assert "init" in fwt.reason
    assert any(note.startswith("fwt unavailable") for note in result.notes)


def test_forgetting_counts_success_before_training() -> None:
    # Task b succeeds 0.9 zero-shot after stage a, 0.6 after its own stage, 0.5 at the end.
    # forgetting = ((max(0.5, 0.5) - 0.5) + (max(0.9, 0.6) - 0.5)) / 2 = 0.2 (Chaudhry et al.: every
    # earlier stage), while bwt = ((0.5 - 0.5) + (0.5 - 0.6)) / 2 = -0.05 looks at the diagonal only.
    result = metrics_of("stage,a,b,c\na,0.5,0.9,0.0\nb,0.5,0.6,0.0\nc,0.5,0.5,1.0\n")
    assert result.metrics["forgetting"].value == pytest.approx(0.2, abs=1e-12)
    assert result.metrics["bwt"].value == pytest.approx(-0.05, abs=1e-12)


def test_single_stage_supports_only_single_stage_metrics() -> None:
    result = metrics_of("stage,a,b\na,0.75,0.25\n")
    assert result.metrics["asr"].value == pytest.approx(0.75)
    assert result.metrics["plasticity"].value == pytest.approx(0.75)
    assert result.metrics["auc"].value == pytest.approx(0.75)
    for key in ("bwt", "forgetting", "fwt", "nbt"):
        assert result.metrics[key].value is None, key
        assert "at least 2 training stages, the matrix has 1" in str(result.metrics[key].reason)
    assert "tasks evaluated but never trained, left out of the metrics: b" in result.notes


def test_missing_cell_makes_dependent_metrics_unavailable_and_names_the_cell() -> None:
    result = metrics_of("stage,a,b\na,,0.1\nb,0.5,0.9\n")
    assert result.metrics["asr"].value == pytest.approx(0.7)
    for key in ("bwt", "forgetting", "plasticity", "nbt", "auc"):
        reason = str(result.metrics[key].reason)
        assert result.metrics[key].value is None, key
        assert "(stage a, task a)" in reason, key


def test_fwt_needs_cells_above_the_diagonal() -> None:
    result = metrics_of("stage,a,b\ninit,0.0,0.1\na,0.9,\nb,0.8,0.7\n")
    assert result.metrics["fwt"].value is None
    assert "(stage a, task b)" in str(result.metrics["fwt"].reason)
    assert result.metrics["bwt"].value == pytest.approx(-0.1)


def test_init_missing_on_a_needed_task_is_unavailable() -> None:
    result = metrics_of("stage,a,b\ninit,0.0,\na,0.9,0.3\nb,0.8,0.7\n")
    assert result.metrics["fwt"].value is None
    assert "init" in str(result.metrics["fwt"].reason)
    assert "b" in str(result.metrics["fwt"].reason)


def test_column_order_and_untrained_columns_do_not_change_metrics() -> None:
    shuffled = """stage,c,extra,a,b
init,0.0,0.5,0.1,0.2
a,0.1,0.5,0.8,0.3
b,0.4,0.5,0.6,0.9
c,1.0,0.5,0.5,0.7
"""
    a, b = metrics_of(FULL), metrics_of(shuffled)
    for key in METRIC_NAMES:
        assert b.metrics[key].value == pytest.approx(a.metrics[key].value, abs=1e-12), key
    assert "tasks evaluated but never trained, left out of the metrics: extra" in b.notes


def _reference(r: np.ndarray, b: np.ndarray | None) -> dict[str, float]:
    """Straight loops over the published definitions, 1-based as in the papers.

    forgetting: Chaudhry et al. (2018), eq. for f_j^k with k = T, max over l in 1..T-1.
    nbt: Liu et al. (2023), NBT = (1/K) sum_k NBT_k, the undefined k = K term taken as 0.
    """
    t = r.shape[0]

    def at(i: int, j: int) -> float:
        return float(r[i - 1, j - 1])

    out = {
        "asr": sum(at(t, j) for j in range(1, t + 1)) / t,
        "plasticity": sum(at(j, j) for j in range(1, t + 1)) / t,
        "auc": sum((at(k, k) + sum(at(tau, k) for tau in range(k + 1, t + 1))) / (t - k + 1) for k in range(1, t + 1))
        / t,
    }
    if t >= 2:
        out["bwt"] = sum(at(t, j) - at(j, j) for j in range(1, t)) / (t - 1)
        out["forgetting"] = sum(max(at(ell, j) for ell in range(1, t)) - at(t, j) for j in range(1, t)) / (t - 1)
        out["nbt"] = sum(sum(at(k, k) - at(tau, k) for tau in range(k + 1, t + 1)) / (t - k) for k in range(1, t)) / t
        if b is not None:
            out["fwt"] = sum(at(j - 1, j) - float(b[j - 1]) for j in range(2, t + 1)) / (t - 1)
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=6).flatmap(
        lambda t: st.tuples(
            st.lists(st.floats(0, 1), min_size=t * t, max_size=t * t),
            st.one_of(st.none(), st.lists(st.floats(0, 1), min_size=t, max_size=t)),
        )
    )
)
def test_vectorized_metrics_match_the_published_definitions(data: tuple[list[float], list[float] | None]) -> None:
    flat, init = data
    t = math.isqrt(len(flat))
    r = np.asarray(flat, dtype=np.float64).reshape(t, t)
    b = None if init is None else np.asarray(init, dtype=np.float64)
    expected = _reference(r, b)
    for key, spec in METRICS.items():
        if key not in expected:
            continue
        assert float(spec.fn(r, b)) == pytest.approx(expected[key], abs=1e-9), key
        assert float(spec.fn(r[None, None], None if b is None else b[None, None])[0, 0]) == pytest.approx(
            expected[key], abs=1e-9
        ), f"{key} with batch dimensions"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_two_task_identities(flat: list[float]) -> None:
    r = np.asarray(flat).reshape(2, 2)
    bwt, forgetting, nbt = (float(METRICS[k].fn(r, None)) for k in ("bwt", "forgetting", "nbt"))
    assert forgetting == pytest.approx(-bwt, abs=1e-12)
    assert nbt == pytest.approx(-bwt / 2, abs=1e-12)
    assert 0.0 <= float(METRICS["auc"].fn(r, None)) <= 1.0
