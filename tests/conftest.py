"""Shared fixtures: tiny artifact factories and a CLI runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.train_factories import Stream, make_stream
from vlacl.artifacts import ArtifactWriter
from vlacl.artifacts.names import MATRIX_CSV_NAME, RESULTS_NAME
from vlacl.evaluation.results import matrix_from_episodes

EvalResultsFactory = Callable[..., Path]


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Vlacl's cache (input hashes) in a directory of the test session, never the user's."""
    from vlacl.artifacts.hashing import CACHE_DIR_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("vlacl-cache")))
        yield


@pytest.fixture
def hashed_files(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files ``vlacl.artifacts.hashing.sha256_file`` reads from now on, in order (it still hashes them)."""
    from vlacl.artifacts import hashing

    calls: list[Path] = []
    real = hashing.sha256_file

    def recording(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(hashing, "sha256_file", recording)
    return calls


@pytest.fixture
def runner() -> CliRunner:
    """A CLI runner that keeps stdout and stderr apart."""
    return CliRunner()


@pytest.fixture
def make_eval_results(tmp_path: Path) -> EvalResultsFactory:
    """Write a small ``eval_results`` artifact from per-cell success counts.

    ``cells`` maps ``(stage, task)`` to ``(successes, episodes)``; ``stages`` gives the row order
    (``init`` allowed) and ``tasks`` the column order.
    """

    def make(
        name: str,
        cells: Mapping[tuple[str, str], tuple[int, int]],
        stages: Sequence[str],
        tasks: Sequence[str],
    ) -> Path:
        rows = []
        for (stage, task), (hits, count) in cells.items():
            for episode in range(count):
                rows.append(
                    {
                        "checkpoint": f"ckpt-{stage}",
                        "stage": stage,
                        "task": task,
                        "seed": episode,
                        "success": episode < hits,
                        "return": float(episode < hits),
                        "steps": 100,
                        "seconds": 0.5,
                    }
                )
        episodes = pd.DataFrame(rows)
        matrix = matrix_from_episodes(episodes, stages, tasks)
        out = tmp_path / name
        with ArtifactWriter(out, "eval_results", command=["vlacl", "eval-suite"], config_yaml=None, seed=0) as writer:
            episodes.to_parquet(writer.path / RESULTS_NAME, index=False)
            (writer.path / MATRIX_CSV_NAME).write_text(matrix.to_csv(), encoding="utf-8")
        return out

    return make


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices: one torch thread is faster than contending for a shared machine's cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stream]:
    """The two-task micro stream of `make_stream`, shared by the tests of a module (one torch thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_stream(tmp_path_factory.mktemp("stream"))
    torch.set_num_threads(threads)
