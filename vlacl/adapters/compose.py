"""``compose-adapters`` as a library call: several LoRA adapters become one, computed on the true updates.

Every method works on the weight updates ``dW_i = scale_i * B_i @ A_i`` (a task checkpoint's
stack counts as the sum of its adapters' updates), never on the A and B factors separately,
whose weighted sums are not the weighted sum of the updates (PEFT issue 3004):

- ``cat``: ``sum_i dW_i`` exactly, the factors concatenated (rank: the sum of the ranks).
- ``linear``: ``sum_i w_i dW_i`` exactly, also by concatenation.
- ``svd``: the ``linear`` sum truncated to the target rank, from the SVD of the concatenated
  factors (two thin QR decompositions and the SVD of a small core, never the dense matrix); exact
  at full rank.
- ``ties`` (Yadav et al. 2023), ``dare_linear``, ``dare_ties`` (Yu et al. 2024),
  ``magnitude_prune``: merged on the dense updates as PEFT's ``merge_utils`` defines them, then
  factorized to the target rank by SVD.

The result is written with scale 1 (``lora_alpha = r`` per module, no rsLoRA), so
``PeftModel.from_pretrained`` applies exactly the factors written. For every approximate method
the relative reconstruction error of each module, ``||M - M_k||_F / ||M||_F`` with ``M`` the
method's dense result and ``M_k`` the factorized one, is reported and recorded in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from vlacl.artifacts.names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from vlacl.artifacts.writer import ArtifactWriter, check_output_dir
from vlacl.config.compose_adapters import EXACT_METHODS, ComposeAdaptersConfig
from vlacl.config.core import dump_config, invalid
from vlacl.errors import InputFormatError

from .peft_files import PEFT_KEY_PREFIX, ModuleKind, ModuleLayout, is_finite, load_adapter
from .sources import AdapterSource, open_sources

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KIND: Final = "composed_adapter"

_CLEARED_CONFIG: Final[dict[str, Any]] = {
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "bias": "none",
    "lora_bias": False,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "inference_mode": True,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}
"""Config keys the written adapter resets: its update is exactly the factors written, nothing else."""


@dataclass(frozen=True)
class ModuleResult:
    """One composed module: its rank and, for approximate methods, the relative reconstruction error."""

    module: str
    rank: int
    rel_error: float | None


@dataclass(frozen=True)
class ComposeResult:
    """What ``compose-adapters`` wrote."""

    out: Path
    config: ComposeAdaptersConfig
    weights: tuple[float, ...]
    target_rank: int | None
    sources: tuple[dict[str, Any], ...]
    modules: tuple[ModuleResult, ...]
    dtype: str
    seconds: float

    @property
    def exact(self) -> bool:
        """Whether the written adapter is the method's result exactly (up to float rounding)."""
        return self.config.method in EXACT_METHODS

    def error_summary(self) -> dict[str, Any] | None:
        """Mean and max relative reconstruction error and the worst module; ``None`` for exact methods."""
        errors = [(m.rel_error, m.module) for m in self.modules if m.rel_error is not None]
        if self.exact or not errors:
            return None
        worst = max(errors)
        return {
            "mean": sum(e for e, _ in errors) / len(errors),
            "max": worst[0],
            "worst_module": worst[1],
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``--json`` and the manifest."""
        return {
            "out": str(self.out),
            "method": self.config.method,
            "weights": list(self.weights),
            "density": self.config.density,
            "majority_sign": self.config.majority_sign,
            "seed": self.config.seed,
            "target_rank": self.target_rank,
            "exact": self.exact,
            "dtype": self.dtype,
            "sources": list(self.sources),
            "reconstruction_error": self.error_summary(),
            "modules": [{"module": m.module, "rank": m.rank, "rel_error": m.rel_error} for m in self.modules],
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Update:
    """One source's update of one module: ``sum_j left_j @ right_j`` (scales folded into ``left_j``)."""

    lefts: tuple[torch.Tensor, ...]  # each (rows, r_j)
    rights: tuple[torch.Tensor, ...]  # each (r_j, cols)

    @property
    def rank(self) -> int:
        return sum(int(left.shape[1]) for left in self.lefts)

    def dense(self) -> torch.Tensor:
        """The update as a ``(rows, cols)`` float32 matrix."""
        import torch

        return torch.cat(self.lefts, dim=1) @ torch.cat(self.rights, dim=0)  # (rows, R) @ (R, cols)


@dataclass(frozen=True)
class _ModuleInputs:
    """Everything composed into one module."""

    module: str
    kind: ModuleKind
    transposed: bool
    rows: int
    cols: int
    updates: tuple[_Update | None, ...]  # one per source; None where a source does not adapt the module


def _collect(sources: Sequence[AdapterSource]) -> tuple[list[_ModuleInputs], dict[str, torch.Tensor]]:
    """Load every source and group the updates by module, checking that they fit together.

    Returns:
        The modules, and the base layers PEFT saved with the adapters (``save_embedding_layers``),
        by file key: copies of base weights, not updates, written unchanged.

    Raises:
        InputFormatError: A source saves trained full tensors (``modules_to_save``) or LoRA biases,
            which are not composed; two sources save different copies of a base layer; or two
            sources adapt a module with different shapes or layer types.
    """
    import torch

    per_source: list[dict[str, _Update]] = []
    layouts: dict[str, tuple[ModuleLayout, str]] = {}
    saved: dict[str, tuple[torch.Tensor, str, str]] = {}  # target -> (tensor, adapter label, key in the file)
    for source in sources:
        updates: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for layout in source.stack:
            trained = sorted(t for t, (key, _) in layout.replacements.items() if ".base_layer." not in key)
            if trained:
                raise InputFormatError(
                    f"adapter {source.label} ({layout.path}) also saves trained full tensors "
                    f"({', '.join(trained[:3])}; modules_to_save or bias): compose-adapters composes LoRA updates "
                    "only; merge it into the base with `vlacl merge-lora`, or train it without modules_to_save"
                )
            adapter = load_adapter(layout)
            for target, tensor in adapter.replacements.items():
                key = layout.replacements[target][0]
                if target in saved and not torch.equal(saved[target][0], tensor):
                    raise InputFormatError(
                        f"adapters {saved[target][1]} and {source.label} saved different copies of the base layer "
                        f"{target} (a resized vocabulary?): they were made for different base models"
                    )
                saved.setdefault(target, (tensor, source.label, key))
            for module, factors in adapter.factors.items():
                m = layout.modules[module]
                if factors.bias is not None:
                    raise InputFormatError(
                        f"adapter {source.label} trains LoRA biases (lora_bias, module {module}), which "
                        "compose-adapters does not compose; merge it with `vlacl merge-lora` instead"
                    )
                seen = layouts.get(module)
                if seen is not None and (seen[0].rows, seen[0].cols, seen[0].kind, seen[0].transposed) != (
                    m.rows,
                    m.cols,
                    m.kind,
                    m.transposed,
                ):
                    raise InputFormatError(
                        f"adapters {seen[1]} and {source.label} were made for different base models: module {module} "
                        f"is a {seen[0].kind} update of shape ({seen[0].rows}, {seen[0].cols}) in one and a {m.kind} "
                        f"update of shape ({m.rows}, {m.cols}) in the other"
                    )
                layouts.setdefault(module, (m, source.label))
                lefts, rights = updates.setdefault(module, ([], []))
                lefts.append(factors.left * m.scale)  # (rows, r)
                rights.append(factors.right)  # (r, cols)
        per_source.append({k: _Update(tuple(lefts), tuple(rights)) for k, (lefts, rights) in updates.items()})
    modules = []
    for module in sorted(layouts):
        m = layouts[module][0]
        modules.append(
            _ModuleInputs(
                module=module,
                kind=m.kind,
                transposed=m.transposed,
                rows=m.rows,
                cols=m.cols,
                updates=tuple(updates.get(module) for updates in per_source),
            )
        )
    return modules, {key: tensor for tensor, _, key in saved.values()}


def concat_factors(updates: Sequence[_Update | None], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``left (rows, R)`` and ``right (R, cols)`` with ``left @ right = sum_i w_i dW_i`` exactly."""
    import torch

    lefts: list[torch.Tensor] = []
    rights: list[torch.Tensor] = []
    for update, weight in zip(updates, weights, strict=True):
        if update is None:
            continue
        lefts.extend(left * weight for left in update.lefts)
        rights.extend(update.rights)
    return torch.cat(lefts, dim=1), torch.cat(rights, dim=0)


def truncated_svd_of_product(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``left @ right`` without forming it, and the relative error.

    ``left = Q1 R1`` and ``right.T = Q2 R2`` (thin QR), so ``left @ right = Q1 (R1 R2^T) Q2^T`` and
    the SVD of the small core ``R1 R2^T`` gives that of the product. Computed in float64.

    Returns:
        ``(left_k (rows, k), right_k (k, cols), ||M - M_k||_F / ||M||_F)`` with the singular
        values split evenly between the two factors.
    """
    import torch

    q1, r1 = torch.linalg.qr(left.double())  # (rows, p), (p, R)
    q2, r2 = torch.linalg.qr(right.double().T)  # (cols, q), (q, R)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)  # core (p, q) -> (p, m), (m,), (m, q)
    k = min(rank, int(s.numel()))
    root = s[:k].sqrt()
    left_k = (q1 @ u[:, :k]) * root  # (rows, k)
    right_k = root[:, None] * (vh[:k] @ q2.T)  # (k, cols)
    return left_k.float(), right_k.float(), _tail_ratio(s, k)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of a dense ``(rows, cols)`` matrix and the relative error."""
    import torch

    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # (rows, m), (m,), (m, cols)
    k = min(rank, int(s.numel()))
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], _tail_ratio(s.double(), k)


def _tail_ratio(singular: torch.Tensor, k: int) -> float:
    """``sqrt(sum_{i >= k} s_i^2) / sqrt(sum_i s_i^2)``, 0 for a zero matrix."""
    total = float((singular**2).sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(float((singular[k:] ** 2).sum()), 0.0) / total)


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (as PEFT)."""
    import torch

    if density >= 1.0:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    if keep > 0:
        mask[torch.topk(tensor.abs().reshape(-1), k=keep).indices] = 1.0
    return tensor * mask.view(tensor.shape)  # (numel,) -> (rows, cols)


def random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by ``1 / density`` (as PEFT)."""
    import torch

    if density >= 1.0:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def ties_merge(tensors: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES' sign election and disjoint merge of pruned ``(n, rows, cols)`` updates (as PEFT).

    The majority sign of each entry comes from the unweighted pruned updates (their sum for
    ``total``, their signs' sum for ``frequency``; 0 counts as +); the weighted updates that agree
    with it are averaged.
    """
    import torch

    sign = tensors.sign()
    magnitude = tensors.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0)
    agree = sign == majority  # (n, rows, cols)
    weighted = tensors * weights.view(-1, 1, 1)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def dense_merge(
    updates: Sequence[_Update | None],
    weights: Sequence[float],
    cfg: ComposeAdaptersConfig,
    generator: torch.Generator,
    shape: tuple[int, int],
) -> torch.Tensor:
    """The dense ``(rows, cols)`` result of a pruning method; a missing update counts as zero."""
    import torch

    dense = [u.dense() if u is not None else torch.zeros(shape) for u in updates]
    if cfg.method in ("ties", "magnitude_prune"):
        pruned = [magnitude_prune(d, cfg.density) for d in dense]
    else:
        pruned = [random_prune(d, cfg.density, generator) for d in dense]
    stacked = torch.stack(pruned)  # (n, rows, cols)
    w = torch.tensor(list(weights), dtype=torch.float32)
    if cfg.method in ("ties", "dare_ties"):
        return ties_merge(stacked, w, cfg.majority_sign)
    return (stacked * w.view(-1, 1, 1)).sum(dim=0)


def _default_rank(modules: Sequence[_ModuleInputs]) -> int:
    """The largest rank of any source at any module (a stack counts as the sum of its ranks)."""
    return max((u.rank for m in modules for u in m.updates if u is not None), default=1)


def _dtype(name: str, sources: Sequence[AdapterSource]) -> torch.dtype:
    import torch

    if name != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    found = {layout.dtype for s in sources for layout in s.stack}
    by_name = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    return by_name[found.pop()] if len(found) == 1 and next(iter(found)) in by_name else torch.float32


def compose_adapters(
    adapters: Sequence[Path | str],
    cfg: ComposeAdaptersConfig,
    *,
    out: Path,
    overwrite: bool = False,
    command: Sequence[str] = (),
) -> ComposeResult:
    """Compose adapters into one PEFT adapter directory, a ``composed_adapter`` artifact.

    Args:
        adapters: PEFT adapter directories, composed adapters or task checkpoints (a checkpoint
            counts as the sum of its stack).
        cfg: Method, weights, target rank, density, sign election, seed, dtype.
        out: The adapter directory to write; ``PeftModel.from_pretrained(base, out)`` loads it.
        overwrite: Replace an existing composed_adapter at ``out``.
        command: The command line, recorded in the manifest.

    Raises:
        VlaclError: Unreadable or mismatched adapters, weights that do not match the adapters,
            or an ``out`` that may not be written. Nothing is left at ``out`` then.
    """
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    sources = open_sources(adapters)
    weights = tuple(cfg.weights) if cfg.weights else (1.0,) * len(sources)
    if len(weights) != len(sources):
        raise invalid(
            "weights",
            f"{len(weights)} weights given for {len(sources)} adapters; give one weight per adapter, in order",
            ComposeAdaptersConfig,
        )
    check_output_dir(out, overwrite, kind=KIND)
    modules, base_layers = _collect(sources)
    if not modules:
        raise InputFormatError("the adapters hold no LoRA modules: nothing to compose")
    fan_in_fan_out = {s.stack[0].settings.fan_in_fan_out for s in sources}
    if len(fan_in_fan_out) > 1:
        raise InputFormatError(
            "some adapters set fan_in_fan_out and others do not: they were made for different models"
        )
    target_rank = None if cfg.method in EXACT_METHODS else cfg.rank or _default_rank(modules)
    dtype = _dtype(cfg.dtype, sources)
    generator = torch.Generator().manual_seed(cfg.seed)
    tensors: dict[str, torch.Tensor] = dict(base_layers)
    results: list[ModuleResult] = []
    for inputs in modules:
        error: float | None = None
        if target_rank is None:
            left, right = concat_factors(inputs.updates, weights)
        elif cfg.method == "svd":
            left, right, error = truncated_svd_of_product(*concat_factors(inputs.updates, weights), target_rank)
        else:
            merged = dense_merge(inputs.updates, weights, cfg, generator, (inputs.rows, inputs.cols))
            left, right, error = truncated_svd(merged, target_rank)
        if not (is_finite(left) and is_finite(right)):
            raise InputFormatError(f"composing module {inputs.module} gives NaN or Inf: check the adapters and weights")
        rank = int(left.shape[1])
        prefix = PEFT_KEY_PREFIX + inputs.module
        # PEFT layout: Linear A (r, in), B (out, r); transposed layers store (B @ A).T, so A = left.T, B = right.T
        a, b = (left.T, right.T) if inputs.transposed else (right, left)
        names = (
            ("lora_embedding_A", "lora_embedding_B")
            if inputs.kind == "embedding"
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{prefix}.{names[0]}"] = a.to(dtype).contiguous()
        tensors[f"{prefix}.{names[1]}"] = b.to(dtype).contiguous()
        results.append(ModuleResult(module=inputs.module, rank=rank, rel_error=error))
        if error is not None:
            log.debug("module %s: rank %d, relative reconstruction error %.3g", inputs.module, rank, error)
    config = _adapter_config(sources, results, fan_in_fan_out.pop())
    result = ComposeResult(
        out=Path(out),
        config=cfg,
        weights=weights,
        target_rank=target_rank,
        sources=tuple(s.describe() for s in sources),
        modules=tuple(results),
        dtype=str(dtype).removeprefix("torch."),
        seconds=0.0,
    )
    with ArtifactWriter(
        out, KIND, command=command, config_yaml=dump_config(cfg), seed=cfg.seed, overwrite=overwrite
    ) as writer:
        for source in sources:
            source.record(writer)
        save_file(tensors, str(writer.path / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (writer.path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
        details = result.to_dict()
        details.pop("out")
        details.pop("seconds")
        details.pop("modules")
        if not result.exact:
            details["per_module_error"] = {m.module: m.rel_error for m in results}
        writer.details.update(details)
    summary = result.error_summary()
    log.info(
        "composed %d adapter(s) with %s into %s: %d modules%s",
        len(sources),
        cfg.method,
        out,
        len(results),
        ""
        if summary is None
        else f", relative reconstruction error mean {summary['mean']:.3g} max {summary['max']:.3g}",
    )
    return dataclasses.replace(result, seconds=time.perf_counter() - started)


def _adapter_config(
    sources: Sequence[AdapterSource], results: Sequence[ModuleResult], fan_in_fan_out: bool
) -> dict[str, Any]:
    """The written ``adapter_config.json``: the first adapter's, with ranks, alphas and targets of the result.

    Every module gets ``lora_alpha = r``, so its scale is 1. ``r`` is the most common rank; other
    modules are listed, by their exact name, in ``rank_pattern`` and ``alpha_pattern``.
    """
    config = dict(sources[0].stack[0].settings.raw)
    counts = Counter(m.rank for m in results)
    common = counts.most_common(1)[0][0]
    pattern = {re.escape(m.module): m.rank for m in results if m.rank != common}
    config.update(_CLEARED_CONFIG)
    config.update(
        {
            "r": common,
            "lora_alpha": common,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": [m.module for m in results],
            "fan_in_fan_out": fan_in_fan_out,
        }
    )
    return config
