"""File names and artifact kinds shared by every command: the one place they are spelled out."""

from __future__ import annotations

from typing import Final

MANIFEST_NAME: Final = "vlacl_manifest.json"
CONFIG_NAME: Final = "config.yaml"

# cl_metrics
METRICS_NAME: Final = "metrics.json"
MATRIX_CSV_NAME: Final = "matrix.csv"
MATRIX_PNG_NAME: Final = "matrix.png"

# eval_results
RESULTS_NAME: Final = "results.parquet"
"""One row per evaluated episode (see :mod:`vlacl.evaluation.results`)."""
EVAL_INFO_NAME: Final = "eval_info.json"
"""Per-task and overall success in LeRobot's eval_info shape, with Wilson intervals."""
ERROR_MATRIX_CSV_NAME: Final = "error_matrix.csv"
"""Offline suite: the mean normalized action MSE of every (stage, task) cell, in matrix.csv's layout."""
VIDEOS_DIR: Final = "videos"
"""Optional rollout videos: videos/<stage>/<task>/episode_<seed>.mp4."""

# ds_stats
STATS_NAME: Final = "stats.json"
KEYMAP_NAME: Final = "keymap.yaml"
"""The key map a dataset was read with; saved with every artifact that used one."""

# task_checkpoint: adapters/<adapter name>/ in PEFT's format, in the order of the manifest's
# details["adapter_stack"]; the action head and the stats the policy was trained with beside them.
ADAPTERS_DIR: Final = "adapters"
ACTION_HEAD_NAME: Final = "action_head.safetensors"
CL_STATE_NAME: Final = "cl_state.safetensors"
"""The CL algorithm's tensors; its other state values are in CL_META_NAME."""
CL_META_NAME: Final = "cl_state.json"
TRAIN_METRICS_NAME: Final = "metrics.jsonl"
"""One JSON object per logged training step and per validation."""
BEST_DIR: Final = "best"
"""With --keep-best: the adapters and head of the lowest validation loss."""
BACKBONE_WEIGHTS_NAME: Final = "backbone.safetensors"
"""Backbone weights changed by --finetune full/last-n, named relative to the backbone module."""

# PEFT adapter directories (what PeftModel.from_pretrained loads)
ADAPTER_CONFIG_NAME: Final = "adapter_config.json"
ADAPTER_WEIGHTS_NAME: Final = "adapter_model.safetensors"

# merged_model: Hugging Face sharded safetensors
SAFETENSORS_INDEX_NAME: Final = "model.safetensors.index.json"

SCHEMA_VERSION: Final = 1
"""Version of the manifest layout. It changes only with a CHANGELOG entry and a reader that
upgrades older manifests or refuses them with a clear message."""

PRODUCERS: Final[dict[str, str]] = {
    "dataset": "collect-demos",
    "ds_stats": "ds-stats",
    "task_checkpoint": "train-task",
    "merged_model": "merge-lora",
    "composed_adapter": "compose-adapters",
    "eval_results": "eval-suite",
    "cl_metrics": "cl-metrics",
}
"""Artifact kind -> the ``vlacl`` command that writes it."""

FILE_KIND: Final = "file"
"""Kind recorded for an input that is a plain file rather than an artifact directory."""


def producer_of(kind: str) -> str:
    """Return the command that writes artifacts of ``kind``, as users type it (``vlacl <cmd>``)."""
    return f"vlacl {PRODUCERS[kind]}" if kind in PRODUCERS else "no vlacl command"


def describe_kinds(kinds: tuple[str, ...]) -> str:
    """``an eval_results artifact (written by `vlacl eval-suite`)``, joined with "or" for several kinds."""
    parts = []
    for kind in kinds:
        article = "an" if kind[:1] in "aeiou" else "a"
        parts.append(f"{article} {kind} artifact (written by `{producer_of(kind)}`)")
    return " or ".join(parts) or "an artifact"
