"""merge-lora on tiny real models: equality with PEFT's merge, variants, task checkpoints, clean failures."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from tests.lora_factories import (
    cli_app,
    edit_adapter_config,
    leftovers,
    load_base,
    make_base,
    make_lora,
    make_task_checkpoint,
    peft_merged,
    peft_model,
)
from vlacl.adapters.merge import KeyResolver, MergeResult, merge_lora
from vlacl.artifacts import open_artifact, verify_outputs
from vlacl.artifacts.names import (
    ACTION_HEAD_NAME,
    KEYMAP_NAME,
    MANIFEST_NAME,
    SAFETENSORS_INDEX_NAME,
    STATS_NAME,
)
from vlacl.config.merge_lora import MergeLoraConfig
from vlacl.errors import ArtifactError, ConfigError, InputFormatError, OutputExistsError

TOKENS = torch.tensor([[1, 5, 9, 3, 60, 2, 7], [4, 4, 0, 11, 31, 8, 2]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("llama") / "base", "llama")


@pytest.fixture(scope="module")
def rich_adapter(tmp_path_factory: pytest.TempPathFactory, llama: Path) -> Path:
    """rsLoRA, a rank and an alpha pattern, an embedding, and a trained lm_head copy."""
    return make_lora(
        llama,
        tmp_path_factory.mktemp("rich") / "rich",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
        modules_to_save=["lm_head"],
    )


def merge(adapters: list[Path], out: Path, base: Path | None, **cfg: object) -> MergeResult:
    return merge_lora(adapters, MergeLoraConfig(**cfg), out=out, base=base)  # type: ignore[arg-type]


def assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module, atol: float = 1e-6) -> None:
    got, want = actual.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=key)


def test_merge_equals_peft_merge_and_unload(tmp_path: Path, llama: Path, rich_adapter: Path) -> None:
    out = tmp_path / "merged"
    result = merge([rich_adapter], out, llama)
    merged = load_base(out)
    reference = peft_merged(llama, [rich_adapter])
    assert_same_weights(merged, reference)
    with torch.no_grad():  # the merged model computes what the PeftModel computes with the adapter applied
        logits = merged(TOKENS).logits
        torch.testing.assert_close(logits, peft_model(llama, [rich_adapter])(TOKENS).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(logits, load_base(llama)(TOKENS).logits, atol=1e-3)
    shards = sorted(p.name for p in llama.glob("*.safetensors"))
    assert len(shards) > 2
    expected = {*shards, SAFETENSORS_INDEX_NAME, "config.json", "generation_config.json", "config.yaml", MANIFEST_NAME}
    assert {p.name for p in out.iterdir()} == expected
    index = json.loads((out / SAFETENSORS_INDEX_NAME).read_text())
    base_index = json.loads((llama / SAFETENSORS_INDEX_NAME).read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    for shard in shards:
        with safe_open(str(out / shard), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    artifact = open_artifact(out, "merged_model", verify=True)
    details = artifact.manifest.details
    assert details["updated_tensors"] == 2 * 3 + 1  # q, v, down per layer + the embedding
    assert details["replaced_tensors"] == 2  # the lm_head copy and the embedding's saved base layer
    assert details["adapters"][0]["adapters"][0]["ranks"] == [2, 4]
    assert sorted(i.role for i in artifact.manifest.inputs) == sorted(
        ["adapter:rich"] * 2 + ["base"] * (1 + len(shards))
    )
    assert result.updated_tensors == 7


def test_stacked_adapters_are_summed_like_peft(tmp_path: Path, llama: Path) -> None:
    first = make_lora(llama, tmp_path / "first", seed=3, target_modules=["q_proj", "o_proj"])
    second = make_lora(llama, tmp_path / "second", seed=4, r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"])
    merge([first, second], tmp_path / "merged", llama)
    assert_same_weights(load_base(tmp_path / "merged"), peft_merged(llama, [first, second]))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_biases_and_fan_in_fan_out_match_peft(tmp_path: Path, arch: str) -> None:
    base = make_base(tmp_path / "base", arch)  # type: ignore[arg-type]
    if arch == "qwen2":  # q/k/v have biases: train LoRA biases and the base biases (bias="lora_only")
        adapter = make_lora(base, tmp_path / "a", target_modules=["q_proj", "k_proj"], lora_bias=True, bias="lora_only")
    else:  # GPT-2's Conv1D stores (in, out)
        adapter = make_lora(base, tmp_path / "a", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    merge([adapter], tmp_path / "merged", base)
    assert_same_weights(load_base(tmp_path / "merged"), peft_merged(base, [adapter]))


def test_bf16_base_keeps_its_dtype_and_float32_is_asked_for(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_lora(base, tmp_path / "a")
    merge([adapter], tmp_path / "bf16", base)
    kept = load_base(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in kept.state_dict().values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    reference = peft_merged(base, [adapter], dtype=torch.float32)  # the update added in float32, rounded once
    for key, value in kept.state_dict().items():
        torch.testing.assert_close(value.float(), reference.state_dict()[key], atol=0, rtol=2**-7, msg=key)
    merge([adapter], tmp_path / "fp32", base, dtype="float32")
    with safe_open(str(next((tmp_path / "fp32").glob("model-*.safetensors"))), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}  # noqa: SIM118
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert open_artifact(tmp_path / "fp32").manifest.details["dtypes"] == ["float32"]


def test_adapter_of_the_bare_model_merges_into_the_causal_lm_checkpoint(tmp_path: Path, llama: Path) -> None:
    original = make_lora(llama, tmp_path / "original")
    adapter = Path(shutil.copytree(original, tmp_path / "bare"))
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as fh:  # as saved from LlamaModel: no `model.` level
        tensors = {k.replace("base_model.model.model.", "base_model.model."): fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    assert all(k.startswith("base_model.model.layers.") for k in tensors)
    from safetensors.torch import save_file

    save_file(tensors, str(weights))
    merge([adapter], tmp_path / "merged", llama)
    assert_same_weights(load_base(tmp_path / "merged"), peft_merged(llama, [original]))


def test_key_resolver_maps_prefixes_and_refuses_ambiguity() -> None:
    resolver = KeyResolver(
        ["model.layers.0.q.weight", "lm_head.weight", "vision.layers.0.k.weight", "text.layers.0.k.weight"]
    )
    assert resolver.resolve("layers.0.q.weight") == "model.layers.0.q.weight"
    assert resolver.resolve("model.lm_head.weight") == "lm_head.weight"
    assert resolver.resolve("model.layers.0.missing.weight") is None
    with pytest.raises(InputFormatError, match="matches several base tensors"):
        resolver.resolve("layers.0.k.weight")


def test_task_checkpoint_merges_its_stack_and_carries_the_policy(tmp_path: Path, llama: Path) -> None:
    first = make_lora(llama, tmp_path / "p1", seed=5, target_modules=["q_proj", "gate_proj"])
    second = make_lora(llama, tmp_path / "p2", seed=6, r=2, target_modules=["q_proj", "v_proj"], use_rslora=True)
    ckpt = make_task_checkpoint(tmp_path / "task2", {"task1": first, "task2": second}, base=llama)
    out = tmp_path / "policy"
    result = merge([ckpt], out, None)  # the base comes from the checkpoint's manifest
    assert_same_weights(load_base(out), peft_merged(llama, [first, second]))
    assert result.policy_files == (ACTION_HEAD_NAME, KEYMAP_NAME, STATS_NAME)
    for name in result.policy_files:
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()
    artifact = open_artifact(out, "merged_model", verify=True)
    assert artifact.manifest.details["stats_fingerprint"] == "f" * 64
    assert artifact.manifest.details["policy_files"] == [ACTION_HEAD_NAME, KEYMAP_NAME, STATS_NAME]
    stack = artifact.manifest.details["adapters"][0]["adapters"]
    assert [a["name"] for a in stack] == ["task1", "task2"]
    checkpoint_inputs = [i for i in artifact.manifest.inputs if i.kind == "task_checkpoint"]
    assert [i.role for i in checkpoint_inputs] == ["adapter:task2"]
    with pytest.raises(InputFormatError, match="pass only the last one"):
        merge([ckpt, ckpt], tmp_path / "two", llama)


def test_per_task_checkpoint_merges_only_its_own_adapter(tmp_path: Path, llama: Path) -> None:
    first = make_lora(llama, tmp_path / "p1", seed=5, target_modules=["q_proj"])
    second = make_lora(llama, tmp_path / "p2", seed=6, target_modules=["v_proj"])
    adapters = {"task1": first, "task2": second}
    last = make_task_checkpoint(tmp_path / "last", adapters, base=llama, details={"adapter_mode": "per-task"})
    merge([last], tmp_path / "m-last", None)
    assert_same_weights(load_base(tmp_path / "m-last"), peft_merged(llama, [second]))
    chosen = make_task_checkpoint(
        tmp_path / "chosen", adapters, base=llama, details={"adapter_mode": "per-task", "active_adapter": "task1"}
    )
    merge([chosen], tmp_path / "m-chosen", None)
    assert_same_weights(load_base(tmp_path / "m-chosen"), peft_merged(llama, [first]))
    damaged = make_task_checkpoint(
        tmp_path / "damaged", adapters, base=llama, details={"adapter_mode": "per-task", "active_adapter": "task9"}
    )
    with pytest.raises(ArtifactError, match="active_adapter 'task9' is not in the adapter stack"):
        merge([damaged], tmp_path / "m-damaged", None)


def test_a_finished_merge_is_recognized_and_left_alone(tmp_path: Path, llama: Path, rich_adapter: Path) -> None:
    out = tmp_path / "merged"
    merge([rich_adapter], out, llama)
    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    again = merge([rich_adapter], out, llama)
    assert again.already_merged
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError, match="--overwrite"):  # other settings: not the same merge
        merge([rich_adapter], out, llama, dtype="bfloat16")
    redone = merge_lora([rich_adapter], MergeLoraConfig(dtype="bfloat16"), out=out, base=llama, overwrite=True)
    assert not redone.already_merged
    assert open_artifact(out).manifest.details["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "LOHA"}, "LOHA adapter"),
        ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
        ({"r": 8}, "rank 4, but adapter_config.json gives it r=8"),
    ],
)
def test_adapters_that_cannot_be_merged_are_refused(
    tmp_path: Path, llama: Path, changes: dict[str, object], message: str
) -> None:
    adapter = make_lora(llama, tmp_path / "a")
    edit_adapter_config(adapter, **changes)
    out = tmp_path / "merged"
    with pytest.raises(InputFormatError, match=message):
        merge([adapter], out, llama)
    assert leftovers(out) == []


def test_corrupted_shard_fails_before_anything_is_written(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    adapter = make_lora(base, tmp_path / "a")
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated: the header promises more bytes
    out = tmp_path / "merged"
    with pytest.raises(InputFormatError, match=rf"base model shard {re.escape(str(shard))}.*fetch the model again"):
        merge([adapter], out, base)
    assert leftovers(out) == []


def test_adapter_for_another_base_is_refused(tmp_path: Path, llama: Path) -> None:
    other = make_base(tmp_path / "wide", hidden=48)
    adapter = make_lora(other, tmp_path / "a")
    out = tmp_path / "merged"
    with pytest.raises(InputFormatError, match=r"made for another base model: its update of .* has shape \(48, 48\)"):
        merge([adapter], out, llama)
    assert leftovers(out) == []


def test_non_empty_out_is_never_replaced(tmp_path: Path, llama: Path, rich_adapter: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a vlacl artifact"):
        merge_lora([rich_adapter], MergeLoraConfig(), out=out, base=llama, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert leftovers(out) == ["merged"]


def test_non_finite_result_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", dtype=torch.float16)
    adapter = make_lora(base, tmp_path / "a", scale_b=1e4, lora_alpha=4096)  # overflows float16
    out = tmp_path / "merged"
    with pytest.raises(InputFormatError, match=r"NaN or Inf in float16.*--dtype float32"):
        merge([adapter], out, base)
    assert leftovers(out) == []
    merge([adapter], out, base, dtype="float32")  # what the message advises works
    assert verify_outputs(open_artifact(out)) == []


def test_tied_output_layer_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", tie=True)
    adapter = make_lora(base, tmp_path / "a", modules_to_save=["lm_head"])
    with pytest.raises(InputFormatError, match="tie_word_embeddings"):
        merge([adapter], tmp_path / "merged", base)


def test_single_file_base_with_tokenizer_and_processor_files(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", shard_size=None)
    assert (base / "model.safetensors").is_file()
    adapter = make_lora(base, tmp_path / "a")
    extra = ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"]
    for name in extra:
        (base / name).write_text(f"{name}\n")
    (base / "original").mkdir()  # e.g. consolidated.pth of Llama repos: weights in another format
    (base / "original" / "consolidated.pth").write_bytes(b"\0" * 8)
    (base / "training_args.bin").write_bytes(b"\0" * 8)
    out = tmp_path / "merged"
    merge([adapter], out, base)
    expected = {"model.safetensors", SAFETENSORS_INDEX_NAME, "config.json", "generation_config.json", *extra}
    assert {p.name for p in out.iterdir()} == expected | {"config.yaml", MANIFEST_NAME}
    for name in extra:
        assert (out / name).read_text() == f"{name}\n"
    assert_same_weights(load_base(out), peft_merged(base, [adapter]))


def test_cli_merges_and_reports(tmp_path: Path, llama: Path, rich_adapter: Path, runner: CliRunner) -> None:
    app = cli_app()
    out = tmp_path / "merged"
    args = ["merge-lora", str(rich_adapter), "--base", str(llama), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "rich" in result.stdout
    assert "7 updated, 2 replaced" in result.stdout
    assert f"wrote merged_model artifact {out}" in result.stderr
    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["already_merged"] is True
    failed = runner.invoke(
        app, ["merge-lora", str(rich_adapter), "--base", str(tmp_path), "--out", str(tmp_path / "x")]
    )
    assert failed.exit_code == 1
    assert failed.stderr.startswith("error: base model ")
    assert failed.stderr.count("\n") == 1
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "y"), "--dtype", "fp8"])
    assert bad.exit_code == ConfigError.exit_code
    assert "expected one of 'auto', 'bfloat16', 'float16', 'float32'" in bad.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    "tensors",
    [
        {
            "b.weight": torch.randn(3, 5).to(torch.bfloat16),
            "a.weight": torch.randn(4, 2, dtype=torch.float16),
            "z.bias": torch.randn(7),
            "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
            "mask": torch.tensor([True, False, True]),
            "bytes": torch.arange(9, dtype=torch.uint8),
            "small": torch.tensor([1, -2], dtype=torch.int8),
            "wide": torch.randn(2, dtype=torch.float64),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
            'naïve "quoted" name': torch.ones(2, 2),
        },
        {"only.weight": torch.randn(1)},
    ],
)
def test_written_shards_are_the_bytes_safetensors_writes(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    from vlacl.adapters.merge import write_shard

    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    with ThreadPoolExecutor(max_workers=2) as pool:
        result = write_shard(tensors, tmp_path / "ours.safetensors", pool)
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == reference
    assert result == (hashlib.sha256(reference).hexdigest(), len(reference))


def test_a_base_merged_onto_before_is_not_hashed_again_unless_a_shard_changed(
    tmp_path: Path, llama: Path, rich_adapter: Path, hashed_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlacl.artifacts import hashing
    from vlacl.artifacts.hashing import sha256_file as real

    monkeypatch.setattr(hashing, "RACY_NS", 0)  # the copied shards changed just now
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    shards = sorted(base.glob("*.safetensors"))
    merge([rich_adapter], tmp_path / "first", base)  # hashes the shards, keeps their hashes
    hashed = hashed_files
    hashed.clear()
    merge([rich_adapter], tmp_path / "second", base)
    assert not set(hashed) & set(shards)
    recorded = {
        Path(i.path).name: i.sha256 for i in open_artifact(tmp_path / "second").manifest.inputs if i.role == "base"
    }
    assert all(recorded[s.name] == real(s) for s in shards)
    assert merge([rich_adapter], tmp_path / "second", base).already_merged
    with safe_open(str(shards[0]), framework="pt") as fh:  # the same tensors, one of them changed
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(shards[0]), metadata={"format": "pt"})
    hashed.clear()
    with pytest.raises(OutputExistsError, match="--overwrite"):  # not the merge it holds any more
        merge([rich_adapter], tmp_path / "second", base)
    assert shards[0] in hashed


def test_shards_written_directly_equal_save_files_bytes(
    tmp_path: Path, llama: Path, rich_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards streamed out with O_DIRECT are the files save_file writes, replaced tensors (lm_head) included."""
    import os

    from safetensors.torch import load_file, save_file

    from vlacl.adapters.merge import StreamedShard

    streamed: list[bool] = []
    finish = StreamedShard.finish

    def recording(self: StreamedShard) -> tuple[str, int] | None:
        result = finish(self)
        streamed.append(result is not None)
        return result

    monkeypatch.setattr(StreamedShard, "finish", recording)
    direct = merge([rich_adapter], tmp_path / "direct", llama)
    if not streamed or not all(streamed):
        pytest.skip("this filesystem takes no O_DIRECT writes")
    assert len(streamed) == len(direct.shards)
    monkeypatch.delattr(os, "O_DIRECT")  # the buffered way: no direct writes on this platform
    buffered = merge([rich_adapter], tmp_path / "buffered", llama)
    assert len(streamed) == len(buffered.shards)  # none streamed
    for shard in direct.shards:
        written = (tmp_path / "direct" / shard).read_bytes()
        assert written == (tmp_path / "buffered" / shard).read_bytes()
        save_file(load_file(str(tmp_path / "direct" / shard)), str(tmp_path / "ref"), metadata={"format": "pt"})
        assert written == (tmp_path / "ref").read_bytes()
    manifests = [open_artifact(tmp_path / name).manifest.outputs for name in ("direct", "buffered")]
    assert {k: v.sha256 for k, v in manifests[0].items() if k.endswith(".safetensors")} == {
        k: v.sha256 for k, v in manifests[1].items() if k.endswith(".safetensors")
    }
    assert verify_outputs(open_artifact(tmp_path / "direct")) == []  # the hashes taken beside the write


def test_a_failed_update_stops_the_stream_and_leaves_nothing(
    tmp_path: Path, llama: Path, rich_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlacl.adapters import merge as merge_module

    real = merge_module._apply
    calls = []

    def failing(key: str, *args: object) -> torch.Tensor:
        calls.append(key)
        if len(calls) == 3:
            raise InputFormatError(f"merging into {key} gives NaN or Inf")
        return real(key, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_module, "_apply", failing)
    with pytest.raises(InputFormatError, match="gives NaN or Inf"):
        merge([rich_adapter], tmp_path / "out", llama)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("vlacl-direct")]


def test_a_base_shard_in_another_layout_is_merged_through_save_files_layout(
    tmp_path: Path, llama: Path, rich_adapter: Path
) -> None:
    """Tensors stored in an order save_file would not choose: the shard cannot be written back as read."""
    import struct

    from safetensors.torch import load_file

    base = tmp_path / "base"
    shutil.copytree(llama, base)
    shard = sorted(base.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    order = sorted(tensors, reverse=True)  # names descending: not safetensors' own order
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        nbytes = tensors[key].numel() * tensors[key].element_size()
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[tensors[key].dtype]
        header[key] = {"dtype": dtype, "shape": list(tensors[key].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = b"".join(tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k in order)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data)
    merge([rich_adapter], tmp_path / "merged", base)
    assert_same_weights(load_base(tmp_path / "merged"), peft_merged(llama, [rich_adapter]))
    assert verify_outputs(open_artifact(tmp_path / "merged")) == []


@pytest.mark.parametrize("fail_at", [None, 2])
def test_streaming_in_small_pieces_writes_save_files_bytes(
    tmp_path: Path, llama: Path, rich_adapter: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int | None
) -> None:
    """Writes and hashes follow the reading and the updates piece by piece; EINVAL on the way falls back."""
    import errno
    import os
    import random

    from vlacl.adapters import hf_model
    from vlacl.adapters import merge as merge_module

    reference = merge([rich_adapter], tmp_path / "buffered", llama)  # O_DIRECT or not, the expected bytes
    monkeypatch.setattr(merge_module.StreamedShard, "CHUNK", 4096)
    monkeypatch.setattr(hf_model, "_READ_CHUNK", 1000)
    apply, write = merge_module._apply, os.write
    delays = random.Random(0)
    writes: list[int] = []

    def slow_apply(*args: object) -> torch.Tensor:
        time.sleep(delays.random() * 0.01)  # updates finish out of order
        return apply(*args)  # type: ignore[arg-type]

    def counting_write(fd: int, data: object) -> int:
        if threading.current_thread().name == "vlacl-direct-write":
            writes.append(fd)
            if fail_at is not None and len(writes) == fail_at:
                raise OSError(errno.EINVAL, "Invalid argument")
        return write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_module, "_apply", slow_apply)
    monkeypatch.setattr(os, "write", counting_write)
    streamed = merge([rich_adapter], tmp_path / "streamed", llama)
    if not writes:
        pytest.skip("this filesystem takes no O_DIRECT writes")
    assert len(writes) > len(streamed.shards)  # several pieces per shard
    for shard in reference.shards:
        assert (tmp_path / "streamed" / shard).read_bytes() == (tmp_path / "buffered" / shard).read_bytes()
    assert verify_outputs(open_artifact(tmp_path / "streamed")) == []
