"""compose-adapters on tiny real models: exact sums, optimal truncation, PEFT's merge rules on true updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.lora_factories import cli_app, leftovers, make_base, make_lora, make_task_checkpoint, peft_delta
from vlacl.adapters.compose import ComposeResult, compose_adapters
from vlacl.adapters.peft_files import read_layout
from vlacl.artifacts import open_artifact
from vlacl.artifacts.names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, MANIFEST_NAME
from vlacl.config.compose_adapters import ComposeAdaptersConfig
from vlacl.errors import ConfigError, InputFormatError

Deltas = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, base: Path) -> tuple[Path, Path]:
    """Two adapters with different ranks, targets, scalings (one rsLoRA) and an embedding in both."""
    root = tmp_path_factory.mktemp("pair")
    first = make_lora(base, root / "first", seed=1, r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    second = make_lora(
        base,
        root / "second",
        seed=2,
        r=2,
        lora_alpha=3,
        target_modules=["q_proj", "o_proj", "embed_tokens"],
        use_rslora=True,
    )
    return first, second


@pytest.fixture(scope="module")
def pair_deltas(base: Path, pair: tuple[Path, Path]) -> tuple[Deltas, Deltas]:
    return peft_delta(base, pair[0]), peft_delta(base, pair[1])


def compose(adapters: list[Path], out: Path, **cfg: object) -> ComposeResult:
    return compose_adapters(adapters, ComposeAdaptersConfig(**cfg), out=out)  # type: ignore[arg-type]


def changed(deltas: Deltas) -> list[str]:
    return [k for k, d in deltas.items() if d.abs().max() > 0]


@pytest.mark.parametrize(("method", "weights"), [("cat", ()), ("linear", (0.7, -0.3))])
def test_cat_and_linear_reproduce_the_weighted_sum(
    tmp_path: Path,
    base: Path,
    pair: tuple[Path, Path],
    pair_deltas: tuple[Deltas, Deltas],
    method: str,
    weights: tuple[float, ...],
) -> None:
    out = tmp_path / "composed"
    result = compose(list(pair), out, method=method, weights=weights)
    w = weights or (1.0, 1.0)
    got = peft_delta(base, out)
    expected = {k: w[0] * pair_deltas[0][k] + w[1] * pair_deltas[1][k] for k in got}
    assert sorted(changed(got)) == sorted(changed(expected))
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)
    layout = read_layout(out)
    ranks = {m.module.split(".")[-1] if "layers" in m.module else m.module: m.rank for m in layout.modules.values()}
    assert ranks == {"q_proj": 6, "v_proj": 4, "o_proj": 2, "model.embed_tokens": 6}
    assert {m.scale for m in layout.modules.values()} == {1.0}
    assert result.exact
    assert result.error_summary() is None
    assert {p.name for p in out.iterdir()} == {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "config.yaml", MANIFEST_NAME}


def test_svd_is_exact_at_full_rank_and_optimal_below(
    tmp_path: Path, base: Path, pair: tuple[Path, Path], pair_deltas: tuple[Deltas, Deltas]
) -> None:
    exact = {k: 0.5 * pair_deltas[0][k] + 2.0 * pair_deltas[1][k] for k in pair_deltas[0]}
    full = compose(list(pair), tmp_path / "full", method="svd", weights=(0.5, 2.0), rank=6)
    summary = full.error_summary()
    assert summary is not None
    assert summary["max"] < 1e-6
    got = peft_delta(base, tmp_path / "full")
    for key in got:
        torch.testing.assert_close(got[key], exact[key], atol=1e-5, rtol=1e-5, msg=key)
    low = compose(list(pair), tmp_path / "low", method="svd", weights=(0.5, 2.0), rank=2)
    got = peft_delta(base, tmp_path / "low")
    errors = {m.module: m.rel_error for m in low.modules}
    key = "model.layers.0.self_attn.q_proj.weight"  # rank 6 in the sum: truncation loses something
    s = torch.linalg.svdvals(exact[key].double())
    optimal = float((s[2:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
    assert errors["model.layers.0.self_attn.q_proj"] == pytest.approx(optimal, rel=1e-4)
    achieved = float((got[key] - exact[key]).norm() / exact[key].norm())
    assert achieved == pytest.approx(optimal, rel=1e-3)
    assert optimal > 0.05
    assert errors["model.layers.0.self_attn.o_proj"] == pytest.approx(0.0, abs=1e-6)  # rank 2 already


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_pruning_methods_apply_peft_rules_to_the_true_updates(
    tmp_path: Path, base: Path, pair: tuple[Path, Path], pair_deltas: tuple[Deltas, Deltas], method: str
) -> None:
    weights = torch.tensor([0.6, 1.3])
    out = tmp_path / "composed"
    result = compose(list(pair), out, method=method, weights=tuple(weights.tolist()), density=0.3, rank=64)
    got = peft_delta(base, out)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        task = [pair_deltas[0][key], pair_deltas[1][key]]
        if method == "ties":
            expected = merge_utils.ties(task, weights, density=0.3, majority_sign_method="total")
        else:
            expected = merge_utils.magnitude_prune(task, weights, density=0.3)
        torch.testing.assert_close(got[key], expected, atol=1e-5, rtol=1e-4, msg=key)
    # the factors of A and B merged separately (PEFT issue 3004) would give something else entirely
    assert result.error_summary() is not None


def test_dare_drops_at_random_with_a_seed_and_rescales(tmp_path: Path, base: Path, pair: tuple[Path, Path]) -> None:
    first = pair[0]
    dense = peft_delta(base, first)
    key = "model.layers.0.self_attn.q_proj.weight"
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        compose([first], tmp_path / name, method="dare_linear", density=0.5, rank=64, seed=seed)
    got = peft_delta(base, tmp_path / "a")[key]
    kept = got.abs() > 1e-6
    assert 0.35 < kept.float().mean() < 0.65
    torch.testing.assert_close(got[kept], dense[key][kept] / 0.5, atol=1e-5, rtol=1e-4)
    tensors = {n: load_file(str(tmp_path / n / ADAPTER_WEIGHTS_NAME)) for n in "abc"}
    assert all(torch.equal(tensors["a"][k], tensors["b"][k]) for k in tensors["a"])
    assert not all(torch.equal(tensors["a"][k], tensors["c"][k]) for k in tensors["a"])


def test_manifest_records_the_method(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    out = tmp_path / "composed"
    result = compose(list(pair), out, method="dare_ties", weights=(1.0, 0.5), density=0.4, seed=3, rank=3)
    details = open_artifact(out, "composed_adapter", verify=True).manifest.details
    assert details["method"] == "dare_ties"
    assert details["weights"] == [1.0, 0.5]
    assert details["density"] == 0.4
    assert details["seed"] == 3
    assert details["target_rank"] == 3
    assert details["exact"] is False
    assert set(details["per_module_error"]) == {m.module for m in result.modules}
    assert 0.0 < details["reconstruction_error"]["mean"] <= details["reconstruction_error"]["max"] < 1.0
    assert [s["label"] for s in details["sources"]] == ["first", "second"]


def test_task_checkpoint_counts_as_its_stack(tmp_path: Path, base: Path, pair: tuple[Path, Path]) -> None:
    third = make_lora(base, tmp_path / "third", seed=9, target_modules=["q_proj"])
    ckpt = make_task_checkpoint(tmp_path / "ckpt", {"t1": pair[0], "t2": pair[1]})
    out = tmp_path / "composed"
    compose([ckpt, third], out, method="linear", weights=(0.5, 2.0))
    d1, d2, d3 = peft_delta(base, pair[0]), peft_delta(base, pair[1]), peft_delta(base, third)
    got = peft_delta(base, out)
    for key in got:
        torch.testing.assert_close(got[key], 0.5 * (d1[key] + d2[key]) + 2.0 * d3[key], atol=1e-5, rtol=1e-5, msg=key)
    assert [i.kind for i in open_artifact(out).manifest.inputs] == ["task_checkpoint", "file", "file"]


def test_weights_must_match_the_adapters(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    out = tmp_path / "composed"
    with pytest.raises(ConfigError, match=r"`weights` \(--weights\): 3 weights given for 2 adapters"):
        compose(list(pair), out, weights=(1.0, 2.0, 3.0))
    with pytest.raises(ConfigError, match="cat sums the updates unweighted"):
        ComposeAdaptersConfig(method="cat", weights=(0.5, 0.5))
    assert leftovers(out) == []


def test_adapters_of_different_bases_and_trained_copies_are_refused(
    tmp_path: Path, base: Path, pair: tuple[Path, Path]
) -> None:
    wide = make_lora(make_base(tmp_path / "wide", hidden=48), tmp_path / "w")
    out = tmp_path / "composed"
    with pytest.raises(InputFormatError, match="made for different base models"):
        compose([pair[0], wide], out)
    with_copy = make_lora(base, tmp_path / "copy", modules_to_save=["lm_head"])
    with pytest.raises(InputFormatError, match=r"saves trained full tensors \(lm_head.weight"):
        compose([pair[0], with_copy], out)
    assert leftovers(out) == []


def test_cli_reports_errors_per_module(tmp_path: Path, pair: tuple[Path, Path], runner: CliRunner) -> None:
    out = tmp_path / "composed"
    args = ["compose-adapters", *map(str, pair), "--out", str(out), "--method", "ties", "--weights", "0.6,0.4"]
    result = runner.invoke(cli_app(), [*args, "--density", "0.5", "--rank", "2"])
    assert result.exit_code == 0, result.stderr
    assert "relative reconstruction error: mean" in result.stdout
    assert "Largest errors" in result.stdout
    assert f"wrote composed_adapter artifact {out}" in result.stderr
    again = runner.invoke(cli_app(), [*args, "--json", "--overwrite", "--set", "density=0.9"])
    assert again.exit_code == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["density"] == 0.9
    assert report["weights"] == [0.6, 0.4]
    bad = runner.invoke(cli_app(), [*args, "--method", "mean", "--overwrite"])
    assert bad.exit_code == 2
    assert "expected one of 'cat', 'linear', 'svd'" in bad.stderr
