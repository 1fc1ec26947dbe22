"""GPU benchmark of ``train-task``'s step at VLA size (Qwen2.5-VL-3B shape) against a plain PEFT loop.

What runs:

- a random-weight Qwen2.5-VL-3B-shaped model directory, written once with ``save_pretrained`` in bf16
  (config written by hand from the published Qwen2.5-VL-3B-Instruct ``config.json``; a word-level
  tokenizer and the processor files as ``tests/hf_factories.py`` writes them), and one with a
  Qwen2.5-0.5B-shaped language model behind the same vision tower;
- a synthetic LeRobot dataset of one task (one 224x224 camera as PNG frames, an 8-dim state, a 7-dim
  action, a 32-word instruction) and its ds-stats artifact;
- a large bf16 ``torch.matmul`` loop: the peak the MFU is measured against;
- per variant, two runs, each in its own process (a failure or an out-of-memory loses that run only):

  - ``vlacl``: :func:`vlacl.training.loop.run_train_task` as ``train-task`` runs it (the flags are
    printed), bf16, LoRA rank 32, the flow-matching head (``--head``), ``--workers`` loader workers;
  - ``baseline``: the same model directory and the same training samples (vlacl's dataset and
    collate), LoRA put on by PEFT's ``get_peft_model`` (same target layers, rank, alpha, dropout), the
    same head class, and a plain loop: eager, ``torch.autocast`` bf16, ``torch.optim.AdamW`` with its
    defaults (not fused), fp32 LoRA weights, a ``DataLoader`` with the same workers (no pinned memory).

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

Usage (the GPU run takes about 8 minutes on an H100; the CPU smoke test under 2)::

    python bench/train_step.py --json-out $OUT/train_step.json            # on a GPU machine
    .venv/bin/python bench/train_step.py --shape tiny --device cpu --steps 3
"""

from __future__ import annotations

import argparse
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests' factories

import torch
from torch import nn

from tests.hf_factories import CLIP_MEAN, CLIP_STD, QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, _save_tokenizer, _write_json

INSTRUCTION = (
    "pick up the red cup and put it into the blue bowl on the left of the plate and open the drawer "
    "and place the green block on top of the mug"
)
"""32 words, each one token of the word-level tokenizer: the instruction of every episode."""

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
    vocab = _save_tokenizer(
        path, ["[UNK]"], QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]"
    )
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE, encoding="utf-8")
    _write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "rescale_factor": 1 / 255,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},  # Qwen2.5-VL's min/max pixels
            "patch_size": shape.vision["patch_size"],
            "temporal_patch_size": shape.vision["temporal_patch_size"],
            "merge_size": shape.vision["spatial_merge_size"],
        },
    )
    _write_json(path / "processor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})
    text = dict(shape.text)
    if tiny:
        text["vocab_size"] = len(vocab)
    text.update(
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"]
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(shape.vision),
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=True,
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


def build_data(root: Path, *, samples: int, image_size: int) -> tuple[Path, Path]:
    """The LeRobot dataset (one task, ``samples`` frames or more) and its ds-stats artifact under ``root``."""
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
        [FRAMES_PER_EPISODE] * episodes,
        [INSTRUCTION],
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
        f"dataset: {episodes} episodes x {FRAMES_PER_EPISODE} frames, one {image_size}x{image_size} camera (PNG), "
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

    @property
    def total(self) -> int:
        """Optimizer steps of the run."""
        return self.warmup + self.steps + self.phase_steps


@dataclass
class RunResult:
    """What one run measured (seconds; FLOPs per sample)."""

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


def _train_config(spec: RunSpec) -> Any:
    from vlacl.config.lora import AdapterConfig
    from vlacl.config.policy import PolicyConfig
    from vlacl.config.train_task import TrainTaskConfig

    return TrainTaskConfig(
        model_path=spec.model_dir,
        datasets=(Path(spec.data_dir),),
        stats=Path(spec.stats_dir),
        steps=spec.total,
        batch_size=spec.batch,
        history=1,
        chunk=CHUNK,
        precision="bf16" if spec.device == "cuda" else "fp32",
        device="cuda" if spec.device == "cuda" else "cpu",
        workers=spec.workers,
        val_fraction=0.0,
        val_every=0,
        save_every=0,
        log_every=LOG_EVERY,
        adapter=AdapterConfig(rank=LORA_RANK, targets=spec.targets),
        model=PolicyConfig(head=spec.head),  # type: ignore[arg-type]
    )


def train_task_flags(spec: RunSpec) -> list[str]:
    """The ``vlacl train-task`` command line equivalent to the vlacl run."""
    cfg = _train_config(spec)
    return [
        "vlacl",
        "train-task",
        f"--model={cfg.model_path}",
        f"--dataset={spec.data_dir}",
        f"--stats={spec.stats_dir}",
        "--task=#0",
        f"--steps={cfg.steps}",
        f"--batch-size={cfg.batch_size}",
        f"--history={cfg.history}",
        f"--chunk={cfg.chunk}",
        f"--precision={cfg.precision}",
        f"--device={cfg.device}",
        f"--workers={cfg.workers}",
        f"--head={spec.head}",
        f"--lora-rank={LORA_RANK}",
        f"--lora-targets={spec.targets}",
        "--val-fraction=0",
        "--val-every=0",
        "--save-every=0",
        f"--log-every={LOG_EVERY}",
        f"--out={spec.out_dir}",
    ]


def run_vlacl(spec: RunSpec) -> RunResult:
    """The vlacl run: ``run_train_task``, its instrumented steps timed by hooks on the trainer."""
    from vlacl.training import loop
    from vlacl.training.checkpoint import METRICS_LOG_NAME

    result = RunResult("vlacl", spec.variant, batch=spec.batch, flags=train_task_flags(spec))
    cfg = _train_config(spec)
    device = torch.device(spec.device)
    timer = PhaseTimer(device, spec.warmup, spec.steps)
    shapes = _Shapes()
    original_train = loop._Trainer.train

    def instrumented_train(trainer: Any) -> None:
        trainer.loader = _TimedLoader(trainer.loader, timer, shapes.see)
        trainer.model.register_forward_pre_hook(lambda *_: timer.begin("forward"))
        trainer.model.register_forward_hook(lambda *_: timer.end("forward"))
        trainer.acc.backward = _wrap(trainer.acc.backward, timer, "backward")
        trainer.optimizer.step = _wrap(trainer.optimizer.step, timer, "optimizer")
        original_train(trainer)

    setattr(loop._Trainer, "train", instrumented_train)  # noqa: B010 (a method of a class, replaced for this run)

    def progress(p: Any) -> None:
        if p.phase == "train":
            timer.step_end(p.step)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trained = loop.run_train_task(cfg, out=Path(spec.out_dir), resume="never", overwrite=True, progress=progress)
    result.peak_allocated_gib, result.peak_reserved_gib = _cuda_peaks(device)
    _fill(result, spec, timer, shapes, trained.policy, start)
    result.final_loss = trained.final_loss
    records = [json.loads(x) for x in (Path(spec.out_dir) / METRICS_LOG_NAME).read_text().splitlines()]
    result.logged_samples_per_s = [r["samples_per_s"] for r in records if r.get("samples_per_s")]
    result.ok = True
    return result


def _fill(result: RunResult, spec: RunSpec, timer: PhaseTimer, shapes: _Shapes, model: nn.Module, start: float) -> None:
    if timer.window is not None:
        result.step_s = timer.window / spec.steps
        result.samples_per_s = spec.batch * spec.steps / timer.window
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
    """Run one :class:`RunSpec` and write its :class:`RunResult` as JSON."""
    spec = RunSpec(**json.loads(spec_file.read_text(encoding="utf-8")))
    if spec.device == "cpu":
        torch.set_num_threads(1)  # a smoke test: leave the machine's other cores alone
    else:
        torch.cuda.current_device()  # initializes CUDA before the peak memory statistics are reset
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runner = run_vlacl if spec.impl == "vlacl" else run_baseline
    result = runner(spec)
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


def run_child(spec: RunSpec, log_file: Path, timeout: float) -> RunResult:
    """Run ``spec`` in a child process; a crash, an error or a timeout gives a failed result."""
    spec_file = Path(spec.result_file).with_suffix(".spec.json")
    spec_file.write_text(json.dumps(asdict(spec)), encoding="utf-8")
    Path(spec.result_file).unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file)]
    with log_file.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its loader workers
            proc.wait()
            code = None
    result_path = Path(spec.result_file)
    if code == 0 and result_path.is_file():
        return RunResult(**json.loads(result_path.read_text(encoding="utf-8")))
    tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:]
    reason = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
    print(f"  {spec.variant}/{spec.impl} failed ({reason}); last lines of {log_file}:", flush=True)
    for line in tail:
        print(f"    {line[:300]}", flush=True)
    last = next((line for line in reversed(tail) if line.strip()), "")
    return RunResult(spec.impl, spec.variant, ok=False, error=f"{reason}: {last[:300]}", batch=spec.batch)


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
    f"{'variant':7} {'impl':8} {'batch':>5} {'samples/s':>9} {'step ms':>8} {'data %':>6} {'data':>6} "
    f"{'fwd':>7} {'bwd':>7} {'optim':>6} {'other':>6} {'peak GiB':>8} {'TFLOP/s':>7} {'MFU %':>6}"
)


def row(result: RunResult, peak: float) -> str:
    """One line of the table (phase columns in ms per instrumented step)."""
    if not result.ok:
        return f"{result.variant:7} {result.impl:8} {result.batch:>5} FAILED: {result.error}"
    ph = result.phases_s
    share = ph["data"] / ph["step"] if ph.get("step") else None
    achieved = (
        result.flops_per_sample["total"] * result.samples_per_s / 1e12 if result.samples_per_s is not None else None
    )
    return (
        f"{result.variant:7} {result.impl:8} {result.batch:>5} {_fmt(result.samples_per_s, '9.1f')} "
        f"{_fmt(result.step_s, '8.1f', 1e3)} {_fmt(share, '6.1f', 100)} {_fmt(ph.get('data'), '6.1f', 1e3)} "
        f"{_fmt(ph.get('forward'), '7.1f', 1e3)} {_fmt(ph.get('backward'), '7.1f', 1e3)} "
        f"{_fmt(ph.get('optimizer'), '6.1f', 1e3)} {_fmt(ph.get('other'), '6.1f', 1e3)} "
        f"{_fmt(result.peak_allocated_gib, '8.1f')} {_fmt(achieved, '7.1f')} {_fmt(mfu(result, peak), '6.1f', 100)}"
    )


def summary(results: list[RunResult], peak: float) -> list[dict[str, Any]]:
    """Per variant: vlacl and baseline samples/s, their ratio and the targets."""
    out = []
    for name in dict.fromkeys(r.variant for r in results):
        by = {r.impl: r for r in results if r.variant == name}
        v, b = by.get("vlacl"), by.get("baseline")
        variant = VARIANTS[name]
        ratio = None
        if v and b and v.samples_per_s and b.samples_per_s:
            ratio = v.samples_per_s / b.samples_per_s
        data_share = None
        if v and v.phases_s.get("step"):
            data_share = v.phases_s["data"] / v.phases_s["step"]
        out.append(
            {
                "variant": name,
                "vlacl_samples_per_s": v.samples_per_s if v else None,
                "baseline_samples_per_s": b.samples_per_s if b else None,
                "ratio": ratio,
                "target_ratio": variant.target_ratio,
                "vlacl_mfu": mfu(v, peak) if v else None,
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
    """The ratio table with the targets."""
    print("\nvlacl / baseline (targets: samples/s >= 3x at a, >= 1.5x at b; MFU >= 25%; data wait <= 5% of the step)")
    print(
        f"{'variant':7} {'vlacl/s':>8} {'base/s':>8} {'ratio':>6} {'target':>6} {'':6} {'vlacl MFU%':>10} {'':6} "
        f"{'base MFU%':>9} {'data %':>6} {'':6} {'peak GiB v/b':>13}"
    )
    for s in rows:
        target = s["target_ratio"]
        peaks = f"{_fmt(s['vlacl_peak_gib'], '.1f')}/{_fmt(s['baseline_peak_gib'], '.1f')}"
        print(
            f"{s['variant']:7} {_fmt(s['vlacl_samples_per_s'], '8.1f')} {_fmt(s['baseline_samples_per_s'], '8.1f')} "
            f"{_fmt(s['ratio'], '6.2f')} {_fmt(target, '6.1f')} {_verdict(s['ratio'], target):6} "
            f"{_fmt(s['vlacl_mfu'], '10.1f', 100)} {_verdict(s['vlacl_mfu'], TARGET_MFU):6} "
            f"{_fmt(s['baseline_mfu'], '9.1f', 100)} {_fmt(s['vlacl_data_share'], '6.1f', 100)} "
            f"{_verdict(s['vlacl_data_share'], TARGET_DATA_SHARE, at_most=True):6} {peaks:>13}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("full", "tiny"), default="full", help="real sizes, or tiny stand-ins")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if there is one")
    parser.add_argument("--variants", default="a,b,small", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--impls", default="vlacl,baseline", help="vlacl, baseline or both")
    parser.add_argument("--head", choices=("flow", "mlp"), default=None, help="override every variant's head")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 when tiny)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (samples/s, step time, MFU)")
    parser.add_argument(
        "--phase-steps", type=int, default=None, help="instrumented steps after them, for the breakdown (4; 2 tiny)"
    )
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: 8 on a GPU, 0 on a CPU)")
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
    if args.warmup < 1 or args.steps < 1 or args.phase_steps < 0:
        parser.error("--warmup and --steps must be >= 1, --phase-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build the inputs, run every variant's runs, print the figures as they come and write the JSON."""
    args = parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return
    began = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    variants = [VARIANTS[v.strip()] for v in args.variants.split(",") if v.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    tiny = args.shape == "tiny"
    workers = args.workers if args.workers is not None else default_workers(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlacl-train-step-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    report: dict[str, Any] = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}

    def save() -> None:
        if args.json_out is not None:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")

    try:
        peak = matmul_peak(device)
        report["matmul_peak_flops"] = peak
        print(f"bf16 matmul peak (8192^3 torch.matmul, best of 3 x 30): {peak / 1e12:.1f} TFLOP/s", flush=True)
        batches = [v.tiny_batch if tiny else v.batch for v in variants]
        samples = int(max(batches) * (args.warmup + args.steps + args.phase_steps) * 1.1) + FRAMES_PER_EPISODE
        data, stats = build_data(work / f"data-{args.shape}", samples=samples, image_size=IMAGE_SIZE[args.shape])
        save()
        model_dirs: dict[str, Path] = {}
        results: list[RunResult] = []
        print(
            f"\nsteps per run: {args.warmup} warm-up + {args.steps} timed + {args.phase_steps} instrumented; "
            f"workers {workers}; phase columns: ms per instrumented step, cuda.synchronize at each phase boundary "
            "(vlacl's loop logs no phase times: its trainer's loader, model, backward and optimizer.step are hooked)",
            flush=True,
        )
        header_printed = False
        for variant in variants:
            if variant.model not in model_dirs:
                shape = MODELS[args.shape][variant.model]
                try:
                    model_dirs[variant.model] = build_model_dir(
                        work / f"model-{args.shape}-{variant.model}", shape, tiny=tiny, device=device
                    )
                except Exception as exc:  # the other variants still run
                    print(f"\n[{variant.name}] building the {shape.description} model failed: {exc!r}", flush=True)
                    for impl in impls:
                        failed = RunResult(impl, variant.name, error=f"model build failed: {exc!r}"[:300])
                        results.append(failed)
                        report["runs"].append(asdict(failed))
                    save()
                    continue
            for impl in impls:
                left = args.deadline - (time.perf_counter() - began)
                run_dir = work / "runs" / f"{variant.name}-{impl}"
                run_dir.mkdir(parents=True, exist_ok=True)
                spec = RunSpec(
                    impl=impl,
                    variant=variant.name,
                    model_dir=str(model_dirs[variant.model]),
                    data_dir=str(data),
                    stats_dir=str(stats),
                    out_dir=str(run_dir / "ckpt"),
                    result_file=str(run_dir / "result.json"),
                    batch=variant.tiny_batch if tiny else variant.batch,
                    targets=variant.targets,
                    head=args.head or variant.head,
                    device=device,
                    workers=workers,
                    warmup=args.warmup,
                    steps=args.steps,
                    phase_steps=args.phase_steps,
                )
                if impl == "vlacl":
                    print(f"\n[{variant.name}] {variant.description}; head {spec.head}", flush=True)
                    print("vlacl run = " + " ".join(train_task_flags(spec)), flush=True)
                if left < 30:
                    result = RunResult(impl, variant.name, error=f"skipped: {left:.0f} s left of --deadline")
                else:
                    t = time.perf_counter()
                    result = run_child(spec, run_dir / "log.txt", min(args.run_timeout, left - 5))
                    print(f"  ({variant.name}/{impl}: {time.perf_counter() - t:.0f} s with set-up)", flush=True)
                shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
                results.append(result)
                report["runs"].append(asdict(result) | {"mfu": mfu(result, peak)})
                report["summary"] = summary(results, peak)
                save()
                if not header_printed:
                    print(ROW_HEADER, flush=True)
                    header_printed = True
                print(row(result, peak), flush=True)
                if result.ok:
                    f = result.flops_per_sample
                    print(
                        f"  tokens: LM {result.lm_tokens}, vision patches {result.vision_patches}; GFLOP/sample "
                        f"vision {f['vision'] / 1e9:.1f}, LM {f['language_model'] / 1e9:.1f}, adapters "
                        f"{f['adapters'] / 1e9:.1f}, head {f['head'] / 1e9:.3f}; trainable "
                        f"{result.trainable_params / 1e6:.1f}M of {result.total_params / 1e9:.3f}B; set-up to step 1 "
                        f"{_fmt(result.setup_s, '.0f')} s; final loss {_fmt(result.final_loss, '.4f')}",
                        flush=True,
                    )
        report["summary"] = summary(results, peak)
        print_summary(report["summary"])
        kept = f"; run logs under {work / 'runs'}" if args.workdir is not None else ""
        print(f"\ntotal {time.perf_counter() - began:.0f} s{kept}", flush=True)
    finally:
        save()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
