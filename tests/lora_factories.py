"""Tiny real transformers models, PEFT LoRA adapters saved by PEFT itself, and hand-built task checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
import typer
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel, Qwen2Config

from vlacl.artifacts import ArtifactWriter
from vlacl.artifacts.names import ACTION_HEAD_NAME, ADAPTERS_DIR, KEYMAP_NAME, STATS_NAME

Arch = Literal["llama", "qwen2", "gpt2"]

VOCAB = 64
HIDDEN = 32


def tiny_config(arch: Arch = "llama", *, hidden: int = HIDDEN, tie: bool = False) -> Any:
    """A 2-layer config of ``arch`` with hidden size ``hidden`` (32 by default)."""
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tie)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def make_base(
    path: Path,
    arch: Arch = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = "20KB",
    hidden: int = HIDDEN,
    tie: bool = False,
    seed: int = 0,
) -> Path:
    """Save a random tiny model with ``save_pretrained``: several shards, or one file if ``shard_size`` is None."""
    torch.manual_seed(seed)
    config = tiny_config(arch, hidden=hidden, tie=tie)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.save_pretrained(path, max_shard_size=shard_size or "1GB")
    return path


def load_base(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """``from_pretrained`` of a model directory, in eval mode."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.train(False)
    return model


def make_lora(
    base: Path,
    out: Path,
    *,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
    scale_b: float = 1.0,
    **config: Any,
) -> Path:
    """Save a PEFT LoRA adapter for ``base`` with random, non-zero A and B (``init_lora_weights=False``).

    ``config`` goes to ``LoraConfig`` (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
    ``rank_pattern``, ...); full trained copies of ``modules_to_save`` get a visible offset.
    """
    settings: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    settings.update(config)
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base), LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(scale_b)
            elif "modules_to_save" in name:
                param.add_(0.25)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(str(out))
    return out


def peft_merged(base: Path, adapters: Sequence[Path], dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """PEFT's own merge: load every adapter on ``base`` and ``merge_and_unload`` them all."""
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(load_base(base, dtype), adapters[0], adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(adapter, adapter_name=name)
    merged: PreTrainedModel = model.merge_and_unload(adapter_names=names)
    merged.train(False)
    return merged


def peft_model(base: Path, adapters: Sequence[Path]) -> PeftModel:
    """The unmerged PeftModel with every adapter active: the LoRA branches computed in the forward pass."""
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(load_base(base), adapters[0], adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(adapter, adapter_name=name)
    cast(Any, model.base_model).set_adapter(names)  # every adapter active at once
    model.train(False)
    return model


def peft_delta(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The weight updates of one adapter as PEFT applies them: merged minus base, per tensor."""
    before = load_base(base).state_dict()
    after = peft_merged(base, [adapter]).state_dict()
    return {k: after[k] - before[k] for k in before}


def make_task_checkpoint(
    out: Path,
    adapters: Mapping[str, Path],
    *,
    base: Path | None = None,
    details: Mapping[str, Any] | None = None,
    keymap: bool = True,
) -> Path:
    """A ``task_checkpoint`` artifact built by hand, as ``train-task`` will write it.

    ``adapters`` maps stack names (in stacking order) to PEFT adapter directories, copied to
    ``adapters/<name>/``; an action head, stats and (optionally) a key map are written beside them.
    """
    with ArtifactWriter(out, "task_checkpoint", command=["vlacl", "train-task"], config_yaml=None, seed=0) as writer:
        for name, source in adapters.items():
            shutil.copytree(source, writer.path / ADAPTERS_DIR / name)
        save_file(
            {"proj.weight": torch.randn(7, HIDDEN), "proj.bias": torch.zeros(7)}, str(writer.path / ACTION_HEAD_NAME)
        )
        (writer.path / STATS_NAME).write_text(json.dumps({"action": {"mean": [0.0] * 7, "std": [1.0] * 7}}) + "\n")
        if keymap:
            (writer.path / KEYMAP_NAME).write_text("action: action\n")
        writer.details.update(
            {
                "adapter_stack": list(adapters),
                "steps": 1200,
                "final_loss": 0.0423,
                "val_loss": 0.0511,
                "stats_fingerprint": "f" * 64,
                "task_index": len(adapters) - 1,
            }
        )
        if base is not None:
            writer.details["base_model"] = str(base)
        writer.details.update(details or {})
    return out


def edit_adapter_config(adapter: Path, **changes: Any) -> None:
    """Change keys of ``adapter_config.json`` in place."""
    file = adapter / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def leftovers(out: Path) -> list[str]:
    """Names next to ``out`` that an interrupted write would leave: ``out`` itself and hidden temporaries."""
    parent = out.parent
    return sorted(p.name for p in parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def cli_app() -> typer.Typer:
    """The vlacl app, with its exception boundary and the three commands registered."""
    from vlacl.cli.app import app

    return app
