"""``merge-lora`` as a library call: stream a base model's shards through the adapters' updates.

Every shard is read, every adapted weight gets ``sum_i scale_i * B_i @ A_i`` added in float32 (in
row blocks that stay in the CPU cache, folded into one matrix product per weight), is cast back
to its dtype, checked for NaN and Inf, and the shard is written; then the next. Memory stays near
one shard plus the adapters, whatever the size of the model.

What is merged: every LoRA update of every adapter, in order (a task checkpoint contributes its
whole stack); tensors an adapter saves in full (``modules_to_save`` copies, biases trained with
``bias="all"``, embedding layers saved with the adapter) replace the base tensor first, the last
adapter saving a tensor winning, and the LoRA updates are added on top.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from vlacl.artifacts.hashing import sha256_buffers, sha256_file, sha256_file_cached, sha256_file_synced, sync_file
from vlacl.artifacts.manifest import read_manifest
from vlacl.artifacts.names import FILE_KIND, MANIFEST_NAME, SAFETENSORS_INDEX_NAME
from vlacl.artifacts.writer import ArtifactWriter, check_output_dir
from vlacl.config.core import dump_config
from vlacl.config.merge_lora import MergeLoraConfig
from vlacl.errors import ArtifactError, InputFormatError

from .hf_model import HF_CONFIG_NAME, BaseModel, ShardBuffer, read_base_model, runtime_names
from .peft_files import is_finite, load_adapter
from .sources import AdapterSource, open_sources

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KIND: Final = "merged_model"
MERGEABLE_DTYPES: Final = frozenset({"F64", "F32", "F16", "BF16"})
"""Base dtypes that updates are added to; quantized and integer weights are refused."""
BLOCK_ELEMENTS: Final = 1 << 18
"""Elements of one float32 row block (1 MiB): small enough to stay in L2, large enough for a fast matmul."""
WRITEBACK_BYTES: Final = 1 << 20
"""Tensors at least this large are handed to the disk as soon as written (``POSIX_FADV_DONTNEED``
starts the writeback of dirty pages without waiting for it), so a shard's sync overlaps its write."""
DIRECT_BLOCK: Final = 4096
"""Alignment of O_DIRECT writes: buffer address, file offset and length (a page covers every block size)."""
SAFETENSORS_METADATA: Final = {"format": "pt"}
POLICY_DETAILS: Final = (
    "head_config",
    "stats_fingerprint",
    "stream",
    "task_index",
    "task_key",
    "task_name",
    "num_tasks",
    "cl_algorithm",
    "adapter_mode",
)
"""Task-checkpoint details a merged model carries under ``details["policy"]``: with the policy files
they make it a complete policy (``vlacl.training.policy_io.load_policy`` reads them)."""
"""The metadata every merged shard carries, as ``save_pretrained`` writes it."""


@dataclass
class _TensorPlan:
    """What happens to one base tensor."""

    replacement: torch.Tensor | None = None
    replaced_by: str | None = None
    lefts: list[torch.Tensor] = field(default_factory=list)
    rights: list[torch.Tensor] = field(default_factory=list)
    biases: list[torch.Tensor] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MergeResult:
    """What ``merge-lora`` did."""

    out: Path
    already_merged: bool
    base: Path
    adapters: tuple[dict[str, Any], ...]
    dtype: str
    shards: tuple[str, ...]
    updated_tensors: int
    replaced_tensors: int
    policy_files: tuple[str, ...]
    bytes_written: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``--json``."""
        return {
            "out": str(self.out),
            "already_merged": self.already_merged,
            "base": str(self.base),
            "adapters": list(self.adapters),
            "dtype": self.dtype,
            "shards": list(self.shards),
            "updated_tensors": self.updated_tensors,
            "replaced_tensors": self.replaced_tensors,
            "policy_files": list(self.policy_files),
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
        }


class KeyResolver:
    """Find the base tensor an adapter's tensor name refers to.

    Adapter names are those of the module PEFT wrapped, which may sit one level above or below the
    checkpoint's names (``model.layers.0...`` for a ``*ForCausalLM``, ``layers.0...`` for the bare
    model). Tried in order: the name itself; with ``model.`` added or removed; the one checkpoint
    name ending in ``.<name>``. Several candidates are an error, never a guess.

    ``runtime`` gives, when first needed, the checkpoint key of each name transformers renames at
    load time (a VLM's ``model.language_model.layers...``, which PEFT uses, is ``model.layers...``
    or ``language_model.model.layers...`` in the file); tried before the suffix.
    """

    def __init__(self, keys: Sequence[str], runtime: Callable[[], Mapping[str, str]] | None = None) -> None:
        self.keys = frozenset(keys)
        self._runtime = runtime
        self._runtime_names: Mapping[str, str] | None = None
        self._by_module: dict[str, list[str]] = {}
        for key in keys:
            self._by_module.setdefault(_module_name(key), []).append(key)

    def resolve(self, name: str) -> str | None:
        """The base key for ``name``; ``None`` when there is none.

        Raises:
            InputFormatError: Several base tensors end with ``name``.
        """
        bare = name.removeprefix("model.")
        for candidate in (name, "model." + name, bare):
            if candidate in self.keys:
                return candidate
        if self._runtime is not None:
            if self._runtime_names is None:
                self._runtime_names = self._runtime()
            for candidate in (name, "model." + name, bare):
                if candidate in self._runtime_names:
                    return self._runtime_names[candidate]
        found = [k for k in self._by_module.get(_module_name(name), ()) if k.endswith("." + bare)]
        if len(found) > 1:
            raise InputFormatError(
                f"adapter tensor {name} matches several base tensors ({', '.join(sorted(found)[:4])}): the adapter "
                "was saved for another model class; save it from the model class of this base"
            )
        return found[0] if found else None


def _module_name(key: str) -> str:
    """The last module name of a tensor name: ``q_proj`` for ``model.layers.0.self_attn.q_proj.weight``."""
    parts = key.split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def _for_another_base(label: str, what: str, base: BaseModel) -> InputFormatError:
    return InputFormatError(
        f"adapter {label} was made for another base model: {what} in {base.path}; pass the base model it was "
        "trained on with --base"
    )


def build_plan(base: BaseModel, sources: Sequence[AdapterSource]) -> dict[str, _TensorPlan]:
    """Check every adapter against the base's tensors and collect the updates per base tensor.

    Raises:
        InputFormatError: An adapter names a tensor the base lacks or gives it another shape, or
            has a LoRA bias where the base layer has none.
    """
    import torch

    resolver = KeyResolver(list(base.tensors), lambda: runtime_names(base))
    tied = bool(base.config.get("tie_word_embeddings", False))
    plan: dict[str, _TensorPlan] = {}

    def find(label: str, name: str) -> str:
        key = resolver.resolve(name)
        if key is None:
            if name.removeprefix("model.").startswith("lm_head") and tied:
                raise InputFormatError(
                    f"adapter {label} changes {name}, which {base.path} does not store because it ties the output "
                    "layer to the input embeddings (tie_word_embeddings): merging would change both; vlacl does not "
                    "untie weights, train without lm_head in target_modules / modules_to_save"
                )
            raise _for_another_base(label, f"it changes {name}, which is not a tensor", base)
        return key

    for source in sources:
        for layout in source.stack:
            label = layout.name if layout.name == source.label else f"{source.label}/{layout.name}"
            adapter = load_adapter(layout)
            for target, tensor in adapter.replacements.items():
                key = find(label, target)
                if tuple(tensor.shape) != base.tensors[key].shape:
                    raise _for_another_base(
                        label,
                        f"it saves {target} with shape {tuple(tensor.shape)}, but {key} is {base.tensors[key].shape}",
                        base,
                    )
                entry = plan.setdefault(key, _TensorPlan())
                if entry.replaced_by is not None:
                    log.info("%s: the copy saved by %s replaces the one saved by %s", key, label, entry.replaced_by)
                entry.replacement, entry.replaced_by = tensor, label
            for module, factors in adapter.factors.items():
                m = layout.modules[module]
                key = find(label, module + ".weight")
                if base.tensors[key].shape != (m.rows, m.cols):
                    raise _for_another_base(
                        label,
                        f"its update of {module} has shape ({m.rows}, {m.cols}), "
                        f"but {key} is {base.tensors[key].shape}",
                        base,
                    )
                entry = plan.setdefault(key, _TensorPlan())
                entry.lefts.append(factors.left * m.scale)  # (rows, r)
                entry.rights.append(factors.right)  # (r, cols)
                entry.adapters.append(label)
                if factors.bias is not None:
                    bias_key = resolver.resolve(module + ".bias")
                    if bias_key is None:
                        raise _for_another_base(
                            label, f"it trains a LoRA bias for {module}, whose base layer has no bias", base
                        )
                    if base.tensors[bias_key].shape != (m.rows,):
                        raise _for_another_base(label, f"its LoRA bias of {module} has {m.rows} entries", base)
                    plan.setdefault(bias_key, _TensorPlan()).biases.append(factors.bias * m.scale)
    for key, entry in plan.items():
        if len(entry.lefts) > 1:  # one matmul per weight: (rows, R) @ (R, cols), R = sum of ranks
            entry.lefts = [torch.cat(entry.lefts, dim=1)]
            entry.rights = [torch.cat(entry.rights, dim=0)]
        if len(entry.biases) > 1:
            entry.biases = [torch.stack(entry.biases).sum(dim=0)]
        info = base.tensors[key]
        if info.dtype not in MERGEABLE_DTYPES:
            raise InputFormatError(
                f"base tensor {key} has dtype {info.dtype}: vlacl merges into floating-point weights only"
            )
    return plan


_scratch = threading.local()
"""Per-thread float32 block buffer, allocated once, so that no block allocates (and faults in) fresh memory."""


def add_low_rank(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> bool:
    """Add ``left @ right`` to ``weight`` in place, in float32 row blocks; return whether all is finite.

    Args:
        weight: ``(rows, cols)`` floating-point tensor, changed in place.
        left: ``(rows, r)`` float32, the scale folded in.
        right: ``(r, cols)`` float32.
    """
    import torch

    rows, cols = weight.shape
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    scratch: torch.Tensor | None = None  # None: a float32 weight is updated in place directly
    if weight.dtype != torch.float32:
        scratch = getattr(_scratch, "buffer", None)
        if scratch is None or scratch.numel() < step * cols:
            scratch = _scratch.buffer = torch.empty(step * cols, dtype=torch.float32)
    finite = True
    for start in range(0, rows, step):
        block = weight[start : start + step]  # (n, cols) view, n <= step
        if scratch is None:
            block.addmm_(left[start : start + step], right)
        else:
            acc = scratch[: block.numel()].view(block.shape)  # (n, cols) float32
            acc.copy_(block)
            acc.addmm_(left[start : start + step], right)
            block.copy_(acc)
        finite = finite and is_finite(block)
    return finite


def _torch_dtype(name: str) -> torch.dtype | None:
    import torch

    return {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _apply(key: str, tensor: torch.Tensor, entry: _TensorPlan, target: torch.dtype) -> torch.Tensor:
    """Replace and update one base tensor, in place where its dtype stays; return it in ``target``.

    Raises:
        InputFormatError: The result holds NaN or Inf.
    """
    if entry.replacement is not None:
        tensor = entry.replacement.to(target, copy=True)
    elif target.itemsize > tensor.dtype.itemsize:
        tensor = tensor.to(target)  # widen first, so the update is added at the higher precision
    finite = True
    if entry.lefts:
        finite = add_low_rank(tensor, entry.lefts[0], entry.rights[0])
    if entry.biases:
        tensor.copy_(tensor.float() + entry.biases[0])
    narrowed = tensor.dtype != target
    tensor = tensor.to(target)
    if narrowed or entry.biases or entry.replacement is not None:
        finite = finite and is_finite(tensor)
    if not finite:
        names = dict.fromkeys([*entry.adapters, *([entry.replaced_by] if entry.replaced_by else [])])
        raise InputFormatError(
            f"merging {', '.join(names)} into {key} gives NaN or Inf in {str(target).removeprefix('torch.')}: the "
            "update is too large for this dtype or the base weight is not finite; merge with --dtype float32 or "
            "check the adapter"
        )
    return tensor


def _merge_shard(
    base: BaseModel,
    shard: str,
    buffer: ShardBuffer,
    plan: Mapping[str, _TensorPlan],
    out_dtype: torch.dtype | None,
    pool: ThreadPoolExecutor,
    stream: StreamedShard | None = None,
) -> dict[str, torch.Tensor]:
    """Merge one shard: read it into ``buffer`` and update its weights in ``pool`` (and write it out in ``stream``).

    Returns:
        The tensors to write (views of ``buffer``, or new tensors where the dtype changed).
    """
    pending: dict[str, Future[torch.Tensor]] = {}
    converted: dict[str, torch.Tensor] = {}

    def ready(key: str, tensor: torch.Tensor) -> None:
        target = out_dtype if out_dtype is not None and tensor.is_floating_point() else tensor.dtype
        entry = plan.get(key)
        if entry is not None:
            pending[key] = pool.submit(_apply, key, tensor, entry, target)
            if stream is not None:
                stream.updating(key, pending[key])
        elif target != tensor.dtype:
            converted[key] = tensor.to(target)

    try:
        tensors = buffer.read(base, shard, ready, stream.progress if stream is not None else None)
    except BaseException:
        for future in pending.values():
            future.cancel()
        raise
    tensors.update(converted)
    try:
        for key, future in pending.items():
            tensors[key] = future.result()
    finally:
        for future in pending.values():
            future.cancel()
    return tensors


def _safetensors_names() -> dict[torch.dtype, str]:
    """The safetensors name of each dtype, in the order it lays tensors out in a file: its dtype enum, descending."""
    import torch

    return {
        torch.uint64: "U64",
        torch.int64: "I64",
        torch.float64: "F64",
        torch.complex64: "C64",
        torch.float32: "F32",
        torch.uint32: "U32",
        torch.int32: "I32",
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.uint16: "U16",
        torch.int16: "I16",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }


def safetensors_layout(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[bytes, list[torch.Tensor]] | None:
    """The bytes ``safetensors.torch.save_file`` writes before the tensor data, and the tensors in file order.

    The file ``save_file(tensors, path, metadata)`` writes is these bytes followed by each tensor's
    bytes in that order: the header is the JSON that its serializer writes (compact, metadata
    first, tensors by dtype then name, padded with spaces to a multiple of 8 bytes), behind its
    length as a little-endian u64. A test compares the two byte for byte.

    Returns:
        ``None`` when the layout cannot be told here (a tensor that is not contiguous or has a
        dtype not listed, several metadata entries, whose order safetensors does not fix):
        ``save_file`` must write those.
    """
    names = _safetensors_names()
    if len(metadata) > 1 or any(t.dtype not in names or not t.is_contiguous() for t in tensors.values()):
        return None
    rank = {dtype: i for i, dtype in enumerate(names)}
    order = sorted(tensors, key=lambda key: (rank[tensors[key].dtype], key))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        tensor = tensors[key]
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, [tensors[key] for key in order]


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy."""
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy().data  # (nbytes,)


def _open_direct(dst: Path) -> int | None:
    """A new file ``dst`` opened for ``O_DIRECT`` writes; ``None`` where the platform or filesystem has none.

    Raises:
        OSError: Any error but ``EINVAL`` (the filesystem's "no direct I/O here").
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def _shard_layout(base: BaseModel, shard: str) -> tuple[bytes, dict[str, tuple[int, int]]] | None:
    """The header ``save_file`` writes for ``shard``'s tensors and each one's place in the file, when the file has it.

    ``None`` when the file's own header differs (another order, other metadata) or a dtype is one
    vlacl does not lay out.
    """
    import torch

    from .hf_model import TORCH_DTYPES

    meta = {}
    for key, info in base.tensors.items():
        if info.shard != shard:
            continue
        dtype = getattr(torch, TORCH_DTYPES.get(info.dtype, ""), None)
        if not isinstance(dtype, torch.dtype):
            return None
        meta[key] = torch.empty(info.shape, dtype=dtype, device="meta")
    layout = safetensors_layout(meta, SAFETENSORS_METADATA)
    if layout is None:
        return None
    header, _ = layout
    try:
        with (base.path / shard).open("rb") as fh:
            if fh.read(len(header)) != header:
                return None
    except OSError:
        return None
    entries = json.loads(header[8:])
    places = {
        key: (len(header) + e["data_offsets"][0], len(header) + e["data_offsets"][1])
        for key, e in entries.items()
        if key != "__metadata__"
    }
    if max((end for _, end in places.values()), default=len(header)) != base.shard_bytes(shard):
        return None  # bytes after the last tensor: save_file would not write them
    return header, places


class StreamedShard:
    """Write a shard with ``O_DIRECT`` and hash it while it is still being read and merged.

    The merged shard is the buffer it was read into (:func:`_shard_layout`: the file already has
    the layout ``save_file`` gives), so its bytes can go to the disk as soon as they are final: read,
    and, for the tensors being updated, updated. A writer thread and a hasher thread follow that
    frontier in file order, so reading, updating, writing and hashing overlap instead of taking
    turns; a tensor that was replaced by a new one (``modules_to_save``) is copied to its place
    first. Memory stays the one buffer.
    """

    CHUNK: Final = 16 << 20
    """Bytes the writer waits for before a write (the last write takes what is left)."""

    def __init__(
        self, buffer: ShardBuffer, header: bytes, places: Mapping[str, tuple[int, int]], size: int, fd: int
    ) -> None:
        import torch

        self.buffer = buffer
        self.header = header
        self.checked = False
        self.places = places
        self.size = size
        self.fd = fd
        self.cond = threading.Condition()
        self.safe = 0
        self.pending: list[tuple[int, str, Future[torch.Tensor]]] = []
        self.failed: BaseException | None = None
        self.stopped = False
        self.whole = torch.frombuffer(buffer.raw, dtype=torch.uint8)
        self._threads = [
            threading.Thread(target=self._guard, args=(self._write,), name="vlacl-direct-write", daemon=True),
            threading.Thread(target=self._guard, args=(self._hash,), name="vlacl-direct-hash", daemon=True),
        ]
        self.digest = hashlib.sha256()
        started = []
        try:
            for thread in self._threads:
                thread.start()
                started.append(thread)
        except BaseException:
            self.abort(started)
            raise

    @classmethod
    def open(cls, base: BaseModel, shard: str, buffer: ShardBuffer, dst: Path) -> StreamedShard | None:
        """Start streaming ``shard`` to ``dst``; ``None`` (nothing at ``dst``) where direct writes cannot be used."""
        layout = _shard_layout(base, shard)
        size = base.shard_bytes(shard)
        if layout is None or -(-size // DIRECT_BLOCK) * DIRECT_BLOCK > buffer.capacity:
            return None
        fd = _open_direct(dst)
        return None if fd is None else cls(buffer, layout[0], layout[1], size, fd)

    def updating(self, key: str, future: Future[torch.Tensor]) -> None:
        """``key``'s bytes are final once ``future`` (its update) is done."""
        with self.cond:
            self.pending.append((self.places[key][0], key, future))
            self.pending.sort(key=lambda item: item[0])
        future.add_done_callback(lambda _: self._notify())

    def progress(self, safe: int) -> None:
        """The first ``safe`` bytes are read and their tensors handed over.

        At the first call the header just read must be the one the places were taken from (the
        file could have been replaced between the two reads); if not, the stream stops before it
        has written or moved anything, and the shard is written the buffered way.
        """
        with self.cond:
            if not self.checked:
                self.checked = True
                if self.buffer.raw[: len(self.header)] != self.header:
                    self.failed = OSError(errno.EINVAL, "the shard's header changed since its layout was read")
                    self.stopped = True
            self.safe = safe
            self.cond.notify_all()

    def _notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _frontier(self) -> int:
        """Bytes final from the start (under the lock); a failed update stops the stream."""
        if not self.checked:
            return 0
        while self.pending and self.pending[0][2].done():
            begin, key, future = self.pending.pop(0)
            tensor = future.result()
            end = self.places[key][1]
            place = self.whole[begin:end]
            if tensor.numel() and tensor.data_ptr() != place.data_ptr():
                place.copy_(tensor.contiguous().reshape(-1).view(place.dtype))
        return min(self.safe, self.pending[0][0]) if self.pending else self.safe

    def _next(self, done: int, align: int) -> int:
        """Wait until bytes past ``done`` are final; the end of the next piece (aligned down, but for the last)."""
        with self.cond:
            while True:
                if self.stopped:
                    raise _StoppedError
                frontier = self._frontier()
                if frontier >= self.size:
                    return self.size
                end = frontier - frontier % align
                if end - done >= self.CHUNK:
                    return min(end, done + self.CHUNK)
                self.cond.wait()

    def _write(self) -> None:
        data = memoryview(self.buffer.raw)
        done = 0
        while done < self.size:
            end = self._next(done, DIRECT_BLOCK)
            stop = end if end < self.size else -(-end // DIRECT_BLOCK) * DIRECT_BLOCK
            while done < stop:
                done += os.write(self.fd, data[done:stop])
        os.ftruncate(self.fd, self.size)

    def _hash(self) -> None:
        data = memoryview(self.buffer.raw)
        done = 0
        while done < self.size:
            end = self._next(done, 1)
            self.digest.update(data[done:end])
            done = end

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except _StoppedError:
            pass
        except BaseException as exc:
            with self.cond:
                self.failed = self.failed or exc
                self.stopped = True
                self.cond.notify_all()

    def finish(self) -> tuple[str, int] | None:
        """Wait for the writer and the hasher: the file's sha256 and size, or ``None`` when direct writes failed.

        Raises:
            BaseException: What an update or a write raised (other than ``EINVAL``).
        """
        for thread in self._threads:
            thread.join()
        os.close(self.fd)
        failed = self.failed
        if failed is None:
            return self.digest.hexdigest(), self.size
        if isinstance(failed, OSError) and failed.errno == errno.EINVAL:
            return None
        raise failed

    def abort(self, threads: Sequence[threading.Thread] | None = None) -> None:
        """Stop the threads (those started) and close the file (the caller removes it)."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for thread in self._threads if threads is None else threads:
            thread.join()
        os.close(self.fd)


class _StoppedError(Exception):
    """The stream was stopped: its threads end quietly."""


def write_shard(tensors: Mapping[str, torch.Tensor], dst: Path, pool: ThreadPoolExecutor) -> tuple[str, int] | None:
    """Write ``tensors`` as the safetensors file ``dst`` and hash the bytes in ``pool`` as they are written.

    The file is exactly what ``safetensors.torch.save_file(tensors, dst, metadata={"format": "pt"})``
    writes, written from the tensors' memory without a copy (measured twice as fast as ``save_file`` on a
    2-core machine); its sha256 comes from the same memory, hashed in ``pool``
    beside the write, so the file is never read back. The writeback of each large tensor to the
    disk starts as soon as it is written (see :data:`WRITEBACK_BYTES`).

    Returns:
        The file's hex sha256 and size; ``None`` when ``save_file`` wrote it (see
        :func:`safetensors_layout`), unhashed.
    """
    layout = safetensors_layout(tensors, SAFETENSORS_METADATA)
    if layout is None:
        from safetensors.torch import save_file

        save_file(dict(tensors), str(dst), metadata=dict(SAFETENSORS_METADATA))
        return None
    header, ordered = layout
    pieces = [memoryview(header), *(_raw_bytes(t) for t in ordered if t.numel())]
    digest = pool.submit(sha256_buffers, pieces)
    try:
        with dst.open("wb") as fh:
            written = 0
            for piece in pieces:
                fh.write(piece)
                if piece.nbytes >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
                    fh.flush()  # start writing it to disk now, so that the sync at the end waits for less
                    os.posix_fadvise(fh.fileno(), written, piece.nbytes, os.POSIX_FADV_DONTNEED)
                written += piece.nbytes
    finally:
        wait([digest])  # the buffers stay untouched until the hash is done
    sha, size = digest.result()
    return sha, size


def _synced(file: Path, hashed: tuple[str, int] | None) -> tuple[str, int]:
    """Sync ``file`` to disk; its sha256 and size, read from it unless ``hashed`` gives them."""
    if hashed is None:
        return sha256_file_synced(file)
    sync_file(file)
    return hashed


def _background_workers(files: int) -> int:
    """Threads that hash files beside the merge: half the cores, one per file, at least one, at most 8."""
    return max(1, min(files, (os.cpu_count() or 1) // 2, 8))


@contextmanager
def _recording_in_background(writer: ArtifactWriter, role: str, files: Sequence[Path]) -> Iterator[None]:
    """Record ``files`` as inputs of ``writer`` in a background thread while the block runs.

    Hashing the base model's shards reads them once more; done beside the merge it costs little
    wall time, since hashing and the merge's disk writes release the GIL, and a base merged onto
    before comes from the hash cache (:func:`~vlacl.artifacts.hashing.sha256_file_cached`), unless
    a shard changed since. The thread records in
    order, so the manifest lists the files in a fixed order; it stops after the current file
    when the block fails.
    """
    stop = threading.Event()
    # Half the cores hash (one file each), the rest merge; one hasher on a machine of 2 or 3 cores.
    workers = _background_workers(len(files))

    def digest(file: Path) -> str | None:
        return None if stop.is_set() else sha256_file_cached(file)

    def record() -> None:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlacl-hash") as pool:
            for file, sha in zip(files, pool.map(digest, files), strict=True):
                if sha is None or stop.is_set():
                    return
                writer.add_file_input(role, file, sha256=sha)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlacl-record") as recorder:
        future = recorder.submit(record)
        try:
            yield
        except BaseException:
            stop.set()
            raise
        future.result()


@contextmanager
def _merge_threads() -> Iterator[ThreadPoolExecutor]:
    """A pool of single-threaded torch workers, one per CPU (at most 8).

    Row blocks are small, and torch's intra-op threads would meet at a barrier after each one,
    which on a busy machine (a shared node, other jobs) costs more than the work; whole tensors
    handed to workers that each compute on one core do not wait for one another.
    """
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=max(1, min(cpus, 8)), thread_name_prefix="vlacl-merge")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(previous)


def _base_path(base: Path | None, sources: Sequence[AdapterSource]) -> Path:
    """``--base``, or the ``base_model`` a task checkpoint names when it is a directory."""
    if base is not None:
        return Path(base)
    for source in sources:
        if source.artifact is None or not source.is_checkpoint:
            continue
        named = source.artifact.manifest.details.get("base_model")
        if isinstance(named, str) and named:
            candidate = Path(named)
            if not candidate.is_absolute():
                candidate = source.artifact.path / candidate
            if candidate.is_dir():
                log.info("base model %s, from task checkpoint %s", candidate, source.path)
                return candidate
            hint = (
                ' (write the built-in model as a directory first: python -c "from vlacl.models.tiny import '
                "save_tiny_model; save_tiny_model('models/tiny')\", then --base models/tiny)"
                if named.startswith("builtin:")
                else ""
            )
            raise InputFormatError(
                f"task checkpoint {source.path} was trained on {named!r}, which is not a model directory here: "
                f"pass the base model directory with --base{hint}"
            )
    raise InputFormatError(
        "no base model: pass the Hugging Face model directory the adapters were trained on with --base"
    )


def _expected_inputs(base: BaseModel, sources: Sequence[AdapterSource]) -> list[tuple[str, str, str]]:
    """``(role, kind, sha256)`` of every input a merge of these records, as in its manifest."""
    records = [rec for source in sources for rec in source.expected_hashes()]
    records.append(("base", FILE_KIND, sha256_file(base.path / HF_CONFIG_NAME)))
    records.extend(("base", FILE_KIND, sha256_file_cached(base.path / shard)) for shard in base.shards)
    return sorted(records)


def _already_merged(out: Path, base: BaseModel, sources: Sequence[AdapterSource], cfg: MergeLoraConfig) -> bool:
    """Whether ``out`` is an intact merged_model of these inputs with these settings."""
    if not (out / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = read_manifest(out)
    except ArtifactError:
        return False
    if manifest.kind != KIND:
        return False
    import hashlib

    config_sha = hashlib.sha256(dump_config(cfg).encode("utf-8")).hexdigest()
    if manifest.config_sha256 != config_sha:
        return False
    for name, entry in manifest.outputs.items():
        file = out / name
        if not file.is_file() or file.stat().st_size != entry.bytes:
            return False
    recorded = sorted((i.role, i.kind, i.sha256) for i in manifest.inputs)
    return recorded == _expected_inputs(base, sources)


def merge_lora(
    adapters: Sequence[Path | str],
    cfg: MergeLoraConfig,
    *,
    out: Path,
    base: Path | None = None,
    overwrite: bool = False,
    command: Sequence[str] = (),
) -> MergeResult:
    """Merge adapters into a base model and write a ``merged_model`` artifact that ``from_pretrained`` loads.

    Args:
        adapters: PEFT adapter directories, composed adapters, or one task checkpoint (its whole
            stack); all their updates are summed.
        cfg: Output dtype.
        out: The merged model directory to write.
        base: The Hugging Face model directory; by default the ``base_model`` a task checkpoint
            records, when that is a directory.
        overwrite: Replace an existing merged_model at ``out``.
        command: The command line, recorded in the manifest.

    Returns:
        What was merged; ``already_merged`` when ``out`` already holds this very merge (same
        base, adapters and settings), which is then left as it is.

    Raises:
        VlaclError: Unreadable or mismatched inputs, an adapter vlacl cannot merge, a non-finite
            result, or an ``out`` that may not be written. Nothing is left at ``out`` then.
    """
    started = time.perf_counter()
    sources = open_sources(adapters)
    checkpoints = [s for s in sources if s.is_checkpoint]
    if len(checkpoints) > 1:
        raise InputFormatError(
            f"{len(checkpoints)} task checkpoints given ({', '.join(str(s.path) for s in checkpoints)}): a task "
            "checkpoint carries its whole adapter stack; pass only the last one"
        )
    base_model = read_base_model(_base_path(base, sources))
    out = Path(out)
    if _already_merged(out, base_model, sources, cfg):
        log.info("%s already holds this merge (same base, adapters and settings): nothing to do", out)
        manifest = read_manifest(out)
        return MergeResult(
            out=out,
            already_merged=True,
            base=base_model.path,
            adapters=tuple(s.describe() for s in sources),
            dtype=str(manifest.details.get("dtype", cfg.dtype)),
            shards=tuple(manifest.details.get("shards", ())),
            updated_tensors=int(manifest.details.get("updated_tensors", 0)),
            replaced_tensors=int(manifest.details.get("replaced_tensors", 0)),
            policy_files=tuple(manifest.details.get("policy_files", ())),
            bytes_written=0,
            seconds=time.perf_counter() - started,
        )
    check_output_dir(out, overwrite, kind=KIND)
    plan = build_plan(base_model, sources)
    out_dtype = _torch_dtype(cfg.dtype)
    policy = checkpoints[0].policy_files() if checkpoints else {}
    weight_map: dict[str, str] = {}
    total_size = 0
    dtypes: set[str] = set()
    written = 0
    buffer = ShardBuffer(max(base_model.shard_bytes(shard) for shard in base_model.shards))
    with (
        ArtifactWriter(
            out, KIND, command=command, config_yaml=dump_config(cfg), seed=None, overwrite=overwrite
        ) as writer,
        _merge_threads() as pool,
        ThreadPoolExecutor(
            max_workers=_background_workers(len(base_model.shards)), thread_name_prefix="vlacl-sync"
        ) as syncer,
    ):
        synced: list[tuple[Path, Future[tuple[str, int]]]] = []
        for source in sources:
            source.record(writer)
        writer.add_file_input("base", base_model.path / HF_CONFIG_NAME)  # refuses an --out overlapping the base
        with _recording_in_background(writer, "base", [base_model.path / shard for shard in base_model.shards]):
            for file in base_model.extra_files():
                if file.name == HF_CONFIG_NAME and out_dtype is not None:
                    _write_config_with_dtype(file, writer.path / file.name, cfg.dtype)
                else:
                    shutil.copyfile(file, writer.path / file.name)
            for number, name in enumerate(base_model.shards, start=1):
                shard_started = time.perf_counter()
                dst = writer.path / name
                stream = StreamedShard.open(base_model, name, buffer, dst) if out_dtype is None else None
                try:
                    tensors = _merge_shard(base_model, name, buffer, plan, out_dtype, pool, stream)
                except BaseException:
                    if stream is not None:
                        stream.abort()
                    raise
                hashed = stream.finish() if stream is not None else None
                if hashed is None:  # not streamed, or the filesystem refused direct writes on the way
                    hashed = write_shard(tensors, dst, pool)
                # sync the shard (and hash it, if the write did not) while the next one merges
                synced.append((writer.path / name, syncer.submit(_synced, writer.path / name, hashed)))
                for key, tensor in tensors.items():
                    weight_map[key] = name
                    total_size += tensor.numel() * tensor.element_size()
                    dtypes.add(str(tensor.dtype).removeprefix("torch."))
                changed = sum(1 for key in tensors if key in plan)
                count = len(tensors)
                del tensors
                shard_bytes = (writer.path / name).stat().st_size
                written += shard_bytes
                log.info(
                    "merged shard %d/%d %s: %d tensors, %d changed, %.2f GB in %.1f s",
                    number,
                    len(base_model.shards),
                    name,
                    count,
                    changed,
                    shard_bytes / 1e9,
                    time.perf_counter() - shard_started,
                )
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (writer.path / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            for name, file in policy.items():
                shutil.copyfile(file, writer.path / name)
            for file, future in synced:
                writer.add_synced_output(file, *future.result())
        adapters_detail = [s.describe() for s in sources]
        writer.details.update(
            {
                "base_model": str(base_model.path),
                "adapters": adapters_detail,
                "dtype": cfg.dtype,
                "dtypes": sorted(dtypes),
                "shards": list(base_model.shards),
                "updated_tensors": sum(1 for e in plan.values() if e.lefts or e.biases),
                "replaced_tensors": sum(1 for e in plan.values() if e.replacement is not None),
                "policy_files": sorted(policy),
            }
        )
        if checkpoints and checkpoints[0].artifact is not None:
            writer.details["task_checkpoint"] = checkpoints[0].label
            source_details = checkpoints[0].artifact.manifest.details
            fingerprint = source_details.get("stats_fingerprint")
            if fingerprint is not None:
                writer.details["stats_fingerprint"] = fingerprint
            writer.details["policy"] = {k: source_details[k] for k in POLICY_DETAILS if k in source_details}
    seconds = time.perf_counter() - started
    log.info("merged %d adapter(s) into %s in %.1f s", sum(len(s.stack) for s in sources), out, seconds)
    return MergeResult(
        out=out,
        already_merged=False,
        base=base_model.path,
        adapters=tuple(adapters_detail),
        dtype=cfg.dtype if out_dtype is not None else ",".join(sorted(dtypes)),
        shards=base_model.shards,
        updated_tensors=writer.details["updated_tensors"],
        replaced_tensors=writer.details["replaced_tensors"],
        policy_files=tuple(sorted(policy)),
        bytes_written=written,
        seconds=seconds,
    )


def _write_config_with_dtype(src: Path, dst: Path, dtype: str) -> None:
    """Copy ``config.json`` with its dtype set to ``dtype`` (``dtype``, and ``torch_dtype`` where present)."""
    config = json.loads(src.read_text(encoding="utf-8"))
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    if "dtype" in config or "torch_dtype" not in config:
        config["dtype"] = dtype
    dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
