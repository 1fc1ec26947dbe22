"""The continual-learning hook protocol, the task context the hooks see, and the explicit registry.

A CL algorithm (replay, regularization, ...) is a class registered under a name with
:func:`register`; ``vlacl train-task --cl NAME`` builds it with :func:`get_algorithm` and the loop
calls its hooks. An algorithm overrides only the hooks it needs; :class:`Algorithm` gives no-op
defaults for all of them.

Call order in ``train-task`` (one process trains one task)::

    algo = get_algorithm(name, options)
    algo.load_state_dict(state)        # the previous task's CL state (--prev), if it saved one,
                                       # or the mid-task state (--resume), which replaces it
    algo.on_task_start(ctx)            # once; model, optimizer and data are ready; ctx.resumed
                                       # tells a resumed run from a fresh one
    for each optimizer step:
        ctx.step = optimizer steps done so far
        for each of the --grad-accum micro-batches:
            algo.observe(batch, task)              # the task's own batch, as the loader gave it
            batch = algo.modify_batch(batch, task) # e.g. add replayed samples
            out = model(batch)                     # PolicyOutput
            penalty = algo.compute_penalty(model)  # a scalar tensor or None (e.g. EWC)
            backward(out.loss + penalty)
            algo.after_backward(model)             # gradients of this micro-batch are accumulated
        clip gradients; optimizer step; scheduler step; zero gradients
        (every --save-every steps, and on SIGTERM/SIGUSR1: algo.state_dict() in the resume state)
    algo.on_task_end(ctx)              # once, after the last step, before the checkpoint is written
    algo.state_dict()                  # saved in the checkpoint: cl_state.safetensors + cl_state.json

``task`` is the position of the task in the stream (an ``int``). Batches are the collated batches of
:meth:`vlacl.models.policy.Policy.collate` on the accelerator's device (see :mod:`vlacl.models.base`
for their keys, including ``episode_index`` and ``frame_index``). A state dict maps names to
tensors (saved in ``cl_state.safetensors``) or to JSON values (saved in ``cl_state.json``).

Gradients: an algorithm that needs its own gradients (scores, a Fisher, a reference gradient)
takes them with ``torch.autograd.grad`` through :attr:`TaskContext.policy`, the unwrapped policy,
on this process's samples (DDP's reducer is not involved), and reduces them with
``ctx.accelerator.reduce`` where processes must agree. The training gradient is ``p.grad`` in
``after_backward`` of a step's last micro-batch, already averaged by DDP. Both need whole
parameters on every process: :func:`require_unsharded` refuses FSDP and ZeRO-3 (and, for ``p.grad``,
DeepSpeed) with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from vlacl.errors import ConfigError


@dataclass(frozen=True)
class SampleRef:
    """One training sample by reference: which dataset, which episode, which frame.

    Attributes:
        dataset_fingerprint: :func:`vlacl.data.episode.dataset_fingerprint` of its dataset.
        episode: The episode's ``episode_index`` in that dataset.
        frame: The frame (the sample's current observation) within the episode.
    """

    dataset_fingerprint: str
    episode: int
    frame: int


@dataclass
class TaskContext:
    """What the hooks of a CL algorithm see of the run.

    Attributes:
        accelerator: The ``accelerate.Accelerator`` (device, process index, gather, ...).
        model: The policy being trained (wrapped by the accelerator; ``accelerator.unwrap_model``
            gives the :class:`~vlacl.models.policy.Policy`).
        task: The task's position in the stream (0-based).
        task_key: The task's key in the stream (``task_index`` as text, or a sub-dataset name).
        task_name: The task's instruction, or its key.
        stream_name: The name of the stream (``--stream-name``).
        num_tasks: How many tasks the stream has.
        train_dataset: The task's training samples (a :class:`~vlacl.data.windows.WindowedDataset`).
        dataset_fingerprints: Fingerprint of each dataset the stream is built from, in order.
        train_fingerprint: sha256 identifying the task's training samples (datasets, episodes, window).
        prev_checkpoint: The previous task's checkpoint directory (``--prev``), or ``None``.
        out_dir: The checkpoint directory this run writes (``--out``); the artifact is written after
            :meth:`CLAlgorithm.on_task_end`, so hooks keep their results in their state dict.
        resumed: Whether the run continues from a mid-task resume state.
        config: The algorithm's options (``cl_options`` of the config).
        make_loader: ``make_loader(refs, batch_size, seed)`` -> an iterable of collated batches (on
            the accelerator's device) of the samples ``refs``, for replay or Fisher estimates.
        collate_refs: ``collate_refs(refs)`` -> one collated batch of the samples ``refs``, on the device.
        sample_refs: ``sample_refs(indices)`` -> the :class:`SampleRef` of training samples by index.
        ref_dataset: ``ref_dataset(refs)`` -> a map-style dataset of the (uncollated) samples ``refs``.
        batches: ``batches(dataset, batch_sampler)`` -> collated batches on the device, read by
            ``--workers`` DataLoader workers, one per index list the ``batch_sampler`` yields (which
            may be endless: replay streams).
        policy: The unwrapped :class:`~vlacl.models.policy.Policy` (no DDP wrapper): forward passes
            through it run on this process alone (no gradient synchronisation), for scores and Fisher.
        optimizer: The optimizer (its parameter groups hold the current learning rates).
        backbone_trainable: Names (in ``policy.named_parameters()``) of the backbone's trainable
            parameters: the LoRA weights under ``--finetune lora``; the rest of the trainable ones
            belong to the head and the state/sensor encoders.
        batch_size: ``--batch-size`` (samples per micro-batch per process).
        grad_accum: ``--grad-accum`` (micro-batches per optimizer step).
        seed: ``--seed``.
        step: Optimizer steps done so far in this task (the loop sets it before every step; it
            continues from the resume state after ``--resume``).
        cached_feature_steps: The first steps whose batches come from the ``--cache-features``
            cache (stage 1): they carry the task's backbone features instead of backbone inputs, so
            samples from elsewhere cannot join them. 0 without ``--cache-features``.
    """

    accelerator: Any
    model: torch.nn.Module
    task: int
    task_key: str
    task_name: str
    stream_name: str
    num_tasks: int
    train_dataset: Any
    dataset_fingerprints: tuple[str, ...]
    train_fingerprint: str
    prev_checkpoint: Path | None
    out_dir: Path
    resumed: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)
    make_loader: Callable[[Sequence[SampleRef], int, int], Any] | None = None
    collate_refs: Callable[[Sequence[SampleRef]], dict[str, Any]] | None = None
    sample_refs: Callable[[Sequence[int]], list[SampleRef]] | None = None
    ref_dataset: Callable[[Sequence[SampleRef]], Any] | None = None
    batches: Callable[[Any, Iterable[list[int]]], Iterator[dict[str, Any]]] | None = None
    policy: Any = None
    optimizer: Any = None
    backbone_trainable: frozenset[str] = frozenset()
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    step: int = 0
    cached_feature_steps: int = 0


@runtime_checkable
class CLAlgorithm(Protocol):
    """The hooks a continual-learning algorithm implements (see the module docstring for the order)."""

    name: str

    def on_task_start(self, ctx: TaskContext) -> None:
        """Once before the first step of the task."""
        ...

    def observe(self, batch: dict[str, Any], task: int) -> None:
        """See the task's batch before it is modified (e.g. to fill a replay buffer)."""
        ...

    def modify_batch(self, batch: dict[str, Any], task: int) -> dict[str, Any]:
        """Return the batch the model trains on (e.g. with replayed samples added)."""
        ...

    def compute_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """A scalar added to the loss (e.g. EWC's), or ``None``."""
        ...

    def after_backward(self, model: torch.nn.Module) -> None:
        """After each micro-batch's backward pass, before clipping and the optimizer step."""
        ...

    def on_task_end(self, ctx: TaskContext) -> None:
        """Once after the last step, before the checkpoint is written."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Name -> tensor or JSON value; travels in the task checkpoint and the resume state."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


class Algorithm:
    """No-op defaults of every hook; subclass it and override what the algorithm needs."""

    name = "base"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        """Keep the algorithm's options."""
        self.config: dict[str, Any] = dict(config or {})

    def on_task_start(self, ctx: TaskContext) -> None:
        """Nothing by default."""

    def observe(self, batch: dict[str, Any], task: int) -> None:
        """Nothing by default."""

    def modify_batch(self, batch: dict[str, Any], task: int) -> dict[str, Any]:
        """The batch unchanged by default."""
        return batch

    def compute_penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """No penalty by default."""
        return None

    def after_backward(self, model: torch.nn.Module) -> None:
        """Nothing by default."""

    def on_task_end(self, ctx: TaskContext) -> None:
        """Nothing by default."""

    def state_dict(self) -> dict[str, Any]:
        """No state by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore by default."""


A = TypeVar("A")
T = TypeVar("T")


def require_unsharded(ctx: TaskContext, algorithm: str, *, gradients: bool = False) -> None:
    """Refuse a run whose processes do not each hold the full trainable parameters (with ``gradients``: p.grad).

    The gradient work of MIR, EWC, LwF and A-GEM runs on :attr:`TaskContext.policy` with whole
    parameters: FSDP and DeepSpeed ZeRO-3 shard them, and DeepSpeed keeps gradients in its own
    buffers instead of ``p.grad``.

    Raises:
        ConfigError: The accelerator shards what the algorithm needs.
    """
    kind = str(getattr(ctx.accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    plugin = getattr(getattr(ctx.accelerator, "state", None), "deepspeed_plugin", None)
    stage = int(getattr(plugin, "zero_stage", 0) or 0) if kind == "DEEPSPEED" else 0
    if kind == "FSDP" or stage == 3 or (gradients and kind == "DEEPSPEED"):
        what = "parameters and their gradients (p.grad)" if gradients else "parameters"
        where = f"DeepSpeed ZeRO-{stage}" if kind == "DEEPSPEED" else kind
        raise ConfigError(
            f"--cl {algorithm} needs the full trainable {what} on every process, which {where} does not keep: "
            "train it under DDP (accelerate config distributed_type: MULTI_GPU), or pick --cl seq or er"
        )


def parse_options(cls: type[T], algorithm: str, options: Mapping[str, Any] | None) -> T:
    """The options dataclass ``cls`` of an algorithm from ``cl_options`` (``--cl-opt KEY=VALUE``).

    Values are coerced to the fields' types; the dataclass's ``__post_init__`` checks their ranges.

    Raises:
        ConfigError: An option ``cls`` does not have (the message lists the ones it has), or a bad value.
    """
    from vlacl.config.core import config_keys, resolve_config

    known = config_keys(cls)
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise ConfigError(
            f"--cl {algorithm} has no option {', '.join(repr(k) for k in unknown)} (cl_options / --cl-opt): its "
            f"options are {', '.join(known) if known else 'none'}"
        )
    return resolve_config(cls, flags=dict(options or {}))


_REGISTRY: dict[str, Callable[[Mapping[str, Any]], CLAlgorithm]] = {}


def register(name: str) -> Callable[[A], A]:
    """Class decorator registering a CL algorithm under ``name`` (what ``--cl`` takes).

    The class is called with the algorithm's options (a mapping) to build it.

    Raises:
        ValueError: ``name`` is already registered (two algorithms may not share a name).
    """

    def decorate(cls: A) -> A:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"CL algorithm {name!r} is already registered")
        _REGISTRY[name] = cls  # type: ignore[assignment]
        return cls

    return decorate


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (tests register spies and remove them)."""
    _REGISTRY.pop(name, None)


def available() -> list[str]:
    """The registered names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_algorithm(name: str, config: Mapping[str, Any] | None = None) -> CLAlgorithm:
    """Build the algorithm registered as ``name`` with its options.

    Raises:
        ConfigError: No algorithm has that name (the message lists the registered ones).
    """
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown CL algorithm {name!r} (--cl): registered ones are {', '.join(sorted(_REGISTRY))}")
    algo = _REGISTRY[name](dict(config or {}))
    algo.name = name
    return algo


def _load_builtin() -> None:
    """Import the built-in algorithms, each of which registers itself."""
    import vlacl.cl.agem
    import vlacl.cl.er
    import vlacl.cl.ewc
    import vlacl.cl.lwf
    import vlacl.cl.mir
    import vlacl.cl.seq  # noqa: F401
