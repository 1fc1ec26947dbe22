"""Benchmark of ``vlacl merge-lora`` against a plain shard copy and PEFT's merge_and_unload.

Builds, once, a model from a real architecture (Qwen2-1.5B: 1.54B parameters, bf16, about 3.1 GB
in shards of about 1 GB) with random weights, written shard by shard with safetensors so that
building never holds the whole model, and a rank-16 LoRA adapter in PEFT's format on q, k, v, o,
gate, up and down of every layer. Then runs, each in a fresh subprocess that reports its own wall
time and peak resident memory (VmHWM):

(a) copy        a plain read and write of the same shards (safetensors load_file + save_file),
(b) vlacl       ``vlacl.adapters.merge.merge_lora``: the merge, plus what every vlacl artifact costs:
                the sha256 of its inputs (the base shards) and of its outputs, and an fsync of each file;
                the base's hashes come from vlacl's hash cache, as for every merge onto a base merged
                onto before (the cache is filled before the runs, untimed),
(b') vlacl-cold  the same with an empty hash cache: a first merge onto this base, which hashes its shards,
(c) peft        ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload()`` +
                ``save_pretrained()``,

and, to tell the merge from the artifact's bookkeeping, two references: ``copy+fsync`` (the copy,
synced to disk as an artifact is) and ``sha256`` (one pass of sha256 over the shards; an artifact
hashes its inputs and its outputs, two such passes). It prints the targets of issue 7: vlacl at
most 1.5x the copy, at least 2x faster than PEFT, and peak memory at most 1.5x the largest shard
plus the adapter. The page cache is warmed first, so every run reads the base model from memory,
and written data is synced to disk between runs (not timed), so no run pays for the one before.
``--check`` exits with 1 when a target is missed.

Usage::

    .venv/bin/python bench/bench_merge.py                 # full size, about 3 GB (needs ~12 GB disk)
    .venv/bin/python bench/bench_merge.py --size small    # about 150 MB, a few seconds
    .venv/bin/python bench/bench_merge.py --repeat 3 --check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlacl.artifacts.hashing import CACHE_DIR_ENV

SIZES: dict[str, dict[str, Any]] = {
    "full": {  # Qwen2-1.5B
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "shard_bytes": 1 << 30,
    },
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 32000,
        "shard_bytes": 48 << 20,
    },
}
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_VS_COPY = 1.5
MIN_VS_PEFT = 2.0
MAX_MEMORY_VS_SHARD = 1.5


def _tensor_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2 causal LM with tied embeddings, in checkpoint order."""
    h, inter, vocab = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    kv = h // spec["num_attention_heads"] * spec["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(spec["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
    shapes["model.norm.weight"] = (h,)
    return shapes


def build(workdir: Path, size: str) -> tuple[Path, Path]:
    """Write the base model and the adapter under ``workdir`` unless they are there already."""
    base, adapter = workdir / "base", workdir / "adapter"
    marker = workdir / "built.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"size": size}:
        return base, adapter
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    shutil.rmtree(workdir, ignore_errors=True)
    base.mkdir(parents=True)
    spec = SIZES[size]
    config = Qwen2Config(
        **{k: v for k, v in spec.items() if k != "shard_bytes"},
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(base)
    generator = torch.Generator().manual_seed(0)
    shapes = _tensor_shapes(spec)
    groups: list[list[str]] = [[]]
    used = 0
    for key, shape in shapes.items():  # plan the shards: about shard_bytes each, in checkpoint order
        nbytes = 2 * int(torch.tensor(shape).prod())
        if groups[-1] and used + nbytes > spec["shard_bytes"]:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for number, keys in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in keys:
            tensor = torch.empty(shapes[key], dtype=torch.bfloat16)
            if key.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            tensors[key] = tensor
            weight_map[key] = name
            total += tensor.numel() * 2
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(
        str(adapter)
    )
    factors = {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
            out_features, in_features = shape
            prefix = "base_model.model." + module
            factors[prefix + ".lora_A.weight"] = torch.randn(RANK, in_features, generator=generator) / in_features**0.5
            factors[prefix + ".lora_B.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.01
    save_file(factors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    marker.write_text(json.dumps({"size": size}))
    return base, adapter


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(mode: str, base: Path, adapter: Path, out: Path) -> None:
    """Run one measurement in this (fresh) process; print ``{"seconds": ..., "peak_rss": ...}``.

    torch is imported before the clock starts in every mode: its import is part of starting
    Python for all three, and the interpreter-inclusive wall time is reported beside.
    """
    import torch  # imported for its side effect: the import time

    if mode in ("copy", "copy+fsync"):
        from safetensors.torch import load_file, save_file

        started = time.perf_counter()
        out.mkdir()
        for file in sorted(base.iterdir()):
            if file.suffix == ".safetensors":
                save_file(load_file(file), str(out / file.name), metadata={"format": "pt"})
            else:
                shutil.copyfile(file, out / file.name)
            if mode == "copy+fsync":
                with (out / file.name).open("rb") as fh:
                    os.fsync(fh.fileno())
    elif mode == "sha256":
        from vlacl.artifacts.hashing import sha256_file

        started = time.perf_counter()
        for file in sorted(base.glob("*.safetensors")):
            sha256_file(file)
    elif mode in ("vlacl", "vlacl-cold"):
        from vlacl.adapters.merge import merge_lora
        from vlacl.config.merge_lora import MergeLoraConfig

        started = time.perf_counter()
        merge_lora([adapter], MergeLoraConfig(), out=out, base=base, command=["bench_merge"])
    elif mode == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        shard = max(f.stat().st_size for f in base.glob("*.safetensors"))
        merged.save_pretrained(out, max_shard_size=f"{shard // (1 << 20) + 1}MB")
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss": _peak_rss_bytes()}))


@dataclass
class Run:
    """One measurement: work seconds (after imports), process wall seconds, peak RSS bytes."""

    seconds: float
    wall: float
    peak_rss: int


def measure(mode: str, base: Path, adapter: Path, workdir: Path, settle: float = 0.0) -> Run:
    """Run ``mode`` in a subprocess and remove what it wrote.

    ``settle`` seconds of idling before the run let a virtual machine take back the memory the
    previous run freed, so that every run starts from the same state (see ``--settle``).
    """
    out = workdir / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    cold = workdir / "hash-cache-cold"
    shutil.rmtree(cold, ignore_errors=True)
    env = {**os.environ, CACHE_DIR_ENV: str(cold if mode == "vlacl-cold" else workdir / "hash-cache")}
    os.sync()  # write back what earlier runs left in the page cache, so it does not slow this one
    time.sleep(settle)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--base", str(base), "--adapter", str(adapter), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    shutil.rmtree(cold, ignore_errors=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return Run(seconds=report["seconds"], wall=wall, peak_rss=report["peak_rss"])


def _warm(base: Path) -> None:
    for file in base.iterdir():
        with file.open("rb") as fh:
            while fh.read(1 << 24):
                pass


def main(argv: list[str] | None = None) -> int:
    """Build the model if needed, run the three measurements, print the figures, check the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model is built and kept")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the median is reported")
    parser.add_argument("--check", action="store_true", help="exit with 1 when a target is missed")
    parser.add_argument("--skip-peft", action="store_true", help="leave out (c), the slowest run")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to idle before each run: on a VM that takes back freed memory after a few seconds, "
        "5 gives every run the same, untouched memory, instead of the previous run's",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.base, args.adapter, args.out)
        return 0
    workdir = args.workdir or Path(tempfile.gettempdir()) / f"vlacl-bench-merge-{args.size}"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, adapter = build(workdir, args.size)
    print(f"model: {base} built or found in {time.perf_counter() - started:.1f} s; load average {os.getloadavg()}")
    _warm(base)
    os.environ[CACHE_DIR_ENV] = str(workdir / "hash-cache")
    from vlacl.artifacts.hashing import sha256_file_cached

    for shard in sorted(base.glob("*.safetensors")):  # what the first merge onto this base leaves in the cache
        sha256_file_cached(shard)
    modes = ["copy", "copy+fsync", "sha256", "vlacl", "vlacl-cold"] + ([] if args.skip_peft else ["peft"])
    runs: dict[str, list[Run]] = {mode: [] for mode in modes}
    for _ in range(args.repeat):
        for mode in modes:
            runs[mode].append(measure(mode, base, adapter, workdir, args.settle))
    shards = sorted(base.glob("*.safetensors"))
    model_bytes = sum(f.stat().st_size for f in shards)
    largest = max(f.stat().st_size for f in shards)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"model {model_bytes / 1e9:.2f} GB in {len(shards)} shards (largest {largest / 1e9:.2f} GB), "
        f"adapter {adapter_bytes / 1e6:.1f} MB (rank {RANK})"
    )
    median: dict[str, Run] = {}
    for mode, measured in runs.items():
        median[mode] = Run(
            seconds=statistics.median(r.seconds for r in measured),
            wall=statistics.median(r.wall for r in measured),
            peak_rss=max(r.peak_rss for r in measured),
        )
        times = ", ".join(f"{r.seconds:.1f}" for r in measured)
        print(
            f"  {mode:10s} {median[mode].seconds:7.1f} s work ({median[mode].wall:.1f} s with interpreter start; "
            f"runs: {times})  peak RSS {median[mode].peak_rss / 1e9:.2f} GB"
        )
    missed = []
    vs_copy = median["vlacl"].seconds / median["copy"].seconds
    cold_vs_copy = median["vlacl-cold"].seconds / median["copy"].seconds
    memory = median["vlacl"].peak_rss / (largest + adapter_bytes)
    floor = median["copy+fsync"].seconds + 2 * median["sha256"].seconds
    print(f"vlacl / copy           {vs_copy:5.2f}x   (target <= {MAX_VS_COPY}x)")
    print(f"vlacl-cold / copy      {cold_vs_copy:5.2f}x   (a first merge onto this base: its shards hashed too)")
    print(
        f"vlacl / (copy+fsync + 2 x sha256) {median['vlacl'].seconds / floor:5.2f}x   (what any artifact of these "
        "bytes costs: synced, inputs and outputs hashed)"
    )
    missed += [] if vs_copy <= MAX_VS_COPY else ["time vs copy"]
    if "peft" in median:
        vs_peft = median["peft"].seconds / median["vlacl"].seconds
        print(f"peft / vlacl           {vs_peft:5.2f}x   (target >= {MIN_VS_PEFT}x)")
        missed += [] if vs_peft >= MIN_VS_PEFT else ["time vs peft"]
    print(f"vlacl peak RSS / (largest shard + adapter) {memory:5.2f}x   (target <= {MAX_MEMORY_VS_SHARD}x)")
    missed += [] if memory <= MAX_MEMORY_VS_SHARD else ["memory"]
    if missed:
        print("missed: " + ", ".join(missed))
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
