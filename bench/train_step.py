"""GPU benchmark of ``train-task``'s step at VLA size (Qwen2.5-VL-3B shape) against a plain PEFT loop.

What runs:

- a random-weight Qwen2.5-VL-3B-shaped model directory, written once with ``save_pretrained`` in bf16
  (config written by hand from the published Qwen2.5-VL-3B-Instruct ``config.json``; a word-level
  tokenizer and the processor files as ``tests/hf_factories.py`` writes them), and one with a
  Qwen2.5-0.5B-shaped language model behind the same vision tower;
- a synthetic LeRobot dataset of one task (two with ``--cl-bench`` or ``--ddp``: one 224x224 camera
  as PNG frames, an 8-dim state, a 7-dim action, a 32-word instruction per task) and its ds-stats
  artifact;
- a large bf16 ``torch.matmul`` loop: the peak the MFU is measured against;
- per variant, one run per ``--impls`` entry, each in its own process (a failure or an out-of-memory
  loses that run only):

  - ``vlacl``: ``vlacl train-task`` run through vlacl's own command line in the child (the flags are
    printed), bf16, LoRA rank 32, the flow-matching head (``--head``), ``--workers`` loader workers;
  - ``vlacl+compile`` (``--compile``): the same command line with ``--compile`` (a flag train-task
    refuses fails that run alone);
  - ``vlacl+cudagraphs``: the same with ``--compile --compile-mode reduce-overhead`` (each compiled
    block replayed as CUDA graphs);
  - ``baseline``: the same model directory and the same training samples (vlacl's dataset and
    collate), LoRA put on by PEFT's ``get_peft_model`` (same target layers, rank, alpha, dropout), the
    same head class, and a plain loop: eager, ``torch.autocast`` bf16, ``torch.optim.AdamW`` with its
    defaults (not fused), fp32 LoRA weights, a ``DataLoader`` with the same workers (no pinned memory).

``--cl-bench`` adds the continual-learning overhead at variant b's shape (LoRA on the language model,
batch ``--cl-batch``, 64 by default): per algorithm of ``--cl-variants`` (ER, MIR with refresh 200,
EWC), one child trains task 0 of a two-task dataset for a few steps with that algorithm and then
task 1 with ``--prev``, timed; the table gives the mean step time, samples/s and the ratio to ER
(targets: MIR/ER <= 1.05, EWC/ER <= 1.02). MIR's refresh, due every 200 steps, is made to fall
inside the timed window (its cache emptied before a chosen step) and spread over its period: the
printed method says how. ``--ddp N`` runs the first variant's vlacl run on N processes under
``accelerate launch`` (``examples/accelerate/ddp.yaml``) and gives the samples/s of all processes
against one process at the same per-process batch (target: N = 2 at least 1.8x), then trains MIR
and EWC on task 1 under DDP for a few steps (final loss finite, checkpoint written).

Variants: ``a`` batch 16, LoRA on every linear layer (vlacl's ``vision`` preset: the vision tower, its
merger and the language model); ``b`` batch 64, LoRA on the language model only (``all-linear``: the
vision tower runs without gradients); ``small`` as ``a`` with the 0.5B language model (reference).

Each run: ``--warmup`` steps, then ``--steps`` timed steps (wall time between a ``cuda.synchronize`` at
both ends: samples/s and step time), then ``--phase-steps`` instrumented steps with a
``cuda.synchronize`` at every phase boundary, giving the breakdown: data wait (the loop blocked on
the loader, host-to-device copy included), forward, backward, ``optimizer.step``, and the rest
(gradient clipping, the finiteness check, ``zero_grad``, scheduler, logging). vlacl's loop has no
phase timing of its own, so its instrumented steps are timed by hooks put on the trainer's loader,
model, ``accelerator.backward`` and ``optimizer.step`` (no vlacl code is changed). Peak memory is
``torch.cuda.max_memory_allocated`` over the run.

MFU counts, per sample, 4N FLOPs per token for the backbone modules that need a backward pass (the
whole backbone when the vision tower has adapters, else the language model), 2N for frozen modules
without adapters (the vision tower in ``b``, the patch embedding), 6N for the LoRA factors and the
head (they train); N per module from the loaded model, the tokens each module sees (patches for the
vision blocks, merged tokens for the merger, the padded prompt for the language model; attention
score FLOPs left out), against the measured matmul peak.

Usage (the GPU run of a and b takes about 4 minutes on an H200; each CPU smoke test about 1 to 2)::

    python bench/train_step.py --json-out $OUT/train_step.json            # on a GPU machine
    python bench/train_step.py --variants b --impls none --cl-bench        # CL overhead, one GPU
    python bench/train_step.py --variants a --impls vlacl --ddp 2          # DDP, two GPUs
    .venv/bin/python bench/train_step.py --shape tiny --device cpu --steps 3
    .venv/bin/python bench/train_step.py --shape tiny --device cpu --variants b --impls none --cl-bench
    .venv/bin/python bench/train_step.py --shape tiny --device cpu --steps 3 --variants a --impls vlacl --ddp 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: vlacl, tests' factories

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.hf_factories import qwen_token_ids, write_qwen_vl_files

INSTRUCTION = (
    "pick up the red cup and put it into the blue bowl on the left of the plate and open the drawer "
    "and place the green block on top of the mug"
)
"""32 words, each one token of the word-level tokenizer: the instruction of every episode of task 0."""
INSTRUCTION_2 = (
    "wipe the table with the yellow sponge then stack the two plates near the sink and close the top drawer of "
    "the white cabinet and turn off the lamp on the desk"
)
"""The instruction of task 1 (32 words too: the same prompt length), for the runs that need a second task."""

STATE_DIM = 8
ACTION_DIM = 7
CHUNK = 8
FRAMES_PER_EPISODE = 50
LORA_RANK = 32
LOG_EVERY = 10
PHASES = ("data", "forward", "backward", "optimizer", "other")
COMPLETE = ".complete"
"""Marker file of a finished model or data directory (reused with ``--workdir``)."""

TARGET_MFU = 0.25
TARGET_DATA_SHARE = 0.05
CL_TARGETS = {"mir": 1.05, "ewc": 1.02}
"""Mean step time of each CL algorithm over ER's at most (the CL issue's targets)."""
MIR_REFRESH = 200
"""MIR's ``refresh`` option of the CL runs (its default): optimizer steps between two scorings."""
TARGET_DDP_EFFICIENCY = 0.9
"""DDP scaling target: samples/s of N processes >= 0.9 N times one process's (1.8 at N = 2)."""
ROOT = Path(__file__).resolve().parent.parent
DDP_CONFIG = ROOT / "examples" / "accelerate" / "ddp.yaml"
IMPLS = ("vlacl", "vlacl+compile", "vlacl+cudagraphs", "baseline")
IMPL_FLAGS: dict[str, list[str]] = {
    "vlacl+compile": ["--compile"],
    "vlacl+cudagraphs": ["--compile", "--compile-mode=reduce-overhead"],
}
"""train-task flags each vlacl impl adds to the common command line."""

# ---------------------------------------------------------------------------------------------
# Shapes


VISION_3B: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "hidden_act": "silu",
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "out_hidden_size": 2048,
}
"""``vision_config`` of Qwen2.5-VL-3B-Instruct."""

TEXT_3B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "use_sliding_window": False,
    "tie_word_embeddings": True,
}
"""The language model of Qwen2.5-VL-3B-Instruct (head dim 128: the mrope sections sum to 64)."""

TEXT_05B: dict[str, Any] = {
    **TEXT_3B,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
}
"""A Qwen2.5-0.5B-shaped language model (head dim 64: sections summing to 32)."""

VISION_TINY: dict[str, Any] = {
    **VISION_3B,
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "fullatt_block_indexes": [1],
    "out_hidden_size": 64,
}
TEXT_TINY: dict[str, Any] = {
    **TEXT_3B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
}
TEXT_TINY_SMALL: dict[str, Any] = {**TEXT_TINY, "hidden_size": 48, "intermediate_size": 96}
TEXT_TINY_SMALL["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 2]}


@dataclass(frozen=True)
class ModelShape:
    """One model directory to build: vision and text configs (``vocab_size`` of the text replaced when tiny)."""

    name: str
    description: str
    vision: dict[str, Any]
    text: dict[str, Any]


MODELS: dict[str, dict[str, ModelShape]] = {
    "full": {
        "3b": ModelShape("3b", "Qwen2.5-VL-3B shape", VISION_3B, TEXT_3B),
        "0.5b": ModelShape(
            "0.5b", "Qwen2.5-VL vision + Qwen2.5-0.5B LM shape", {**VISION_3B, "out_hidden_size": 896}, TEXT_05B
        ),
    },
    "tiny": {
        "3b": ModelShape("3b", "tiny stand-in of the 3B shape", VISION_TINY, TEXT_TINY),
        "0.5b": ModelShape(
            "0.5b", "tiny stand-in of the 0.5B shape", {**VISION_TINY, "out_hidden_size": 48}, TEXT_TINY_SMALL
        ),
    },
}
IMAGE_SIZE = {"full": 224, "tiny": 56}
"""Camera side in pixels: 224 (16x16 patches of 14, 64 image tokens); 56 for the tiny shape (4 tokens)."""


@dataclass(frozen=True)
class Variant:
    """One measured configuration.

    Attributes:
        name: ``a``, ``b``, ``small``, ``a-mlp``.
        model: Key of :data:`MODELS`.
        batch: Batch size at the full shape.
        tiny_batch: Batch size at the tiny shape.
        targets: vlacl's ``--lora-targets`` preset.
        head: Action head.
        target_ratio: The samples/s ratio vlacl/baseline held to (``None``: reference only).
        description: What it is, for the output.
    """

    name: str
    model: str
    batch: int
    tiny_batch: int
    targets: str
    head: str
    target_ratio: float | None
    description: str


VARIANTS: dict[str, Variant] = {
    "a": Variant("a", "3b", 16, 4, "vision", "flow", 3.0, "3B, batch 16, LoRA r32 on every linear layer"),
    "b": Variant("b", "3b", 64, 8, "all-linear", "flow", 1.5, "3B, batch 64, LoRA r32 on the LM only"),
    "small": Variant("small", "0.5b", 16, 4, "vision", "flow", None, "0.5B LM, batch 16, LoRA r32 every linear"),
    "a-mlp": Variant("a-mlp", "3b", 16, 4, "vision", "mlp", 3.0, "as a, MLP head"),
}


# ---------------------------------------------------------------------------------------------
# Building the model directories and the dataset


def build_model_dir(path: Path, shape: ModelShape, *, tiny: bool, device: str) -> Path:
    """A random-weight Qwen2.5-VL directory: config + safetensors (bf16, fp32 when tiny), tokenizer, processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if (path / COMPLETE).is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    vocab = write_qwen_vl_files(
        path,
        processor_class="Qwen2_5_VLProcessor",
        min_pixels=56 * 56,  # Qwen2.5-VL's own min/max pixels
        max_pixels=28 * 28 * 16384,
        patch_size=shape.vision["patch_size"],
        temporal=shape.vision["temporal_patch_size"],
        merge=shape.vision["spatial_merge_size"],
    )
    text = dict(shape.text)
    if tiny:
        text["vocab_size"] = len(vocab)
    text.update(
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"]
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(shape.vision),
        tie_word_embeddings=True,
        **qwen_token_ids(vocab),
    )
    dtype = torch.float32 if tiny else torch.bfloat16
    model_class: Any = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 3.75B weights
        model: Any = model_class._from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are other processes: leave them the memory
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(
        f"built {shape.description}: {params / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB safetensors in "
        f"{time.perf_counter() - start:.1f} s -> {path}",
        flush=True,
    )
    (path / COMPLETE).write_text("ok\n", encoding="utf-8")
    return path


def build_data(root: Path, *, samples: int, image_size: int, tasks: int = 1) -> tuple[Path, Path]:
    """The LeRobot dataset (``tasks`` tasks of ``samples`` frames or more each) and its ds-stats artifact.

    With two tasks the episodes alternate between :data:`INSTRUCTION` (task 0) and
    :data:`INSTRUCTION_2` (task 1); every task has as many episodes as the one-task dataset.
    """
    from tests.lerobot_factories import make_episodes, write_lerobot
    from vlacl.config.ds_stats import DsStatsConfig
    from vlacl.data.stats import run_ds_stats

    data, stats = root / "data", root / "stats"
    if (root / COMPLETE).is_file():
        return data, stats
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    episodes = max(4, math.ceil(samples / FRAMES_PER_EPISODE))
    truth = make_episodes(
        [FRAMES_PER_EPISODE] * (episodes * tasks),
        [INSTRUCTION, INSTRUCTION_2][:tasks],
        state_dim=STATE_DIM,
        action_dim=ACTION_DIM,
        cameras=["front"],
        image_size=(image_size, image_size),
        seed=0,
    )
    write_lerobot(data, truth, images="embedded", episodes_per_file=8)
    run_ds_stats([data], DsStatsConfig(image_frames=32), out=stats)
    (root / COMPLETE).write_text("ok\n", encoding="utf-8")
    print(
        f"dataset: {tasks} task(s) x {episodes} episodes x {FRAMES_PER_EPISODE} frames, one {image_size}x{image_size} "
        "camera (PNG), "
        f"{time.perf_counter() - start:.1f} s -> {data}",
        flush=True,
    )
    return data, stats


def matmul_peak(device: str, n: int = 8192, iters: int = 30, repeats: int = 3) -> float:
    """Best bf16 ``torch.matmul`` throughput of ``n x n`` matrices in FLOP/s (0 off a GPU)."""
    if device != "cuda":
        return 0.0
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    del a, b, out
    torch.cuda.empty_cache()
    return best


# ---------------------------------------------------------------------------------------------
# One run (a child process)


@dataclass
class RunSpec:
    """What one child process measures."""

    impl: str
    variant: str
    model_dir: str
    data_dir: str
    stats_dir: str
    out_dir: str
    result_file: str
    batch: int
    targets: str
    head: str
    device: str
    workers: int
    warmup: int
    steps: int
    phase_steps: int
    task: str = "#0"
    cl: str = "seq"
    cl_opts: list[str] = field(default_factory=list)
    extra_flags: list[str] = field(default_factory=list)
    prev_steps: int = 0
    prev_batch: int = 0
    prev_cl_opts: list[str] = field(default_factory=list)
    force_refresh_at: int | None = None
    processes: int = 1

    @property
    def total(self) -> int:
        """Optimizer steps of the run."""
        return self.warmup + self.steps + self.phase_steps

    @property
    def prev_dir(self) -> str:
        """The task-0 checkpoint of a chained run (``prev_steps > 0``): the measured run's ``--prev``."""
        return self.out_dir + "-task0"


@dataclass
class RunResult:
    """What one run measured (seconds; FLOPs per sample).

    ``samples_per_s`` counts the task's samples of every process (``batch x processes`` per step):
    replayed samples that ER and MIR join to the batch are not counted. ``step_times_s`` holds every
    optimizer step's wall time (progress report to progress report, the first from the call);
    ``refreshes`` each MIR refresh as ``[step, seconds]`` (a device synchronization at both ends).
    """

    impl: str
    variant: str
    ok: bool = False
    error: str | None = None
    batch: int = 0
    samples_per_s: float | None = None
    step_s: float | None = None
    phases_s: dict[str, float] = field(default_factory=dict)
    phase_steps: int = 0
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    flops_per_sample: dict[str, float] = field(default_factory=dict)
    lm_tokens: int = 0
    vision_patches: int = 0
    trainable_params: int = 0
    total_params: int = 0
    setup_s: float | None = None
    final_loss: float | None = None
    logged_samples_per_s: list[float] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    cl: str = "seq"
    processes: int = 1
    step_times_s: list[float] = field(default_factory=list)
    refreshes: list[list[float]] = field(default_factory=list)
    checkpoint_written: bool = False
    finish_s: float | None = None
    prev_flags: list[str] = field(default_factory=list)
    prev_s: float | None = None


PROFILE_STEPS_ENV = "VLACL_BENCH_PROFILE_STEPS"
"""With this environment variable set to K > 0, the vlacl runs profile K of the instrumented steps that follow
the timed window (profiling inside the window would slow the figures it measures)."""


class _HostReads(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts ``aten::_local_scalar_dense`` (``.item()``, ``int(t)``, ``if t:``) by the code that asked for it."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.devices = {"cuda"} if torch.cuda.is_available() else {"cpu"}  # on a CPU: where the reads would be
        self.sources: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args and args[0].device.type in self.devices:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            self.sources[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:]))] += 1
        return func(*args, **(kwargs or {}))


class _StepProfiler:
    """torch.profiler over K steps of the timed window (no extra synchronization); a summary to $OUT.

    The summary lists the operators by device time and by host time, and counts the host-device
    synchronizations (``aten::_local_scalar_dense``: ``.item()``/``.tolist()``; ``cudaStreamSynchronize``;
    device-to-host copies) per step: what keeps a launch-bound step from queueing ahead.
    """

    def __init__(self, spec: RunSpec, device: torch.device) -> None:
        self.steps = int(os.environ.get(PROFILE_STEPS_ENV, "0"))
        self.start_at = spec.warmup + spec.steps
        self.device = device
        rank = int(os.environ.get("RANK", "0"))
        self.name = f"{spec.variant}-{spec.impl}" + (f"-x{spec.processes}-rank{rank}" if spec.processes > 1 else "")
        self.prof: Any = None
        self.reads = _HostReads()

    def step_end(self, step: int) -> None:
        """Start after the warm-up's last step; stop ``steps`` steps later and write the summary."""
        if self.steps <= 0:
            return
        if step == self.start_at:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.start()
            self.reads.__enter__()  # type: ignore[no-untyped-call]
        elif self.prof is not None and step == self.start_at + self.steps:
            self.reads.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self.prof.stop()
            self._write()
            self.prof = None

    def _write(self) -> None:
        events = self.prof.key_averages()
        count = {e.key: e.count for e in events}
        sync_keys = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
        lines = [f"profile of {self.name}: {self.steps} steps after the timed window"]
        for key in sync_keys:
            lines.append(f"{key}: {count.get(key, 0) / self.steps:.1f} per step")
        launch_keys = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        launches = sum(e.count for e in events if e.key in launch_keys)
        lines.append(f"kernel launches: {launches / self.steps:.0f} per step")
        for where, n in self.reads.sources.most_common(8):
            lines.append(f"host reads, {n / self.steps:.0f} per step, from: {where}")
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        lines.append(events.table(sort_by=sort, row_limit=25))
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
        text = "\n".join(lines)
        print(text, flush=True)
        out = os.environ.get("OUT")
        if out:
            (Path(out) / f"profile-{self.name}.txt").write_text(text + "\n", encoding="utf-8")


class PhaseTimer:
    """Wall time of a window of steps, then of each phase of the instrumented steps after it.

    :meth:`step_end` is called after every optimizer step (1-based). The window runs from the end of
    step ``warmup`` to the end of step ``warmup + steps``; the steps after it are instrumented: every
    phase is bracketed by a device synchronization.
    """

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        """Window after ``warmup`` steps, ``steps`` long."""
        self.cuda = device.type == "cuda"
        self.warmup = warmup
        self.steps = steps
        self.active = False
        self.sums = dict.fromkeys(PHASES, 0.0)
        self.total = 0.0
        self.instrumented = 0
        self.window: float | None = None
        self._window_start = 0.0
        self._last = 0.0
        self._open: dict[str, float] = {}
        self.first_step_at: float | None = None

    def now(self) -> float:
        """``perf_counter`` after the device's queued work is done."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_end(self, step: int) -> None:
        """Called after optimizer step ``step``."""
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        if step == self.warmup:
            self._window_start = self.now()
        elif step == self.warmup + self.steps:
            t = self.now()
            self.window = t - self._window_start
            self.active = True
            self._last = t
        elif self.active:
            t = self.now()
            self.total += t - self._last
            self._last = t
            self.instrumented += 1

    def begin(self, name: str) -> None:
        """Start phase ``name`` (instrumented steps only)."""
        if self.active:
            self._open[name] = self.now()

    def end(self, name: str) -> None:
        """End phase ``name``."""
        if self.active and name in self._open:
            self.sums[name] += self.now() - self._open.pop(name)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def per_step(self) -> dict[str, float]:
        """Mean seconds per instrumented step by phase; ``other`` is the step's time left over."""
        if not self.instrumented:
            return {}
        out = {k: v / self.instrumented for k, v in self.sums.items() if k != "other"}
        out["other"] = max(0.0, self.total / self.instrumented - sum(out.values()))
        out["step"] = self.total / self.instrumented
        return out


class _TimedLoader:
    """An iterable over ``inner`` whose ``next()`` calls are timed as the ``data`` phase."""

    def __init__(self, inner: Any, timer: PhaseTimer, on_batch: Callable[[Any], None]) -> None:
        self.inner = inner
        self.timer = timer
        self.on_batch = on_batch

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.inner)
        while True:
            self.timer.begin("data")
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.timer.end("data")
            self.on_batch(batch)
            yield batch


def _wrap(fn: Callable[..., Any], timer: PhaseTimer, name: str) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer.phase(name):
            return fn(*args, **kwargs)

    return timed


class _Shapes:
    """Token counts of the first batch: the language model's padded prompt and the vision patches per frame."""

    def __init__(self) -> None:
        self.tokens = 0
        self.patches = 0

    def see(self, batch: Any) -> None:
        if self.tokens:
            return
        from vlacl.models.base import BACKBONE_INPUTS

        inputs = batch[BACKBONE_INPUTS]
        self.tokens = int(inputs["input_ids"].shape[1])
        self.patches = int(inputs["pixel_values"].shape[1])  # (N, P, D): P patches per frame


def flops_per_sample(model: nn.Module, *, tokens: int, patches: int) -> dict[str, float]:
    """Training FLOPs per sample by part (see the module docstring): 4N/2N backbone, 6N adapters and head."""
    vision_trains = any(p.requires_grad and "visual." in n for n, p in model.named_parameters())
    out = {"vision": 0.0, "language_model": 0.0, "adapters": 0.0, "head": 0.0}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv3d):
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if "lm_head" in name:  # not run: the backbone stops at the last hidden state
            continue
        if "visual." in name:
            seen = patches // 4 if ".merger." in name else patches  # the merger sees 2x2-merged tokens
            part = "vision"
        elif "language_model." in name:
            seen, part = tokens, "language_model"
        else:
            seen, part = 1, "head"
        if ".lora_" in name:
            out["adapters"] += 6.0 * params * seen
        elif part == "head":
            out["head"] += (6.0 if module.weight.requires_grad else 2.0) * params
        elif part == "vision":
            backward = vision_trains and isinstance(module, nn.Linear)  # the patch embedding needs no input grad
            out["vision"] += (4.0 if backward else 2.0) * params * seen
        else:
            out["language_model"] += 4.0 * params * seen
    out["total"] = sum(out.values())
    return out


def _cuda_peaks(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def train_task_flags(spec: RunSpec, *, first: bool = False) -> list[str]:
    """The ``vlacl train-task`` command line of the vlacl run (``first``: its chained task-0 run).

    The child runs exactly this command line through vlacl's own CLI, so a flag it does not know
    (``--compile`` before train-task has it) fails that run with train-task's usage error.
    """
    cuda = spec.device == "cuda"
    task, steps, batch, out = spec.task, spec.total, spec.batch, spec.out_dir
    options = spec.cl_opts
    if first:
        task, steps, batch, out = "#0", spec.prev_steps, spec.prev_batch or spec.batch, spec.prev_dir
        options = spec.prev_cl_opts
    flags = [
        "vlacl",
        "train-task",
        f"--model={spec.model_dir}",
        f"--dataset={spec.data_dir}",
        f"--stats={spec.stats_dir}",
        f"--task={task}",
        f"--steps={steps}",
        f"--batch-size={batch}",
        "--history=1",
        f"--chunk={CHUNK}",
        f"--precision={'bf16' if cuda else 'fp32'}",
        f"--device={'cuda' if cuda else 'cpu'}",
        f"--workers={spec.workers}",
        f"--head={spec.head}",
        f"--lora-rank={LORA_RANK}",
        f"--lora-targets={spec.targets}",
        "--set=val_fraction=0",
        "--val-every=0",
        "--save-every=0",
        f"--log-every={LOG_EVERY}",
    ]
    if spec.cl != "seq":
        flags += [f"--cl={spec.cl}", *(f"--cl-opt={o}" for o in options)]
    if spec.prev_steps and not first:
        flags.append(f"--prev={spec.prev_dir}")
    if not first:
        flags += spec.extra_flags
    return [*flags, "--resume=never", "--overwrite", f"--out={out}"]


def launch_prefix(processes: int, device: str, port: int) -> list[str]:
    """``accelerate launch`` (as ``python -m accelerate.commands.launch``) of ``processes`` DDP processes.

    The repository's ``examples/accelerate/ddp.yaml``, the process count and a free rendezvous port.
    On a CPU the processes join through gloo (vlacl's accelerator runs with ``cpu=True``).
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(DDP_CONFIG),
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16" if device == "cuda" else "no",
        "--main_process_port",
        str(port),
    ]


def user_command(spec: RunSpec, flags: list[str]) -> str:
    """The command a user types for ``flags``: plain ``vlacl``, or under ``accelerate launch`` for DDP."""
    if spec.processes <= 1:
        return " ".join(flags)
    launch = f"accelerate launch --config_file {DDP_CONFIG.relative_to(ROOT)} --num_processes {spec.processes}"
    return f"{launch} -m {' '.join(flags)}"


def _train_cli(flags: list[str]) -> None:
    """Run ``flags`` (``vlacl ...``) through vlacl's command line in this process; a non-zero exit raises."""
    from vlacl.cli import main as vlacl_main

    try:
        vlacl_main(flags[1:])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"vlacl {flags[1]} exited with code {exc.code} (its message is above)") from None


def _is_main_process() -> bool:
    """Rank 0 of a DDP launch, or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def run_vlacl(spec: RunSpec) -> RunResult:
    """The vlacl run: ``vlacl train-task`` (its CLI, in this process), timed by hooks on the trainer.

    ``run_train_task`` is wrapped to add the timer's progress callback; the trainer's loader, model,
    ``accelerator.backward`` and ``optimizer.step`` are hooked for the instrumented steps. A chained
    run (``prev_steps > 0``) first trains task 0 with the same algorithm, untimed. With
    ``force_refresh_at``, MIR's cache is emptied before that step, so that its refresh (the one due
    every ``refresh`` steps) falls inside the timed window; each refresh is timed.
    """
    from vlacl.artifacts.names import MANIFEST_NAME
    from vlacl.training import loop
    from vlacl.training.checkpoint import METRICS_LOG_NAME

    flags = train_task_flags(spec)
    result = RunResult(spec.impl, spec.variant, batch=spec.batch, cl=spec.cl, processes=spec.processes, flags=flags)
    device = torch.device(spec.device)
    if spec.prev_steps:
        result.prev_flags = train_task_flags(spec, first=True)
        print("task 0 = " + " ".join(result.prev_flags), flush=True)
        t = time.perf_counter()
        _train_cli(result.prev_flags)
        result.prev_s = time.perf_counter() - t
    timer = PhaseTimer(device, spec.warmup, spec.steps)
    shapes = _Shapes()
    stamps: list[float] = []
    captured: dict[str, Any] = {}
    original_run = loop.run_train_task
    original_train = loop._Trainer.train

    profiler = _StepProfiler(spec, device)

    def progress(p: Any) -> None:
        if p.phase == "train":
            stamps.append(time.perf_counter())
            timer.step_end(p.step)
            profiler.step_end(p.step)

    def timed_run(*args: Any, **kwargs: Any) -> Any:
        shown = kwargs.get("progress")

        def both(p: Any) -> None:
            progress(p)
            if shown is not None:
                shown(p)

        kwargs["progress"] = both
        captured["start"] = time.perf_counter()
        trained = original_run(*args, **kwargs)
        captured["end"] = time.perf_counter()
        captured["trained"] = trained
        return trained

    def instrumented_train(trainer: Any) -> None:
        trainer.loader = _TimedLoader(trainer.loader, timer, shapes.see)
        trainer.model.register_forward_pre_hook(lambda *_: timer.begin("forward"))
        trainer.model.register_forward_hook(lambda *_: timer.end("forward"))
        trainer.acc.backward = _wrap(trainer.acc.backward, timer, "backward")
        trainer.optimizer.step = _wrap(trainer.optimizer.step, timer, "optimizer")
        original_train(trainer)

    setattr(loop, "run_train_task", timed_run)  # noqa: B010 (train-task imports it from the module when it runs)
    setattr(loop._Trainer, "train", instrumented_train)  # noqa: B010 (a method of a class, replaced for this run)
    if spec.force_refresh_at is not None:
        _force_mir_refresh(spec.force_refresh_at, timer, result.refreshes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print("measured = " + user_command(spec, flags), flush=True)
    _train_cli(flags)
    trained = captured["trained"]
    result.peak_allocated_gib, result.peak_reserved_gib = _cuda_peaks(device)
    _fill(result, spec, timer, shapes, trained.policy, captured["start"])
    result.final_loss = trained.final_loss
    result.step_times_s = [b - a for a, b in zip([captured["start"], *stamps], stamps, strict=False)]
    if stamps:
        result.finish_s = captured["end"] - stamps[-1]
    out = Path(spec.out_dir)
    result.checkpoint_written = trained.out is not None and (out / MANIFEST_NAME).is_file()
    if result.checkpoint_written:
        records = [json.loads(x) for x in (out / METRICS_LOG_NAME).read_text().splitlines()]
        result.logged_samples_per_s = [r["samples_per_s"] for r in records if r.get("samples_per_s")]
    result.ok = True
    return result


def _force_mir_refresh(at: int, timer: PhaseTimer, refreshes: list[list[float]]) -> None:
    """Make MIR refresh its cache at step ``at`` (0-based) as well, and time every refresh into ``refreshes``."""
    from vlacl.cl.mir import MaximallyInterferedRetrieval

    modify_batch = MaximallyInterferedRetrieval.modify_batch
    refresh_cache = MaximallyInterferedRetrieval.refresh_cache
    forced: list[int] = []

    def forcing_modify_batch(self: Any, batch: dict[str, Any], task: int) -> dict[str, Any]:
        if self.ctx is not None and self.ctx.step == at and not forced:
            forced.append(at)
            self.cache = []  # an empty cache is refreshed from this step's batch, as at the task's first step
        result: dict[str, Any] = modify_batch(self, batch, task)
        return result

    def timed_refresh_cache(self: Any, ctx: Any, batch: Any) -> None:
        start = timer.now()
        refresh_cache(self, ctx, batch)
        refreshes.append([float(ctx.step), timer.now() - start])

    setattr(MaximallyInterferedRetrieval, "modify_batch", forcing_modify_batch)  # noqa: B010 (this run only)
    setattr(MaximallyInterferedRetrieval, "refresh_cache", timed_refresh_cache)  # noqa: B010 (this run only)


def _fill(result: RunResult, spec: RunSpec, timer: PhaseTimer, shapes: _Shapes, model: nn.Module, start: float) -> None:
    if timer.window is not None:
        result.step_s = timer.window / spec.steps
        result.samples_per_s = spec.batch * spec.processes * spec.steps / timer.window  # every process's samples
    result.phases_s = timer.per_step()
    result.phase_steps = timer.instrumented
    result.setup_s = (timer.first_step_at or start) - start
    result.lm_tokens, result.vision_patches = shapes.tokens, shapes.patches
    result.flops_per_sample = flops_per_sample(model, tokens=shapes.tokens, patches=shapes.patches)
    result.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.total_params = sum(p.numel() for p in model.parameters())


class _BaselineCollate:
    """``Policy.collate`` without the policy: the default collate, then the backbone's ``prepare`` of the frames."""

    def __init__(self, prepare: Callable[..., dict[str, torch.Tensor]]) -> None:
        self.prepare = prepare

    def __call__(self, samples: list[Mapping[str, Any]]) -> dict[str, Any]:
        from torch.utils.data import default_collate

        from vlacl.models.base import BACKBONE_INPUTS

        batch: dict[str, Any] = default_collate(list(samples))
        frames = batch.pop("observation.images.front")  # (B, W, H, W_img, C)
        batch[BACKBONE_INPUTS] = self.prepare({"front": frames.flatten(0, 1)}, list(batch["instruction"]))
        return batch


def run_baseline(spec: RunSpec) -> RunResult:
    """The plain loop: PEFT LoRA on the HF model, the head, eager autocast bf16, default AdamW, plain DataLoader."""
    from peft import LoraConfig, get_peft_model

    from vlacl.config.policy import PolicyConfig
    from vlacl.data.keymap import KeyMap
    from vlacl.data.normalize import load_stats
    from vlacl.data.windows import WindowSpec
    from vlacl.models.base import BACKBONE_INPUTS
    from vlacl.models.heads import build_head
    from vlacl.models.hf import load_hf_backbone
    from vlacl.models.hf_families import QWEN2_5_VL
    from vlacl.models.policy import binary_action_dims
    from vlacl.training.data import build_task_data

    result = RunResult("baseline", spec.variant, batch=spec.batch)
    device = torch.device(spec.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    torch.manual_seed(0)
    stats = load_stats(Path(spec.stats_dir))
    data = build_task_data(
        [Path(spec.data_dir)], stats, keymap=KeyMap(), task=0, spec=WindowSpec(1, CHUNK), val_fraction=0.0
    )
    # the model loaded as vlacl loads it (from_pretrained, SDPA, bf16 on a GPU); its processor makes the batches
    loaded = load_hf_backbone(spec.model_dir, dtype=torch.bfloat16 if cuda else None)
    hf: Any = loaded.model
    targets = loaded.lora_target_modules(spec.targets)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.05, target_modules=targets)
    peft_model: Any = get_peft_model(hf, lora)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 master LoRA weights
    hidden = loaded.hidden_size
    state_width = PolicyConfig().state_width
    binary, low, high = binary_action_dims(stats.data)
    state_proj = nn.Linear(STATE_DIM, state_width)
    head: Any = build_head(
        PolicyConfig(head=spec.head),  # type: ignore[arg-type]
        hidden + state_width,
        ACTION_DIM,
        CHUNK,
        1,
        binary_dims=binary,
        binary_low=low,
        binary_high=high,
    )
    model = nn.ModuleDict({"hf": peft_model, "state_proj": state_proj, "head": head}).to(device)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    head_params = [*state_proj.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": 1e-4}, {"params": head_params, "lr": 1e-3}])
    loader = torch.utils.data.DataLoader(
        data.train,
        batch_size=spec.batch,
        shuffle=True,
        drop_last=True,
        num_workers=spec.workers,
        collate_fn=_BaselineCollate(loaded.prepare),
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    keys = QWEN2_5_VL.input_keys
    timer = PhaseTimer(device, spec.warmup, spec.steps)
    shapes = _Shapes()

    def batches() -> Iterator[dict[str, Any]]:
        while True:
            yield from loader

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out[BACKBONE_INPUTS] = {k: v.to(device) for k, v in batch[BACKBONE_INPUTS].items() if k in keys}
        return out

    def loss_of(batch: dict[str, Any]) -> torch.Tensor:
        inputs = dict(batch[BACKBONE_INPUTS])
        inputs["pixel_values"] = inputs["pixel_values"].flatten(0, 1).to(torch.bfloat16 if cuda else torch.float32)
        inputs["image_grid_thw"] = inputs["image_grid_thw"].flatten(0, 1)  # (B, 1, 3) -> (B, 3)
        with autocast:
            states = hf.model(**inputs, use_cache=False, return_dict=True).last_hidden_state  # (B, L, D)
            mask = inputs["attention_mask"]
            last = (mask.long() * torch.arange(mask.shape[1], device=device)).argmax(dim=1)  # (B,)
            feature = states[torch.arange(states.shape[0], device=device), last].float()  # (B, D)
            cond = torch.cat([feature[:, None], state_proj(batch["observation.state"])], dim=-1)  # (B, 1, C)
            target = batch["action"]  # (B, K, A)
            weights = (~batch["action_is_pad"].bool()).float()[:, :, None].expand_as(target)  # (B, K, A)
            terms, _ = head.loss(cond, target, weights)
            return sum(terms.values(), torch.zeros((), device=device))

    model.train()
    it = batches()
    loss: Any = torch.zeros(())
    for step in range(1, spec.total + 1):
        with timer.phase("data"):
            raw = next(it)
            shapes.see(raw)
            batch = to_device(raw)
        with timer.phase("forward"):
            loss = loss_of(batch)
        with timer.phase("backward"):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + head_params, 1.0)
        with timer.phase("optimizer"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % LOG_EVERY == 0:
            float(loss.detach())  # a plain loop's logging
        timer.step_end(step)
    result.peak_allocated_gib, result.peak_reserved_gib = _cuda_peaks(device)
    _fill(result, spec, timer, shapes, model, start)
    result.final_loss = float(loss)
    result.ok = True
    return result


def child_main(spec_file: Path) -> None:
    """Run one :class:`RunSpec` and write its :class:`RunResult` as JSON (rank 0 only under DDP)."""
    spec = RunSpec(**json.loads(spec_file.read_text(encoding="utf-8")))
    if spec.device == "cpu":
        torch.set_num_threads(1)  # a smoke test: leave the machine's other cores alone
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # each DDP process on its own GPU
        torch.cuda.current_device()  # initializes CUDA before the peak memory statistics are reset
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runner = run_vlacl if spec.impl.startswith("vlacl") else run_baseline
    result = runner(spec)
    if _is_main_process():
        Path(spec.result_file).write_text(json.dumps(asdict(result), indent=1), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The parent: build, run the children, report


def environment(device: str) -> dict[str, str]:
    """GPU, library versions, commit and date."""
    import accelerate  # type: ignore[import-untyped]
    import peft
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "cpus": str(os.cpu_count()),
        "shm_free_gib": _fmt(shm_free_gib(), ".1f"),
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
    }
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        env["commit"] = commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown (no git checkout)"
    return env


def shm_free_gib() -> float | None:
    """Free space of ``/dev/shm``, where loader workers hand their batches over (``None`` where there is none)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize / 2**30


def default_workers(device: str) -> int:
    """Loader workers: 8 on a GPU machine (16 CPUs), fewer where ``/dev/shm`` cannot hold their prefetched batches.

    A batch of 64 frames is about 80 MB of pixel values; 8 workers prefetching 4 batches each need 2.5 GB.
    """
    if device != "cuda":
        return 0
    shm = shm_free_gib()
    if shm is None or shm >= 8:
        return 8
    workers = 2 if shm >= 2 else 0
    print(f"/dev/shm has {shm:.1f} GiB free: {workers} loader workers instead of 8 (--workers to override)", flush=True)
    return workers


def free_port() -> int:
    """A TCP port free on this machine now (the DDP rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_child(spec: RunSpec, log_file: Path, timeout: float) -> RunResult:
    """Run ``spec`` in a child process (under ``accelerate launch`` for DDP); a failure gives a failed result."""
    spec_file = Path(spec.result_file).with_suffix(".spec.json")
    spec_file.write_text(json.dumps(asdict(spec)), encoding="utf-8")
    Path(spec.result_file).unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file)]
    if spec.processes > 1:
        command = [*launch_prefix(spec.processes, spec.device, free_port()), *command[1:]]
    with log_file.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child, its loader workers, the DDP processes
            proc.wait()
            code = None
    result_path = Path(spec.result_file)
    if code == 0 and result_path.is_file():
        return RunResult(**json.loads(result_path.read_text(encoding="utf-8")))
    tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:]
    reason = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
    print(f"  {label(spec)} failed ({reason}); last lines of {log_file}:", flush=True)
    for line in tail:
        print(f"    {line[:300]}", flush=True)
    last = next((line for line in reversed(tail) if line.strip()), "")
    return RunResult(
        spec.impl,
        spec.variant,
        ok=False,
        error=f"{reason}: {last[:300]}",
        batch=spec.batch,
        cl=spec.cl,
        processes=spec.processes,
    )


def label(spec: RunSpec) -> str:
    """``variant/impl``, with the CL algorithm and the process count where they are not the defaults."""
    out = f"{spec.variant}/{spec.impl}"
    if spec.cl != "seq":
        out += f"/{spec.cl}"
    if spec.processes > 1:
        out += f" x{spec.processes}"
    return out


def mfu(result: RunResult, peak: float) -> float | None:
    """Model FLOPs utilization of a run against the measured matmul peak."""
    total = result.flops_per_sample.get("total")
    if not result.samples_per_s or not total or peak <= 0:
        return None
    return total * result.samples_per_s / peak


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    """``value * scale`` formatted by ``spec``; ``-`` as wide as the spec's width for none."""
    if value is None:
        width = spec.split(".", 1)[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(value * scale, spec)


ROW_HEADER = (
    f"{'variant':7} {'impl':16} {'batch':>5} {'samples/s':>9} {'step ms':>8} {'data %':>6} {'data':>6} "
    f"{'fwd':>7} {'bwd':>7} {'optim':>6} {'other':>6} {'peak GiB':>8} {'TFLOP/s':>7} {'MFU %':>6}"
)


def row(result: RunResult, peak: float) -> str:
    """One line of the table (phase columns in ms per instrumented step)."""
    if not result.ok:
        return f"{result.variant:7} {result.impl:16} {result.batch:>5} FAILED: {result.error}"
    ph = result.phases_s
    share = ph["data"] / ph["step"] if ph.get("step") else None
    total = result.flops_per_sample.get("total")
    achieved = total * result.samples_per_s / 1e12 if result.samples_per_s is not None and total else None
    return (
        f"{result.variant:7} {result.impl:16} {result.batch:>5} {_fmt(result.samples_per_s, '9.1f')} "
        f"{_fmt(result.step_s, '8.1f', 1e3)} {_fmt(share, '6.1f', 100)} {_fmt(ph.get('data'), '6.1f', 1e3)} "
        f"{_fmt(ph.get('forward'), '7.1f', 1e3)} {_fmt(ph.get('backward'), '7.1f', 1e3)} "
        f"{_fmt(ph.get('optimizer'), '6.1f', 1e3)} {_fmt(ph.get('other'), '6.1f', 1e3)} "
        f"{_fmt(result.peak_allocated_gib, '8.1f')} {_fmt(achieved, '7.1f')} {_fmt(mfu(result, peak), '6.1f', 100)}"
    )


def _rate(result: RunResult | None) -> float | None:
    return result.samples_per_s if result is not None and result.ok else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(results: list[RunResult], peak: float) -> list[dict[str, Any]]:
    """Per variant: vlacl, vlacl+compile and baseline samples/s, the ratios and the targets."""
    out = []
    for name in dict.fromkeys(r.variant for r in results):
        by = {r.impl: r for r in results if r.variant == name}
        v, c, b = by.get("vlacl"), by.get("vlacl+compile"), by.get("baseline")
        variant = VARIANTS[name]
        data_share = None
        if v and v.phases_s.get("step"):
            data_share = v.phases_s["data"] / v.phases_s["step"]
        out.append(
            {
                "variant": name,
                "vlacl_samples_per_s": _rate(v),
                "compile_samples_per_s": _rate(c),
                "baseline_samples_per_s": _rate(b),
                "ratio": _ratio(_rate(v), _rate(b)),
                "compile_ratio": _ratio(_rate(c), _rate(b)),
                "compile_over_vlacl": _ratio(_rate(c), _rate(v)),
                "target_ratio": variant.target_ratio,
                "vlacl_mfu": mfu(v, peak) if v else None,
                "compile_mfu": mfu(c, peak) if c else None,
                "baseline_mfu": mfu(b, peak) if b else None,
                "vlacl_data_share": data_share,
                "vlacl_peak_gib": v.peak_allocated_gib if v else None,
                "baseline_peak_gib": b.peak_allocated_gib if b else None,
            }
        )
    return out


def _verdict(value: float | None, target: float | None, *, at_most: bool = False) -> str:
    if value is None or target is None:
        return ""
    ok = value <= target if at_most else value >= target
    return "met" if ok else "MISSED"


def print_summary(rows: list[dict[str, Any]]) -> None:
    """The ratio table with the targets (compile columns when a vlacl+compile run was made)."""
    compiled = any(s["compile_samples_per_s"] is not None for s in rows)
    print("\nvlacl / baseline (targets: samples/s >= 3x at a, >= 1.5x at b; MFU >= 25%; data wait <= 5% of the step)")
    extra = f" {'compile/s':>9} {'c ratio':>7} {'c/vlacl':>7} {'c MFU%':>6}" if compiled else ""
    print(
        f"{'variant':7} {'vlacl/s':>8} {'base/s':>8} {'ratio':>6} {'target':>6} {'':6} {'vlacl MFU%':>10} {'':6} "
        f"{'base MFU%':>9} {'data %':>6} {'':6} {'peak GiB v/b':>13}{extra}"
    )
    for s in rows:
        target = s["target_ratio"]
        peaks = f"{_fmt(s['vlacl_peak_gib'], '.1f')}/{_fmt(s['baseline_peak_gib'], '.1f')}"
        line = (
            f"{s['variant']:7} {_fmt(s['vlacl_samples_per_s'], '8.1f')} {_fmt(s['baseline_samples_per_s'], '8.1f')} "
            f"{_fmt(s['ratio'], '6.2f')} {_fmt(target, '6.1f')} {_verdict(s['ratio'], target):6} "
            f"{_fmt(s['vlacl_mfu'], '10.1f', 100)} {_verdict(s['vlacl_mfu'], TARGET_MFU):6} "
            f"{_fmt(s['baseline_mfu'], '9.1f', 100)} {_fmt(s['vlacl_data_share'], '6.1f', 100)} "
            f"{_verdict(s['vlacl_data_share'], TARGET_DATA_SHARE, at_most=True):6} {peaks:>13}"
        )
        if compiled:
            line += (
                f" {_fmt(s['compile_samples_per_s'], '9.1f')} {_fmt(s['compile_ratio'], '7.2f')} "
                f"{_fmt(s['compile_over_vlacl'], '7.2f')} {_fmt(s['compile_mfu'], '6.1f', 100)}"
            )
        print(line)


def print_impls(results: list[RunResult], peak: float) -> None:
    """Every run of the main table against its variant's baseline: samples/s, ratio, MFU, peak memory."""
    print("\nper run: samples/s, ratio to the baseline of the same variant, MFU, peak GiB allocated")
    print(f"{'variant':7} {'impl':16} {'samples/s':>9} {'ratio':>6} {'MFU%':>6} {'peak GiB':>8}")
    for r in results:
        base = next((b for b in results if b.variant == r.variant and b.impl == "baseline" and b.ok), None)
        ratio = _ratio(_rate(r), _rate(base)) if r.impl != "baseline" else None
        print(
            f"{r.variant:7} {r.impl:16} {_fmt(_rate(r), '9.1f')} {_fmt(ratio, '6.2f')} "
            f"{_fmt(mfu(r, peak) if r.ok else None, '6.1f', 100)} {_fmt(r.peak_allocated_gib, '8.1f')}"
        )


# ---------------------------------------------------------------------------------------------
# Continual-learning overhead and DDP


CL_METHOD = """\
Continual-learning overhead: every algorithm trains task 0 for {prev} steps (batch {prev_batch}, untimed: task 1
then has a memory, a Fisher), then task 1 with --prev for {warmup} warm-up + {steps} timed steps at batch {batch},
in one child process per algorithm. ER and MIR train on the batch joined with {replay} replayed samples
('trained'); samples/s counts the task's samples. MIR (refresh={refresh}) scores its memory at the task's first
step (a warm-up step) and every {refresh} steps after; so that the timed window holds one refresh, its cache is
emptied before timed step {forced} of {steps} (the task's step {forced_step}, from 0), which makes MIR refresh
there as at step {refresh}. 'refresh +ms' is that step's time over the median of the other timed steps (the
scoring, its loader, the restarted replay loader); 'refresh s' the scoring itself between two synchronizations.
MIR's ms/step = (window - refresh +ms) / {steps} + refresh +ms / {refresh}: the mean step over a whole refresh
period; 'window ms' is the plain mean over the timed window (one refresh per {steps} steps, {over:.0f}x more often
than at refresh={refresh}). ER and EWC: ms/step = the window's mean. EWC's Fisher is taken on
fisher_samples={fisher} samples at the end of each task (after the window: it does not enter the step time)."""

CL_HEADER = (
    f"{'algorithm':9} {'batch':>5} {'trained':>7} {'samples/s':>9} {'ms/step':>8} {'window ms':>9} {'refresh s':>9} "
    f"{'refresh +ms':>11} {'/ ER':>6} {'target':>6} {'':6} {'peak GiB':>8} {'final loss':>10}"
)


def trained_batch(algorithm: str, batch: int) -> int:
    """Samples of one trained batch: the task's, plus the replayed ones for ER and MIR."""
    from vlacl.cl.er import replay_batch_size

    return batch + replay_batch_size(batch, 0.5) if algorithm in ("er", "mir") else batch


def cl_figures(result: RunResult, spec: RunSpec) -> dict[str, Any]:
    """The mean step of a CL run over its timed window, MIR's window refresh spread over ``MIR_REFRESH`` steps."""
    out: dict[str, Any] = {
        "algorithm": spec.cl,
        "ok": result.ok,
        "error": result.error,
        "batch": spec.batch,
        "trained_batch": trained_batch(spec.cl, spec.batch),
        "window_step_s": result.step_s,
        "step_s": None,
        "samples_per_s": None,
        "refresh_s": None,
        "refresh_extra_s": None,
        "peak_allocated_gib": result.peak_allocated_gib,
        "final_loss": result.final_loss,
    }
    if not result.ok or result.step_s is None:
        return out
    first, last = spec.warmup, spec.warmup + spec.steps  # 0-based steps of the timed window
    times = result.step_times_s[first:last]
    extra = 0.0
    at = spec.force_refresh_at
    if at is not None and first <= at < min(last, len(result.step_times_s)):
        others = [t for i, t in enumerate(times, start=first) if i != at]
        extra = max(0.0, result.step_times_s[at] - statistics.median(others)) if others else 0.0
        out["refresh_extra_s"] = extra
        out["refresh_s"] = next((s for step, s in result.refreshes if int(step) == at), None)
    window = result.step_s * spec.steps
    step = (window - extra) / spec.steps + (extra / MIR_REFRESH if at is not None else 0.0)
    out["step_s"] = step
    out["samples_per_s"] = spec.batch * spec.processes / step
    out["median_step_s"] = statistics.median(times) if times else None
    out["refreshes"] = result.refreshes
    return out


def cl_row(fig: dict[str, Any], er: dict[str, Any] | None) -> str:
    """One line of the CL table; the ratio is to ER's ms/step."""
    if not fig["ok"]:
        return f"{fig['algorithm']:9} {fig['batch']:>5} FAILED: {fig['error']}"
    ratio = _ratio(fig["step_s"], er["step_s"] if er else None)
    fig["ratio_to_er"] = ratio
    target = CL_TARGETS.get(fig["algorithm"])
    return (
        f"{fig['algorithm']:9} {fig['batch']:>5} {fig['trained_batch']:>7} {_fmt(fig['samples_per_s'], '9.1f')} "
        f"{_fmt(fig['step_s'], '8.1f', 1e3)} {_fmt(fig['window_step_s'], '9.1f', 1e3)} "
        f"{_fmt(fig['refresh_s'], '9.2f')} {_fmt(fig['refresh_extra_s'], '11.1f', 1e3)} {_fmt(ratio, '6.3f')} "
        f"{_fmt(target, '6.2f')} {_verdict(ratio, target, at_most=True):6} {_fmt(fig['peak_allocated_gib'], '8.1f')} "
        f"{_fmt(fig['final_loss'], '10.4f')}"
    )


DDP_HEADER = (
    f"{'processes':9} {'batch/proc':>10} {'samples/s':>9} {'step ms':>8} {'logged/s':>9} {'scaling':>7} "
    f"{'target':>6} {'':6} {'peak GiB':>8} {'final loss':>10}"
)


def ddp_row(result: RunResult, single: RunResult | None) -> tuple[str, float | None]:
    """One line of the DDP table and the scaling over the one-process run."""
    if not result.ok:
        return f"{result.processes:9} {result.batch:>10} FAILED: {result.error}", None
    scaling = _ratio(result.samples_per_s, _rate(single)) if result.processes > 1 else None
    target = TARGET_DDP_EFFICIENCY * result.processes if result.processes > 1 else None
    logged = result.logged_samples_per_s[-1] if result.logged_samples_per_s else None
    line = (
        f"{result.processes:9} {result.batch:>10} {_fmt(result.samples_per_s, '9.1f')} "
        f"{_fmt(result.step_s, '8.1f', 1e3)} {_fmt(logged, '9.1f')} {_fmt(scaling, '7.2f')} {_fmt(target, '6.2f')} "
        f"{_verdict(scaling, target):6} {_fmt(result.peak_allocated_gib, '8.1f')} {_fmt(result.final_loss, '10.4f')}"
    )
    return line, scaling


# ---------------------------------------------------------------------------------------------
# The command line and the parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("full", "tiny"), default="full", help="real sizes, or tiny stand-ins")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if there is one")
    parser.add_argument("--variants", default="a,b,small", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--impls", default="vlacl,baseline", help=f"comma-separated, of {', '.join(IMPLS)}; none: no main table"
    )
    parser.add_argument("--compile", action="store_true", help="add the vlacl+compile impl: train-task --compile")
    parser.add_argument("--head", choices=("flow", "mlp"), default=None, help="override every variant's head")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 when tiny)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (samples/s, step time, MFU)")
    parser.add_argument(
        "--phase-steps", type=int, default=None, help="instrumented steps after them, for the breakdown (4; 2 tiny)"
    )
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: 8 on a GPU, 0 on a CPU)")
    cl = parser.add_argument_group("continual-learning overhead (--cl-bench)")
    cl.add_argument("--cl-bench", action="store_true", help="time ER, MIR and EWC on task 1 at variant b's shape")
    cl.add_argument(
        "--cl-variants", default="er,mir,ewc", help="algorithms, comma-separated (er is always run; seq: EWC/seq too)"
    )
    cl.add_argument("--cl-batch", type=int, default=None, help="task batch (default: variant b's, 64; 8 tiny)")
    cl.add_argument("--cl-warmup", type=int, default=None, help="untimed steps of task 1 (default 3; 1 tiny)")
    cl.add_argument("--cl-steps", type=int, default=None, help="timed steps of task 1 (default 20; 4 tiny)")
    ddp = parser.add_argument_group("DDP (--ddp N)")
    ddp.add_argument("--ddp", type=int, default=0, help="also run the first variant's vlacl run on N processes")
    ddp.add_argument(
        "--ddp-impl",
        choices=[i for i in IMPLS if i.startswith("vlacl")],
        default="vlacl",
        help="which vlacl run goes on N processes (and its one-process reference)",
    )
    ddp.add_argument("--ddp-cl", default="mir,ewc", help="algorithms trained on task 1 under DDP (none: skip)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept, and reused when run again; default: temp")
    parser.add_argument("--json-out", type=Path, default=None, help="JSON of every figure, rewritten after each run")
    parser.add_argument("--run-timeout", type=float, default=240.0, help="seconds a run may take")
    parser.add_argument("--deadline", type=float, default=570.0, help="seconds for everything; later runs skipped")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.shape == "tiny"
    if args.warmup is None:
        args.warmup = 1 if tiny else 3
    if args.phase_steps is None:
        args.phase_steps = 2 if tiny else 4
    if args.cl_batch is None:
        args.cl_batch = VARIANTS["b"].tiny_batch if tiny else VARIANTS["b"].batch
    if args.cl_warmup is None:
        args.cl_warmup = 1 if tiny else 3
    if args.cl_steps is None:
        args.cl_steps = 4 if tiny else 20
    if args.warmup < 1 or args.steps < 1 or args.phase_steps < 0:
        parser.error("--warmup and --steps must be >= 1, --phase-steps >= 0")
    if args.cl_batch < 1 or args.cl_warmup < 1 or args.cl_steps < 2:
        parser.error("--cl-batch and --cl-warmup must be >= 1, --cl-steps >= 2")
    if args.ddp < 0 or args.ddp == 1:
        parser.error(f"--ddp {args.ddp}: give the number of processes, 2 or more (0: no DDP runs)")
    impls = [i.strip() for i in args.impls.split(",") if i.strip() and i.strip() != "none"]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impls: unknown {', '.join(unknown)}; use {', '.join(IMPLS)} or none")
    if args.compile and "vlacl+compile" not in impls:
        at = impls.index("vlacl") + 1 if "vlacl" in impls else len(impls)
        impls.insert(at, "vlacl+compile")
    args.impl_list = impls
    args.cl_list = [a.strip() for a in args.cl_variants.split(",") if a.strip()]
    if "er" not in args.cl_list:
        args.cl_list.insert(0, "er")  # the reference of the ratios
    args.cl_list.sort(key=lambda a: a != "er")
    args.ddp_cl_list = [a.strip() for a in args.ddp_cl.split(",") if a.strip() and a.strip() != "none"]
    return args


CL_PREV_STEPS = 2
"""Steps of the untimed task 0 of a CL run (its checkpoint carries the memory, the Fisher)."""
DDP_CL_STEPS = (1, 2)
"""Warm-up and timed steps of task 1 in the DDP runs of MIR and EWC (they show that it trains)."""


class Bench:
    """The parent's state: inputs, the report, the deadline; runs children and records their results."""

    def __init__(self, args: argparse.Namespace, device: str, workers: int, work: Path, report: dict[str, Any]) -> None:
        """Set up from the parsed command line."""
        self.args = args
        self.device = device
        self.workers = workers
        self.work = work
        self.report = report
        self.tiny = args.shape == "tiny"
        self.began = time.perf_counter()
        self.model_dirs: dict[str, Path] = {}
        self.data = Path()
        self.stats = Path()

    def left(self) -> float:
        """Seconds left of ``--deadline``."""
        return float(self.args.deadline - (time.perf_counter() - self.began))

    def save(self) -> None:
        """Write the JSON report (after every run)."""
        if self.args.json_out is not None:
            self.args.json_out.parent.mkdir(parents=True, exist_ok=True)
            self.args.json_out.write_text(json.dumps(self.report, indent=1, default=str), encoding="utf-8")

    def batch(self, variant: Variant) -> int:
        """The variant's batch at this shape."""
        return variant.tiny_batch if self.tiny else variant.batch

    def fisher_samples(self) -> int:
        """EWC's ``fisher_samples`` in these runs: few (the Fisher is taken after the timed steps)."""
        return 4 if self.tiny else 16

    def model_dir(self, variant: Variant) -> Path | str:
        """The variant's model directory (built once), or the error that building it raised."""
        if variant.model not in self.model_dirs:
            shape = MODELS[self.args.shape][variant.model]
            try:
                self.model_dirs[variant.model] = build_model_dir(
                    self.work / f"model-{self.args.shape}-{variant.model}", shape, tiny=self.tiny, device=self.device
                )
            except Exception as exc:  # the other variants still run
                print(f"\n[{variant.name}] building the {shape.description} model failed: {exc!r}", flush=True)
                return f"model build failed: {exc!r}"[:300]
        return self.model_dirs[variant.model]

    def spec(self, variant: Variant, impl: str, name: str, model: Path, **changes: Any) -> RunSpec:
        """The spec of one run under ``runs/<name>`` (the main table's settings, then ``changes``)."""
        run_dir = self.work / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = RunSpec(
            impl=impl,
            variant=variant.name,
            model_dir=str(model),
            data_dir=str(self.data),
            stats_dir=str(self.stats),
            out_dir=str(run_dir / "ckpt"),
            result_file=str(run_dir / "result.json"),
            batch=self.batch(variant),
            targets=variant.targets,
            head=self.args.head or variant.head,
            device=self.device,
            workers=self.workers,
            warmup=self.args.warmup,
            steps=self.args.steps,
            phase_steps=self.args.phase_steps,
            extra_flags=list(IMPL_FLAGS.get(impl, [])),
        )
        for key, value in changes.items():
            setattr(spec, key, value)
        return spec

    def execute(self, spec: RunSpec) -> RunResult:
        """Run ``spec`` unless the deadline is near; its checkpoints are removed afterwards."""
        left = self.left()
        run_dir = Path(spec.result_file).parent
        if left < 30:
            result = RunResult(
                spec.impl,
                spec.variant,
                error=f"skipped: {left:.0f} s left of --deadline",
                batch=spec.batch,
                cl=spec.cl,
                processes=spec.processes,
            )
        else:
            t = time.perf_counter()
            result = run_child(spec, run_dir / "log.txt", min(self.args.run_timeout, left - 5))
            print(f"  ({label(spec)}: {time.perf_counter() - t:.0f} s with set-up)", flush=True)
        shutil.rmtree(spec.out_dir, ignore_errors=True)
        shutil.rmtree(spec.prev_dir, ignore_errors=True)
        return result

    def main_table(self, variants: list[Variant], impls: list[str], peak: float) -> list[RunResult]:
        """The main table: vlacl (and vlacl+compile) against the baseline, per variant."""
        results: list[RunResult] = []
        args = self.args
        print(
            f"\nsteps per run: {args.warmup} warm-up + {args.steps} timed + {args.phase_steps} instrumented; "
            f"workers {self.workers}; phase columns: ms per instrumented step, cuda.synchronize at each phase boundary "
            "(vlacl's loop logs no phase times: its trainer's loader, model, backward and optimizer.step are hooked)",
            flush=True,
        )
        header_printed = False
        for variant in variants:
            model = self.model_dir(variant) if impls else ""
            for impl in impls:
                if isinstance(model, str):
                    result = RunResult(impl, variant.name, error=model)
                else:
                    spec = self.spec(variant, impl, f"{variant.name}-{impl}", model)
                    if impl == impls[0]:
                        print(f"\n[{variant.name}] {variant.description}; head {spec.head}", flush=True)
                    if impl.startswith("vlacl"):
                        print(f"{impl} run = " + " ".join(train_task_flags(spec)), flush=True)
                    result = self.execute(spec)
                results.append(result)
                self.report["runs"].append(asdict(result) | {"mfu": mfu(result, peak)})
                self.report["summary"] = summary(results, peak)
                self.save()
                if not header_printed:
                    print(ROW_HEADER, flush=True)
                    header_printed = True
                print(row(result, peak), flush=True)
                if result.ok and result.flops_per_sample:
                    f = result.flops_per_sample
                    print(
                        f"  tokens: LM {result.lm_tokens}, vision patches {result.vision_patches}; GFLOP/sample "
                        f"vision {f['vision'] / 1e9:.1f}, LM {f['language_model'] / 1e9:.1f}, adapters "
                        f"{f['adapters'] / 1e9:.1f}, head {f['head'] / 1e9:.3f}; trainable "
                        f"{result.trainable_params / 1e6:.1f}M of {result.total_params / 1e9:.3f}B; set-up to step 1 "
                        f"{_fmt(result.setup_s, '.0f')} s; final loss {_fmt(result.final_loss, '.4f')}; after the "
                        f"last step {_fmt(result.finish_s, '.0f')} s",
                        flush=True,
                    )
        if results:
            self.report["summary"] = summary(results, peak)
            print_summary(self.report["summary"])
            print_impls(results, peak)
        return results

    def cl_bench(self) -> None:
        """ER, MIR and EWC on task 1 at variant b's shape: mean step times and the ratios to ER."""
        args = self.args
        variant = VARIANTS["b"]
        batch, warmup, steps = args.cl_batch, args.cl_warmup, args.cl_steps
        forced = warmup + steps // 2
        fisher = self.fisher_samples()
        prev_batch = min(batch, 8)
        print(
            f"\n[cl] {variant.description.replace(f'batch {variant.batch}', f'batch {batch}')}; head "
            f"{args.head or variant.head}; task 1 of 2\n"
            + CL_METHOD.format(
                prev=CL_PREV_STEPS,
                prev_batch=prev_batch,
                warmup=warmup,
                steps=steps,
                batch=batch,
                replay=trained_batch("er", batch) - batch,
                refresh=MIR_REFRESH,
                forced=forced - warmup + 1,
                forced_step=forced,
                over=MIR_REFRESH / steps,
                fisher=fisher,
            ),
            flush=True,
        )
        section: dict[str, Any] = {"method": CL_METHOD, "runs": [], "figures": []}
        self.report["cl"] = section
        model = self.model_dir(variant)
        er: dict[str, Any] | None = None
        header_printed = False
        for algorithm in args.cl_list:
            options = {"mir": [f"refresh={MIR_REFRESH}"], "ewc": [f"fisher_samples={fisher}"]}.get(algorithm, [])
            if isinstance(model, str):
                spec = self.spec(variant, "vlacl", f"cl-{algorithm}", Path(), cl=algorithm, batch=batch)
                result = RunResult("vlacl", variant.name, error=model, batch=batch, cl=algorithm)
            else:
                spec = self.spec(
                    variant,
                    "vlacl",
                    f"cl-{algorithm}",
                    model,
                    batch=batch,
                    warmup=warmup,
                    steps=steps,
                    phase_steps=0,
                    task="#1",
                    cl=algorithm,
                    cl_opts=options,
                    prev_steps=CL_PREV_STEPS,
                    prev_batch=prev_batch,
                    prev_cl_opts=options,
                    force_refresh_at=forced if algorithm == "mir" else None,
                )
                print(f"{algorithm} run = " + " ".join(train_task_flags(spec)), flush=True)
                result = self.execute(spec)
            fig = cl_figures(result, spec)
            if algorithm == "er":
                er = fig if fig["ok"] else None
            if not header_printed:
                print(CL_HEADER, flush=True)
                header_printed = True
            print(cl_row(fig, er), flush=True)
            section["runs"].append(asdict(result))
            section["figures"].append(fig)
            self.save()
        verdicts = [
            f"{f['algorithm'].upper()}/ER {_fmt(f.get('ratio_to_er'), '.3f')} (target <= {CL_TARGETS[f['algorithm']]}: "
            f"{_verdict(f.get('ratio_to_er'), CL_TARGETS[f['algorithm']], at_most=True) or 'not measured'})"
            for f in section["figures"]
            if f["algorithm"] in CL_TARGETS
        ]
        by = {f["algorithm"]: f for f in section["figures"] if f["ok"]}
        if "seq" in by and "ewc" in by:  # EWC's own cost: the penalty over plain training on the same batch
            section["ewc_over_seq"] = _ratio(by["ewc"]["step_s"], by["seq"]["step_s"])
            verdicts.append(f"EWC/seq {_fmt(section['ewc_over_seq'], '.3f')} (same batch, no replay)")
        if verdicts:
            print("cl overhead: " + "; ".join(verdicts), flush=True)

    def ddp_bench(self, variant: Variant, main_results: list[RunResult]) -> None:
        """The variant's vlacl run on ``--ddp`` processes against one process; MIR and EWC trained under DDP."""
        n = self.args.ddp
        section: dict[str, Any] = {
            "processes": n,
            "variant": variant.name,
            "impl": self.args.ddp_impl,
            "runs": [],
            "cl_runs": [],
        }
        self.report["ddp"] = section
        print(
            f"\n[ddp] {variant.description}; {n} processes under accelerate launch ({DDP_CONFIG.relative_to(ROOT)}), "
            f"the same batch per process; samples/s = batch x processes x timed steps / rank 0's window (DDP "
            "synchronizes every step); 'logged/s' is vlacl's own last logged samples_per_s, which counts rank 0's "
            "samples x processes over rank 0's interval: the global rate as well",
            flush=True,
        )
        if self.device == "cuda" and torch.cuda.device_count() < n:
            reason = f"skipped: --ddp {n} but torch sees {torch.cuda.device_count()} GPU(s)"
            print(reason, flush=True)
            section["error"] = reason
            self.save()
            return
        model = self.model_dir(variant)
        if isinstance(model, str):
            section["error"] = model
            self.save()
            return
        impl = self.args.ddp_impl
        single = next((r for r in main_results if r.variant == variant.name and r.impl == impl and r.ok), None)
        print(DDP_HEADER, flush=True)
        if single is None:
            spec = self.spec(variant, impl, f"ddp1-{variant.name}", model, phase_steps=0)
            print("one-process run = " + " ".join(train_task_flags(spec)), flush=True)
            single = self.execute(spec)
            section["runs"].append(asdict(single))
        else:
            print(f"(one process: the main table's {variant.name}/{impl} run)", flush=True)
        print(ddp_row(single, None)[0], flush=True)
        # instrumented steps after the timed window: rank 0's phase breakdown (and a profile when asked for)
        spec = self.spec(variant, impl, f"ddp{n}-{variant.name}", model, processes=n)
        print(f"ddp run = {user_command(spec, train_task_flags(spec))}", flush=True)
        result = self.execute(spec)
        line, scaling = ddp_row(result, single)
        print(line, flush=True)
        section["runs"].append(asdict(result))
        section["single_samples_per_s"] = _rate(single)
        section["samples_per_s"] = _rate(result)
        section["scaling"] = scaling
        section["target_scaling"] = TARGET_DDP_EFFICIENCY * n
        self.save()
        if not self.args.ddp_cl_list:
            return
        warmup, steps = DDP_CL_STEPS
        print(
            f"\n[ddp cl] task 0 ({CL_PREV_STEPS} steps) then task 1 with --prev ({warmup + steps} steps), both on {n} "
            "processes; trained = task 1's final loss finite and its checkpoint written",
            flush=True,
        )
        print(f"{'algorithm':9} {'processes':>9} {'final loss':>10} {'finite':>6} {'checkpoint':>10} {'trained':>7}")
        for algorithm in self.args.ddp_cl_list:
            options = {"mir": [f"refresh={MIR_REFRESH}"], "ewc": [f"fisher_samples={self.fisher_samples()}"]}
            spec = self.spec(
                variant,
                "vlacl",
                f"ddp{n}-{algorithm}",
                model,
                warmup=warmup,
                steps=steps,
                phase_steps=0,
                task="#1",
                cl=algorithm,
                cl_opts=options.get(algorithm, []),
                prev_steps=CL_PREV_STEPS,
                prev_batch=self.batch(variant),
                prev_cl_opts=options.get(algorithm, []),
                processes=n,
            )
            print(f"{algorithm} run = {user_command(spec, train_task_flags(spec))}", flush=True)
            result = self.execute(spec)
            finite = result.final_loss is not None and math.isfinite(result.final_loss)
            trained = result.ok and finite and result.checkpoint_written
            if result.ok:
                print(
                    f"{algorithm:9} {n:>9} {_fmt(result.final_loss, '10.4f')} {finite!s:>6} "
                    f"{result.checkpoint_written!s:>10} {'yes' if trained else 'NO':>7}",
                    flush=True,
                )
            else:
                print(f"{algorithm:9} {n:>9} FAILED: {result.error}", flush=True)
            section["cl_runs"].append(asdict(result) | {"trained": trained, "final_loss_finite": finite})
            self.save()


def samples_needed(args: argparse.Namespace, variants: list[Variant], tiny: bool) -> int:
    """Samples per task so that no run crosses an epoch boundary (a loader restart) in its measured steps."""

    def batch(v: Variant) -> int:
        return v.tiny_batch if tiny else v.batch

    total = args.warmup + args.steps + args.phase_steps
    need = max(batch(v) for v in variants) * total
    if args.cl_bench:
        need = max(need, args.cl_batch * (args.cl_warmup + args.cl_steps))
    if args.ddp:
        need = max(need, batch(variants[0]) * args.ddp * (args.warmup + args.steps))
    return int(need * 1.1) + FRAMES_PER_EPISODE


def main(argv: list[str] | None = None) -> None:
    """Build the inputs, run every part's runs, print the figures as they come and write the JSON."""
    args = parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    variants = [VARIANTS[v.strip()] for v in args.variants.split(",") if v.strip()]
    tiny = args.shape == "tiny"
    workers = args.workers if args.workers is not None else default_workers(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the DDP runs: no NVLink multicast
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlacl-train-step-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    report: dict[str, Any] = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    bench = Bench(args, device, workers, work, report)
    try:
        peak = matmul_peak(device)
        report["matmul_peak_flops"] = peak
        print(f"bf16 matmul peak (8192^3 torch.matmul, best of 3 x 30): {peak / 1e12:.1f} TFLOP/s", flush=True)
        tasks = 2 if args.cl_bench or args.ddp else 1
        name = f"data-{args.shape}" if tasks == 1 else f"data-{args.shape}-{tasks}tasks"
        bench.data, bench.stats = build_data(
            work / name, samples=samples_needed(args, variants, tiny), image_size=IMAGE_SIZE[args.shape], tasks=tasks
        )
        bench.save()
        results = bench.main_table(variants, args.impl_list, peak)
        if args.cl_bench:
            bench.cl_bench()
        if args.ddp:
            bench.ddp_bench(variants[0], results)
        kept = f"; run logs under {work / 'runs'}" if args.workdir is not None else ""
        print(f"\ntotal {time.perf_counter() - bench.began:.0f} s{kept}", flush=True)
    finally:
        bench.save()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
