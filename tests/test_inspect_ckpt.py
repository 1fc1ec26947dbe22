"""inspect-ckpt: task checkpoints, merged models with their lineage, PEFT directories, verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.lora_factories import cli_app, make_base, make_lora, make_task_checkpoint
from vlacl.adapters.inspect import inspect_artifact
from vlacl.adapters.merge import merge_lora
from vlacl.artifacts.names import ACTION_HEAD_NAME, MANIFEST_NAME, STATS_NAME
from vlacl.config.merge_lora import MergeLoraConfig
from vlacl.errors import ArtifactError


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A base model, a two-adapter task checkpoint on it, and their merge."""
    root = tmp_path_factory.mktemp("chain")
    base = make_base(root / "base")
    first = make_lora(base, root / "p1", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = make_lora(base, root / "p2", r=2, lora_alpha=4, target_modules=["o_proj"], use_rslora=True)
    ckpt = make_task_checkpoint(root / "task2", {"task1": first, "task2": second}, base=base)
    merged = root / "merged"
    merge_lora([ckpt], MergeLoraConfig(), out=merged)
    return base, ckpt, merged


def test_task_checkpoint_report(chain: tuple[Path, Path, Path]) -> None:
    report = inspect_artifact(chain[1])
    assert report.kind == "task_checkpoint"
    assert report.manifest["producer"] == "vlacl train-task"
    assert [a["name"] for a in report.adapters] == ["task1", "task2"]
    first, second = report.adapters
    assert (first["r"], first["lora_alpha"], first["use_rslora"], first["num_modules"]) == (4, 8.0, False, 4)
    assert sorted(first["target_modules"]) == ["q_proj", "v_proj"]
    assert first["num_parameters"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # q: 32x32, v: 16x32, two layers
    assert (second["ranks"], second["scales"]) == ([2], [pytest.approx(4 / 2**0.5)])
    assert report.stats_fingerprint == "f" * 64
    assert report.training == {"steps": 1200, "final_loss": 0.0423, "val_loss": 0.0511}
    assert report.files[ACTION_HEAD_NAME] == (chain[1] / ACTION_HEAD_NAME).stat().st_size
    assert "adapters/task2/adapter_model.safetensors" in report.files
    assert report.lineage == []
    assert report.problems is None


def test_merged_model_lineage_walks_to_the_checkpoint_and_base(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    report = inspect_artifact(chain[2])
    assert report.kind == "merged_model"
    assert [(n["role"], n["kind"], n["status"]) for n in report.lineage if n["kind"] != "file"] == [
        ("adapter:task2", "task_checkpoint", "ok")
    ]
    files = [n for n in report.lineage if n["kind"] == "file"]
    shards = {p.name for p in chain[0].glob("model-*.safetensors")}
    assert {Path(n["path"]).name for n in files} == {"config.json", *shards}
    assert all(n["status"] == "ok" for n in files)
    assert [a["name"] for a in report.adapters] == ["task1", "task2"]
    assert report.stats_fingerprint == "f" * 64
    assert {ACTION_HEAD_NAME, STATS_NAME} <= set(report.files)
    config = chain[0] / "config.json"
    original = config.read_text()
    try:
        config.write_text(original.replace("}", ', "note": 1}', 1))
        changed = inspect_artifact(chain[2])
        assert [n["status"] for n in changed.lineage if Path(n["path"]) == config.resolve()] == ["changed"]
    finally:
        config.write_text(original)


def test_plain_peft_directory(chain: tuple[Path, Path, Path]) -> None:
    report = inspect_artifact(chain[1] / "adapters" / "task1")
    assert report.kind == "peft_adapter"
    assert report.adapters[0]["ranks"] == [4]
    assert set(report.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def test_missing_path_and_non_artifacts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        inspect_artifact(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match=f"{MANIFEST_NAME} is missing"):
        inspect_artifact(tmp_path / "plain")


def test_cli_table_json_and_verify(chain: tuple[Path, Path, Path], tmp_path: Path, runner: CliRunner) -> None:
    app = cli_app()
    result = runner.invoke(app, ["inspect-ckpt", str(chain[2]), "--verify"])
    assert result.exit_code == 0, result.stderr
    for text in ("merged_model", "vlacl merge-lora", "Lineage", "adapter:task2", "task2/task1", "verified: every file"):
        assert text in result.stdout, text
    shown = runner.invoke(app, ["inspect-ckpt", str(chain[1]), "--json", "--no-lineage"])
    assert shown.exit_code == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["training"]["steps"] == 1200
    assert data["verified"] is None
    damaged = tmp_path / "ckpt"
    make_task_checkpoint(damaged, {"only": chain[1] / "adapters" / "task1"})
    (damaged / STATS_NAME).write_text("{}")
    failed = runner.invoke(app, ["inspect-ckpt", str(damaged), "--verify"])
    assert failed.exit_code == 1
    assert f"problem: {STATS_NAME}: " in failed.stdout
    missing = runner.invoke(app, ["inspect-ckpt", str(tmp_path / "nope")])
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: ")
