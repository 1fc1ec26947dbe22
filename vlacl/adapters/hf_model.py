"""Reading a Hugging Face model directory of safetensors shards without loading its weights.

Only the shard headers are read: tensor names, dtypes and shapes. A directory is either one
``model.safetensors`` or several shards listed in ``model.safetensors.index.json``. Weights in
pickle formats (``pytorch_model.bin``) are refused: vlacl never unpickles files users pass in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from vlacl.artifacts.manifest import load_json
from vlacl.artifacts.names import CONFIG_NAME, MANIFEST_NAME, SAFETENSORS_INDEX_NAME
from vlacl.errors import InputFormatError

HF_CONFIG_NAME: Final = "config.json"
"""The model config every Hugging Face model directory holds."""

SINGLE_SHARD_NAME: Final = "model.safetensors"
"""The weights file of an unsharded Hugging Face model."""

DTYPE_BYTES: Final[Mapping[str, int]] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
"""Bytes per element of safetensors dtypes."""

WEIGHT_FILE_RE: Final = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|npz)$|^model\.safetensors\.index\.json$|"
    r"^pytorch_model\.bin\.index\.json$"
)
"""Files of a model directory that hold (or index) weights; the merge writes its own."""

NOT_COPIED: Final = frozenset({MANIFEST_NAME, CONFIG_NAME})
"""Files of a vlacl artifact used as a base, which belong to that artifact only."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the base model, from its shard's header."""

    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 0)


@dataclass(frozen=True)
class BaseModel:
    """A Hugging Face model directory, read from its config and shard headers.

    Attributes:
        path: The directory.
        config: ``config.json``.
        shards: Shard file names, in order.
        tensors: Tensor name -> where it is and what it is.
        sharded: Whether the directory has ``model.safetensors.index.json``.
    """

    path: Path
    config: Mapping[str, Any]
    shards: tuple[str, ...]
    tensors: Mapping[str, TensorInfo]
    sharded: bool

    def shard_bytes(self, shard: str) -> int:
        """Size of a shard file in bytes."""
        return (self.path / shard).stat().st_size

    @property
    def num_parameters(self) -> int:
        """Elements of every tensor."""
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def extra_files(self) -> list[Path]:
        """Top-level files that are not weights: config, tokenizer, processor, generation config, code."""
        files = []
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith(".") or entry.name in NOT_COPIED or WEIGHT_FILE_RE.match(entry.name):
                continue
            if entry.is_file():
                files.append(entry)
        return files


def read_base_model(path: Path | str) -> BaseModel:
    """Open a Hugging Face model directory and read every shard's header.

    Raises:
        InputFormatError: Not a model directory, pickle weights only, an index naming a missing
            shard or a tensor its shard lacks, or a shard whose header cannot be read (a damaged
            or truncated file). The message names the file and what to do.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise InputFormatError(f"base model {path} is not a directory: pass a Hugging Face model directory")
    config_file = path / HF_CONFIG_NAME
    try:
        config = load_json(config_file)
    except FileNotFoundError:
        raise InputFormatError(
            f"base model {path} has no {HF_CONFIG_NAME}: pass a Hugging Face model directory (save_pretrained)"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"base model {config_file} cannot be read ({exc}): re-download or re-save it") from None
    if not isinstance(config, dict):
        raise InputFormatError(f"base model {config_file} must hold a JSON object: re-download or re-save it")
    index_file = path / SAFETENSORS_INDEX_NAME
    listed: dict[str, str] | None = None
    if index_file.is_file():
        listed = _read_index(index_file)
        shards = tuple(sorted(set(listed.values())))
    elif (path / SINGLE_SHARD_NAME).is_file():
        shards = (SINGLE_SHARD_NAME,)
    elif any(path.glob("pytorch_model*.bin")):
        raise InputFormatError(
            f"base model {path} has pickle weights (pytorch_model*.bin) only; vlacl reads safetensors: re-save it "
            "with save_pretrained(..., safe_serialization=True)"
        )
    else:
        raise InputFormatError(
            f"base model {path} has neither {SINGLE_SHARD_NAME} nor {SAFETENSORS_INDEX_NAME}: pass a Hugging Face "
            "model directory with safetensors weights"
        )
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise InputFormatError(
                f"base model shard {file}, listed in {SAFETENSORS_INDEX_NAME}, is missing: the download or copy is "
                "incomplete; fetch the model again"
            )
        try:
            with safe_open(file, framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118  # safe_open is not a mapping
                    view = fh.get_slice(key)
                    if key in tensors:
                        raise InputFormatError(f"base model tensor {key} is in two shards, {tensors[key].shard} and {shard}")
                    tensors[key] = TensorInfo(shard=shard, dtype=view.get_dtype(), shape=tuple(view.get_shape()))
        except InputFormatError:
            raise
        except Exception as exc:  # safetensors raises SafetensorError; OSError
            raise InputFormatError(
                f"base model shard {file} cannot be read ({exc}): the file is damaged or truncated; fetch the model again"
            ) from None
    if listed is not None:
        for key, shard in listed.items():
            info = tensors.get(key)
            if info is None or info.shard != shard:
                raise InputFormatError(
                    f"base model {index_file} puts {key} in {shard}, but that shard does not hold it: the index and the "
                    "shards come from different saves; fetch the model again"
                )
    return BaseModel(path=path, config=config, shards=shards, tensors=tensors, sharded=listed is not None)


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        data = load_json(index_file)
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"base model {index_file} cannot be read ({exc}): fetch the model again") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputFormatError(f"base model {index_file} has no weight_map: fetch the model again")
    for shard in weight_map.values():
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise InputFormatError(f"base model {index_file} names an invalid shard file {shard!r}")
    return {str(k): str(v) for k, v in weight_map.items()}
