"""Reading a Hugging Face model directory of safetensors shards, headers first, weights shard by shard.

:func:`read_base_model` reads only the shard headers (through ``safetensors.safe_open``, which
validates them): tensor names, dtypes and shapes. A directory is either one ``model.safetensors``
or several shards listed in ``model.safetensors.index.json``. Weights in pickle formats
(``pytorch_model.bin``) are refused: vlacl never unpickles files users pass in.

:class:`ShardBuffer` then reads one shard at a time, whole, into one buffer that is reused for
every shard, and hands out tensors that are views of it. Reading a shard costs one sequential
read and no allocation: fresh memory is paid for page by page (a page fault per 4 KiB, expensive
on virtual machines), and a buffer allocated once is paid for once.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from vlacl.artifacts.manifest import load_json
from vlacl.artifacts.names import CONFIG_NAME, MANIFEST_NAME, SAFETENSORS_INDEX_NAME
from vlacl.errors import InputFormatError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
                        raise InputFormatError(
                            f"base model tensor {key} is in two shards, {tensors[key].shard} and {shard}"
                        )
                    tensors[key] = TensorInfo(shard=shard, dtype=view.get_dtype(), shape=tuple(view.get_shape()))
        except InputFormatError:
            raise
        except Exception as exc:  # safetensors raises SafetensorError; OSError
            raise InputFormatError(
                f"base model shard {file} cannot be read ({exc}): the file is damaged or truncated; "
                "fetch the model again"
            ) from None
    if listed is not None:
        for key, shard in listed.items():
            info = tensors.get(key)
            if info is None or info.shard != shard:
                raise InputFormatError(
                    f"base model {index_file} puts {key} in {shard}, but that shard does not hold it: the index "
                    "and the shards come from different saves; fetch the model again"
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


def runtime_names(base: BaseModel) -> dict[str, str]:
    """Checkpoint key by the name transformers gives the tensor at runtime, where the two differ.

    transformers 5 renames the tensors of many checkpoints as it loads them and renames them back
    as it saves: a Qwen2-VL checkpoint's ``model.layers.0...`` is the model's
    ``model.language_model.layers.0...``, a PaliGemma's ``language_model.model.layers.0...`` too.
    PEFT names adapter tensors after the runtime modules. The renaming rules are transformers'
    own, read from a skeleton of the model on the meta device (no memory, no weights read).
    Empty when transformers does not know the architecture (custom code, or an older or newer
    transformers) or renames nothing.
    """
    import torch

    try:
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        architectures = base.config.get("architectures") or []
        cls = getattr(transformers, str(architectures[0]), None) if architectures else None
        if cls is None:
            return {}
        config = transformers.AutoConfig.from_pretrained(base.path)
        with torch.device("meta"):
            model = cls._from_config(config)
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        meta = model.state_dict()
        names: dict[str, str] = {}
        for key in base.tensors:
            runtime, _ = rename_source_key(key, renamings, [], model.base_model_prefix, meta)
            if runtime != key:
                names.setdefault(runtime, key)
        return names
    except Exception as exc:  # an architecture transformers cannot build here: no renaming known
        log.debug("no transformers key renaming for %s: %s", base.path, exc)
        return {}


TORCH_DTYPES: Final = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
"""safetensors dtype names -> torch dtype attribute names."""

_READ_CHUNK: Final = 64 << 20
"""Bytes per ``readinto`` call: large enough for full disk speed, small enough to stay responsive."""


class ShardBuffer:
    """One buffer, as large as the largest shard, that the shards of a model are read into in turn.

    The tensors :meth:`read` returns are writable views of the buffer, valid until the next
    :meth:`read`; they are changed in place and handed to ``safetensors.torch.save_file`` as they
    are. Each view has a storage of its own, so safetensors does not take them for shared tensors.
    """

    def __init__(self, size: int) -> None:
        if sys.byteorder != "little":
            raise InputFormatError("safetensors files are little-endian; vlacl merges on little-endian machines only")
        # whole pages: a shard written back from the buffer with O_DIRECT may end on a padded block
        self._buffer = mmap.mmap(-1, -(-max(size, 1) // mmap.PAGESIZE) * mmap.PAGESIZE)

    @property
    def raw(self) -> mmap.mmap:
        """The buffer itself (page-aligned, :attr:`capacity` bytes)."""
        return self._buffer

    @property
    def capacity(self) -> int:
        """The buffer's size in bytes: the largest shard, rounded up to whole pages."""
        return len(self._buffer)

    def read(
        self,
        base: BaseModel,
        shard: str,
        ready: Callable[[str, torch.Tensor], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read ``shard`` of ``base`` whole and return its tensors, checked against the header read before.

        Args:
            base: The model.
            shard: The shard's file name.
            ready: Called with each tensor as soon as its bytes are in, while the rest is still
                being read, so that work on it overlaps the reading.
            progress: Called as the reading goes with the number of leading bytes of the file
                whose tensors have all been handed to ``ready`` (the header included).

        Raises:
            InputFormatError: The file no longer matches the header :func:`read_base_model` read
                (it changed or was damaged since), or it is larger than the buffer.
        """
        file = base.path / shard
        view = memoryview(self._buffer)
        tensors: dict[str, torch.Tensor] = {}
        try:
            with file.open("rb", buffering=0) as fh:
                size = file.stat().st_size
                if size > len(view):
                    raise InputFormatError(f"base model shard {file} grew while vlacl read it: fetch the model again")
                done = 0
                entries: list[tuple[int, int, str, Any]] = []
                start = 0
                while done < size:
                    got = fh.readinto(view[done : min(size, done + _READ_CHUNK)])
                    if not got:
                        raise InputFormatError(
                            f"base model shard {file} is shorter than its header says: fetch it again"
                        )
                    done += got
                    if not entries and done >= 8:
                        (header_len,) = struct.unpack("<Q", view[:8])
                        start = 8 + header_len
                        if done < start:
                            continue
                        entries = self._entries(base, shard, json.loads(bytes(view[8:start])), size - start)
                    while entries and start + entries[0][1] <= done:
                        begin, end, key, dtype = entries.pop(0)
                        tensors[key] = self._view(start + begin, end - begin, dtype, base.tensors[key].shape)
                        if ready is not None:
                            ready(key, tensors[key])
                    if progress is not None and start:
                        progress(start + entries[0][0] if entries else done)
        except (OSError, ValueError, struct.error) as exc:
            raise InputFormatError(f"base model shard {file} cannot be read ({exc}): fetch the model again") from None
        finally:
            view.release()
        if entries or len(tensors) != sum(1 for t in base.tensors.values() if t.shard == shard):
            raise InputFormatError(
                f"base model shard {file} changed since vlacl read its header: fetch the model again"
            )
        return tensors

    @staticmethod
    def _entries(
        base: BaseModel, shard: str, header: Mapping[str, Any], data_size: int
    ) -> list[tuple[int, int, str, Any]]:
        """``(begin, end, key, torch dtype)`` of every tensor in the header, by offset, checked against ``base``."""
        import torch

        entries = []
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            info = base.tensors.get(key)
            begin, end = entry["data_offsets"]
            dtype = getattr(torch, TORCH_DTYPES.get(entry["dtype"], ""), None)
            if (
                info is None
                or info.shard != shard
                or info.dtype != entry["dtype"]
                or info.shape != tuple(entry["shape"])
                or not isinstance(dtype, torch.dtype)
                or not 0 <= begin <= end <= data_size
                or end - begin != info.nbytes
            ):
                raise InputFormatError(
                    f"base model shard {base.path / shard} changed since vlacl read its header (tensor {key}): "
                    "fetch the model again"
                )
            entries.append((begin, end, key, dtype))
        return sorted(entries)

    def _view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over ``nbytes`` of the buffer at ``offset``; a copy where the offset is not aligned."""
        import torch

        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if offset % dtype.itemsize == 0:
            return torch.frombuffer(self._buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).view(
                shape
            )
        raw = torch.frombuffer(self._buffer, dtype=torch.uint8, count=nbytes, offset=offset)
        return raw.clone().view(dtype).view(shape)  # (nbytes,) bytes -> shape
