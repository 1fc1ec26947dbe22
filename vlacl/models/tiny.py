"""The built-in tiny backbone: a small pure-PyTorch vision-language transformer that trains on a CPU.

Each frame becomes one token sequence::

    [CLS] [STATE] [text bytes ...] [camera 0 patches ...] [camera 1 patches ...]

- cameras: ``(H, W, C)`` uint8 frames, resized to ``image_size`` when they differ, scaled to
  ``[-1, 1]`` inside :meth:`TinyBackbone.forward`, cut into ``patch_size`` squares and embedded by one
  linear layer (``vision.patch_embed``), plus a learned position per patch and a learned embedding
  per camera slot;
- the instruction: UTF-8 bytes (:class:`ByteTokenizer`; no vocabulary file, the same ids on every
  machine), a learned position per byte;
- the proprioceptive state: zero-padded to ``max_state_dim`` and projected to one token, so the
  backbone ``takes_state``.

A pre-LN transformer (``blocks.<i>.attn.{q,k,v,o}_proj``, ``blocks.<i>.mlp.{fc1,fc2}``, attention by
:func:`torch.nn.functional.scaled_dot_product_attention`) mixes them, and the final CLS token is the
frame's feature ``(N, D)``. Every learned map is an ``nn.Linear`` with a stable name, so PEFT's LoRA
targets it like any Hugging Face model.

A model directory holds ``config.json`` (``model_type: vlacl_tiny``) and ``model.safetensors``;
:func:`save_tiny_model` writes a seeded random initialisation, :func:`load_tiny_model` reads one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file, save_file
from torch import nn

from vlacl.data.features import IMAGE_PREFIX
from vlacl.errors import ArtifactError, ConfigError, InputFormatError

log = logging.getLogger(__name__)

MODEL_TYPE: Final = "vlacl_tiny"
CONFIG_FILE: Final = "config.json"
WEIGHTS_FILE: Final = "model.safetensors"
FORMAT_VERSION: Final = 1

PIXEL_VALUES: Final = "pixel_values"
INPUT_IDS: Final = "input_ids"
ATTENTION_MASK: Final = "attention_mask"


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny backbone (saved as its ``config.json``).

    The defaults (D=128, 4 layers of 4 heads, 64x64 images in 8x8 patches, about 0.9 M parameters)
    keep a training step of a batch of 32 frames well under a second on two CPU cores.

    Attributes:
        hidden_size: ``D``, the token and feature width.
        num_layers: Transformer blocks.
        num_heads: Attention heads (``hidden_size`` must divide by it).
        mlp_ratio: Width of a block's MLP over ``hidden_size``.
        image_size: Side of the square frames the model sees; other sizes are resized in :meth:`~TinyBackbone.prepare`.
        patch_size: Side of a patch (``image_size`` must divide by it).
        cameras: Camera names in the order the model expects; empty takes any cameras in the order given.
        max_cameras: Camera slots (learned camera embeddings).
        max_state_dim: State dimensions the state token takes; shorter states are zero-padded.
        max_text_len: Instruction bytes kept (longer instructions are truncated).
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    image_size: int = 64
    patch_size: int = 8
    cameras: tuple[str, ...] = ()
    max_cameras: int = 4
    max_state_dim: int = 64
    max_text_len: int = 48

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tiny backbone {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"tiny backbone hidden_size {self.hidden_size} does not divide into {self.num_heads} heads"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"tiny backbone image_size {self.image_size} does not divide into {self.patch_size}-pixel patches"
            )
        if self.max_cameras < max(1, len(self.cameras)):
            raise ConfigError(f"tiny backbone max_cameras {self.max_cameras} is below its {len(self.cameras)} cameras")
        if self.max_state_dim < 0 or self.max_text_len < 1:
            raise ConfigError(
                f"tiny backbone max_state_dim must be >= 0 and max_text_len >= 1, got {self.max_state_dim} and "
                f"{self.max_text_len}"
            )

    @property
    def num_patches(self) -> int:
        """Patches per camera frame."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content."""
        out: dict[str, Any] = {"model_type": MODEL_TYPE, "vlacl_tiny_version": FORMAT_VERSION}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        out["cameras"] = list(self.cameras)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the config given") -> TinyConfig:
        """Read ``config.json`` content; unknown keys (from a newer version) are ignored with a warning."""
        if data.get("model_type") != MODEL_TYPE:
            raise ArtifactError(f"{source} has model_type {data.get('model_type')!r}, not {MODEL_TYPE!r}")
        version = data.get("vlacl_tiny_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(
                f"{source} is tiny model format version {version!r}; this vlacl reads up to {FORMAT_VERSION}: "
                "upgrade vlacl"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"model_type", "vlacl_tiny_version"})
        if unknown:
            log.warning("tiny model config at %s: ignoring unknown keys %s", source, ", ".join(unknown))
        kwargs = {k: v for k, v in data.items() if k in names}
        if "cameras" in kwargs:
            kwargs["cameras"] = tuple(kwargs["cameras"])
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as exc:
            raise ArtifactError(f"{source} is not a valid tiny model config: {exc}") from None


class ByteTokenizer:
    """Instruction -> token ids: the UTF-8 bytes shifted by the special ids; no files, deterministic.

    Id 0 is padding and id 1 ends the text; byte ``b`` is ``b + 2``. Text is whitespace-stripped and
    truncated to ``max_len`` ids (the end id included).
    """

    PAD: Final = 0
    EOS: Final = 1
    OFFSET: Final = 2
    vocab_size: Final = 256 + 2

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def encode(self, text: str) -> list[int]:
        """The ids of one text, the end id last."""
        ids = [b + self.OFFSET for b in text.strip().encode("utf-8")][: self.max_len - 1]
        return [*ids, self.EOS]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids from :meth:`encode` (padding and the end id dropped)."""
        raw = bytes(i - self.OFFSET for i in ids if i >= self.OFFSET)
        return raw.decode("utf-8", errors="replace")

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``(N, L)`` int64 padded to the longest text, and the mask ``(N, L)`` bool (True = a token)."""
        cache: dict[str, list[int]] = {}
        for text in texts:
            if text not in cache:
                cache[text] = self.encode(text)
        rows = [cache[t] for t in texts]
        length = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), length), self.PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != self.PAD


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (PEFT's usual target names)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``(N, T, D)``; ``mask`` ``(N, 1, 1, T)`` bool (True = attend) or None."""
        n, t, d = x.shape
        q, k, v = (
            p(x).view(n, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )  # (N, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, T, Dh)
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(n, t, d))  # (N, T, D)
        return out


class Mlp(nn.Module):
    """A block's feed-forward layer."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, D)`` -> ``(N, T, D)``."""
        out: torch.Tensor = self.fc2(F.gelu(self.fc1(x)))
        return out


class Block(nn.Module):
    """A pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(N, T, D)`` -> ``(N, T, D)``."""
        x = x + self.attn(self.norm1(x), mask)
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class VisionEmbed(nn.Module):
    """Camera frames -> patch tokens."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.patch_embed = nn.Linear(p * p * 3, d)
        self.pos = nn.Parameter(torch.zeros(config.num_patches, d))
        self.camera = nn.Parameter(torch.zeros(config.max_cameras, d))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` ``(N, C_cam, H, W, 3)`` uint8 -> tokens ``(N, C_cam * P, D)``."""
        n, cams, h, w, c = pixels.shape
        p = self.patch_size
        x = pixels.to(self.patch_embed.weight.dtype) * (2.0 / 255.0) - 1.0
        x = x.view(n, cams, h // p, p, w // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)  # (N, C_cam, H/p, W/p, p, p, 3)
        x = x.reshape(n, cams, (h // p) * (w // p), p * p * c)  # (N, C_cam, P, p*p*3)
        x = self.patch_embed(x) + self.pos + self.camera[:cams, None, :]  # (N, C_cam, P, D)
        tokens: torch.Tensor = x.reshape(n, cams * x.shape[2], -1)  # (N, C_cam * P, D)
        return tokens


class TinyBackbone(nn.Module):
    """The built-in tiny vision-language backbone; implements :class:`vlacl.models.base.Backbone`."""

    family = "tiny"
    takes_state = True

    def __init__(self, config: TinyConfig, seed: int = 0) -> None:
        """Build the model with weights drawn from ``seed`` (the global RNG is left untouched)."""
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.tokenizer = ByteTokenizer(config.max_text_len)
        d = config.hidden_size
        with torch.random.fork_rng(devices=[]):
            self.cls_token = nn.Parameter(torch.zeros(d))
            self.state_proj = nn.Linear(max(config.max_state_dim, 1), d)
            self.text_embed = nn.Embedding(ByteTokenizer.vocab_size, d)
            self.text_pos = nn.Parameter(torch.zeros(config.max_text_len, d))
            self.vision = VisionEmbed(config)
            self.blocks = nn.ModuleList(Block(d, config.num_heads, config.mlp_ratio) for _ in range(config.num_layers))
            self.norm = nn.LayerNorm(d)
        self._init_weights(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator) -> None:
        """Truncated normal (std 0.02) for weights, embeddings and learned tokens; zero biases; unit norms."""
        norms = {id(p) for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
        for name, param in self.named_parameters():
            if id(param) in norms:
                param.fill_(0.0 if name.endswith(".bias") else 1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04, generator=generator)

    # Backbone protocol -------------------------------------------------------------------------

    def prepare(self, images: Mapping[str, torch.Tensor], instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Frames ``(N, H, W, C)`` uint8 per camera and ``N`` instructions -> the model's tensors.

        Returns ``pixel_values`` ``(N, C_cam, S, S, 3)`` uint8 (``S = image_size``; absent without
        cameras), ``input_ids`` and ``attention_mask`` ``(N, L)``.
        """
        names = [k[len(IMAGE_PREFIX) :] if k.startswith(IMAGE_PREFIX) else k for k in images]
        frames = dict(zip(names, images.values(), strict=True))
        if self.config.cameras:
            if sorted(names) != sorted(self.config.cameras):
                raise InputFormatError(
                    f"the tiny backbone was built for cameras {list(self.config.cameras)}, the data has {names}: "
                    "choose the cameras with the key map, or build the model with these cameras"
                )
            names = list(self.config.cameras)
        elif len(names) > self.config.max_cameras:
            raise InputFormatError(
                f"the tiny backbone takes at most {self.config.max_cameras} cameras, the data has {len(names)} "
                f"({', '.join(names)}): drop cameras with the key map"
            )
        ids, mask = self.tokenizer(instructions)
        out = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if names:
            out[PIXEL_VALUES] = torch.stack([self._frames(frames[n], n) for n in names], dim=1)  # (N, C_cam, S, S, 3)
        return out

    def _frames(self, frames: torch.Tensor, camera: str) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 -> ``(N, S, S, 3)`` uint8, resized when needed."""
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise InputFormatError(
                f"camera {camera!r}: expected (N, H, W, 3) uint8 frames, got {tuple(frames.shape)} {frames.dtype}"
            )
        size = self.config.image_size
        if frames.shape[1:3] == (size, size):
            return frames
        x = frames.permute(0, 3, 1, 2).float()  # (N, 3, H, W)
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (N, S, S, 3)

    def forward(self, inputs: Mapping[str, torch.Tensor], state: torch.Tensor | None = None) -> torch.Tensor:
        """One feature ``(N, D)`` per frame from :meth:`prepare`'s tensors and the state ``(N, S)``."""
        ids = inputs[INPUT_IDS]
        n = ids.shape[0]
        d = self.hidden_size
        dtype = self.cls_token.dtype
        parts = [self.cls_token.expand(n, 1, d)]  # (N, 1, D)
        valid = [torch.ones(n, 1, dtype=torch.bool, device=ids.device)]
        if state is not None and self.config.max_state_dim > 0:
            if state.shape[-1] > self.config.max_state_dim:
                raise InputFormatError(
                    f"the state has {state.shape[-1]} dimensions, more than the tiny backbone's max_state_dim "
                    f"{self.config.max_state_dim}: build the model with a larger max_state_dim"
                )
            padded = F.pad(state.to(dtype), (0, self.config.max_state_dim - state.shape[-1]))  # (N, S_max)
            parts.append(self.state_proj(padded)[:, None, :])  # (N, 1, D)
            valid.append(valid[0])
        length = min(ids.shape[1], self.config.max_text_len)
        parts.append(self.text_embed(ids[:, :length]) + self.text_pos[:length])  # (N, L, D)
        valid.append(inputs[ATTENTION_MASK][:, :length].bool())
        pixels = inputs.get(PIXEL_VALUES)
        if pixels is not None:
            tokens = self.vision(pixels)  # (N, C_cam * P, D)
            parts.append(tokens)
            valid.append(torch.ones(n, tokens.shape[1], dtype=torch.bool, device=ids.device))
        x = torch.cat(parts, dim=1)  # (N, T, D)
        keep = torch.cat(valid, dim=1)  # (N, T)
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # (N, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask)
        feats: torch.Tensor = self.norm(x[:, 0])  # (N, D)
        return feats

    def lora_target_modules(self, preset: str) -> list[str]:
        """Full module names LoRA adapts: ``all-linear``, ``attention`` or ``vision`` (see the Backbone protocol).

        The names come from the config, not from the modules, so they stay the same after PEFT has
        wrapped the layers (a second adapter of a stack targets the same names as the first).
        """
        attention = [f"attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if preset == "attention":
            per_block = attention
        elif preset in ("all-linear", "vision"):
            per_block = [*attention, "mlp.fc1", "mlp.fc2"]
        else:
            raise ConfigError(f"unknown LoRA target preset {preset!r}: use all-linear, attention or vision")
        names = [f"blocks.{i}.{name}" for i in range(self.config.num_layers) for name in per_block]
        if preset == "vision":
            names += ["vision.patch_embed", "state_proj"]
        return names

    def layer_modules(self) -> Sequence[nn.Module]:
        """The transformer blocks, first to last."""
        return list(self.blocks)

    def pad_inputs(self, inputs: Mapping[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` padded on the right to ``length`` (as the tokenizer pads)."""
        out = dict(inputs)
        extra = length - int(inputs[INPUT_IDS].shape[1])
        if extra > 0:
            out[INPUT_IDS] = F.pad(inputs[INPUT_IDS], (0, extra), value=ByteTokenizer.PAD)  # (N, length)
            out[ATTENTION_MASK] = F.pad(inputs[ATTENTION_MASK], (0, extra), value=False)  # (N, length)
        return out


def save_tiny_model(directory: Path | str, config: TinyConfig | None = None, seed: int = 0) -> Path:
    """Write a randomly initialised tiny model (``config.json``, ``model.safetensors``); a seed gives the same bytes.

    Args:
        directory: Where to write; created if needed. Existing model files there are replaced.
        config: Model sizes; the defaults when None.
        seed: Seed of the initial weights.

    Returns:
        The directory.
    """
    config = config or TinyConfig()
    return save_tiny_backbone(TinyBackbone(config, seed=seed), directory)


def save_tiny_backbone(model: TinyBackbone, directory: Path | str) -> Path:
    """Write ``model`` as a model directory that :func:`load_tiny_model` (and ``load_backbone``) reads."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_tiny_model(directory: Path | str, dtype: torch.dtype | None = None) -> TinyBackbone:
    """Read a tiny model directory.

    Raises:
        ArtifactError: A missing or unreadable file, or weights that do not fit the config.
    """
    path = Path(directory)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the tiny model config {config_path}: {exc}") from None
    config = TinyConfig.from_dict(data, source=str(config_path))
    if not weights_path.is_file():
        raise ArtifactError(
            f"tiny model {path} has no {WEIGHTS_FILE}: the directory is incomplete; write it again with save_tiny_model"
        )
    model = TinyBackbone(config)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"cannot read {weights_path}: {exc}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ArtifactError(
            f"{weights_path} does not fit its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}; write the model again with save_tiny_model"
        )
    model.load_state_dict(state)
    if dtype is not None:
        model.to(dtype)
    return model


def param_count(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
