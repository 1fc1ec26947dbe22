"""LoRA on the backbone for one task of a stream, the adapter modes, plain fine-tuning, and their checkpoint files.

``train-task`` calls :func:`attach` at the start of a task with the previous task checkpoint's
adapters (:func:`load_previous`), trains what the returned :class:`AdapterSetup` marks trainable,
and at the end writes :func:`save_adapters`' files and details into the task checkpoint.

Adapter modes (``--finetune lora``):

- ``shared``: one adapter, ``shared``, trained on through the stream: task 0 creates it, every later
  task loads it from the previous checkpoint and trains it further.
- ``stack``: a new adapter per task; the earlier ones stay active in the forward pass (the feature is
  base + the sum of every adapter's update) but frozen, and their dropout is off, so they act as
  part of the base. Only the newest trains.
- ``per-task``: a new adapter per task; only the current task's adapter is active. The earlier ones
  are kept (and saved) but inactive; at inference :func:`activate_for_task` selects the adapter of
  the task being evaluated.

Without LoRA (``--finetune full|last-n|frozen``) every backbone weight, or those of the last N
transformer blocks, or none train; the weights that differ from the base model are saved as
``backbone.safetensors`` (names of the backbone module's parameters), which the next task and
evaluation load on top of the base model.

Files of a task checkpoint: ``adapters/<name>/adapter_config.json`` and
``adapters/<name>/adapter_model.safetensors`` for each adapter of the stack, written as PEFT's
``save_pretrained`` writes them (keys ``base_model.model.<module path in the backbone>.lora_A.weight``),
so ``PeftModel.from_pretrained(<the backbone>, <dir>)`` loads each one, and the details
``adapter_stack`` (stacking order), ``adapter_mode``, ``adapter_tasks``, ``finetune``,
``backbone_family`` and, where there is one, ``backbone_weights``.

PEFT wraps the backbone in a ``PeftModel`` whose ``forward`` passes its arguments through; the
setup's backbone is a :class:`LoraBackbone` that holds it and keeps the :class:`Backbone` interface.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import torch
from torch import nn

from vlacl.artifacts.names import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    BACKBONE_WEIGHTS_NAME,
    producer_of,
)
from vlacl.artifacts.reader import open_artifact
from vlacl.config.lora import AdapterConfig, AdapterMode, FinetuneMode
from vlacl.errors import ArtifactError, ConfigError, InputFormatError

from .peft_files import AdapterLayout, read_layout

if TYPE_CHECKING:
    from peft import PeftModel

    from vlacl.models.base import Backbone

log = logging.getLogger(__name__)

SHARED_ADAPTER: Final = "shared"
"""Name of the one adapter of ``--adapter-mode shared``."""

ADAPTER_MODES: Final[tuple[AdapterMode, ...]] = ("shared", "stack", "per-task")
FINETUNE_MODES: Final[tuple[FinetuneMode, ...]] = ("lora", "full", "last-n", "frozen")

_SLUG_LENGTH: Final = 48
"""Characters of the task name kept in an adapter's name: names stay readable as directory names."""

_LORA_FACTORS: Final = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

Unseen = Literal["error", "base", "latest"]


def adapter_name_for(task: str, task_index: int) -> str:
    """The adapter name of a task in ``stack`` and ``per-task`` modes: ``task_003_push-wall``.

    Unique per task index, the index zero-padded so that names sort in stream order (up to task
    999; the stack's order is ``details["adapter_stack"]`` in any case), and safe as a directory
    name and as a PEFT adapter name (no dots).
    """
    if task_index < 0:
        raise ValueError(f"task_index must be >= 0, got {task_index}")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", task).strip("-_")[:_SLUG_LENGTH].strip("-_") or "task"
    return f"task_{task_index:03d}_{slug}"


@dataclass(frozen=True)
class AdapterRecord:
    """One adapter of a stack and the task it was created for.

    Attributes:
        name: The adapter's name: its directory under ``adapters/`` and its PEFT adapter name.
        task: Name of the task it was created for (the first task of a shared adapter).
        task_index: That task's index in the stream.
    """

    name: str
    task: str
    task_index: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as recorded in a task checkpoint's ``details["adapter_tasks"]``."""
        return {"adapter": self.name, "task": self.task, "task_index": self.task_index}


@dataclass(frozen=True)
class PreviousAdapters:
    """What a task checkpoint hands to the next task: its adapters or its changed backbone weights.

    Attributes:
        path: The task checkpoint directory.
        finetune: How it was trained (``lora``, ``full``, ``last-n``, ``frozen``).
        mode: Its adapter mode; ``None`` without LoRA.
        adapters: Its adapters in stacking order (empty without LoRA).
        family: The backbone family it was trained on, where recorded.
        backbone_weights: ``backbone.safetensors`` of full or last-N fine-tuning, else ``None``.
    """

    path: Path
    finetune: FinetuneMode
    mode: AdapterMode | None
    adapters: tuple[AdapterRecord, ...]
    family: str | None = None
    backbone_weights: Path | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The adapter names in stacking order."""
        return tuple(a.name for a in self.adapters)

    def adapter_dir(self, name: str) -> Path:
        """The PEFT directory of adapter ``name``."""
        return self.path / ADAPTERS_DIR / name


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a module, each shared tensor counted once."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        """Trainable share of the total."""
        return self.trainable / self.total if self.total else 0.0


class LoraBackbone(nn.Module):
    """A backbone with PEFT LoRA adapters, still a :class:`~vlacl.models.base.Backbone`.

    Attributes:
        peft_model: The ``PeftModel`` wrapping the backbone; its adapters, active adapters and
            ``save_pretrained`` are PEFT's own.
    """

    def __init__(self, peft_model: PeftModel, backbone: Backbone) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.family: str = backbone.family
        self.hidden_size: int = backbone.hidden_size
        self.takes_state: bool = backbone.takes_state

    @property
    def base(self) -> Backbone:
        """The wrapped backbone (its linear layers now carry the LoRA branches)."""
        return cast("Backbone", self.peft_model.get_base_model())

    def prepare(self, images: Mapping[str, torch.Tensor], instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The wrapped backbone's preprocessing."""
        return self.base.prepare(images, instructions)

    def forward(self, inputs: Mapping[str, torch.Tensor], state: torch.Tensor | None = None) -> torch.Tensor:
        """One feature per frame ``(N, D)``, with the active adapters' updates."""
        return cast(torch.Tensor, self.peft_model(inputs, state))

    def lora_target_modules(self, preset: str) -> list[str] | str:
        """The wrapped backbone's LoRA targets for ``preset``."""
        return self.base.lora_target_modules(preset)

    def layer_modules(self) -> Sequence[nn.Module]:
        """The wrapped backbone's transformer blocks."""
        return self.base.layer_modules()

    def pad_inputs(self, inputs: Mapping[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """The wrapped backbone's padding of prepared inputs (its optional ``pad_inputs``)."""
        pad = getattr(self.base, "pad_inputs", None)
        if pad is None:
            raise InputFormatError(f"the {self.family} backbone cannot pad prepared inputs (it has no pad_inputs)")
        return cast("dict[str, torch.Tensor]", pad(inputs, length))


@dataclass
class AdapterSetup:
    """The backbone of one task, ready to train: what is wrapped, what trains, what gets saved.

    Attributes:
        backbone: The module to use as the policy's backbone: a :class:`LoraBackbone` with LoRA,
            else the backbone itself.
        base: The backbone module as given (for LoRA, the module PEFT wrapped).
        finetune: ``lora``, ``full``, ``last-n`` or ``frozen``.
        mode: The adapter mode; ``None`` without LoRA.
        adapters: Every adapter in stacking order, with the task it was made for.
        trainable_adapter: The adapter this task trains; ``None`` without LoRA.
        trainable: The backbone parameters this task trains, by name in :attr:`backbone`.
        changed: Names (in :attr:`base`) of the backbone weights that differ from the base model and
            are saved (full and last-N fine-tuning; this task's and the earlier tasks').
    """

    backbone: Backbone
    base: nn.Module
    finetune: FinetuneMode
    mode: AdapterMode | None
    adapters: tuple[AdapterRecord, ...] = ()
    trainable_adapter: str | None = None
    trainable: dict[str, nn.Parameter] = field(default_factory=dict)
    changed: tuple[str, ...] = ()

    @property
    def stack(self) -> tuple[str, ...]:
        """Adapter names in stacking order."""
        return tuple(a.name for a in self.adapters)

    @property
    def module(self) -> nn.Module:
        """:attr:`backbone` as the ``nn.Module`` it is (to move, train, or list parameters)."""
        return cast(nn.Module, self.backbone)

    @property
    def peft_model(self) -> PeftModel | None:
        """The ``PeftModel`` with LoRA, else ``None``."""
        return self.backbone.peft_model if isinstance(self.backbone, LoraBackbone) else None

    def active_adapters(self) -> tuple[str, ...]:
        """The adapters the forward pass uses now."""
        peft = self.peft_model
        return () if peft is None else tuple(_tuner(peft).active_adapters)

    def counts(self) -> ParameterCount:
        """Trainable and total parameters of the backbone (adapters included)."""
        return count_parameters(self.module)


def count_parameters(module: nn.Module) -> ParameterCount:
    """Trainable and total parameters of ``module``; a tensor shared by several modules counts once."""
    trainable = total = 0
    for param in module.parameters():  # parameters() yields each shared tensor once
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable=trainable, total=total)


def _previous_records(details: Mapping[str, Any], names: Sequence[str], where: Path) -> tuple[AdapterRecord, ...]:
    """The stack's records: ``details["adapter_tasks"]`` where written, else each name its own task."""
    tasks = details.get("adapter_tasks")
    if tasks is None:
        return tuple(AdapterRecord(name, name, i) for i, name in enumerate(names))
    try:
        by_name = {
            str(t["adapter"]): AdapterRecord(str(t["adapter"]), str(t["task"]), int(t["task_index"])) for t in tasks
        }
    except (TypeError, KeyError, ValueError):
        raise ArtifactError(
            f"{where}: details.adapter_tasks should list {{adapter, task, task_index}} objects, got {tasks!r}: the "
            f"artifact is damaged; recreate it with `{producer_of('task_checkpoint')}`"
        ) from None
    if set(by_name) != set(names):
        raise ArtifactError(
            f"{where}: details.adapter_tasks names the adapters {sorted(by_name)}, but the stack is {list(names)}: the "
            f"artifact is damaged; recreate it with `{producer_of('task_checkpoint')}`"
        )
    return tuple(by_name[name] for name in names)


def load_previous(checkpoint: Path | str) -> PreviousAdapters:
    """Read what a task checkpoint hands to the next task, checking every adapter as merge-lora does.

    Raises:
        ArtifactError: Not a task checkpoint, or one whose details or files are damaged.
        InputFormatError: An adapter that is not a plain PEFT LoRA adapter vlacl can merge.
    """
    path = Path(checkpoint)
    artifact = open_artifact(path, "task_checkpoint")
    details = artifact.manifest.details
    finetune = details.get("finetune", "lora")
    if finetune not in FINETUNE_MODES:
        raise ArtifactError(
            f"{path}: details.finetune is {finetune!r}, not one of {', '.join(FINETUNE_MODES)}: the artifact is "
            f"damaged or from a newer vlacl; recreate it with `{producer_of('task_checkpoint')}`"
        )
    family = details.get("backbone_family")
    family = str(family) if family is not None else None
    weights = None
    if details.get("backbone_weights") is not None:
        weights = artifact.file(str(details["backbone_weights"]))
    if finetune != "lora":
        return PreviousAdapters(path, finetune, None, (), family, weights)
    mode = details.get("adapter_mode", "stack")  # a stack without a recorded mode is what every reader assumes
    if mode not in ADAPTER_MODES:
        raise ArtifactError(
            f"{path}: details.adapter_mode is {mode!r}, not one of {', '.join(ADAPTER_MODES)}: the artifact is "
            f"damaged or from a newer vlacl; recreate it with `{producer_of('task_checkpoint')}`"
        )
    names = details.get("adapter_stack")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ArtifactError(
            f"{path} is a LoRA task_checkpoint whose details.adapter_stack should list adapter names, got {names!r}: "
            f"the artifact is damaged; recreate it with `{producer_of('task_checkpoint')}`"
        )
    if len(set(names)) != len(names):
        raise ArtifactError(f"{path}: details.adapter_stack names an adapter twice ({names}): recreate it")
    for name in names:  # present, listed, and a plain LoRA adapter vlacl can merge
        artifact.file(f"{ADAPTERS_DIR}/{name}/{ADAPTER_CONFIG_NAME}")
        artifact.file(f"{ADAPTERS_DIR}/{name}/{ADAPTER_WEIGHTS_NAME}")
        read_layout(path / ADAPTERS_DIR / name, name)
    records = _previous_records(details, names, path)
    return PreviousAdapters(path, finetune, mode, records, family, weights)


def resolve_targets(backbone: Backbone, settings: AdapterConfig) -> list[str] | str:
    """PEFT's ``target_modules`` for ``settings.targets``: the backbone's preset, or the names or regex given."""
    if settings.is_preset:
        return backbone.lora_target_modules(settings.targets.strip())
    return settings.explicit_targets()


def _tuner(peft: PeftModel) -> Any:
    """The ``LoraModel`` in the ``PeftModel``: it activates several adapters at once, ``PeftModel`` does not."""
    return peft.base_model


def _alpha(value: float) -> Any:
    """Alpha as PEFT types it (an int) where it is whole, so the saved config reads as PEFT's own."""
    return int(value) if float(value).is_integer() else value


def _new_lora_config(backbone: Backbone, settings: AdapterConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=_alpha(settings.lora_alpha),
        lora_dropout=settings.dropout,
        use_rslora=settings.rslora,
        target_modules=resolve_targets(backbone, settings),
        bias="none",
    )


def _check_fits(module: nn.Module, layout: AdapterLayout, family: str) -> None:
    """Every module the adapter changes exists in ``module`` with the weight shape the adapter expects."""
    for m in layout.modules.values():
        try:
            target = module.get_submodule(m.module)
        except AttributeError:
            raise InputFormatError(
                f"adapter {layout.name} ({layout.path}) adapts {m.module}, which this {family} backbone does not have: "
                "it was trained on another base model; pass the base model the previous checkpoint was trained on"
            ) from None
        weight = getattr(target, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        if shape != (m.rows, m.cols):
            raise InputFormatError(
                f"adapter {layout.name} ({layout.path}) expects {m.module} with a weight of shape "
                f"({m.rows}, {m.cols}), but this {family} backbone's is {shape}: it was trained on another base "
                "model; pass the base model the previous checkpoint was trained on"
            )
    params = dict(module.named_parameters())
    for name, (_, shape) in layout.replacements.items():
        if name not in params or tuple(params[name].shape) != tuple(shape):
            raise InputFormatError(
                f"adapter {layout.name} ({layout.path}) saves {name} with shape {tuple(shape)}, which this {family} "
                "backbone does not have: pass the base model the previous checkpoint was trained on"
            )


def _load_adapter(
    peft: PeftModel | None, module: nn.Module, directory: Path, name: str, family: str, dropout: float | None
) -> PeftModel:
    """Load one PEFT adapter directory as adapter ``name``; check its keys and shapes exactly.

    ``dropout`` replaces the saved LoRA dropout (for an adapter that trains on); ``None`` keeps it.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    layout = read_layout(directory, name)
    _check_fits(peft.get_base_model() if peft is not None else module, layout, family)
    config = LoraConfig.from_pretrained(str(directory))
    config.inference_mode = False
    if dropout is not None:
        config.lora_dropout = dropout
    try:
        if peft is None:
            peft = get_peft_model(module, config, adapter_name=name)
        else:
            peft.add_adapter(name, config)
    except ValueError as exc:  # PEFT: target modules not found, ...
        raise InputFormatError(
            f"adapter {name} ({directory}) cannot be attached to this {family} backbone: {exc}"
        ) from None
    tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
    expected = get_peft_model_state_dict(peft, adapter_name=name, save_embedding_layers=False)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[:3]}" if missing else f"has {unexpected[:3]}, which the backbone does not"
        raise InputFormatError(
            f"adapter {name} ({directory}) {what}: it was saved for another backbone or its files are damaged; pass "
            "the base model the previous checkpoint was trained on"
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise InputFormatError(
                f"adapter {name} ({directory}): {key} has shape {tuple(tensor.shape)}, the backbone expects "
                f"{tuple(expected[key].shape)}: it was saved for another backbone"
            )
    result: Any = set_peft_model_state_dict(peft, tensors, adapter_name=name)
    if result.unexpected_keys:
        raise InputFormatError(f"adapter {name} ({directory}): PEFT did not load {result.unexpected_keys[:3]}")
    return peft


def _check_continues(previous: PreviousAdapters, settings: AdapterConfig, family: str) -> None:
    """The current task continues the previous checkpoint's stream: same backbone, same way of training."""
    if previous.family is not None and previous.family != family:
        raise ConfigError(
            f"{previous.path} was trained on a {previous.family} backbone, this task uses a {family} one: pass the "
            "base model of the stream"
        )
    if previous.finetune != settings.finetune:
        raise ConfigError(
            f"{previous.path} was trained with --finetune {previous.finetune}, this task with --finetune "
            f"{settings.finetune}: a stream keeps one way of training; pass --finetune {previous.finetune}"
        )
    if settings.finetune == "lora" and previous.mode != settings.mode:
        raise ConfigError(
            f"{previous.path} has --adapter-mode {previous.mode} adapters, this task uses --adapter-mode "
            f"{settings.mode}: a stream keeps one adapter mode; pass --adapter-mode {previous.mode}"
        )


def _check_shared_settings(previous: PreviousAdapters, settings: AdapterConfig) -> None:
    """A shared adapter trains on with the rank, alpha and scaling it was created with."""
    from .peft_files import read_settings

    saved = read_settings(previous.adapter_dir(SHARED_ADAPTER))
    for flag, was, now in (
        ("--lora-rank", saved.r, settings.rank),
        ("--lora-alpha", saved.lora_alpha, settings.lora_alpha),
        ("--rslora", saved.use_rslora, settings.rslora),
    ):
        if was != now:
            raise ConfigError(
                f"the shared adapter of {previous.path} has {flag} {was}, this task asks for {now}: a shared adapter "
                f"keeps its settings through the stream; pass {flag} {was}"
            )


def _lora_layers(peft: PeftModel) -> Iterable[Any]:
    from peft.tuners.lora import LoraLayer

    return (m for m in peft.modules() if isinstance(m, LoraLayer))


def _adapter_parameters(peft: PeftModel, names: Iterable[str]) -> list[nn.Parameter]:
    """The LoRA factors of adapters ``names``."""
    wanted = set(names)
    params: list[nn.Parameter] = []
    for layer in _lora_layers(peft):
        for attr in _LORA_FACTORS:
            container = getattr(layer, attr)
            for name in wanted & set(container.keys()):
                params.extend(
                    container[name].parameters() if isinstance(container[name], nn.Module) else [container[name]]
                )
    return params


def _freeze_dropout(peft: PeftModel, names: Iterable[str]) -> None:
    """Turn off the LoRA dropout of frozen adapters: they act as part of the base, the same in training and eval."""
    wanted = set(names)
    for layer in _lora_layers(peft):
        for name in wanted & set(layer.lora_dropout.keys()):
            layer.lora_dropout[name] = nn.Identity()


def _load_stack(
    module: nn.Module, backbone: Backbone, previous: PreviousAdapters, train_shared: float | None
) -> PeftModel:
    peft: PeftModel | None = None
    for record in previous.adapters:
        dropout = train_shared if record.name == SHARED_ADAPTER else None
        peft = _load_adapter(peft, module, previous.adapter_dir(record.name), record.name, backbone.family, dropout)
    if peft is None:
        raise ArtifactError(f"{previous.path} is a LoRA task checkpoint without adapters: recreate it")
    return peft


def _as_module(backbone: object) -> nn.Module:
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"a backbone must be a torch.nn.Module, got {type(backbone).__name__}")
    if isinstance(backbone, LoraBackbone):
        raise TypeError("the backbone already carries LoRA adapters: pass the bare backbone")
    return backbone


def attach(
    backbone: Backbone,
    settings: AdapterConfig,
    *,
    task: str,
    task_index: int,
    previous: PreviousAdapters | None = None,
) -> AdapterSetup:
    """Set the backbone up for one task: load the previous checkpoint's adapters or weights, mark what trains.

    The backbone module is changed in place (PEFT injects its LoRA layers into it). Every backbone
    parameter outside :attr:`AdapterSetup.trainable` has ``requires_grad=False``.

    Args:
        backbone: The bare backbone, with the base model's weights.
        settings: LoRA and fine-tuning settings of the task.
        task: The task's name.
        task_index: The task's index in the stream.
        previous: The previous task checkpoint's adapters (:func:`load_previous`); ``None`` for the
            first task.

    Raises:
        ConfigError: Settings that do not continue the previous checkpoint's stream (another mode, a
            shared adapter's other rank), LoRA targets that match nothing, or more blocks to train
            than the backbone has.
        InputFormatError: A previous adapter or weight file that does not fit this backbone.
    """
    module = _as_module(backbone)
    if previous is not None:
        _check_continues(previous, settings, backbone.family)
    if settings.finetune != "lora":
        return _attach_finetune(backbone, module, settings, previous)
    from peft import get_peft_model

    records = list(previous.adapters) if previous is not None else []
    if settings.mode == "shared":
        trainable = SHARED_ADAPTER
        if previous is not None:
            if previous.names != (SHARED_ADAPTER,):
                raise ArtifactError(
                    f"{previous.path} is a shared-mode checkpoint whose stack is {list(previous.names)}, not "
                    f"[{SHARED_ADAPTER!r}]: the artifact is damaged; recreate it"
                )
            _check_shared_settings(previous, settings)
        else:
            records.append(AdapterRecord(SHARED_ADAPTER, task, task_index))
    else:
        trainable = adapter_name_for(task, task_index)
        if trainable in (r.name for r in records):
            where = previous.path if previous is not None else "the previous checkpoint"
            raise ConfigError(
                f"{where} already has an adapter {trainable} for task {task_index} ({task}): continue from the "
                "checkpoint of the task before it"
            )
        records.append(AdapterRecord(trainable, task, task_index))
    module.requires_grad_(False)
    peft = _load_stack(module, backbone, previous, settings.dropout) if previous is not None else None
    if peft is None or trainable not in peft.peft_config:
        config = _new_lora_config(backbone, settings)
        try:
            if peft is None:
                peft = get_peft_model(module, config, adapter_name=trainable)
            else:
                peft.add_adapter(trainable, config)
        except ValueError as exc:  # PEFT: no module matched the targets
            raise ConfigError(
                f"invalid --lora-targets {settings.targets!r} for the {backbone.family} backbone: {exc}"
            ) from None
    names = [r.name for r in records]
    active = [trainable] if settings.mode == "per-task" else names
    _tuner(peft).set_adapter(active)  # marks every active adapter trainable; the frozen ones follow
    peft.requires_grad_(False)
    for param in _adapter_parameters(peft, [trainable]):
        param.requires_grad_(True)
    if settings.mode == "stack":
        _freeze_dropout(peft, names[:-1])
    wrapped = LoraBackbone(peft, backbone)
    setup = AdapterSetup(
        backbone=cast("Backbone", wrapped),
        base=module,
        finetune="lora",
        mode=settings.mode,
        adapters=tuple(records),
        trainable_adapter=trainable,
        trainable={n: p for n, p in wrapped.named_parameters() if p.requires_grad},
    )
    _log_setup(setup)
    return setup


def _attach_finetune(
    backbone: Backbone, module: nn.Module, settings: AdapterConfig, previous: PreviousAdapters | None
) -> AdapterSetup:
    changed: list[str] = []
    if previous is not None and previous.backbone_weights is not None:
        changed = load_backbone_weights(module, previous.backbone_weights)
    module.requires_grad_(False)
    if settings.finetune == "full":
        module.requires_grad_(True)
    elif settings.finetune == "last-n":
        layers = list(backbone.layer_modules())
        if settings.last_n > len(layers):
            raise ConfigError(
                f"invalid --last-n-layers {settings.last_n}: the {backbone.family} backbone has {len(layers)} "
                f"transformer blocks; pass at most {len(layers)} (or --finetune full)"
            )
        for layer in layers[-settings.last_n :]:
            layer.requires_grad_(True)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    changed_names = tuple(sorted(set(changed) | set(trainable)))
    setup = AdapterSetup(
        backbone=backbone,
        base=module,
        finetune=settings.finetune,
        mode=None,
        trainable=trainable,
        changed=changed_names,
    )
    _log_setup(setup)
    return setup


def _log_setup(setup: AdapterSetup) -> None:
    counts = setup.counts()
    log.info(
        "backbone %s: finetune=%s mode=%s stack=%s trains %s: %d of %d parameters (%.4f%%)",
        setup.backbone.family,
        setup.finetune,
        setup.mode,
        ",".join(setup.stack) or "-",
        setup.trainable_adapter or setup.finetune,
        counts.trainable,
        counts.total,
        100.0 * counts.fraction,
    )


def load_backbone_weights(backbone: nn.Module, path: Path) -> list[str]:
    """Load a ``backbone.safetensors`` into ``backbone`` in place; return the names it set.

    Raises:
        InputFormatError: A tensor the backbone lacks or has with another shape, or an unreadable file.
    """
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError
        raise InputFormatError(f"{path} cannot be read ({exc}): the checkpoint is damaged; recreate it") from None
    params = dict(backbone.named_parameters())
    for name, tensor in tensors.items():
        if name not in params or params[name].shape != tensor.shape:
            have = tuple(params[name].shape) if name in params else "nothing"
            raise InputFormatError(
                f"{path} holds {name} {tuple(tensor.shape)}, the backbone has {have}: it was saved for another base "
                "model; pass the base model the checkpoint was trained on"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return sorted(tensors)


def _untied(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses aliases): repeats are copied."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _write_adapter(
    peft: PeftModel, name: str, directory: Path, full_state: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Write adapter ``name`` as PEFT's ``save_pretrained(..., selected_adapters=[name])`` does, without its README."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(
        peft,
        state_dict=None if full_state is None else dict(full_state),
        adapter_name=name,
        save_embedding_layers=False,
    )
    save_file(_untied(state), str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(peft.peft_config[name])
    base = peft.get_base_model()
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base.__dict__.get("name_or_path")
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)


def save_adapters(
    setup: AdapterSetup,
    out_dir: Path | str,
    *,
    peft_state: Mapping[str, torch.Tensor] | None = None,
    base_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write the setup's adapters (and changed backbone weights) into a task checkpoint directory.

    Writes ``adapters/<name>/adapter_config.json`` and ``adapter_model.safetensors`` for every
    adapter of the stack, and ``backbone.safetensors`` where full or last-N fine-tuning changed
    backbone weights. Call it on the main process with the unwrapped (not DDP) setup. Under FSDP,
    whose modules hold only shards, pass the gathered full tensors: ``peft_state`` named as in the
    PEFT model's ``state_dict``, ``base_state`` as in the backbone's.

    Returns:
        The manifest details to record: ``adapter_stack``, ``adapter_mode``, ``adapter_tasks``,
        ``trainable_adapter`` (and, in per-task mode, ``active_adapter``, the one merge-lora and
        compose-adapters take), ``finetune``, ``backbone_family``, ``backbone_weights``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft = setup.peft_model
    if peft is not None:
        for name in setup.stack:
            _write_adapter(peft, name, out / ADAPTERS_DIR / name, peft_state)
    weights = None
    if setup.changed:
        params = dict(base_state) if base_state is not None else dict(setup.base.named_parameters())
        save_file(
            _untied({name: params[name] for name in setup.changed}),
            str(out / BACKBONE_WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        weights = BACKBONE_WEIGHTS_NAME
    return {
        "adapter_stack": list(setup.stack),
        "adapter_mode": setup.mode,
        "adapter_tasks": [a.to_dict() for a in setup.adapters],
        "trainable_adapter": setup.trainable_adapter,
        **({"active_adapter": setup.trainable_adapter} if setup.mode == "per-task" else {}),
        "finetune": setup.finetune,
        "backbone_family": setup.backbone.family,
        "backbone_weights": weights,
    }


def load_for_inference(backbone: Backbone, checkpoint: Path | str | PreviousAdapters) -> AdapterSetup:
    """The backbone as a task checkpoint left it, every parameter frozen, for evaluation.

    Adapters active: the shared one, the whole stack, or (per-task) the last task's; select
    another task's with :func:`activate_for_task`.

    Raises:
        ArtifactError, InputFormatError: As :func:`load_previous` and :func:`attach`.
    """
    previous = checkpoint if isinstance(checkpoint, PreviousAdapters) else load_previous(checkpoint)
    module = _as_module(backbone)
    if previous.family is not None and previous.family != backbone.family:
        raise ConfigError(
            f"{previous.path} was trained on a {previous.family} backbone, not {backbone.family}: pass its base model"
        )
    module.requires_grad_(False)
    if previous.finetune != "lora":
        changed = load_backbone_weights(module, previous.backbone_weights) if previous.backbone_weights else []
        return AdapterSetup(backbone, module, previous.finetune, None, changed=tuple(changed))
    peft = _load_stack(module, backbone, previous, None)
    names = list(previous.names)
    _tuner(peft).set_adapter(names[-1:] if previous.mode == "per-task" else names, inference_mode=True)
    peft.requires_grad_(False)
    return AdapterSetup(
        backbone=cast("Backbone", LoraBackbone(peft, backbone)),
        base=module,
        finetune="lora",
        mode=previous.mode,
        adapters=previous.adapters,
    )


def activate_for_task(setup: AdapterSetup, task: str | int, *, unseen: Unseen = "error") -> tuple[str, ...]:
    """Activate the adapters that serve ``task`` (a task name or a stream index); return them.

    Only ``per-task`` mode switches: its adapter for the task. ``shared`` and ``stack`` keep their
    adapters active for every task, and fine-tuning without LoRA has none.

    Args:
        setup: From :func:`load_for_inference` (or :func:`attach`).
        task: The task's name or its index in the stream.
        unseen: For a task without its own adapter (not trained yet): ``error``, ``base`` (no
            adapter: the base backbone) or ``latest`` (the last adapter of the stack).

    Raises:
        ConfigError: ``unseen="error"`` and no adapter was made for ``task``.
    """
    peft = setup.peft_model
    if peft is None or setup.mode != "per-task":
        return setup.active_adapters()
    key = "task_index" if isinstance(task, int) else "task"
    found = [a.name for a in setup.adapters if getattr(a, key) == task]
    if not found:
        if unseen == "error":
            known = ", ".join(f"{a.task_index}:{a.task}" for a in setup.adapters)
            raise ConfigError(f"no per-task adapter was trained for task {task!r}; the checkpoint has {known}")
        found = [] if unseen == "base" else [setup.stack[-1]]
    trains = any(p.requires_grad for p in setup.trainable.values())
    _tuner(peft).set_adapter(found, inference_mode=not trains)
    if trains:  # keep exactly the task's trainable set
        peft.requires_grad_(False)
        for param in setup.trainable.values():
            param.requires_grad_(True)
    return tuple(found)


def backbone_parameters(setup: AdapterSetup) -> list[nn.Parameter]:
    """The backbone parameters this task trains (LoRA factors of the trainable adapter, or backbone weights)."""
    return list(setup.trainable.values())


def set_backbone_trainable(setup: AdapterSetup, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze (``True``) the setup's trainable backbone parameters, e.g. for a head-only stage.

    An optimizer built over :func:`parameter_groups` once keeps working: frozen parameters get no
    gradient and the optimizer skips them.
    """
    for param in setup.trainable.values():
        param.requires_grad_(trainable)


def parameter_groups(
    setup: AdapterSetup, head: nn.Module, *, backbone_lr: float, head_lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the backbone's trainable parameters and the head's, each with its learning rate.

    Groups without parameters are left out (``--finetune frozen`` has no backbone group).
    """
    groups = [
        {"name": "backbone", "params": backbone_parameters(setup), "lr": backbone_lr, "weight_decay": weight_decay},
        {"name": "head", "params": list(head.parameters()), "lr": head_lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]
