"""Normalization of features from a ``ds_stats`` artifact, and its exact inverse.

Modes, per feature (``norm_mode`` in ``stats.json``, or given to :meth:`Normalizer.from_stats`):

- ``q99``: ``2 * (x - q01) / (q99 - q01) - 1``, clipped to ``[-1, 1]`` (robust to outliers);
- ``min_max``: the same with ``min`` and ``max``, clipped;
- ``mean_std``: ``(x - mean) / std`` (LeRobot's population std), not clipped;
- ``none``: unchanged.

Every mode is one affine map per dimension, ``y = (x - center) / half``, so :meth:`Normalizer.unnormalize`
is its exact inverse on the unclipped range. A dimension whose range (or std) is zero maps to 0
and back to its one value, never to NaN. Dimensions whose ``mask`` is false (binary dimensions,
such as a gripper with two levels, detected by ``vlacl ds-stats``) pass through unchanged;
:class:`DimOverrides` forces chosen dimensions to binary or continuous.

Arrays may be NumPy arrays or torch tensors (any device); torch is imported only when a tensor is
passed, so this module imports without it. Stats are read from JSON only, never unpickled, and are
tied to their dataset: :func:`check_stats_match` refuses stats computed for other data or another
key map.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast, get_args, overload

import numpy as np

from vlacl.artifacts.names import STATS_NAME
from vlacl.errors import ConfigError, InputFormatError

if TYPE_CHECKING:
    import torch

    from vlacl.data.episode import EpisodeDataset
    from vlacl.data.keymap import KeyMap

NormMode = Literal["q99", "min_max", "mean_std", "none"]
NORM_MODES: Final[tuple[NormMode, ...]] = get_args(NormMode)
STATS_VERSION: Final = 1
"""Version of the ``stats.json`` layout; a newer one is refused with a message naming the upgrade."""

_BOUNDS: Final[Mapping[NormMode, tuple[str, str]]] = {"q99": ("q01", "q99"), "min_max": ("min", "max")}


@dataclass(frozen=True)
class DimOverrides:
    """Dimensions forced to binary (left unnormalized) or continuous (normalized), per feature.

    Attributes:
        binary: Feature -> dimension indices whose mask is forced false.
        continuous: Feature -> dimension indices whose mask is forced true.
    """

    binary: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    continuous: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in set(self.binary) & set(self.continuous):
            both = sorted(set(self.binary[key]) & set(self.continuous[key]))
            if both:
                raise ConfigError(
                    f"dimension(s) {both} of {key} are in both binary_dims and continuous_dims: keep each in one"
                )

    @classmethod
    def of(
        cls, binary: Mapping[str, Sequence[int]] | None, continuous: Mapping[str, Sequence[int]] | None
    ) -> DimOverrides:
        """Build from the config's ``binary_dims`` / ``continuous_dims`` (either may be ``None``)."""
        return cls(
            {k: tuple(int(i) for i in v) for k, v in (binary or {}).items()},
            {k: tuple(int(i) for i in v) for k, v in (continuous or {}).items()},
        )

    def check(self, dims: Mapping[str, int]) -> None:
        """Refuse overrides naming a feature that is not there or a dimension out of range.

        Args:
            dims: Feature -> number of dimensions of the vector features that can be overridden.

        Raises:
            ConfigError: An unknown feature or an index outside ``[0, dims)``.
        """
        for name, table in (("binary_dims", self.binary), ("continuous_dims", self.continuous)):
            for key, indices in table.items():
                if key not in dims:
                    known = ", ".join(sorted(dims)) or "none"
                    raise ConfigError(f"{name} names feature {key!r}, which the data lacks; vector features: {known}")
                bad = [i for i in indices if not 0 <= i < dims[key]]
                if bad:
                    raise ConfigError(f"{name} for {key} has index(es) {bad} outside [0, {dims[key]})")

    def apply(self, key: str, mask: np.ndarray) -> np.ndarray:
        """``mask`` (``(D,)`` bool) with this feature's overrides applied (a new array)."""
        out = np.array(mask, dtype=bool, copy=True)
        out[list(self.binary.get(key, ()))] = False
        out[list(self.continuous.get(key, ()))] = True
        return out

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        """JSON form, keys sorted, as recorded in ``stats.json``'s settings."""
        return {
            "binary_dims": {k: sorted(v) for k, v in sorted(self.binary.items())},
            "continuous_dims": {k: sorted(v) for k, v in sorted(self.continuous.items())},
        }


@dataclass(frozen=True)
class StatsFile:
    """A parsed ``stats.json`` of a ``ds_stats`` artifact, with where it was read from.

    Attributes:
        data: The JSON content (see :mod:`vlacl.data.stats` for the layout).
        source: The path it was read from, for messages.
    """

    data: Mapping[str, Any]
    source: str

    @property
    def fingerprint(self) -> str:
        """sha256 over the datasets' fingerprints, the key map and the settings."""
        return str(self.data["fingerprint"])

    @property
    def features(self) -> Mapping[str, Mapping[str, Any]]:
        """Feature key -> its global stats."""
        return cast("Mapping[str, Mapping[str, Any]]", self.data["features"])

    @property
    def dataset_fingerprints(self) -> list[str]:
        """Fingerprint of each dataset the stats were computed over."""
        return [str(d["fingerprint"]) for d in self.data.get("datasets", [])]

    @property
    def keymap_sha256(self) -> str:
        """Hash of the key map the datasets were read with."""
        return str(self.data.get("keymap_sha256", ""))


def stats_fingerprint(dataset_fingerprints: Sequence[str], keymap_sha256: str, settings: Mapping[str, Any]) -> str:
    """sha256 identifying a stats artifact: which data, read with which key map, under which settings.

    The values themselves are not hashed: they are a deterministic function of these inputs, and
    leaving them out keeps the fingerprint equal across machines whose float rounding differs.
    """
    ident = {
        "vlacl_stats_version": STATS_VERSION,
        "datasets": list(dataset_fingerprints),
        "keymap_sha256": keymap_sha256,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def load_stats(path: Path | str) -> StatsFile:
    """Read the stats of a ``ds_stats`` artifact directory, or a ``stats.json`` file written by one.

    Raises:
        ArtifactError: A directory that is not a complete ``ds_stats`` artifact, or whose files no
            longer match the sha256 its manifest recorded (edited since it was written).
        InputFormatError: A file that is not JSON, not a vlacl stats file (LeRobot's own
            ``meta/stats.json`` carries no fingerprint), of a newer version, or whose fingerprint
            does not match its settings and datasets. A bare ``stats.json`` has no manifest, so an
            edit of its values alone is caught only when it is read from its artifact directory.
    """
    from vlacl.artifacts.reader import open_artifact

    path = Path(path)
    file = open_artifact(path, "ds_stats", verify=True).file(STATS_NAME) if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFormatError(
            f"stats file {file} does not exist: pass a ds_stats directory or its stats.json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFormatError(f"cannot read stats {file} ({exc}): recreate it with `vlacl ds-stats`") from None
    if not isinstance(data, dict) or "vlacl_stats_version" not in data:
        raise InputFormatError(
            f"{file} is not a stats file written by `vlacl ds-stats` (no vlacl_stats_version; LeRobot's "
            "meta/stats.json has no fingerprint tying it to its data): run `vlacl ds-stats <dataset> --out <dir>`"
        )
    version = data["vlacl_stats_version"]
    if not isinstance(version, int) or version > STATS_VERSION:
        raise InputFormatError(
            f"{file} has stats version {version!r}, newer than this vlacl reads ({STATS_VERSION}): upgrade vlacl"
        )
    for key, kind, what in (
        ("fingerprint", str, "a text"),
        ("datasets", list, "a list of objects"),
        ("keymap_sha256", str, "a text"),
        ("settings", dict, "an object"),
        ("features", dict, "an object of objects"),
    ):
        if key not in data:
            raise InputFormatError(f"{file} lacks {key!r}: the file is damaged; recreate it with `vlacl ds-stats`")
        value = data[key]
        items = value if isinstance(value, list) else value.values() if isinstance(value, dict) else ()
        if not isinstance(value, kind) or (
            key in ("datasets", "features") and not all(isinstance(v, dict) for v in items)
        ):
            raise InputFormatError(
                f"{file}: {key!r} is {_short(value)}, not {what}: the file is damaged; recreate it with "
                "`vlacl ds-stats`"
            )
    fps = [str(d.get("fingerprint")) for d in data["datasets"]]
    expected = stats_fingerprint(fps, str(data["keymap_sha256"]), data["settings"])
    if expected != data["fingerprint"]:
        raise InputFormatError(
            f"{file} was edited after `vlacl ds-stats` wrote it (its fingerprint does not match its datasets and "
            "settings): recreate it with `vlacl ds-stats`"
        )
    return StatsFile(data, str(file))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def check_stats_match(stats: StatsFile, datasets: Sequence[EpisodeDataset], keymap: KeyMap) -> None:
    """Refuse stats computed for other datasets (the same set, in any order) or under another key map.

    Raises:
        InputFormatError: The stats' dataset fingerprints or key map hash differ from the data's;
            the message names both sides and how to make matching stats.
    """
    from vlacl.data.episode import dataset_fingerprint

    have = sorted(stats.dataset_fingerprints)
    given = sorted(dataset_fingerprint(d) for d in datasets)
    same_keymap = stats.keymap_sha256 == keymap.sha256()
    if have == given and same_keymap:
        return
    paths = [str(d.get("path")) for d in stats.data.get("datasets", [])]
    stats_km = "the default key map" if stats.data.get("keymap_is_default") else f"key map {stats.keymap_sha256[:12]}"
    data_km = "the default key map" if keymap.is_default else f"key map {keymap.sha256()[:12]}"
    what = "datasets" if same_keymap else "key maps"
    given_paths = " ".join(str(d.root) for d in datasets)
    raise InputFormatError(
        f"stats at {stats.source} (fingerprint {stats.fingerprint[:12]}) were computed by `vlacl ds-stats` for "
        f"dataset(s) {', '.join(paths)} (fingerprint(s) {', '.join(h[:12] for h in have)}) with {stats_km}, but the "
        f"data given is {', '.join(str(d.root) for d in datasets)} (fingerprint(s) "
        f"{', '.join(h[:12] for h in given)}) with {data_km}: the {what} differ; rerun "
        f"`vlacl ds-stats {given_paths} --out <dir>` or pass the matching --stats"
    )


@dataclass(frozen=True)
class _Affine:
    """``y = clip((x - center) * inv, lo, hi)``; inverse ``x = y * half + center``; float64, stats' shape."""

    mode: NormMode
    center: np.ndarray
    half: np.ndarray
    inv: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    clipped: bool


class Normalizer:
    """Per-feature affine normalization built from stats; see the module docstring for the modes.

    Example:
        >>> norm = Normalizer.from_stats(load_stats("runs/stats"), keys=["observation.state", "action"])
        >>> y = norm.normalize("action", actions)  # (B, T, D), numpy or torch
        >>> actions_again = norm.unnormalize("action", y)
    """

    def __init__(self, affines: Mapping[str, _Affine]) -> None:
        self._affines = dict(affines)
        self._tensors: dict[tuple[str, str, str], tuple[Any, ...]] = {}

    @classmethod
    def from_stats(
        cls,
        stats: StatsFile | Mapping[str, Any],
        keys: Sequence[str] | None = None,
        modes: Mapping[str, NormMode] | None = None,
        overrides: DimOverrides | None = None,
    ) -> Normalizer:
        """Build the normalizer of ``keys`` from stats.

        Args:
            stats: A :class:`StatsFile`, or a ``stats.json`` dict.
            keys: Features to normalize; all features of the stats by default.
            modes: Feature -> mode, replacing the stats' ``norm_mode``.
            overrides: Dimensions forced binary or continuous, replacing the stats' ``mask`` there.

        Raises:
            InputFormatError: A key the stats lack, or a statistic the mode needs missing.
            ConfigError: An unknown mode, or an override outside the feature's dimensions.
        """
        source = stats.source if isinstance(stats, StatsFile) else "the stats given"
        data = stats.data if isinstance(stats, StatsFile) else stats
        features: Mapping[str, Mapping[str, Any]] = data.get("features", data)
        keys = list(features) if keys is None else list(keys)
        overrides = overrides or DimOverrides()
        dims = {k: len(f["mask"]) for k, f in features.items() if "mask" in f}
        overrides.check({k: dims[k] for k in dims if k in keys})
        affines: dict[str, _Affine] = {}
        for key in keys:
            if key not in features:
                raise InputFormatError(
                    f"stats at {source} have no feature {key!r}; features there: {', '.join(features)}: "
                    "recompute them with `vlacl ds-stats` over the data you train on"
                )
            feat = features[key]
            mode = (modes or {}).get(key, feat.get("norm_mode", "none"))
            if mode not in NORM_MODES:
                raise ConfigError(f"unknown normalization mode {mode!r} for {key}: use one of {', '.join(NORM_MODES)}")
            affines[key] = _affine(key, feat, cast("NormMode", mode), overrides, source)
        return cls(affines)

    @property
    def keys(self) -> list[str]:
        """The features this normalizer handles."""
        return list(self._affines)

    def mode(self, key: str) -> NormMode:
        """The mode of ``key``."""
        return self._affine(key).mode

    @overload
    def normalize(self, key: str, x: np.ndarray) -> np.ndarray: ...
    @overload
    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor: ...
    def normalize(self, key: str, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Normalize ``x`` of feature ``key``: ``(..., D)`` for vectors, ``(..., C, H, W)`` for images.

        A float array keeps its dtype (float32 stays float32); integers become float64 (float32 for tensors).
        """
        affine = self._affine(key)
        if affine.mode == "none":
            return x
        if not _is_tensor(x):
            arr = np.asarray(x)
            dtype = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)
            y: np.ndarray = (arr.astype(dtype, copy=False) - affine.center.astype(dtype)) * affine.inv.astype(dtype)
            if affine.clipped:
                np.clip(y, affine.lo.astype(dtype), affine.hi.astype(dtype), out=y)
            return y
        tensor = cast("torch.Tensor", x)
        center, _, inv, lo, hi = self._torch_params(key, tensor)
        t = (tensor.to(center.dtype) - center) * inv
        return t.clamp(lo, hi) if affine.clipped else t

    @overload
    def unnormalize(self, key: str, y: np.ndarray) -> np.ndarray: ...
    @overload
    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor: ...
    def unnormalize(self, key: str, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """The inverse of :meth:`normalize` (exact on the unclipped range, up to float rounding)."""
        affine = self._affine(key)
        if affine.mode == "none":
            return y
        if not _is_tensor(y):
            arr = np.asarray(y)
            dtype = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)
            x: np.ndarray = arr.astype(dtype, copy=False) * affine.half.astype(dtype) + affine.center.astype(dtype)
            return x
        tensor = cast("torch.Tensor", y)
        center, half, _, _, _ = self._torch_params(key, tensor)
        return tensor.to(center.dtype) * half + center

    def _affine(self, key: str) -> _Affine:
        try:
            return self._affines[key]
        except KeyError:
            raise KeyError(f"the normalizer has no feature {key!r}; it has {', '.join(self._affines)}") from None

    def _torch_params(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch

        dtype = x.dtype if x.is_floating_point() else torch.float32
        cache_key = (key, str(dtype), str(x.device))
        if cache_key not in self._tensors:
            a = self._affine(key)
            self._tensors[cache_key] = tuple(
                torch.as_tensor(v, dtype=dtype, device=x.device) for v in (a.center, a.half, a.inv, a.lo, a.hi)
            )
        return self._tensors[cache_key]


def _is_tensor(x: object) -> bool:
    return type(x).__module__.startswith("torch")


def _affine(key: str, feat: Mapping[str, Any], mode: NormMode, overrides: DimOverrides, source: str) -> _Affine:
    """The affine map of one feature: pass-through dims get center 0, half 1, no clipping."""
    needed = {"q99": ("q01", "q99"), "min_max": ("min", "max"), "mean_std": ("mean", "std"), "none": ()}[mode]
    for stat in needed:
        if stat not in feat:
            raise InputFormatError(
                f"stats at {source} have no {stat!r} for {key}, which norm mode {mode} needs: use another mode, or "
                "recompute the stats with `vlacl ds-stats`"
            )
    if mode == "none":
        one = np.ones(1)
        return _Affine(mode, one * 0, one, one, -one * math.inf, one * math.inf, clipped=False)

    def array(stat: str, like: np.ndarray | None = None) -> np.ndarray:
        try:
            values = np.asarray(feat[stat], dtype=np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.ndim == 0:
            raise InputFormatError(
                f"stats at {source}: {stat!r} of {key} is {_short(feat[stat])}, not numbers: the file is damaged; "
                "recompute the stats with `vlacl ds-stats`"
            ) from None
        if like is not None and values.shape != like.shape:
            raise InputFormatError(
                f"stats at {source}: {stat!r} of {key} has {values.size} values, {needed[0]!r} {like.size}: the file "
                "is damaged; recompute the stats with `vlacl ds-stats`"
            )
        return values

    low = array(needed[0])
    high = array(needed[1], low)
    if mode == "mean_std":
        center, half = low, high
    else:
        center = (low + high) / 2
        half = (high - low) / 2
    shape = center.shape
    if "mask" in feat:
        mask = overrides.apply(key, array("mask", low).astype(bool).ravel()).reshape(shape)
    else:
        mask = np.ones(shape, dtype=bool)
    center = np.where(mask, center, 0.0)
    half = np.where(mask, half, 1.0)
    zero = half <= 0
    inv = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, half))  # a constant dim maps to 0 and back to its value
    half = np.where(zero, 0.0, half)
    clipped = mode in _BOUNDS
    bound = np.where(mask, 1.0, math.inf)
    return _Affine(mode, center, half, inv, -bound, bound, clipped=clipped)
