"""``train-task``: train one task of a stream and write its task checkpoint.

:func:`run_train_task` is the command as a library call. It builds the task's data, the policy
(backbone + adapters + head, continuing from ``--prev``), the optimizer, schedule and CL algorithm,
runs the loop under an ``accelerate.Accelerator`` (single process, DDP, FSDP or DeepSpeed, whatever
``accelerate launch`` set up) and, on the main process only, writes the ``task_checkpoint``.

The step (see :mod:`vlacl.cl.base` for where the CL hooks run): ``--grad-accum`` micro-batches, each
forward under autocast (bf16/fp16; trainable weights stay fp32 so the loss scaler sees their
gradients), backward; then clipping, a finiteness check of the loss and the gradient norm (the one
value read from the device per optimizer step: a step must be skipped before it is applied), the
optimizer and scheduler steps. Losses accumulate on the device and are read every ``--log-every`` steps.

Stopping early: :class:`StopFlag` is set by the CLI's signal handlers (SIGTERM, SIGUSR1); the loop
checks it at step boundaries, saves the resume state and raises :class:`PreemptedError`, whose exit code
:data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: try again) tells a requeue script to resubmit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import torch

from vlacl.artifacts.names import BEST_DIR, KEYMAP_NAME, STATS_NAME
from vlacl.cl.base import CLAlgorithm, SampleRef, TaskContext, get_algorithm
from vlacl.config.core import config_to_dict, dump_config
from vlacl.config.train_task import SMOKE_STEPS, SMOKE_VAL_BATCHES, TrainTaskConfig
from vlacl.errors import ArtifactError, ConfigError, VlaclError
from vlacl.models.policy import FEATURES
from vlacl.training import checkpoint as ckpt
from vlacl.training.data import ResumableSampler, TaskData, build_task_data, make_loader, move_batch
from vlacl.training.guards import LossGuard, TrainingError, check_first_gradients, is_oom, oom_error
from vlacl.training.model import uses_cudagraphs
from vlacl.training.optim import build_optimizer, build_scheduler, param_groups

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after saving its resume state (sysexits' EX_TEMPFAIL)."""

ResumeMode = Literal["auto", "never", "must"]


class PreemptedError(VlaclError):
    """The run was asked to stop (SIGTERM, SIGUSR1) and saved its resume state; rerun with ``--resume auto``."""

    exit_code = EXIT_PREEMPTED


class StopFlag:
    """Set from a signal handler; read by the loop at step boundaries."""

    def __init__(self) -> None:
        """Not set."""
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        """Ask the loop to stop after the current step."""
        self.signum = signum

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None


RESUME_FREE_KEYS: Final = frozenset({"compile", "compile_mode", "activation_checkpointing", "workers"})
"""Settings a run may resume with changed: how the same steps are computed, not which steps."""


def resume_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The settings that differ between a resume state's config and this run's, less :data:`RESUME_FREE_KEYS`."""
    return sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE_KEYS and saved.get(k) != now.get(k))


class StopAgreement:
    """Whether any process was asked to stop, agreed on by every process without a wait in the step.

    Each :meth:`poll` starts an asynchronous sum of every process's flag and returns the sum the
    previous poll started, which finished during this step (the step's gradient all-reduce already
    brought the processes together): every process sees the same answer at the same step, one step
    after a signal, and no process waits for the others at a collective of its own. A blocking sum
    at each step exposes the processes' step-time skew once more per step (on two H200s, the time
    after the optimizer step grew by 8 ms under DDP, in a 178 ms step).
    """

    def __init__(self, device: torch.device) -> None:
        """The sums live on ``device`` (the process group's: CUDA under NCCL, CPU under gloo)."""
        self.device = device
        self._pending: tuple[Any, torch.Tensor] | None = None

    def poll(self, flag: bool) -> bool:
        """Start the sum of this process's ``flag``; whether any process's flag was set one poll ago."""
        import torch.distributed as dist

        agreed = False
        if self._pending is not None:
            work, total = self._pending
            work.wait()
            agreed = bool(total.item() > 0)
        total = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._pending = (dist.all_reduce(total, async_op=True), total)
        return agreed

    def close(self) -> None:
        """Wait for the sum the last poll started (every process started it); a stop asked in the last step is moot."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


@dataclass(frozen=True)
class Progress:
    """What the loop reports after each optimizer step (the CLI renders it).

    Attributes:
        step: Optimizer steps done.
        total: Optimizer steps of the run.
        metrics: The logged values at log steps (loss, lr, samples_per_s, ...), else ``None``.
        phase: ``train``, ``val`` or ``save``.
    """

    step: int
    total: int
    metrics: Mapping[str, Any] | None = None
    phase: str = "train"


ProgressFn = Callable[[Progress], None]


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        out: The checkpoint directory (``None`` on non-main processes).
        steps: Optimizer steps done.
        final_loss: Mean training loss of the last logged interval.
        val_loss: Validation loss at the end, or ``None`` without validation episodes.
        best_val_loss: Lowest validation loss seen.
        trainable: Trainable parameter counts by group.
        total_params: Every parameter of the policy.
        samples_per_s: Training throughput over the run (all processes).
        details: The manifest details written.
        policy: The trained policy (unwrapped from the accelerator), for callers that go on using it.
    """

    out: Path | None
    steps: int
    final_loss: float
    val_loss: float | None
    best_val_loss: float | None
    trainable: dict[str, int]
    total_params: int
    samples_per_s: float
    details: dict[str, Any] = field(default_factory=dict)
    policy: Any = None


# ---------------------------------------------------------------------------------------------
# Set-up


def _precision(cfg: TrainTaskConfig, device: str) -> str:
    """Accelerate's ``mixed_precision``: ``no``, ``bf16`` or ``fp16``."""
    if cfg.precision == "fp32" or device == "cpu":
        if cfg.precision in ("bf16", "fp16") and device == "cpu":
            log.info("precision %s asked for on a CPU: training in fp32", cfg.precision)
        return "no"
    if cfg.precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return cfg.precision


def _device(cfg: TrainTaskConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device: pass --device cpu")
    return cfg.device


def _make_accelerator(cfg: TrainTaskConfig) -> Any:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs  # type: ignore[import-untyped]

    device = _device(cfg)
    # No buffer broadcast before every forward: a policy's buffers (the heads' bounds and masks, rotary
    # frequencies) are built alike from the same config and stats on every process and never change,
    # and the broadcast, the forward's only collective, made each process wait for the slowest one
    # (on two H200s the forward took 19 ms longer under DDP than alone, in a 178 ms step).
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=cfg.two_stage, broadcast_buffers=False)]
    # accelerate keeps its settings in a process-wide singleton: a second run in the same process
    # (a library caller, a test) with another precision must start from a fresh one. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # non-blocking host-to-device copies of the pinned batches: the copy overlaps the step's compute
    loading = DataLoaderConfiguration(non_blocking=True)
    return Accelerator(
        mixed_precision=_precision(cfg, device),
        cpu=device == "cpu",
        kwargs_handlers=kwargs,
        dataloader_config=loading,
    )


def _check_compile(cfg: TrainTaskConfig, accelerator: Any) -> None:
    """Refuse ``--compile`` under FSDP or DeepSpeed, whose hooks on the blocks the compiled code would trace."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if cfg.compile and kind in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            f"--compile compiles the backbone's blocks for a single process or DDP, but accelerate runs {kind}: "
            "drop --compile, or launch with a DDP accelerate config (multi-GPU, no FSDP or DeepSpeed)"
        )


def _check_prev(prev: Any, cfg: TrainTaskConfig, stats_fingerprint: str) -> None:
    """Refuse a previous checkpoint of another base model or other stats."""
    details = prev.manifest.details
    base = details.get("base_model")
    if base is not None and (trained_on := _model_identity(str(base), prev.path)) != _model_identity(
        cfg.model_path, None
    ):
        raise ArtifactError(
            f"--prev {prev.path} was trained on base model {trained_on}, but --model is {cfg.model_path}: a stream "
            f"continues on one base model; pass --model {trained_on}, or start the stream without --prev"
        )
    fp = details.get("stats_fingerprint")
    if fp is not None and fp != stats_fingerprint:
        raise ArtifactError(
            f"--prev {prev.path} was trained with stats {str(fp)[:12]}, but --stats has fingerprint "
            f"{stats_fingerprint[:12]}: every task of a stream normalizes with the same stats; pass the --stats "
            "the previous task used (its stats.json is in the checkpoint), or start the stream without --prev"
        )


def _model_identity(model: str, relative_to: Path | None) -> str:
    """A built-in name as is; a directory as its real path (a recorded one is relative to its checkpoint)."""
    if model.startswith("builtin:"):
        return model
    path = Path(model)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    return os.path.realpath(path)


def _recorded_model(model: str, out: Path) -> str:
    """``base_model`` as the manifest records it: a built-in name, or the directory relative to ``out``.

    Relative where the two share a directory below the filesystem root (so a moved run directory
    still finds its base model, as merge-lora reads it), absolute otherwise.
    """
    if model.startswith("builtin:"):
        return model
    real = os.path.realpath(model)
    where = os.path.realpath(out)
    if Path(os.path.commonpath([real, where])) == Path(Path(real).anchor):
        return real
    return os.path.relpath(real, where)


def _total_steps(cfg: TrainTaskConfig, per_epoch: int) -> int:
    if cfg.smoke:
        return SMOKE_STEPS
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    return 1000


def _trainable_groups(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameter counts by the first two name parts (``head.net``, ``backbone.blocks``, ...)."""
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = ".".join(name.split(".")[:2])
            groups[key] = groups.get(key, 0) + param.numel()
    return groups


# ---------------------------------------------------------------------------------------------
# The command as a library call


def run_train_task(
    cfg: TrainTaskConfig,
    *,
    out: Path,
    prev: Path | None = None,
    resume: ResumeMode = "auto",
    overwrite: bool = False,
    command: Sequence[str] = (),
    progress: ProgressFn | None = None,
    stop: StopFlag | None = None,
    algorithm: CLAlgorithm | None = None,
) -> TrainResult:
    """Train the task ``cfg.task`` of the stream and write its ``task_checkpoint`` to ``out``.

    Args:
        cfg: The resolved settings.
        out: The checkpoint directory to write.
        prev: The previous task's checkpoint, continued from (adapters, head, CL state).
        resume: ``auto`` continues from the resume state of ``out`` if there is one; ``never``
            ignores (and replaces) it; ``must`` fails without one.
        overwrite: Replace an existing checkpoint at ``out``.
        command: The command line, for the manifest.
        progress: Called after every optimizer step (main process only).
        stop: Checked at step boundaries; when set, the resume state is saved and :class:`PreemptedError` raised.
        algorithm: A CL algorithm instance instead of ``cfg.cl`` from the registry (tests pass spies).

    Raises:
        VlaclError: Bad inputs or settings, a guard that fired, out of memory, or :class:`PreemptedError`.
    """
    from accelerate.utils import set_seed

    from vlacl.artifacts.reader import open_artifact
    from vlacl.artifacts.writer import check_output_dir
    from vlacl.data.keymap import load_keymap
    from vlacl.data.normalize import load_stats
    from vlacl.data.windows import WindowSpec

    if not cfg.datasets:
        raise ConfigError("no dataset given: pass --dataset PATH (repeatable)")
    if cfg.stats is None:
        raise ConfigError("no stats given: pass --stats DIR, a ds_stats artifact (`vlacl ds-stats DATASET --out DIR`)")
    out = Path(os.path.abspath(out))  # noqa: PTH100
    rdir = ckpt.resume_dir(out)
    resuming = resume != "never" and (rdir / ckpt.STATE_NAME).is_file()
    if resume == "must" and not resuming:
        raise ArtifactError(f"--resume must: there is no resume state at {rdir} for --out {out}")
    # Also when resuming: a resume state left next to a finished checkpoint (a run killed between
    # writing --out and removing it) must not replace that checkpoint without --overwrite.
    check_output_dir(out, overwrite, kind="task_checkpoint")
    if prev is not None and _overlaps(Path(prev), out):
        raise ConfigError(
            f"--prev {prev} and --out {out} overlap: the new checkpoint would replace the one it continues from; "
            "choose another --out"
        )
    accelerator = _make_accelerator(cfg)
    _check_compile(cfg, accelerator)
    set_seed(cfg.seed)
    stats = load_stats(cfg.stats)
    keymap = load_keymap(cfg.keymap)
    prev_artifact = open_artifact(prev, "task_checkpoint", verify=True) if prev is not None else None
    if prev_artifact is not None:
        _check_prev(prev_artifact, cfg, stats.fingerprint)
    spec = WindowSpec(history=cfg.history, chunk=cfg.chunk)
    data = build_task_data(
        cfg.datasets,
        stats,
        keymap=keymap,
        task=cfg.task_selector,
        spec=spec,
        partition=cfg.partition,
        order=cfg.task_order,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.seed,
        short=cfg.short_episodes,
    )
    from vlacl.training.model import build_model

    built = build_model(
        cfg, data, stats, prev_artifact, mixed=accelerator.mixed_precision, device_type=accelerator.device.type
    )
    algo = algorithm if algorithm is not None else get_algorithm(cfg.cl, cfg.cl_options)
    if prev_artifact is not None:
        prev_cl = ckpt.load_cl_state(prev_artifact.path)
        prev_algo = prev_artifact.manifest.details.get("cl_algorithm")
        if prev_cl is not None and prev_algo == algo.name:
            algo.load_state_dict(prev_cl)
        elif prev_algo is not None and prev_algo != algo.name:
            log.warning(
                "--prev %s was trained with --cl %s; its CL state (%s) does not carry over to --cl %s, which starts "
                "with none (no memory or penalty of the earlier tasks): train every task of a stream with one --cl",
                prev_artifact.path,
                prev_algo,
                ", ".join(sorted(prev_cl or {})[:4]) or "empty",
                algo.name,
            )
    trainer = _Trainer(cfg, accelerator, data, built, algo, out, rdir, prev, progress, stop)
    trainer.stats_fingerprint = stats.fingerprint
    try:
        trainer.setup(resuming)
        trainer.train()
    except BaseException as exc:
        trainer.close(discard=True)
        if isinstance(exc, Exception) and not isinstance(exc, VlaclError) and is_oom(exc):
            raise oom_error(trainer.memory_settings(), exc) from None
        raise
    trainer.close(discard=False)
    try:
        return trainer.finish(stats, keymap, prev_artifact, command, overwrite)
    except BaseException:
        trainer.close(discard=True)
        raise


class _Trainer:
    """The state of one run: model, optimizer, data position, logs; split into steps for readability."""

    def __init__(
        self,
        cfg: TrainTaskConfig,
        accelerator: Any,
        data: TaskData,
        built: Any,
        algo: CLAlgorithm,
        out: Path,
        rdir: Path,
        prev: Path | None,
        progress: ProgressFn | None,
        stop: StopFlag | None,
    ) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.data = data
        self.built = built
        self.algo = algo
        self.out = out
        self.rdir = rdir
        self.prev = prev
        self.progress = progress if accelerator.is_main_process else None
        self.stop = stop or StopFlag()
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.last_loss = float("nan")
        self.samples = 0
        self.train_seconds = 0.0
        self.guard = LossGuard(cfg.zero_loss_steps, cfg.nonfinite_steps)
        self.cudagraphs = uses_cudagraphs(cfg)
        self.stop_agreement: StopAgreement | None = None
        self.work = rdir.parent / f"{rdir.name}.live-{os.getpid()}"
        self.tb: Any = None
        self.feature_loader: Any = None
        self.stats_fingerprint = ""
        self.features_reused: bool | None = None

    # -- set-up -------------------------------------------------------------------------------

    def memory_settings(self) -> dict[str, object]:
        cfg = self.cfg
        return {
            "--batch-size": cfg.batch_size,
            "--grad-accum": cfg.grad_accum,
            "--history": cfg.history,
            "--chunk": cfg.chunk,
            "precision": self.acc.mixed_precision,
            "--activation-checkpointing": cfg.activation_checkpointing,
            "--finetune": cfg.adapter.finetune,
            "--lora-rank": cfg.adapter.rank,
        }

    def setup(self, resuming: bool) -> None:
        cfg, acc = self.cfg, self.acc
        policy = self.built.policy
        if not self.sharded:
            policy.to(acc.device)  # before the optimizer is built: AdamW is fused only over parameters on the GPU
        groups = param_groups(
            policy, self.built.backbone_params(), lr=cfg.lr, head_lr=cfg.head_lr, weight_decay=cfg.weight_decay
        )
        if not groups:
            raise TrainingError(
                "nothing trains: every parameter is frozen; use --finetune lora/full/last-n or a head that trains"
            )
        self.group_counts = _trainable_groups(policy)
        self.trainable_total = sum(g.count for g in groups)
        self.total_params = sum(p.numel() for p in policy.parameters())
        log.info(
            "parameters: %s trainable of %s (%.3f%%); trainable groups: %s",
            f"{self.trainable_total:,}",
            f"{self.total_params:,}",
            100.0 * self.trainable_total / max(1, self.total_params),
            ", ".join(f"{k}: {v:,}" for k, v in self.group_counts.items()),
        )
        optimizer = build_optimizer(groups)
        world = acc.num_processes
        per_epoch = len(self.data.train) // (cfg.batch_size * world)
        if per_epoch < 1:
            raise ConfigError(
                f"task {self.data.task.key!r} has {len(self.data.train)} training samples, fewer than one batch of "
                f"{cfg.batch_size} x {world} process(es): lower --batch-size"
            )
        self.per_epoch = per_epoch
        self.total = _total_steps(cfg, per_epoch)
        warmup = min(cfg.warmup_steps, self.total)
        self.scheduler = build_scheduler(
            optimizer, total=self.total, warmup=warmup, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio
        )
        self.sampler = ResumableSampler(len(self.data.train), cfg.seed)
        loader = make_loader(
            self.data.train,
            batch_size=cfg.batch_size,
            collate=policy.collate,
            workers=cfg.workers,
            sampler=self.sampler,
            drop_last=True,
            pin_memory=acc.device.type == "cuda",
            seed=cfg.seed,
        )
        self.model, self.optimizer, self.loader = acc.prepare(policy, optimizer, loader)
        self.val_loader = None
        if self.data.val is not None:
            val_batch = min(cfg.batch_size, len(self.data.val))
            self.val_loader = acc.prepare(
                make_loader(
                    self.data.val, batch_size=val_batch, collate=policy.collate, workers=0, drop_last=False, seed=0
                )
            )
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        unwrapped = self.acc.unwrap_model(self.model)
        self.trainable_names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
        shutil.rmtree(self.work, ignore_errors=True)
        if acc.is_main_process:
            _remove_stale_live_dirs(self.rdir)
            self.work.mkdir(parents=True)
        if resuming:
            self._restore()
        self.ctx = self._context(resuming)
        if cfg.tensorboard and acc.is_main_process:
            self.tb = _tensorboard(self.work / ckpt.TENSORBOARD_DIR)
        self.algo.on_task_start(self.ctx)  # before the feature cache: an algorithm may refuse it cheaply
        if cfg.cache_features and self.step < cfg.stage1_steps:
            self.feature_loader = self._feature_loader()

    @property
    def feature_dir(self) -> Path:
        """Where the --cache-features files go: --feature-cache, else next to --out."""
        return self.cfg.feature_cache if self.cfg.feature_cache is not None else ckpt.feature_cache_dir(self.out)

    def _feature_loader(self) -> Any:
        """Stage 1's loader of samples with cached backbone features (computed on the main process, or reused)."""
        from torch.utils.data import default_collate

        from vlacl.training import features as fc

        cfg, acc, data = self.cfg, self.acc, self.data
        policy = self.built.policy
        fingerprint = fc.cache_fingerprint(
            policy.backbone,
            train_fingerprint=data.fingerprint,
            keymap_sha256=data.keymap.sha256(),
            stats_fingerprint=self.stats_fingerprint,
            cameras=policy.cameras,
            history=cfg.history,
            precision=f"{acc.device.type}:{acc.mixed_precision}",
        )
        path = fc.cache_file(Path(self.feature_dir), fingerprint)
        n = len(data.train)

        def compute() -> torch.Tensor:
            loader = make_loader(
                data.train,
                batch_size=cfg.batch_size,
                collate=policy.collate,
                workers=cfg.workers,
                drop_last=False,
                pin_memory=acc.device.type == "cuda",
                seed=cfg.seed,
            )
            return fc.compute_features(policy, iter(loader), n, acc.autocast, acc.device)

        features: torch.Tensor | None = None
        if acc.is_main_process:
            features, self.features_reused = fc.load_or_compute(path, fingerprint, samples=n, compute=compute)
            if cfg.feature_cache is None:
                fc.remove_other_caches(path.parent, keep=path)
        acc.wait_for_everyone()
        if features is None:
            features = fc.read_cache(path, fingerprint, n)
            if features is None:
                raise ArtifactError(f"the feature cache {path} written by the main process cannot be read here")
        loader = make_loader(
            fc.FeatureDataset(data.train, features),
            batch_size=cfg.batch_size,
            collate=default_collate,
            workers=cfg.workers,
            sampler=self.sampler,
            drop_last=True,
            pin_memory=acc.device.type == "cuda",
            seed=cfg.seed,
        )
        return acc.prepare(loader)

    def _from_cache(self) -> bool:
        """Whether the next micro-batch comes from the feature cache (stage 1 of --cache-features)."""
        return self.feature_loader is not None and self.step < self.cfg.stage1_steps

    def _context(self, resumed: bool) -> TaskContext:
        data = self.data
        train = data.train
        fps = data.dataset_fingerprints
        by_fp = {fp: i for i, fp in enumerate(fps)}
        policy = self.built.policy

        def sample_refs(indices: Sequence[int]) -> list[SampleRef]:
            refs = []
            for i in indices:
                e, t = train.locate(int(i))
                ep = train.episodes[e]
                ref = self._episode_ref(ep)
                refs.append(SampleRef(fps[ref.dataset], ep.index, t))
            return refs

        def dataset_of(refs: Sequence[SampleRef]) -> Any:
            return _RefDataset(self.data, refs, by_fp)

        def collate_refs(refs: Sequence[SampleRef]) -> dict[str, Any]:
            ds = dataset_of(refs)
            batch = policy.collate([ds[i] for i in range(len(ds))])
            return dict(move_batch(batch, self.acc.device))

        def extra_loader(refs: Sequence[SampleRef], batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
            loader = make_loader(
                dataset_of(refs),
                batch_size=batch_size,
                collate=policy.collate,
                workers=0,
                sampler=ResumableSampler(len(refs), seed),
                drop_last=False,
                seed=seed,
            )
            for batch in loader:
                yield dict(move_batch(batch, self.acc.device))

        def ref_dataset(refs: Sequence[SampleRef]) -> Any:
            return _RefDataset(self.data, refs, by_fp)

        def batches(dataset: Any, batch_sampler: Iterable[list[int]]) -> Iterator[dict[str, Any]]:
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=batch_sampler,
                collate_fn=policy.collate,
                num_workers=self.cfg.workers,
                pin_memory=self.acc.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.cfg.seed),  # the workers' seeds: not the global RNG
            )
            for batch in loader:
                yield dict(move_batch(batch, self.acc.device))

        unwrapped = self.acc.unwrap_model(self.model)
        backbone_ids = {id(p) for p in self.built.backbone_params()}
        backbone_trainable = frozenset(n for n, p in unwrapped.named_parameters() if id(p) in backbone_ids)
        return TaskContext(
            accelerator=self.acc,
            model=self.model,
            task=data.task.position,
            task_key=data.task.key,
            task_name=data.task.name,
            stream_name=self.cfg.stream_name,
            num_tasks=len(data.stream.tasks),
            train_dataset=train,
            dataset_fingerprints=fps,
            train_fingerprint=data.fingerprint,
            prev_checkpoint=self.prev,
            out_dir=self.out,
            resumed=resumed,
            config=dict(self.cfg.cl_options or {}),
            make_loader=extra_loader,
            collate_refs=collate_refs,
            sample_refs=sample_refs,
            ref_dataset=ref_dataset,
            batches=batches,
            policy=unwrapped,
            optimizer=self.optimizer,
            backbone_trainable=backbone_trainable,
            batch_size=self.cfg.batch_size,
            grad_accum=self.cfg.grad_accum,
            seed=self.cfg.seed,
            step=self.step,
            cached_feature_steps=self.cfg.stage1_steps if self.cfg.cache_features else 0,
        )

    def _episode_ref(self, episode: Any) -> Any:
        for ref in (*self.data.task.train, *self.data.task.val):
            if self.data.stream.episode(ref) is episode:
                return ref
        raise KeyError(f"episode {episode.source} is not in the task")

    # -- resume state -------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.acc.unwrap_model(self.model).named_parameters())
        return {n: params[n].detach() for n in self.trainable_names}

    @property
    def sharded(self) -> bool:
        """Whether model or optimizer state is sharded over processes (FSDP, DeepSpeed)."""
        return str(self.acc.distributed_type).rsplit(".", 1)[-1] in ("FSDP", "DEEPSPEED")

    def save_resume(self) -> None:
        """Save the resume state: every process for sharded state, then the main process writes the rest."""
        acc = self.acc
        tmp = ckpt.resume_tmp(self.rdir)
        acc.wait_for_everyone()
        if self.sharded:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp / ckpt.ACCELERATE_DIR))
            acc.wait_for_everyone()
        if acc.is_main_process:
            if self.tb is not None:
                self.tb.flush()
            carry = {
                name: self.work / name
                for name in (ckpt.METRICS_LOG_NAME, BEST_DIR, ckpt.TENSORBOARD_DIR)
                if (self.work / name).exists()
            }
            scaler = acc.scaler.state_dict() if acc.scaler is not None else {}
            ckpt.save_resume_state(
                self.rdir,
                state={
                    "step": self.step,
                    "epoch": self.epoch,
                    "batches_in_epoch": self.batches_in_epoch,
                    "best_val": self.best_val,
                    "last_val": self.last_val,
                    "samples": self.samples,
                    "train_seconds": self.train_seconds,
                    "zero_run": self.guard.zero_run,
                    "nonfinite_run": self.guard.nonfinite_run,
                    "skipped": self.guard.skipped,
                    "total": self.total,
                    "num_processes": acc.num_processes,
                    "config": config_to_dict(self.cfg),
                    "prev": self._prev_identity(),
                },
                trainable=None if self.sharded else self._trainable_state(),
                optimizer={
                    "optimizer": None if self.sharded else self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": scaler,
                },
                cl_state=self.algo.state_dict(),
                carry=carry,
                prepared=self.sharded,
            )
            log.info("saved the resume state at step %d to %s", self.step, self.rdir)
        acc.wait_for_everyone()

    def _restore(self) -> None:
        loaded = ckpt.load_resume_state(self.rdir)
        state = loaded["state"]
        diff = resume_differences(state.get("config") or {}, config_to_dict(self.cfg))
        if diff:
            raise ConfigError(
                f"the resume state at {self.rdir} was saved with other settings ({', '.join(diff)} differ): resume "
                "with the same settings, or pass --resume never to start over"
            )
        if "prev" in state and state["prev"] != self._prev_identity():
            raise ConfigError(
                f"the resume state at {self.rdir} was saved continuing from --prev {state['prev'] or '(none)'}, this "
                f"run continues from --prev {self._prev_identity() or '(none)'}: resume with the same --prev, or pass "
                "--resume never to start over"
            )
        if state.get("num_processes", 1) != self.acc.num_processes:
            raise ConfigError(
                f"the resume state at {self.rdir} was saved by {state.get('num_processes')} process(es), this run has "
                f"{self.acc.num_processes}: resume with the same number (the sampler position counts batches of all "
                "processes), or pass --resume never"
            )
        if loaded["accelerate"] is not None:
            self.acc.load_state(str(loaded["accelerate"]))
        else:
            self._load_trainable(loaded["trainable"] or {})
            self.optimizer.load_state_dict(loaded["optimizer"]["optimizer"])
        self.scheduler.load_state_dict(loaded["optimizer"]["scheduler"])
        if self.acc.scaler is not None and loaded["optimizer"]["scaler"]:
            self.acc.scaler.load_state_dict(loaded["optimizer"]["scaler"])
        self.algo.load_state_dict(loaded["cl"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.best_val = state["best_val"]
        self.last_val = state["last_val"]
        self.samples = int(state["samples"])
        self.train_seconds = float(state["train_seconds"])
        self.guard.zero_run = int(state["zero_run"])
        self.guard.nonfinite_run = int(state["nonfinite_run"])
        self.guard.skipped = int(state["skipped"])
        if self.acc.is_main_process:
            for name in (ckpt.METRICS_LOG_NAME, BEST_DIR, ckpt.TENSORBOARD_DIR):
                source = self.rdir / name
                if source.is_dir():
                    shutil.copytree(source, self.work / name, dirs_exist_ok=True)
                elif source.is_file():
                    shutil.copy2(source, self.work / name)
        ckpt.set_rng_state(loaded["rng"])
        log.info("resumed from %s at step %d of %d", self.rdir, self.step, self.total)

    def _prev_identity(self) -> str | None:
        """The real path of ``--prev`` (``None`` without one), recorded in the resume state."""
        return os.path.realpath(self.prev) if self.prev is not None else None

    def _load_trainable(self, tensors: Mapping[str, torch.Tensor]) -> None:
        all_params = dict(self.acc.unwrap_model(self.model).named_parameters())
        params = {n: all_params[n] for n in self.trainable_names}
        missing = [n for n in params if n not in tensors]
        if missing:
            raise ArtifactError(f"the resume state at {self.rdir} lacks weights {missing[:3]}: pass --resume never")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])

    # -- the loop -----------------------------------------------------------------------------

    def _batches(self) -> Iterator[Any]:
        """Micro-batches forever, epoch after epoch, from the saved position on.

        Stage 1 of --cache-features reads the feature loader; at the switch to stage 2 the
        iteration restarts at the same position with the full loader (same sampler, same order).
        """
        world = self.acc.num_processes
        while True:
            cached = self._from_cache()
            loader = self.feature_loader if cached else self.loader
            self.sampler.seek(self.epoch, self.batches_in_epoch * self.cfg.batch_size * world)
            switched = False
            for batch in loader:
                self.batches_in_epoch += 1
                yield batch
                if self._from_cache() != cached:
                    switched = True
                    break
            if not switched:
                self.epoch += 1
                self.batches_in_epoch = 0

    def train(self) -> None:
        cfg, acc = self.cfg, self.acc
        model, optimizer = self.model, self.optimizer
        batches = self._batches()
        device = acc.device
        loss_sum = torch.zeros((), device=device)
        term_sums: dict[str, torch.Tensor] = {}
        interval_steps = 0
        interval_start = time.perf_counter()
        interval_samples = 0
        stage1 = cfg.two_stage and self.step < cfg.stage1_steps
        if stage1:
            self.built.set_backbone_trainable(False)
        model.train()
        while self.step < self.total:
            if stage1 and self.step >= cfg.stage1_steps:
                stage1 = False
                self.built.set_backbone_trainable(True)
                log.info("stage 2 from step %d: the adapters train with the head", self.step)
            self.ctx.step = self.step
            step_loss = torch.zeros((), device=device)
            terms_now: dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum):
                if self.cudagraphs:  # a new iteration: earlier steps' graph outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
                batch = next(batches)
                self.algo.observe(batch, self.ctx.task)
                batch = self.algo.modify_batch(batch, self.ctx.task)
                if FEATURES in batch:
                    _check_cached_batch(batch, self.algo.name)
                sync = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else acc.no_sync(model):
                    output = model(batch)
                    loss = output.loss
                    penalty = self.algo.compute_penalty(model)
                    if penalty is not None:
                        loss = loss + penalty
                        terms_now["cl_penalty"] = terms_now.get("cl_penalty", 0) + penalty.detach() / cfg.grad_accum
                    acc.backward(loss / cfg.grad_accum)
                self.algo.after_backward(model)
                step_loss += loss.detach() / cfg.grad_accum
                for k, v in output.terms.items():
                    terms_now[k] = terms_now.get(k, 0) + v.detach().float() / cfg.grad_accum
                interval_samples += _batch_size(batch)
            if self.step == 0 and not stage1:
                check_first_gradients(self.trainable, _floats(terms_now), self.group_counts)
            params = [p for _, p in self.trainable]
            norm = acc.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            norm_t = norm if isinstance(norm, torch.Tensor) else torch.tensor(float(norm), device=device)
            # the step's one read (with several processes, the stop agreement's sum is read after it)
            finite = bool(torch.isfinite(step_loss) & torch.isfinite(norm_t))
            if finite:
                optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
            else:
                self.guard.nonfinite(self.step + 1, float(step_loss), self.group_counts)
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if finite:
                loss_sum += step_loss
                for k, v in terms_now.items():
                    term_sums[k] = term_sums.get(k, torch.zeros((), device=device)) + v
                interval_steps += 1
            last_grad_norm = norm_t
            metrics = None
            if self.step % cfg.log_every == 0 or self.step == self.total:
                elapsed = time.perf_counter() - interval_start
                samples = interval_samples * acc.num_processes
                self.samples += samples
                self.train_seconds += elapsed
                if acc.num_processes > 1:  # the mean over processes, read at log steps only
                    loss_sum = acc.reduce(loss_sum, reduction="mean")
                    term_sums = {k: acc.reduce(v, reduction="mean") for k, v in term_sums.items()}
                if interval_steps:
                    mean = float(loss_sum) / interval_steps
                    terms = {k: float(v) / interval_steps for k, v in term_sums.items()}
                    self.guard.finite(float(step_loss), _floats(terms_now), self.group_counts, interval_steps)
                    self.last_loss = mean
                    metrics = {
                        "step": self.step,
                        "loss": mean,
                        "terms": terms,
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": samples / elapsed if elapsed > 0 else None,
                        "grad_norm": float(last_grad_norm),
                        "epoch": self.epoch,
                    }
                    self._log(metrics)
                loss_sum = torch.zeros((), device=device)
                term_sums = {}
                interval_steps = 0
                interval_samples = 0
                interval_start = time.perf_counter()
            if self.val_loader is not None and (
                (cfg.val_every and self.step % cfg.val_every == 0) or self.step == self.total
            ):
                self._validate()
                interval_start = time.perf_counter()
            if self.progress is not None:
                self.progress(Progress(self.step, self.total, metrics))
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                self.save_resume()
            if self._stop_requested():
                self.save_resume()
                import signal

                name = signal.Signals(self.stop.signum or signal.SIGTERM).name
                raise PreemptedError(
                    f"stopped by {name} at step {self.step} of {self.total}; the resume state is in {self.rdir}: "
                    f"rerun the same command (with --resume auto) to continue; exit code {EXIT_PREEMPTED}"
                )
        if self.stop_agreement is not None:
            self.stop_agreement.close()
        self.algo.on_task_end(self.ctx)

    def _stop_requested(self) -> bool:
        flag = self.stop.is_set()
        if self.acc.num_processes == 1:
            return flag
        if self.stop_agreement is None:
            self.stop_agreement = StopAgreement(self.acc.device)
        return self.stop_agreement.poll(flag)

    def _validate(self) -> None:
        cfg = self.cfg
        assert self.val_loader is not None
        limit = SMOKE_VAL_BATCHES if cfg.smoke else cfg.val_batches
        self.model.eval()
        total = torch.zeros((), device=self.acc.device)
        count = torch.zeros((), device=self.acc.device)
        with torch.no_grad():
            for i, batch in enumerate(self.val_loader):
                if limit is not None and i >= limit:
                    break
                n = _batch_size(batch)
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
                total += self.model(batch).loss.detach().float() * n
                count += n
        self.model.train()
        total = self.acc.reduce(total, reduction="sum")
        count = self.acc.reduce(count, reduction="sum")
        val = float(total / count.clamp(min=1))
        self.last_val = val
        better = self.best_val is None or val < self.best_val
        if better:
            self.best_val = val
        self._log({"step": self.step, "val_loss": val, "best_val_loss": self.best_val})
        if better and cfg.keep_best and self.acc.is_main_process:
            best = self.work / BEST_DIR
            shutil.rmtree(best, ignore_errors=True)
            best.mkdir(parents=True)
            self.built.save_weights(self.acc.unwrap_model(self.model), best)
        if self.progress is not None:
            self.progress(Progress(self.step, self.total, {"val_loss": val}, phase="val"))

    def _log(self, record: Mapping[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        with (self.work / ckpt.METRICS_LOG_NAME).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, step)
            for k, v in (record.get("terms") or {}).items():
                self.tb.add_scalar(f"terms/{k}", v, step)
        log.debug("metrics %s", json.dumps(record, sort_keys=True))

    def close(self, *, discard: bool) -> None:
        """Close the TensorBoard writer; with ``discard``, remove the live log directory (a failed run)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if discard:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- the artifact -------------------------------------------------------------------------

    def finish(self, stats: Any, keymap: Any, prev: Any, command: Sequence[str], overwrite: bool) -> TrainResult:
        from vlacl.artifacts.writer import ArtifactWriter

        acc = self.acc
        acc.wait_for_everyone()
        full_state = None
        if self.sharded and str(acc.distributed_type).endswith("FSDP"):
            full_state = _full_state_dict(acc.unwrap_model(self.model))
        details: dict[str, Any] = {}
        written: Path | None = None
        samples_per_s = self.samples / self.train_seconds if self.train_seconds > 0 else 0.0
        if acc.is_main_process:
            policy = acc.unwrap_model(self.model)
            task = self.data.task
            with ArtifactWriter(
                self.out,
                "task_checkpoint",
                command=command,
                config_yaml=dump_config(self.cfg),
                seed=self.cfg.seed,
                overwrite=overwrite or self.out.exists(),
            ) as writer:
                details.update(self.built.save_weights(policy, writer.path, full_state))
                ckpt.save_cl_state(self.algo.state_dict(), writer.path)
                shutil.copy2(Path(stats.source), writer.path / STATS_NAME)
                (writer.path / KEYMAP_NAME).write_text(keymap.to_yaml(), encoding="utf-8")
                for name in (ckpt.METRICS_LOG_NAME, BEST_DIR, ckpt.TENSORBOARD_DIR):
                    source = self.work / name
                    if source.is_dir():
                        shutil.copytree(source, writer.path / name)
                    elif source.is_file():
                        shutil.copy2(source, writer.path / name)
                details.update(
                    {
                        "base_model": _recorded_model(self.cfg.model_path, self.out),
                        "stats_fingerprint": stats.fingerprint,
                        "steps": self.step,
                        "final_loss": self.last_loss,
                        "val_loss": self.last_val,
                        "best_val_loss": self.best_val,
                        "stream": self.cfg.stream_name,
                        "task_index": task.position,
                        "task_key": task.key,
                        "task_name": task.name,
                        "num_tasks": len(self.data.stream.tasks),
                        "cl_algorithm": self.algo.name,
                        "dataset_fingerprints": list(self.data.dataset_fingerprints),
                        "train_fingerprint": self.data.fingerprint,
                        "trainable_params": self.trainable_total,
                        "total_params": self.total_params,
                        "skipped_steps": self.guard.skipped,
                        "num_processes": acc.num_processes,
                        "precision": acc.mixed_precision,
                    }
                )
                writer.details.update(details)
                self._record_inputs(writer, stats, prev)
            written = self.out
            shutil.rmtree(self.rdir, ignore_errors=True)
            shutil.rmtree(ckpt.resume_tmp(self.rdir), ignore_errors=True)  # a save cut short by SIGKILL
            shutil.rmtree(self.work, ignore_errors=True)
            if self.cfg.feature_cache is None:
                shutil.rmtree(ckpt.feature_cache_dir(self.out), ignore_errors=True)
            log.info("wrote task checkpoint %s (task %d %r, %d steps)", self.out, task.position, task.key, self.step)
        acc.wait_for_everyone()
        return TrainResult(
            out=written,
            steps=self.step,
            final_loss=self.last_loss,
            val_loss=self.last_val,
            best_val_loss=self.best_val,
            trainable=self.group_counts,
            total_params=self.total_params,
            samples_per_s=samples_per_s,
            details=details,
            policy=acc.unwrap_model(self.model),
        )

    def _record_inputs(self, writer: Any, stats: Any, prev: Any) -> None:
        from vlacl.artifacts.reader import open_artifact
        from vlacl.data.stats import _record_input

        model = Path(self.cfg.model_path)
        if model.is_dir():
            for name in ("config.json",):
                if (model / name).is_file():
                    writer.add_file_input("base_model", model / name)
        stats_dir = Path(stats.source).parent
        writer.add_input("stats", open_artifact(stats_dir))
        for i, ds in enumerate(self.data.stream.datasets):
            _record_input(writer, "dataset" if len(self.data.stream.datasets) == 1 else f"dataset:{i}", ds.root)
        if prev is not None:
            writer.add_input("prev", prev)


class _RefDataset(torch.utils.data.Dataset[Any]):
    """Samples by :class:`SampleRef`, read through windowed datasets of the stream's episodes."""

    def __init__(self, data: TaskData, refs: Sequence[SampleRef], by_fp: Mapping[str, int]) -> None:
        from vlacl.data.windows import WindowedDataset

        self.refs = list(refs)
        self.items: list[tuple[WindowedDataset, int]] = []
        cache: dict[tuple[int, int], WindowedDataset] = {}
        train = data.train
        positions: dict[int, dict[int, int]] = {}  # dataset -> episode_index -> position
        for ref in self.refs:
            if ref.dataset_fingerprint not in by_fp:
                raise ArtifactError(
                    f"a sample refers to dataset {ref.dataset_fingerprint[:12]}, which is not among the --dataset "
                    "paths: pass every dataset of the stream"
                )
            d = by_fp[ref.dataset_fingerprint]
            episodes = data.stream.datasets[d].episodes
            if d not in positions:
                positions[d] = {ep.index: i for i, ep in enumerate(episodes)}
            pos = positions[d].get(ref.episode)
            if pos is None:
                raise ArtifactError(f"dataset {ref.dataset_fingerprint[:12]} has no episode {ref.episode}")
            key = (d, pos)
            if key not in cache:
                cache[key] = WindowedDataset(
                    [episodes[pos]],
                    train.spec,
                    observation_keys=train.observation_keys,
                    normalizer=train.normalizer,
                    short="skip",
                )
            self.items.append((cache[key], ref.frame))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        ds, frame = self.items[index]
        return ds[frame]


def _check_cached_batch(batch: Mapping[str, Any], algorithm: str) -> None:
    """Refuse a stage-1 batch whose rows lost their cached features (a CL algorithm that adds samples)."""
    features = batch[FEATURES]
    rows = _batch_size(batch)
    if not isinstance(features, torch.Tensor) or int(features.shape[0]) != rows:
        raise ConfigError(
            f"--cache-features: the CL algorithm {algorithm!r} changed stage 1's batch to {rows} samples, but only "
            "the task's own samples have cached features: drop --cache-features with this algorithm"
        )


def _remove_stale_live_dirs(rdir: Path) -> None:
    """Remove ``<resume dir>.live-<pid>`` directories of processes that no longer run (killed runs)."""
    prefix = f"{rdir.name}.live-"
    for path in rdir.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _overlaps(a: Path, b: Path) -> bool:
    """Whether two paths are the same directory or one lies inside the other (symlinks resolved)."""
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def _batch_size(batch: Any) -> int:
    action = batch.get("action") if isinstance(batch, dict) else None
    return int(action.shape[0]) if isinstance(action, torch.Tensor) else 0


def _floats(terms: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in terms.items()}


def _tensorboard(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard "
            "(metrics.jsonl is written either way)"
        ) from None
    return SummaryWriter(log_dir=str(directory))


__all__ = [
    "EXIT_PREEMPTED",
    "PreemptedError",
    "Progress",
    "ProgressFn",
    "StopFlag",
    "TrainResult",
    "run_train_task",
]


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model on the main process, on the CPU; empty elsewhere.

    A collective: every process calls it once training is over, before the main process writes the
    checkpoint from it (an FSDP module holds only its shards).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
