"""Settings of ``vlacl train-task``: data, model, adapters, optimization, logging and resume."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlacl.config.core import invalid, setting
from vlacl.config.lora import AdapterConfig
from vlacl.config.policy import PolicyConfig
from vlacl.data.stream import PartitionMode

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Schedule = Literal["cosine", "linear", "constant"]
ShortEpisodes = Literal["error", "skip"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""As :data:`vlacl.data.windows.ShortEpisodes` (not imported: that module imports torch)."""

SMOKE_STEPS = 4
"""Optimizer steps of a --smoke run."""
SMOKE_VAL_BATCHES = 1
"""Validation batches of a --smoke run."""


@dataclass(frozen=True)
class TrainTaskConfig:
    """What ``train-task`` trains on, with which model, and how."""

    model_path: str = setting(
        "builtin:tiny",
        "Base model: a Hugging Face VLM directory, a tiny model directory, or builtin:tiny (a small "
        "random backbone, for tests and smoke runs).",
        flag="--model",
    )
    trust_remote_code: bool = setting(
        False,
        "Let transformers run the model directory's own code (only for directories you trust).",
        flag="--trust-remote-code",
    )
    datasets: tuple[Path, ...] = setting((), "Datasets the stream is built from.", flag="--dataset")
    stats: Path | None = setting(None, "ds_stats artifact of the datasets (vlacl ds-stats).", flag="--stats")
    keymap: Path | None = setting(None, "Key map YAML the datasets are read with.", flag="--keymap")
    stream_name: str = setting("stream", "Name of the stream, recorded in the checkpoint.", flag="--stream")
    partition: PartitionMode = setting(
        "auto", "How the datasets split into tasks: task_index, dataset or auto.", flag="--partition"
    )
    task_order: tuple[str, ...] | None = setting(
        None, "Task keys or instructions in stream order; none keeps the natural order.", flag="--order"
    )
    task: str = setting(
        "#0", "The task to train: its position (#0, #1, ...), key or instruction within the stream.", flag="--task"
    )
    val_fraction: float = setting(
        0.1, "Fraction of each task's episodes held out for the validation loss.", flag="--val-fraction"
    )
    history: int = setting(1, "Observation frames per sample (W).", flag="--history")
    chunk: int = setting(4, "Actions predicted per sample (K, the action chunk).", flag="--chunk")
    short_episodes: ShortEpisodes = setting(
        "skip", "Episodes shorter than history + chunk: skip (with a warning) or error.", flag="--short-episodes"
    )
    model: PolicyConfig = setting(PolicyConfig(), "The action head and its conditioning.")
    adapter: AdapterConfig = setting(
        AdapterConfig(), "What of the backbone trains and how adapters continue the stream."
    )
    cl: str = setting("seq", "Continual-learning algorithm (seq: plain sequential fine-tuning).", flag="--cl")
    cl_options: Mapping[str, Any] | None = setting(
        None, "Options of the CL algorithm, e.g. --set 'cl_options={buffer: 500}'."
    )
    lr: float = setting(1e-4, "Peak learning rate of the backbone's trainable weights (LoRA).", flag="--lr")
    head_lr: float = setting(1e-3, "Peak learning rate of the action head.", flag="--head-lr")
    weight_decay: float = setting(0.0, "AdamW weight decay of weight matrices.", flag="--weight-decay")
    schedule: Schedule = setting("cosine", "Decay after warmup: cosine, linear or constant.", flag="--schedule")
    warmup_steps: int = setting(0, "Linear warmup steps.", flag="--warmup-steps")
    min_lr_ratio: float = setting(0.0, "Learning rate at the end of the decay, as a fraction of the peak.")
    steps: int | None = setting(
        None, "Optimizer steps to train; none trains --epochs epochs (1000 steps when both are none).", flag="--steps"
    )
    epochs: float | None = setting(
        None, "Epochs over the task's training samples, instead of --steps.", flag="--epochs"
    )
    batch_size: int = setting(32, "Samples per micro-batch per process.", flag="--batch-size")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", flag="--grad-accum")
    grad_clip: float = setting(1.0, "Clip the gradient's global norm to this (0 = no clipping).", flag="--grad-clip")
    precision: Precision = setting(
        "auto",
        "Mixed precision: bf16, fp16 (with a loss scaler) or fp32; auto is bf16 on a GPU that has it, else fp32. "
        "Trainable weights stay fp32 either way.",
        flag="--precision",
    )
    two_stage: bool = setting(
        False,
        "Stage 1 trains the head alone on a frozen backbone for --stage1-steps, then stage 2 adds the adapters.",
        flag="--two-stage",
    )
    stage1_steps: int = setting(200, "Head-only steps of stage 1 (--two-stage).", flag="--stage1-steps")
    cache_features: bool = setting(
        False,
        "Stage 1 computes the frozen backbone's features once and trains the head on them from disk.",
        flag="--cache-features",
    )
    feature_cache: Path | None = setting(
        None,
        "Directory of the --cache-features files, kept and shared between runs (each file is keyed by a "
        "fingerprint of model, data, key map and window); none uses .<out name>.features next to --out, "
        "removed once the checkpoint is written.",
        flag="--feature-cache",
    )
    activation_checkpointing: bool = setting(
        False,
        "Recompute the backbone's activations in the backward pass (less memory, ~30% slower).",
        flag="--activation-checkpointing",
    )
    compile: bool = setting(
        False,
        "Compile each transformer block of the backbone (the language model's and the vision tower's) with "
        "torch.compile, after LoRA is attached: fewer, fused kernels per step, for a first step slower by the "
        "compile time (minutes on a large model). Single process or DDP; not with FSDP or DeepSpeed.",
        flag="--compile",
    )
    compile_mode: CompileMode = setting(
        "default",
        "torch.compile mode of --compile: default; reduce-overhead also replays each compiled block as a CUDA "
        "graph (on a GPU: far fewer kernel launches per step, for more GPU memory and one recording per new "
        "shape); max-autotune and max-autotune-no-cudagraphs search for faster kernels at a longer compile.",
        flag="--compile-mode",
    )
    workers: int = setting(0, "DataLoader worker processes (0 reads in the training process).", flag="--workers")
    seed: int = setting(0, "Seed of the model init, the sampler and the validation split.", flag="--seed")
    device: Device = setting("auto", "Device: auto (cuda if there is one), cpu, cuda or mps.", flag="--device")
    log_every: int = setting(10, "Steps between metrics.jsonl lines (and the only host syncs).", flag="--log-every")
    val_every: int = setting(200, "Steps between validation losses (0 = only at the end).", flag="--val-every")
    val_batches: int | None = setting(
        None, "Validation batches per evaluation; none uses every one.", flag="--val-batches"
    )
    save_every: int = setting(
        500, "Steps between saves of the resume state (0 = only on SIGTERM/SIGUSR1).", flag="--save-every"
    )
    keep_best: bool = setting(False, "Also keep the weights of the best validation loss in best/.", flag="--keep-best")
    tensorboard: bool = setting(
        False, "Also write TensorBoard events (needs the tensorboard package).", flag="--tensorboard"
    )
    zero_loss_steps: int = setting(20, "Stop when the loss is exactly 0 for this many steps in a row (0 = never).")
    nonfinite_steps: int = setting(5, "Stop after this many NaN/Inf steps in a row (each is skipped; 0 = never).")
    smoke: bool = setting(
        False, f"A few steps end to end ({SMOKE_STEPS} steps, {SMOKE_VAL_BATCHES} validation batch).", flag="--smoke"
    )

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "history", "chunk", "log_every"):
            if getattr(self, key) < 1:
                raise invalid(key, f"must be >= 1, got {getattr(self, key)}", TrainTaskConfig)
        for key in ("warmup_steps", "val_every", "save_every", "workers", "seed", "stage1_steps"):
            if getattr(self, key) < 0:
                raise invalid(key, f"must be >= 0, got {getattr(self, key)}", TrainTaskConfig)
        if self.steps is not None and self.steps < 1:
            raise invalid("steps", f"must be >= 1, got {self.steps}", TrainTaskConfig)
        if self.epochs is not None and not self.epochs > 0:
            raise invalid("epochs", f"must be > 0, got {self.epochs}", TrainTaskConfig)
        if self.steps is not None and self.epochs is not None:
            raise invalid("steps", "give --steps or --epochs, not both", TrainTaskConfig)
        if not (self.lr > 0 and self.head_lr > 0):
            raise invalid("lr", f"learning rates must be > 0, got {self.lr} and {self.head_lr}", TrainTaskConfig)
        if not 0.0 <= self.val_fraction < 1.0:
            raise invalid("val_fraction", f"must be in [0, 1), got {self.val_fraction}", TrainTaskConfig)
        if self.grad_clip < 0:
            raise invalid("grad_clip", f"must be >= 0, got {self.grad_clip}", TrainTaskConfig)
        if self.cache_features and not self.two_stage:
            raise invalid("cache_features", "needs --two-stage (it caches stage 1's features)", TrainTaskConfig)
        if self.compile_mode != "default" and not self.compile:
            raise invalid("compile_mode", "is the mode of --compile; pass --compile too", TrainTaskConfig)
        if self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            # a CUDA graph's backward leaves the gradients in the graph's memory, which its next
            # replay reuses: gradients kept across backward passes would be overwritten
            if self.grad_accum > 1:
                raise invalid(
                    "compile_mode",
                    f"{self.compile_mode} (CUDA graphs) cannot accumulate gradients over --grad-accum "
                    f"{self.grad_accum} backward passes: use --grad-accum 1 with a larger --batch-size, or "
                    "--compile-mode default",
                    TrainTaskConfig,
                )
            if self.cl == "agem":
                raise invalid(
                    "compile_mode",
                    f"{self.compile_mode} (CUDA graphs) cannot run with --cl agem, which keeps the task's "
                    "gradients across its reference backward pass: use --compile-mode default",
                    TrainTaskConfig,
                )
        if self.feature_cache is not None and not self.cache_features:
            raise invalid("feature_cache", "is the directory of --cache-features; pass that too", TrainTaskConfig)

    @property
    def task_selector(self) -> str | int:
        """The task as :meth:`~vlacl.data.stream.TaskStream.task` takes it (digits are a position)."""
        return int(self.task) if self.task.isdigit() else self.task
