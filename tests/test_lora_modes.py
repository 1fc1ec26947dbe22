"""LoRA attachment, adapter modes and fine-tuning modes: what trains, what the forward pass computes, what is saved."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from tests.lora_factories import HIDDEN, load_base, make_base, make_task_checkpoint
from vlacl.adapters.compose import compose_adapters
from vlacl.adapters.lora import (
    SHARED_ADAPTER,
    AdapterSetup,
    LoraBackbone,
    PreviousAdapters,
    activate_for_task,
    adapter_name_for,
    attach,
    count_parameters,
    load_for_inference,
    load_previous,
    parameter_groups,
    save_adapters,
    set_backbone_trainable,
)
from vlacl.adapters.merge import merge_lora
from vlacl.adapters.peft_files import load_adapter, read_layout
from vlacl.adapters.sources import open_source
from vlacl.artifacts import ArtifactWriter
from vlacl.artifacts.names import (
    ACTION_HEAD_NAME,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    BACKBONE_WEIGHTS_NAME,
)
from vlacl.config.compose_adapters import ComposeAdaptersConfig
from vlacl.config.core import resolve_config
from vlacl.config.lora import AdapterConfig
from vlacl.config.merge_lora import MergeLoraConfig
from vlacl.errors import ConfigError, InputFormatError
from vlacl.models.base import Backbone

D = 16
IN = 12
N = 5


class Block(nn.Module):
    """A transformer-shaped block of plain linear layers."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict({name: nn.Linear(d, d) for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(d, 2 * d), "down_proj": nn.Linear(2 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        x = x + a["o_proj"](torch.tanh(a["q_proj"](x)) * a["k_proj"](x) + a["v_proj"](x))
        out: torch.Tensor = x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](x)))
        return out


class Stack(nn.Module):
    """The language model: ``layers``."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))


class Vision(nn.Module):
    """A one-layer "vision tower"."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, d)


class ToyBackbone(nn.Module):
    """A :class:`Backbone` of named linear layers: ``vision.proj`` and three LM blocks ``model.layers.<i>``."""

    family = "toy"
    takes_state = False

    def __init__(self, d: int = D, layers: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden_size = d
        self.vision = Vision(d)
        self.model = Stack(d, layers)

    def prepare(self, images: Mapping[str, torch.Tensor], instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"x": torch.cat([im.flatten(1).float() for im in images.values()], dim=1)}

    def forward(self, inputs: Mapping[str, torch.Tensor], state: torch.Tensor | None = None) -> torch.Tensor:
        x: torch.Tensor = self.vision.proj(inputs["x"])  # (N, D)
        for layer in self.model.layers:
            x = layer(x)
        return x

    def lora_target_modules(self, preset: str) -> list[str] | str:
        lm = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
        presets: dict[str, list[str] | str] = {
            "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "all-linear": lm,
            "vision": rf"({lm})|vision\.proj",
        }
        return presets[preset]

    def layer_modules(self) -> Sequence[nn.Module]:
        return list(self.model.layers)


def inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(N, IN, generator=torch.Generator().manual_seed(seed))}


def settings(**changes: Any) -> AdapterConfig:
    return AdapterConfig(**{"rank": 4, "dropout": 0.0, **changes})


def randomize(setup: AdapterSetup, seed: int = 7) -> None:
    """Give the trainable LoRA factors (B included) random values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in setup.trainable.values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def write_checkpoint(out: Path, setup: AdapterSetup, *, task_index: int, base: Path | None = None) -> Path:
    """A task checkpoint as train-task writes it: the adapters' files and details, an action head."""
    from safetensors.torch import save_file

    with ArtifactWriter(out, "task_checkpoint", command=["vlacl", "train-task"], config_yaml=None, seed=0) as writer:
        writer.details.update(save_adapters(setup, writer.path))
        writer.details["task_index"] = task_index
        if base is not None:
            writer.details["base_model"] = str(base)
        save_file({"proj.weight": torch.zeros(7, D)}, str(writer.path / ACTION_HEAD_NAME))
    return out


def run_stream(tmp: Path, cfg: AdapterConfig, tasks: int, *, make: Any = ToyBackbone) -> tuple[AdapterSetup, Path]:
    """Train-free stream: each task attaches, randomizes what it trains and writes a checkpoint."""
    previous: PreviousAdapters | None = None
    ckpt = tmp
    for k in range(tasks):
        setup = attach(make(), cfg, task=f"task {k}/demo", task_index=k, previous=previous)
        randomize(setup, seed=10 + k)
        ckpt = write_checkpoint(tmp / f"ckpt{k}", setup, task_index=k)
        previous = load_previous(ckpt)
    return setup, ckpt


def merged_by_hand(ckpt: Path, names: Sequence[str], make: Any = ToyBackbone) -> Any:
    """A fresh base backbone with every named adapter's update ``scale * B @ A`` added, read from the files."""
    backbone = make()
    params = dict(backbone.named_parameters())
    with torch.no_grad():
        for name in names:
            adapter = load_adapter(read_layout(ckpt / ADAPTERS_DIR / name, name))
            for module, factors in adapter.factors.items():
                scale = adapter.layout.modules[module].scale
                params[module + ".weight"].add_(scale * factors.left @ factors.right)
    return backbone


def trainable_modules(setup: AdapterSetup) -> set[str]:
    return set(setup.trainable)


# ---------------------------------------------------------------------------------------------- naming, config


def test_adapter_names_are_ordered_unique_and_safe() -> None:
    assert adapter_name_for("push wall/v2.1", 3) == "task_003_push-wall-v2-1"
    assert adapter_name_for("...", 12) == "task_012_task"
    assert len(adapter_name_for("x" * 500, 0)) == len("task_000_") + 48
    names = [adapter_name_for("a", i) for i in (0, 2, 10)]
    assert names == sorted(names)
    assert all("." not in n for n in names)


def test_config_flags_presets_and_validation() -> None:
    cfg = resolve_config(AdapterConfig, flags={"rank": 8, "targets": "q_proj, v_proj", "mode": "stack"})
    assert cfg.lora_alpha == 16.0
    assert cfg.explicit_targets() == ["q_proj", "v_proj"]
    assert AdapterConfig(targets=r"model\.layers\.\d+\.q_proj").explicit_targets() == r"model\.layers\.\d+\.q_proj"
    assert AdapterConfig(targets="vision").is_preset
    with pytest.raises(ConfigError, match="--lora-targets"):
        AdapterConfig(targets="q_proj(")
    with pytest.raises(ConfigError, match="--lora-rank"):
        AdapterConfig(rank=0)
    with pytest.raises(ConfigError, match="--lora-dropout"):
        AdapterConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="--adapter-mode"):
        resolve_config(AdapterConfig, flags={"mode": "stacked"})


# ---------------------------------------------------------------------------------------------- the modes


def test_first_task_trains_only_the_new_adapter_and_starts_at_the_base() -> None:
    base_out = ToyBackbone()(inputs())
    setup = attach(ToyBackbone(), settings(), task="reach", task_index=0)
    assert isinstance(setup.backbone, LoraBackbone)
    assert isinstance(setup.backbone, Backbone)
    assert (setup.backbone.family, setup.backbone.hidden_size, setup.backbone.takes_state) == ("toy", D, False)
    assert (setup.stack, setup.trainable_adapter) == ((SHARED_ADAPTER,), SHARED_ADAPTER)
    assert all(".lora_" in n and f".{SHARED_ADAPTER}." in n for n in setup.trainable)
    # all-linear preset: the 6 linear layers of 3 blocks, not the vision tower, 2 factors each
    assert len(setup.trainable) == 3 * 6 * 2
    assert not any("vision" in n for n in setup.trainable)
    counts = setup.counts()
    assert counts.trainable == sum(p.numel() for p in setup.trainable.values())
    assert counts.total == count_parameters(ToyBackbone()).total + counts.trainable
    torch.testing.assert_close(setup.module(inputs()), base_out, rtol=0, atol=0)  # B starts at zero


@pytest.mark.parametrize(("preset", "expected"), [("attention", 3 * 4), ("vision", 3 * 6 + 1)])
def test_target_presets_come_from_the_backbone(preset: str, expected: int) -> None:
    setup = attach(ToyBackbone(), settings(targets=preset), task="t", task_index=0)
    assert len(setup.trainable) == 2 * expected
    assert any("vision" in n for n in setup.trainable) == (preset == "vision")


def test_targets_that_match_nothing_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--lora-targets"):
        attach(ToyBackbone(), settings(targets="no_such_proj"), task="t", task_index=0)


def test_shared_mode_trains_the_same_adapter_on(tmp_path: Path) -> None:
    first = attach(ToyBackbone(), settings(), task="a", task_index=0)
    randomize(first)
    saved = {n: p.detach().clone() for n, p in first.trainable.items()}
    ckpt = write_checkpoint(tmp_path / "ckpt0", first, task_index=0)
    previous = load_previous(ckpt)
    assert (previous.mode, previous.names) == ("shared", (SHARED_ADAPTER,))
    nxt = attach(ToyBackbone(), settings(dropout=0.1), task="b", task_index=1, previous=previous)
    assert (nxt.stack, nxt.trainable_adapter) == ((SHARED_ADAPTER,), SHARED_ADAPTER)
    assert set(nxt.trainable) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(nxt.trainable[name], tensor), name
    nxt.module.train(False)
    first.module.train(False)
    torch.testing.assert_close(nxt.module(inputs()), first.module(inputs()), rtol=0, atol=0)
    assert nxt.adapters[0].task == "a"  # created by the first task
    with pytest.raises(ConfigError, match="--lora-rank 4"):
        attach(ToyBackbone(), settings(rank=8), task="b", task_index=1, previous=previous)
    with pytest.raises(ConfigError, match="--adapter-mode shared"):
        attach(ToyBackbone(), settings(mode="stack"), task="b", task_index=1, previous=previous)


def test_stack_forward_is_base_plus_every_update_and_only_the_newest_learns(tmp_path: Path) -> None:
    cfg = settings(mode="stack", dropout=0.3, rslora=True)
    setup, ckpt = run_stream(tmp_path, cfg, 3)
    names = [adapter_name_for(f"task {k}/demo", k) for k in range(3)]
    assert (setup.stack, setup.trainable_adapter) == (tuple(names), names[-1])
    assert setup.active_adapters() == tuple(names)
    assert all(f".{names[-1]}." in n for n in setup.trainable)
    setup.module.train(False)
    expected = merged_by_hand(ckpt, names)(inputs())
    torch.testing.assert_close(setup.module(inputs()), expected, rtol=1e-5, atol=1e-5)
    # training mode: the frozen adapters' dropout is off, the newest one's is on
    setup.module.train(True)
    q: Any = setup.base.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q.lora_dropout[names[0]], nn.Identity)
    assert isinstance(q.lora_dropout[names[2]], nn.Dropout)
    setup.module(inputs()).square().sum().backward()
    learned = 0
    for name, param in setup.module.named_parameters():
        if f".{names[-1]}." in name and ".lora_" in name:
            assert param.grad is not None, name
            assert param.grad.abs().sum() > 0, name
            learned += 1
        else:
            assert param.grad is None, name
            assert not param.requires_grad, name
    assert learned == len(setup.trainable) == 3 * 6 * 2


def test_stack_checkpoint_round_trips_exact_tensors(tmp_path: Path) -> None:
    setup, ckpt = run_stream(tmp_path, settings(mode="stack"), 2)
    previous = load_previous(ckpt)
    nxt = attach(ToyBackbone(), settings(mode="stack"), task="third", task_index=2, previous=previous)
    assert nxt.stack == (*setup.stack, "task_002_third")
    old = {n: p for n, p in setup.module.named_parameters() if ".lora_" in n}
    new = dict(nxt.module.named_parameters())
    for name, tensor in old.items():
        assert torch.equal(new[name], tensor), name
        assert not new[name].requires_grad
    with pytest.raises(ConfigError, match="already has an adapter"):
        attach(ToyBackbone(), settings(mode="stack"), task="task 1/demo", task_index=1, previous=previous)


def test_per_task_mode_activates_the_adapter_of_the_task(tmp_path: Path) -> None:
    setup, ckpt = run_stream(tmp_path, settings(mode="per-task"), 3)
    names = list(setup.stack)
    assert setup.active_adapters() == (names[-1],)
    setup.module.train(False)
    torch.testing.assert_close(setup.module(inputs()), merged_by_hand(ckpt, names[-1:])(inputs()), rtol=1e-5, atol=1e-5)
    ready = load_for_inference(ToyBackbone(), ckpt)
    assert ready.trainable == {}
    assert not any(p.requires_grad for p in ready.module.parameters())
    ready.module.train(False)
    for k in range(3):
        for key in (k, f"task {k}/demo"):
            assert activate_for_task(ready, key) == (names[k],)
            torch.testing.assert_close(
                ready.module(inputs()), merged_by_hand(ckpt, [names[k]])(inputs()), rtol=1e-5, atol=1e-5
            )
    with pytest.raises(ConfigError, match="no per-task adapter"):
        activate_for_task(ready, 5)
    assert activate_for_task(ready, 5, unseen="base") == ()
    torch.testing.assert_close(ready.module(inputs()), ToyBackbone()(inputs()), rtol=0, atol=0)
    assert activate_for_task(ready, "new", unseen="latest") == (names[-1],)


def test_inference_setup_of_a_stack_uses_every_adapter(tmp_path: Path) -> None:
    _, ckpt = run_stream(tmp_path, settings(mode="stack"), 2)
    ready = load_for_inference(ToyBackbone(), ckpt)
    ready.module.train(False)
    assert activate_for_task(ready, 0) == ready.stack  # a stack serves every task whole
    expected = merged_by_hand(ckpt, ready.stack)(inputs())
    torch.testing.assert_close(ready.module(inputs()), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- files


def test_saved_adapters_are_peft_directories_peft_loads(tmp_path: Path) -> None:
    setup, ckpt = run_stream(tmp_path, settings(mode="per-task", rslora=True, alpha=6.0), 2)
    for name in setup.stack:
        directory = ckpt / ADAPTERS_DIR / name
        assert sorted(p.name for p in directory.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
        config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
        picked = {k: config[k] for k in ("use_rslora", "r", "lora_alpha", "peft_type", "inference_mode")}
        assert picked == {"use_rslora": True, "r": 4, "lora_alpha": 6, "peft_type": "LORA", "inference_mode": True}
        keys = load_file(str(directory / ADAPTER_WEIGHTS_NAME)).keys()
        assert all(k.startswith("base_model.model.model.layers.") for k in keys)
        assert read_layout(directory).modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(6.0 / 2.0)
        loaded = PeftModel.from_pretrained(ToyBackbone(), str(directory))
        loaded.train(False)
        torch.testing.assert_close(loaded(inputs()), merged_by_hand(ckpt, [name])(inputs()), rtol=1e-5, atol=1e-5)
        layer: Any = loaded.get_base_model().get_submodule("model.layers.1.self_attn.v_proj")
        assert layer.scaling["default"] == pytest.approx(6.0 / math.sqrt(4))


def test_checkpoint_details_and_readers(tmp_path: Path) -> None:
    setup, ckpt = run_stream(tmp_path, settings(mode="stack"), 2)
    details = save_adapters(setup, tmp_path / "again")
    picked = {k: details[k] for k in ("adapter_stack", "adapter_mode", "finetune", "backbone_weights")}
    assert picked == {
        "adapter_stack": list(setup.stack),
        "adapter_mode": "stack",
        "finetune": "lora",
        "backbone_weights": None,
    }
    assert [t["task_index"] for t in details["adapter_tasks"]] == [0, 1]
    source = open_source(ckpt)
    assert source.is_checkpoint
    assert [layout.name for layout in source.stack] == list(setup.stack)
    # a checkpoint assembled from the saved PEFT directories (as the readers' tests build them) reads back too
    hand = make_task_checkpoint(
        tmp_path / "hand", {name: tmp_path / "again" / ADAPTERS_DIR / name for name in setup.stack}
    )
    previous = load_previous(hand)
    assert (previous.mode, previous.names) == ("stack", setup.stack)
    composed = compose_adapters([ckpt], ComposeAdaptersConfig(method="cat"), out=tmp_path / "composed")
    loaded = PeftModel.from_pretrained(ToyBackbone(), str(composed.out))
    loaded.train(False)
    torch.testing.assert_close(loaded(inputs()), merged_by_hand(ckpt, setup.stack)(inputs()), rtol=1e-5, atol=1e-5)


def test_adapters_of_another_backbone_are_refused(tmp_path: Path) -> None:
    _, ckpt = run_stream(tmp_path, settings(mode="stack"), 1)
    with pytest.raises(InputFormatError, match="another base model"):
        attach(ToyBackbone(d=8), settings(mode="stack"), task="b", task_index=1, previous=load_previous(ckpt))
    with pytest.raises(InputFormatError, match="does not have"):
        attach(ToyBackbone(layers=1), settings(mode="stack"), task="b", task_index=1, previous=load_previous(ckpt))


class LlamaBackbone(nn.Module):
    """A backbone holding a Hugging Face model at ``model``, as the VLM backbones do."""

    family = "llama"
    takes_state = False
    hidden_size = HIDDEN

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.model = load_base(path)

    def prepare(self, images: Mapping[str, torch.Tensor], instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, inputs: Mapping[str, torch.Tensor], state: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.model(input_ids=inputs["input_ids"]).last_hidden_state[:, -1]  # type: ignore[no-any-return]

    def lora_target_modules(self, preset: str) -> list[str] | str:
        return ["q_proj", "v_proj", "down_proj"]

    def layer_modules(self) -> Sequence[nn.Module]:
        return list(self.model.model.layers)


def test_merge_lora_merges_a_trained_stack_into_the_base(tmp_path: Path) -> None:
    base = make_base(tmp_path / "llama", "llama")
    tokens = {"input_ids": torch.tensor([[1, 5, 9, 3], [4, 4, 0, 11]])}
    setup, ckpt = run_stream(tmp_path, settings(mode="stack"), 2, make=lambda: LlamaBackbone(base))
    setup.module.train(False)
    result = merge_lora([ckpt], MergeLoraConfig(), out=tmp_path / "merged", base=base)
    assert result.updated_tensors == 2 * 3  # 2 layers x 3 target modules
    merged = load_base(result.out)
    expected = merged.model(input_ids=tokens["input_ids"]).last_hidden_state[:, -1]
    torch.testing.assert_close(setup.module(tokens), expected, rtol=1e-4, atol=1e-5)


def test_a_per_task_checkpoint_composes_its_own_adapter_only(tmp_path: Path) -> None:
    setup, ckpt = run_stream(tmp_path, settings(mode="per-task"), 2)
    assert [layout.name for layout in open_source(ckpt).stack] == [setup.stack[-1]]
    composed = compose_adapters([ckpt], ComposeAdaptersConfig(method="cat"), out=tmp_path / "composed")
    loaded = PeftModel.from_pretrained(ToyBackbone(), str(composed.out))
    loaded.train(False)
    torch.testing.assert_close(loaded(inputs()), merged_by_hand(ckpt, setup.stack[-1:])(inputs()), rtol=1e-5, atol=1e-5)


def test_the_built_in_tiny_backbone_stacks_and_fine_tunes(tmp_path: Path) -> None:
    tiny = pytest.importorskip("vlacl.models.tiny")

    def make() -> Any:
        return tiny.TinyBackbone(tiny.TinyConfig(hidden_size=32, num_layers=3, image_size=16, patch_size=8), seed=0)

    base = make()
    frames = torch.randint(0, 256, (N, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = base.prepare({"observation.images.top": frames}, ["pick up the cube"] * N)
    state = torch.randn(N, 6, generator=torch.Generator().manual_seed(1))
    setup, ckpt = run_stream(tmp_path, settings(mode="stack", targets="vision"), 2, make=make)
    assert any("vision.patch_embed" in n for n in setup.trainable)
    setup.module.train(False)
    expected = merged_by_hand(ckpt, setup.stack, make)(batch, state)
    torch.testing.assert_close(setup.module(batch, state), expected, rtol=1e-5, atol=1e-5)
    last = attach(make(), settings(finetune="last-n", last_n=1), task="t", task_index=0)
    assert last.trainable
    assert all(n.startswith("blocks.2.") for n in last.trainable)


# ---------------------------------------------------------------------------------------------- no LoRA


def test_full_last_n_and_frozen_train_what_they_say(tmp_path: Path) -> None:
    full = attach(ToyBackbone(), settings(finetune="full"), task="t", task_index=0)
    assert set(full.trainable) == {n for n, _ in ToyBackbone().named_parameters()}
    assert full.module is full.base
    assert (full.peft_model, full.stack) == (None, ())
    last = attach(ToyBackbone(), settings(finetune="last-n", last_n=2), task="t", task_index=0)
    assert trainable_modules(last) == {
        n for n, _ in ToyBackbone().named_parameters() if n.startswith(("model.layers.1.", "model.layers.2."))
    }
    frozen = attach(ToyBackbone(), settings(finetune="frozen"), task="t", task_index=0)
    assert frozen.trainable == {}
    assert count_parameters(frozen.base).trainable == 0
    with pytest.raises(ConfigError, match="--last-n-layers"):
        attach(ToyBackbone(), settings(finetune="last-n", last_n=4), task="t", task_index=0)


def test_last_n_weights_carry_over_and_accumulate(tmp_path: Path) -> None:
    first = attach(ToyBackbone(), settings(finetune="last-n", last_n=1), task="a", task_index=0)
    randomize(first)
    ckpt = write_checkpoint(tmp_path / "c0", first, task_index=0)
    saved = load_file(str(ckpt / BACKBONE_WEIGHTS_NAME))
    assert set(saved) == set(first.trainable)
    previous = load_previous(ckpt)
    assert (previous.finetune, previous.backbone_weights) == ("last-n", ckpt / BACKBONE_WEIGHTS_NAME)
    nxt = attach(ToyBackbone(), settings(finetune="last-n", last_n=1), task="b", task_index=1, previous=previous)
    params = dict(nxt.base.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(params[name], tensor)
    torch.testing.assert_close(nxt.module(inputs()), first.module(inputs()), rtol=0, atol=0)
    details = save_adapters(nxt, tmp_path / "next")
    assert (details["adapter_stack"], details["backbone_weights"]) == ([], BACKBONE_WEIGHTS_NAME)
    ready = load_for_inference(ToyBackbone(), ckpt)
    torch.testing.assert_close(ready.module(inputs()), first.module(inputs()), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="--finetune last-n"):
        attach(ToyBackbone(), settings(), task="b", task_index=1, previous=previous)


def test_parameter_groups_and_the_head_only_stage() -> None:
    setup = attach(ToyBackbone(), settings(mode="stack"), task="t", task_index=0)
    head = nn.Linear(D, 7)
    groups = parameter_groups(setup, head, backbone_lr=1e-4, head_lr=1e-3)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("backbone", 1e-4, len(setup.trainable)),
        ("head", 1e-3, 2),
    ]
    set_backbone_trainable(setup, False)
    assert count_parameters(setup.module).trainable == 0
    set_backbone_trainable(setup, True)
    assert count_parameters(setup.module).trainable == sum(p.numel() for p in setup.trainable.values())
    frozen = attach(ToyBackbone(), settings(finetune="frozen"), task="t", task_index=0)
    assert [g["name"] for g in parameter_groups(frozen, head, backbone_lr=1.0, head_lr=1.0)] == ["head"]
