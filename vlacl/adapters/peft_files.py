"""Reading PEFT LoRA adapter directories: the config, the tensors, and what vlacl refuses to merge.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Its keys
are the module paths of the wrapped model with PEFT's prefix, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Every LoRA module contributes
the weight update ``scale * B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
``r`` and ``alpha`` looked up per module in ``rank_pattern`` / ``alpha_pattern`` the way PEFT does.

vlacl reads every update into one layout, that of the base weight it changes:
``delta = scale * left @ right`` with ``left`` of shape ``(rows, r)`` and ``right`` ``(r, cols)``.
For a ``Linear`` layer ``left = B`` and ``right = A``; for an ``Embedding`` and for a
``fan_in_fan_out`` layer (GPT-2's ``Conv1D``), whose weight is ``(B @ A).T``, ``left = A.T`` and
``right = B.T``. Tensors that are not LoRA factors (``modules_to_save`` copies, biases trained
with ``bias="all"``, embedding layers saved with the adapter) replace the base tensor of the same
name.

LoRA variants whose update is not ``scale * B @ A`` (DoRA, aLoRA, ...), adapters whose
initialization changed the base weights (PiSSA, OLoRA, LoftQ, ...) and other PEFT methods are
refused with an :class:`~vlacl.errors.InputFormatError` naming the feature and what to do.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from vlacl.artifacts.manifest import load_json
from vlacl.artifacts.names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from vlacl.errors import InputFormatError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PEFT_KEY_PREFIX: Final = "base_model.model."
"""Prefix PEFT gives every key of a saved adapter: the PeftModel's path to the wrapped model."""

_VARIANTS: Final[Mapping[str, str]] = {
    "use_dora": "DoRA (use_dora), which rescales every merged column by a learned magnitude",
    "use_qalora": "QA-LoRA (use_qalora), which pools input features in groups",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which acts only after its invocation tokens",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config), which picks adapters per token",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication), which shares layers between positions",
    "loftq_config": "LoftQ (loftq_config), which quantizes the base weights",
}
"""Config keys that, when set, make the update something other than ``scale * B @ A``."""

_BASE_CHANGING_INITS: Final = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
"""``init_lora_weights`` values (prefixes) that change the base weights or the forward pass."""

KNOWN_CONFIG_KEYS: Final = frozenset(
    {
        "alora_invocation_tokens",
        "alpha_pattern",
        "arrow_config",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "exclude_modules",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "kasa_config",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "lora_ga_config",
        "megatron_config",
        "megatron_core",
        "modules_to_save",
        "monteclora_config",
        "peft_type",
        "peft_version",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "revision",
        "runtime_config",
        "target_modules",
        "target_parameters",
        "task_type",
        "trainable_token_indices",
        "use_bdlora",
        "use_dora",
        "use_qalora",
        "use_rslora",
        "velora_config",
    }
)
"""Keys of PEFT's ``LoraConfig`` (0.21); others come from a newer PEFT and are logged."""

_FACTOR_RE: Final = re.compile(
    r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<param>weight|bias))?$"
)
_FACTOR_WITH_NAME_RE: Final = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.[^.]+\.(?P<param>weight|bias)$")
"""Older files keep the adapter name: ``<module>.lora_A.default.weight``."""

ModuleKind = Literal["linear", "embedding"]


@dataclass(frozen=True)
class LoraSettings:
    """What vlacl uses of an ``adapter_config.json``.

    Attributes:
        r: Default rank.
        lora_alpha: Default alpha.
        use_rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern: Module pattern -> rank, matched as PEFT does.
        alpha_pattern: Module pattern -> alpha, matched as PEFT does.
        fan_in_fan_out: The adapted layers store their weight as ``(in, out)`` (GPT-2's Conv1D).
        modules_to_save: Modules saved as full trained copies.
        target_modules: As written in the config (a list of names or one regular expression).
        raw: The whole config as read.
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    fan_in_fan_out: bool
    modules_to_save: tuple[str, ...]
    target_modules: tuple[str, ...] | str | None
    raw: Mapping[str, Any]

    def rank_for(self, module: str) -> int:
        """The rank the config gives ``module``."""
        key = _pattern_key(self.rank_pattern, module)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, module: str) -> float:
        """The alpha the config gives ``module``."""
        key = _pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else float(self.alpha_pattern[key])

    def scale(self, alpha: float, rank: int) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first pattern matching ``module`` the way PEFT matches them (as a suffix on a dot), else ``None``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


@dataclass(frozen=True)
class ModuleLayout:
    """One LoRA module of an adapter, from the file's header alone.

    Attributes:
        module: The module path as PEFT names it, e.g. ``model.layers.0.self_attn.q_proj``.
        kind: ``linear`` or ``embedding``.
        rank: Rank of the factors.
        alpha: Alpha from the config.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        rows: Rows of the base weight the update changes.
        cols: Columns of the base weight.
        transposed: The base weight is ``(B @ A).T`` (embeddings, ``fan_in_fan_out`` layers).
        a_key: Key of the A factor in the file.
        b_key: Key of the B factor.
        bias_key: Key of ``lora_B.bias`` (``lora_bias=True``), added to the base bias times ``scale``.
    """

    module: str
    kind: ModuleKind
    rank: int
    alpha: float
    scale: float
    rows: int
    cols: int
    transposed: bool
    a_key: str
    b_key: str
    bias_key: str | None

    @property
    def num_parameters(self) -> int:
        """Parameters of the two factors (and the LoRA bias)."""
        return self.rank * (self.rows + self.cols) + (self.rows if self.bias_key is not None else 0)


@dataclass(frozen=True)
class AdapterLayout:
    """A validated PEFT adapter directory, read from its config and the safetensors header.

    Attributes:
        name: The adapter's name (its directory name, or its name in a task checkpoint's stack).
        path: The adapter directory.
        settings: The config.
        modules: LoRA modules by module path.
        replacements: Base tensor name (relative to the model PEFT wrapped) -> (key in the file,
            shape) for every saved full tensor.
        dtype: Dtype of the factors, e.g. ``F32`` (safetensors' names).
    """

    name: str
    path: Path
    settings: LoraSettings
    modules: Mapping[str, ModuleLayout]
    replacements: Mapping[str, tuple[str, tuple[int, ...]]]
    dtype: str

    @property
    def weights_file(self) -> Path:
        """``adapter_model.safetensors``."""
        return self.path / ADAPTER_WEIGHTS_NAME

    @property
    def config_file(self) -> Path:
        """``adapter_config.json``."""
        return self.path / ADAPTER_CONFIG_NAME

    @property
    def num_parameters(self) -> int:
        """Parameters of the LoRA factors plus the saved full tensors."""
        lora = sum(m.num_parameters for m in self.modules.values())
        return lora + sum(math.prod(shape) for _, shape in self.replacements.values())

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description: ranks, alpha, scales, targets, parameter counts."""
        ranks = sorted({m.rank for m in self.modules.values()})
        scales = sorted({round(m.scale, 8) for m in self.modules.values()})
        target = self.settings.target_modules
        return {
            "name": self.name,
            "path": str(self.path),
            "r": self.settings.r,
            "lora_alpha": self.settings.lora_alpha,
            "use_rslora": self.settings.use_rslora,
            "ranks": ranks,
            "scales": scales,
            "target_modules": list(target) if isinstance(target, tuple) else target,
            "modules_to_save": list(self.settings.modules_to_save),
            "num_modules": len(self.modules),
            "num_parameters": self.num_parameters,
            "num_lora_parameters": sum(m.num_parameters for m in self.modules.values()),
            "saved_tensors": sorted(self.replacements),
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class LoraFactors:
    """One module's update in fp32, in the layout of the base weight: ``scale * left @ right``.

    Attributes:
        left: ``(rows, r)``.
        right: ``(r, cols)``.
        bias: ``(rows,)`` LoRA bias or ``None``.
    """

    left: torch.Tensor
    right: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter with its tensors in memory."""

    layout: AdapterLayout
    factors: Mapping[str, LoraFactors]
    replacements: Mapping[str, torch.Tensor]

    @property
    def name(self) -> str:
        """The adapter's name."""
        return self.layout.name


def read_settings(path: Path) -> LoraSettings:
    """Read and validate ``<path>/adapter_config.json``.

    Raises:
        InputFormatError: The file is missing or malformed, not a LoRA config, or selects a
            feature whose update vlacl cannot merge (the message names it and what to do).
    """
    file = path / ADAPTER_CONFIG_NAME
    try:
        raw = load_json(file)
    except FileNotFoundError:
        raise InputFormatError(
            f"{path} is not a PEFT adapter directory: {ADAPTER_CONFIG_NAME} is missing; pass a directory "
            "written by PEFT's save_pretrained or a task_checkpoint artifact"
        ) from None
    except OSError as exc:
        raise InputFormatError(f"cannot read {file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputFormatError(f"{file} is {exc}: the adapter is damaged; save it again") from None
    if not isinstance(raw, dict):
        raise InputFormatError(f"{file} must hold a JSON object: the adapter is damaged; save it again")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise InputFormatError(
            f"{path} is a {peft_type or 'unknown'} adapter (peft_type in {ADAPTER_CONFIG_NAME}); vlacl merges and "
            "composes LoRA adapters only"
        )
    for key, what in _VARIANTS.items():
        if raw.get(key):
            raise InputFormatError(
                f"{path} uses {what}: its weight update is not scale * B @ A, so vlacl cannot merge or compose it; "
                "merge it with PEFT's merge_and_unload() instead"
            )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InputFormatError(
            f"{path} was initialized with init_lora_weights={init!r}, which changes the base weights or the "
            "forward pass; save it as a plain LoRA adapter first (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and pass that directory"
        )
    unknown = sorted(set(raw) - KNOWN_CONFIG_KEYS)
    if unknown:
        log.warning(
            "%s has keys this vlacl does not know (from a newer PEFT?), ignored: %s; if one selects a LoRA variant, "
            "the merged weights are wrong",
            file,
            ", ".join(unknown),
        )
    try:
        r = _positive_int(raw.get("r"), "r")
        alpha = float(raw.get("lora_alpha", r))
        rank_pattern = {
            str(k): _positive_int(v, f"rank_pattern[{k!r}]") for k, v in (raw.get("rank_pattern") or {}).items()
        }
        alpha_pattern = {str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()}
        for pattern in (*rank_pattern, *alpha_pattern):
            re.compile(pattern)
    except (TypeError, ValueError, AttributeError, re.error) as exc:
        raise InputFormatError(f"{file} has an invalid r, lora_alpha, rank_pattern or alpha_pattern ({exc})") from None
    target = raw.get("target_modules")
    return LoraSettings(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        modules_to_save=tuple(str(m) for m in raw.get("modules_to_save") or ()),
        target_modules=target if isinstance(target, str) or target is None else tuple(str(t) for t in target),
        raw=raw,
    )


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def strip_prefix(key: str) -> str:
    """A file key without PEFT's ``base_model.model.`` prefix."""
    return key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key


def read_layout(path: Path | str, name: str | None = None) -> AdapterLayout:
    """Validate a PEFT LoRA adapter directory from its config and the safetensors header.

    Args:
        path: The adapter directory.
        name: The adapter's name; its directory name by default.

    Raises:
        InputFormatError: A missing or unreadable file, a feature vlacl cannot merge, a key it
            does not know, a module with one factor only, or factor shapes that disagree with each
            other or with the config.
    """
    from safetensors import safe_open

    path = Path(path)
    settings = read_settings(path)
    file = path / ADAPTER_WEIGHTS_NAME
    if not file.is_file():
        raise InputFormatError(
            f"{path} has no {ADAPTER_WEIGHTS_NAME}: vlacl reads safetensors adapters only; save the adapter with "
            "PEFT's save_pretrained(..., safe_serialization=True)"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[str] = set()
    try:
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118  # safe_open is not a mapping
                view = fh.get_slice(key)
                shapes[key] = tuple(view.get_shape())
                dtypes.add(view.get_dtype())
    except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
        raise InputFormatError(
            f"{file} cannot be read ({exc}): the file is damaged or incomplete; save it again"
        ) from None
    factors: dict[str, dict[str, str]] = {}
    replacements: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key in sorted(shapes):
        rel = strip_prefix(key)
        if "lora_magnitude_vector" in rel:
            raise InputFormatError(
                f"{file} holds DoRA magnitudes ({key}): vlacl merges plain LoRA only; use PEFT's merge_and_unload()"
            )
        match = _FACTOR_RE.match(rel) or _FACTOR_WITH_NAME_RE.match(rel)
        if match is not None:
            part = match.group("factor") + ("." + match.group("param") if match.group("param") else "")
            factors.setdefault(match.group("module"), {})[part] = key
        elif ".lora_" in rel or rel.startswith("lora_") or "trainable_tokens" in rel:
            raise InputFormatError(
                f"{file} holds the key {key}, which is not a LoRA factor vlacl knows: it merges lora_A/lora_B and "
                "lora_embedding_A/lora_embedding_B only"
            )
        else:
            target = rel.replace(".base_layer.", ".")
            if target in replacements:
                raise InputFormatError(f"{file} saves the tensor {target} twice: the adapter is damaged")
            replacements[target] = (key, shapes[key])
    modules = {
        module: _module_layout(file, module, parts, shapes, settings) for module, parts in sorted(factors.items())
    }
    if not modules and not replacements:
        raise InputFormatError(f"{file} holds no tensors: the adapter is empty; save it again")
    return AdapterLayout(
        name=name or path.name,
        path=path,
        settings=settings,
        modules=modules,
        replacements=replacements,
        dtype=",".join(sorted(dtypes)),
    )


def _module_layout(
    file: Path, module: str, parts: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], settings: LoraSettings
) -> ModuleLayout:
    """Check one module's factors and place them in the base weight's layout."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    if a_part not in parts or b_part not in parts:
        raise InputFormatError(
            f"{file}: module {module} has {' and '.join(sorted(parts))} but not both LoRA factors: the adapter is "
            "damaged; save it again"
        )
    unexpected = set(parts) - {a_part, b_part, "lora_B.bias"}
    if unexpected or (embedding and "lora_B.bias" in parts):
        raise InputFormatError(f"{file}: module {module} mixes LoRA factors of different layer types: {sorted(parts)}")
    a_shape, b_shape = shapes[parts[a_part]], shapes[parts[b_part]]
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise InputFormatError(
            f"{file}: module {module} has LoRA factors of shapes {a_shape} and {b_shape}; vlacl merges LoRA on "
            "Linear and Embedding layers only (a convolution's factors are 4-D): use PEFT's merge_and_unload()"
        )
    rank = a_shape[0]
    if b_shape[1] != rank:
        raise InputFormatError(
            f"{file}: module {module} has A {a_shape} and B {b_shape}, whose ranks differ: the adapter is damaged"
        )
    expected = settings.rank_for(module)
    if rank != expected:
        raise InputFormatError(
            f"{file}: module {module} has rank {rank}, but {ADAPTER_CONFIG_NAME} gives it r={expected}: the config "
            "and the weights come from different adapters; save the adapter again"
        )
    bias_key = parts.get("lora_B.bias")
    if bias_key is not None and shapes[bias_key] != (b_shape[0],):
        raise InputFormatError(
            f"{file}: module {module} has a LoRA bias of shape {shapes[bias_key]}, not ({b_shape[0]},)"
        )
    transposed = embedding or settings.fan_in_fan_out
    # Linear: delta (out, in) = B (out, r) @ A (r, in); transposed: delta = (B @ A).T, i.e. A.T @ B.T
    rows, cols = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
    alpha = settings.alpha_for(module)
    return ModuleLayout(
        module=module,
        kind="embedding" if embedding else "linear",
        rank=rank,
        alpha=alpha,
        scale=settings.scale(alpha, rank),
        rows=rows,
        cols=cols,
        transposed=transposed,
        a_key=parts[a_part],
        b_key=parts[b_part],
        bias_key=bias_key,
    )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or Inf.

    A finite sum in the tensor's own dtype proves every entry finite (an Inf or NaN entry makes
    any sum Inf or NaN); only when it is not (an entry is not finite, or the sum overflowed) is
    the answer taken from the float64 sum, which no sum of finite floats brings near 1e308. One
    pass and no temporary either way, many times faster than ``torch.isfinite(tensor).all()``;
    the first sum is about five times cheaper than the float64 one.
    """
    import torch

    return math.isfinite(float(tensor.sum())) or math.isfinite(float(tensor.sum(dtype=torch.float64)))


def load_adapter(layout: AdapterLayout) -> LoadedAdapter:
    """Read an adapter's tensors: the factors in fp32 and the base layout, the saved tensors as stored.

    Raises:
        InputFormatError: The file cannot be read, or a tensor holds NaN or Inf.
    """
    from safetensors import safe_open

    factors: dict[str, LoraFactors] = {}
    replacements: dict[str, torch.Tensor] = {}
    file = layout.weights_file
    try:
        with safe_open(file, framework="pt") as fh:
            for module, m in layout.modules.items():
                a = fh.get_tensor(m.a_key).float()  # (r, in) or embedding (r, num_embeddings)
                b = fh.get_tensor(m.b_key).float()  # (out, r) or embedding (dim, r)
                bias = fh.get_tensor(m.bias_key).float() if m.bias_key is not None else None
                for key, tensor in ((m.a_key, a), (m.b_key, b), (m.bias_key, bias)):
                    if tensor is not None and not is_finite(tensor):
                        raise InputFormatError(f"{file}: {key} holds NaN or Inf: the adapter diverged in training")
                if m.transposed:
                    factors[module] = LoraFactors(left=a.T.contiguous(), right=b.T.contiguous(), bias=bias)
                else:
                    factors[module] = LoraFactors(left=b, right=a, bias=bias)
            for target, (key, _) in layout.replacements.items():
                tensor = fh.get_tensor(key)
                if tensor.is_floating_point() and not is_finite(tensor):
                    raise InputFormatError(f"{file}: {key} holds NaN or Inf: the adapter diverged in training")
                replacements[target] = tensor
    except InputFormatError:
        raise
    except Exception as exc:  # SafetensorError, OSError
        raise InputFormatError(
            f"{file} cannot be read ({exc}): the file is damaged or incomplete; save it again"
        ) from None
    return LoadedAdapter(layout=layout, factors=factors, replacements=replacements)
