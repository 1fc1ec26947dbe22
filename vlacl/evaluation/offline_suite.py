"""``eval-suite --suite offline``: every checkpoint's action errors on every task's held-out episodes.

The stream is rebuilt from the datasets exactly as ``train-task`` built it (the checkpoint's
partition, order, validation fraction and split seed, from its ``config.yaml``), so ``--split val``
scores the episodes that training held out. The datasets must be those the stats were computed on
(the same check as training). Columns are the stream's tasks, named as in the rollout suites when
the dataset was collected by ``vlacl collect-demos`` (``hammer-v3``), else by instruction or key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import yaml

from vlacl.artifacts.names import CONFIG_NAME, ERROR_MATRIX_CSV_NAME, EVAL_INFO_NAME, KEYMAP_NAME, RESULTS_NAME
from vlacl.artifacts.reader import open_artifact
from vlacl.artifacts.writer import ArtifactWriter, check_output_dir
from vlacl.config.core import config_to_dict, dump_config
from vlacl.config.eval_suite import EvalSuiteConfig
from vlacl.errors import ConfigError
from vlacl.evaluation.offline import OfflineEpisodeResult, evaluate_offline, pool
from vlacl.evaluation.policies import CheckpointRef, PolicyBank
from vlacl.evaluation.suites import OFFLINE, training_datasets

if TYPE_CHECKING:
    from vlacl.evaluation.runner import EvalReport, ProgressFn

log = logging.getLogger(__name__)

ERROR_FIELDS = ("mse", "mae", "mse_raw", "mae_raw")
PER_DIM_FIELDS = ("mse_per_dim", "mae_per_dim", "mse_raw_per_dim", "mae_raw_per_dim", "count_per_dim")


def _train_settings(ref: CheckpointRef) -> dict[str, Any]:
    data = yaml.safe_load((ref.path / CONFIG_NAME).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{ref.path / CONFIG_NAME} is not a mapping: the checkpoint is damaged")
    return data


def _column_names(datasets: Sequence[Path], stream: Any) -> list[str]:
    """Task column names: collect-demos' simulator task names where the dataset records them."""
    by_instruction: dict[str, str] = {}
    for path in datasets:
        manifest = path / "vlacl_manifest.json"
        if manifest.is_file():
            for task in open_artifact(path).manifest.details.get("tasks", []):
                if isinstance(task, dict) and "instruction" in task and "task" in task:
                    by_instruction[str(task["instruction"])] = str(task["task"])
    return [by_instruction.get(t.instruction, t.name) for t in stream.tasks]


def run_offline_suite(
    refs: Sequence[CheckpointRef],
    cfg: EvalSuiteConfig,
    *,
    out: Path | None,
    overwrite: bool = False,
    command: Sequence[str] = (),
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Score every (checkpoint, task) cell on the task's held-out (or all) episodes; write the artifact.

    Raises:
        ConfigError: No datasets, or a task without held-out episodes under ``--split val`` for every task.
        InputFormatError: Datasets that the checkpoints' stats were not computed on.
    """
    from vlacl.data.keymap import load_keymap
    from vlacl.data.normalize import check_stats_match, load_stats
    from vlacl.data.open import open_datasets
    from vlacl.data.stream import build_stream
    from vlacl.evaluation.runner import KIND, EvalReport, _device, _stats_fingerprint

    started = time.perf_counter()
    if out is not None:
        check_output_dir(out, overwrite, kind=KIND)
    paths = list(cfg.datasets) or training_datasets(refs[-1])
    if not paths:
        raise ConfigError(f"{refs[-1].path} records no dataset: pass the held-out data with --dataset")
    last = refs[-1]
    keymap_file = last.path / KEYMAP_NAME
    keymap = load_keymap(keymap_file if keymap_file.is_file() else None)
    datasets = open_datasets(paths, keymap)
    check_stats_match(load_stats(last.path / "stats.json"), datasets, keymap)
    settings = _train_settings(last)
    stream = build_stream(
        datasets,
        partition=settings.get("partition", "auto"),
        order=settings.get("task_order"),
        val_fraction=float(settings.get("val_fraction", 0.1)),
        seed=int(settings.get("seed", 0)),
    )
    tasks = _column_names(paths, stream)
    by_position = {t.position: name for t, name in zip(stream.tasks, tasks, strict=True)}
    stages = [by_position.get(r.task_index, r.task_name) for r in refs]
    if len(set(stages)) != len(stages):
        raise ConfigError(f"several checkpoints trained the same task ({stages}): a matrix has one row per task")
    chosen = [len(refs) - 1] if cfg.last_only else list(range(len(refs)))
    shard_index, shard_count = cfg.shard_index
    cells = [(i, j) for i in chosen for j in range(len(stream.tasks))]
    mine = [c for n, c in enumerate(cells) if n % shard_count == shard_index]
    device = torch.device(_device(cfg))
    bank = PolicyBank(device, _stats_fingerprint(cfg))
    rows: list[dict[str, Any]] = []
    pooled: dict[tuple[int, int], OfflineEpisodeResult | Any] = {}
    for done, (i, j) in enumerate(mine):
        task = stream.tasks[j]
        refs_of_task = task.val if cfg.split == "val" else (*task.train, *task.val)
        if not refs_of_task:
            log.warning("task %r has no held-out episodes: its column stays empty (try --split all)", tasks[j])
            continue
        loaded = bank.get(refs[i])
        if loaded.setup is not None and loaded.setup.mode == "per-task":
            from vlacl.adapters.lora import activate_for_task

            loaded.active_adapters = activate_for_task(loaded.setup, task.position, unseen="latest")
        results = evaluate_offline(
            loaded, stream.episodes(refs_of_task), batch_size=cfg.batch_size, device=device, seed=cfg.seed
        )
        pooled[(i, j)] = pool(results)
        for result in results:
            row: dict[str, Any] = {
                "checkpoint": str(refs[i].path),
                "stage": stages[i],
                "stage_index": i,
                "task": tasks[j],
                "task_index": j,
                "episode": result.episode,
                "frames": result.frames,
                "values": result.values,
                "seconds": result.seconds,
            }
            row.update({k: getattr(result, k) for k in ERROR_FIELDS})
            row.update({k: list(getattr(result, k)) for k in PER_DIM_FIELDS})
            rows.append(row)
        if progress is not None:
            progress(done + 1, len(mine), None)
    episodes = pd.DataFrame(rows)
    seconds = time.perf_counter() - started
    info = _info(pooled, stages, tasks, stages, len(rows), seconds)
    report = EvalReport(
        out=out,
        suite=OFFLINE,
        stages=tuple(stages),
        tasks=tuple(tasks),
        episodes=episodes,
        seconds=seconds,
        shard=(shard_index, shard_count),
        info=info,
    )
    if out is not None:
        _write(out, report, cfg, refs, pooled, stages, overwrite, command)
    log.info("scored %d held-out episodes in %.1f s", len(rows), seconds)
    return report


def _info(
    pooled: dict[tuple[int, int], Any],
    rows: Sequence[str],
    tasks: Sequence[str],
    stages: Sequence[str],
    episodes: int,
    seconds: float,
) -> dict[str, Any]:
    def summary(s: Any) -> dict[str, Any]:
        out: dict[str, Any] = {k: float(getattr(s, k)) for k in ERROR_FIELDS}
        out.update({k: [float(v) for v in getattr(s, k)] for k in PER_DIM_FIELDS})
        out.update({"n_episodes": int(s.episodes), "frames": int(s.frames)})
        return out

    per_task = [
        {"task_group": stages[i], "task_id": tasks[j], "metrics": summary(s)} for (i, j), s in sorted(pooled.items())
    ]
    return {
        "kind": "offline",
        "suite": OFFLINE,
        "stages": list(rows),
        "tasks": list(tasks),
        "per_task": per_task,
        "overall": {"n_episodes": episodes, "eval_s": seconds, "eval_ep_s": seconds / max(episodes, 1)},
    }


def _write(
    out: Path,
    report: EvalReport,
    cfg: EvalSuiteConfig,
    refs: Sequence[CheckpointRef],
    pooled: dict[tuple[int, int], Any],
    stages: Sequence[str],
    overwrite: bool,
    command: Sequence[str],
) -> None:
    from vlacl.metrics.matrix import ResultMatrix

    values = np.full((len(report.stages), len(report.tasks)), np.nan)
    row_of = {s: r for r, s in enumerate(report.stages)}
    for (i, j), summary in pooled.items():
        values[row_of[stages[i]], j] = summary.mse
    matrix = ResultMatrix(tasks=report.tasks, stages=report.stages, values=values)
    with ArtifactWriter(
        out,
        "eval_results",
        command=command,
        config_yaml=dump_config(cfg),
        seed=cfg.seed,
        overwrite=overwrite or out.exists(),
    ) as writer:
        report.episodes.to_parquet(writer.path / RESULTS_NAME, index=False)
        (writer.path / ERROR_MATRIX_CSV_NAME).write_text(matrix.to_csv(), encoding="utf-8")
        (writer.path / EVAL_INFO_NAME).write_text(json.dumps(report.info, indent=2) + "\n", encoding="utf-8")
        for i, ref in enumerate(refs):
            writer.add_input(f"checkpoint:{i}", open_artifact(ref.path))
        writer.details.update(
            {
                "suite": OFFLINE,
                "stages": list(report.stages),
                "tasks": list(report.tasks),
                "shard": {"index": report.shard[0], "count": report.shard[1]},
                "episodes": len(report.episodes),
                "split": cfg.split,
                "settings": {k: v for k, v in config_to_dict(cfg).items() if k not in ("stats", "datasets")},
            }
        )
