"""The feature cache of ``--two-stage --cache-features``: the frozen backbone's features, computed once.

In stage 1 of ``--two-stage`` nothing in the backbone trains (adapters frozen, a new adapter's
``lora_B`` still zero), so each training sample's backbone features ``(W, D)`` are the same at
every step. :func:`load_or_compute` runs the backbone once over the training samples, in order,
without augmentation, in eval mode and under the run's autocast, and writes them to
``features-<fingerprint>.safetensors`` (tensor ``features`` ``(N, W, D)`` float32); stage 1 then
reads the samples without their camera frames (:class:`FeatureDataset`) and the policy skips the
backbone (:data:`vlacl.models.policy.FEATURES`).

The file is keyed by :func:`cache_fingerprint`: the backbone's tensors (base weights, every adapter
loaded from ``--prev``, their dtype), the training samples (datasets, episodes, window), the key map,
the stats, the cameras and the autocast precision. A file whose fingerprint differs is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlacl.data.features import role_of
from vlacl.data.windows import WindowedDataset
from vlacl.models.policy import FEATURES
from vlacl.training.data import move_batch

log = logging.getLogger(__name__)

CACHE_VERSION: Final = 1
FEATURES_TENSOR: Final = "features"
CACHE_PREFIX: Final = "features-"
CACHE_SUFFIX: Final = ".safetensors"


def module_fingerprint(module: nn.Module) -> str:
    """sha256 over every tensor of ``module``'s state dict: names, dtypes, shapes and bytes (read one at a time)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def cache_fingerprint(
    backbone: nn.Module,
    *,
    train_fingerprint: str,
    keymap_sha256: str,
    stats_fingerprint: str,
    cameras: Sequence[str],
    history: int,
    precision: str,
) -> str:
    """The key of a feature cache: what the features of the training samples depend on."""
    ident = {
        "cache_version": CACHE_VERSION,
        "backbone_class": type(backbone).__name__,
        "backbone": module_fingerprint(backbone),
        "train": train_fingerprint,
        "keymap": keymap_sha256,
        "stats": stats_fingerprint,
        "cameras": list(cameras),
        "history": history,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cache_file(directory: Path, fingerprint: str) -> Path:
    """``<directory>/features-<fingerprint>.safetensors``."""
    return directory / f"{CACHE_PREFIX}{fingerprint}{CACHE_SUFFIX}"


def read_cache(path: Path, fingerprint: str, samples: int) -> torch.Tensor | None:
    """The cached ``(N, W, D)`` features, or ``None`` where the file is absent, unreadable or of other samples."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            features: torch.Tensor = fh.get_tensor(FEATURES_TENSOR)
    except Exception as exc:  # SafetensorError, OSError: a damaged file is recomputed
        log.warning("feature cache %s cannot be read (%s): computing the features again", path, exc)
        return None
    if meta.get("fingerprint") != fingerprint or features.shape[0] != samples:
        log.warning("feature cache %s does not match this run: computing the features again", path)
        return None
    return features


def write_cache(path: Path, features: torch.Tensor, fingerprint: str) -> None:
    """Write ``features`` atomically (a temporary sibling renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"fingerprint": fingerprint, "cache_version": str(CACHE_VERSION), "samples": str(features.shape[0])}
    try:
        save_file({FEATURES_TENSOR: features.contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_other_caches(directory: Path, keep: Path) -> None:
    """Remove the cache files of ``directory`` other than ``keep`` (stale ones of an earlier model or data)."""
    for path in directory.glob(f"{CACHE_PREFIX}*{CACHE_SUFFIX}"):
        if path != keep:
            path.unlink(missing_ok=True)


@torch.no_grad()
def compute_features(
    policy: Any, batches: Iterator[Mapping[str, Any]], samples: int, autocast: Any, device: torch.device
) -> torch.Tensor:
    """The backbone features ``(N, W, D)``, float32 on the CPU, of ``samples`` samples, in eval mode."""
    was_training = policy.training
    policy.eval()
    parts: list[torch.Tensor] = []
    try:
        for batch in batches:
            moved = move_batch(batch, device)
            with autocast():
                parts.append(policy.backbone_features(moved).float().cpu())  # (B, W, D)
    finally:
        policy.train(was_training)
    features = torch.cat(parts)  # (N, W, D)
    if features.shape[0] != samples:
        raise RuntimeError(f"the feature pass produced {features.shape[0]} samples, expected {samples}")
    return features


def load_or_compute(
    path: Path,
    fingerprint: str,
    *,
    samples: int,
    compute: Any,
) -> tuple[torch.Tensor, bool]:
    """The features at ``path`` if they match ``fingerprint``, else ``compute()``'s, written there.

    Returns:
        The features and whether they came from the cache.
    """
    cached = read_cache(path, fingerprint, samples)
    if cached is not None:
        log.info("feature cache: reusing %s (%d samples)", path, samples)
        return cached, True
    start = time.perf_counter()
    features: torch.Tensor = compute()
    write_cache(path, features, fingerprint)
    log.info(
        "feature cache: computed %s features in %.1f s, %.1f MB written to %s",
        "x".join(str(d) for d in features.shape),
        time.perf_counter() - start,
        features.numel() * features.element_size() / 1e6,
        path,
    )
    return features, False


class FeatureDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """The training samples without their camera frames, each with its cached features under ``FEATURES``.

    Args:
        train: The task's training samples (their indices are the cache's rows).
        features: ``(N, W, D)``, row ``i`` the features of ``train[i]``.
    """

    def __init__(self, train: WindowedDataset, features: torch.Tensor) -> None:
        keys = [k for k in train.observation_keys if role_of(k) != "image"]
        self.samples = WindowedDataset(
            train.episodes, train.spec, observation_keys=keys, normalizer=train.normalizer, short="skip"
        )
        if len(self.samples) != len(train) or features.shape[0] != len(train):
            raise RuntimeError(
                f"the feature dataset has {len(self.samples)} samples and {features.shape[0]} feature rows, the "
                f"training set {len(train)}"
            )
        self.features = features

    def __len__(self) -> int:
        """Samples."""
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index`` (no camera frames) with its features ``(W, D)``."""
        sample: dict[str, Any] = dict(self.samples[index])
        sample[FEATURES] = self.features[index]
        return sample
