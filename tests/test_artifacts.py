from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

import vlacl
from vlacl.artifacts import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ArtifactWriter,
    LineageNode,
    check_output_dir,
    lineage,
    open_artifact,
    producer_of,
    verify_outputs,
)
from vlacl.artifacts.names import CONFIG_NAME, PRODUCERS
from vlacl.artifacts.reader import Artifact
from vlacl.errors import ArtifactError, OutputExistsError, Terminated

SHM = Path("/dev/shm")

HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "unknown"
"""This machine's name as the writer puts it into the names of hidden siblings."""

CONFIG_TEXT = "n_bootstrap: 1000\nconfidence: 0.95\nseed: 0\nplot: true\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_artifact(
    out: Path,
    kind: str = "eval_results",
    files: Mapping[str, bytes] | None = None,
    *,
    inputs: Sequence[tuple[str, Artifact]] = (),
    file_inputs: Sequence[tuple[str, Path]] = (),
    overwrite: bool = False,
    config_yaml: str | None = CONFIG_TEXT,
    seed: int | None = 0,
    body: Callable[[ArtifactWriter], None] | None = None,
) -> Path:
    command = ["vlacl", PRODUCERS[kind], "--out", str(out)]
    with ArtifactWriter(out, kind, command=command, config_yaml=config_yaml, seed=seed, overwrite=overwrite) as w:
        for name, data in (files if files is not None else {"data.bin": b"payload"}).items():
            target = w.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for role, artifact in inputs:
            w.add_input(role, artifact)
        for role, path in file_inputs:
            w.add_file_input(role, path)
        if body is not None:
            body(w)
    return out


def file_set(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_manifest(directory: Path, data: Mapping[str, Any]) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")


def enter(out: Path, kind: str = "eval_results", *, overwrite: bool = False) -> None:
    """Enter a writer for ``out``, where :func:`check_output_dir` runs, writing nothing of its own."""
    with ArtifactWriter(out, kind, command=[], config_yaml=None, seed=0, overwrite=overwrite):
        pass


def test_constructing_a_writer_checks_nothing(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out")
    ArtifactWriter(out, "ds_stats", command=[], config_yaml=None, seed=0)
    with pytest.raises(OutputExistsError, match="holds an eval_results artifact"):
        enter(out, "ds_stats", overwrite=True)


def test_commit_writes_the_file_set_and_manifest(tmp_path: Path) -> None:
    stats = open_artifact(make_artifact(tmp_path / "stats", "ds_stats"), "ds_stats")
    out = tmp_path / "out"
    files = {"results.parquet": b"rows", "sub/extra.bin": bytes(range(10))}
    with ArtifactWriter(
        out, "eval_results", command=["vlacl", "eval-suite", "--out", "out"], config_yaml=CONFIG_TEXT, seed=7
    ) as w:
        for name, data in files.items():
            (w.path / name).parent.mkdir(parents=True, exist_ok=True)
            (w.path / name).write_bytes(data)
        w.add_input("ckpt", stats)
        w.details["suite"] = "tiny"
    assert entries(tmp_path) == {"stats", "out"}
    assert file_set(out) == {"results.parquet", "sub/extra.bin", CONFIG_NAME, MANIFEST_NAME}
    assert (out / CONFIG_NAME).read_text(encoding="utf-8") == CONFIG_TEXT

    text = (out / MANIFEST_NAME).read_text(encoding="utf-8")
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert set(manifest) == {
        "schema_version",
        "kind",
        "vlacl_version",
        "created_utc",
        "command",
        "config_sha256",
        "seed",
        "inputs",
        "outputs",
        "libraries",
        "details",
    }
    assert manifest["schema_version"] == SCHEMA_VERSION == 1
    assert manifest["kind"] == "eval_results"
    assert manifest["vlacl_version"] == vlacl.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created_utc"])
    assert manifest["command"] == ["vlacl", "eval-suite", "--out", "out"]
    assert manifest["config_sha256"] == sha256((out / CONFIG_NAME).read_bytes()) == sha256(CONFIG_TEXT.encode())
    assert manifest["seed"] == 7
    assert manifest["outputs"] == {
        "results.parquet": {"sha256": sha256(b"rows"), "bytes": 4},
        "sub/extra.bin": {"sha256": sha256(bytes(range(10))), "bytes": 10},
        CONFIG_NAME: {"sha256": sha256(CONFIG_TEXT.encode()), "bytes": len(CONFIG_TEXT)},
    }
    assert manifest["libraries"]["torch"] == version("torch")
    assert manifest["inputs"] == [
        {
            "role": "ckpt",
            "kind": "ds_stats",
            "path": "../stats",
            "sha256": sha256((tmp_path / "stats" / MANIFEST_NAME).read_bytes()),
        }
    ]
    assert manifest["details"] == {"suite": "tiny"}

    opened = open_artifact(out, "eval_results", verify=True)
    assert opened.kind == "eval_results"
    assert opened.manifest.seed == 7
    assert opened.manifest.command == ("vlacl", "eval-suite", "--out", "out")
    assert opened.manifest_sha256 == sha256(text.encode())
    assert verify_outputs(opened) == []


def test_commit_without_config_records_no_config(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out", config_yaml=None, seed=None)
    assert file_set(out) == {"data.bin", MANIFEST_NAME}
    manifest = read_json(out / MANIFEST_NAME)
    assert manifest["config_sha256"] is None
    assert manifest["seed"] is None
    assert manifest["inputs"] == []


def test_writer_path_only_inside_with(tmp_path: Path) -> None:
    w = ArtifactWriter(tmp_path / "out", "cl_metrics", command=[], config_yaml=None, seed=None)
    with pytest.raises(RuntimeError, match="only available inside the `with` block"):
        _ = w.path
    with w:
        inside = w.path
        assert inside.parent == tmp_path
        assert inside.name.startswith(".out.tmp-")
        assert inside.is_dir()
    with pytest.raises(RuntimeError, match="only available inside the `with` block"):
        _ = w.path


def test_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    writers: list[ArtifactWriter] = []

    def crash(writer: ArtifactWriter) -> None:
        writers.append(writer)
        (writer.path / "half.bin").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        make_artifact(out, body=crash)
    assert not out.exists()
    assert entries(tmp_path) == set()
    with pytest.raises(RuntimeError, match="only available inside the `with` block"):
        _ = writers[0].path


def test_exception_while_overwriting_keeps_the_old_artifact(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old"})
    before = (out / MANIFEST_NAME).read_bytes()

    def crash(writer: ArtifactWriter) -> None:
        raise KeyError("crash")

    with pytest.raises(KeyError, match="crash"):
        make_artifact(out, files={"new.bin": b"new"}, overwrite=True, body=crash)
    assert entries(tmp_path) == {"out"}
    assert file_set(out) == {"old.bin", CONFIG_NAME, MANIFEST_NAME}
    assert (out / MANIFEST_NAME).read_bytes() == before


def test_refuses_an_existing_artifact_without_overwrite(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out")
    before = (out / MANIFEST_NAME).read_bytes()
    expected = f"--out {out} already holds an artifact: pass --overwrite to replace it, or choose another --out"
    with pytest.raises(OutputExistsError) as info:
        check_output_dir(out, overwrite=False)
    assert str(info.value) == expected
    with pytest.raises(OutputExistsError) as info:
        enter(out)
    assert str(info.value) == expected
    assert info.value.exit_code == 2
    assert (out / MANIFEST_NAME).read_bytes() == before
    assert entries(tmp_path) == {"out"}


def test_overwrite_replaces_an_artifact(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old", "sub/old.txt": b"x"}, seed=1)
    check_output_dir(out, overwrite=True)
    make_artifact(out, files={"new.bin": b"new"}, overwrite=True, seed=2)
    assert entries(tmp_path) == {"out"}
    assert file_set(out) == {"new.bin", CONFIG_NAME, MANIFEST_NAME}
    artifact = open_artifact(out, "eval_results", verify=True)
    assert artifact.manifest.seed == 2
    assert set(artifact.manifest.outputs) == {"new.bin", CONFIG_NAME}


def test_existing_empty_directory_is_used(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    check_output_dir(out, overwrite=False)
    make_artifact(out)
    assert entries(tmp_path) == {"out"}
    assert file_set(out) == {"data.bin", CONFIG_NAME, MANIFEST_NAME}


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    make_artifact(tmp_path / "a" / "b" / "out")
    assert file_set(tmp_path) == {f"a/b/out/{name}" for name in ("data.bin", CONFIG_NAME, MANIFEST_NAME)}


@pytest.mark.parametrize("overwrite", [False, True])
def test_never_replaces_a_non_artifact_directory(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(OutputExistsError) as info:
        enter(out, overwrite=overwrite)
    message = str(info.value)
    assert f"--out {out} is a non-empty directory that is not a vlacl artifact (no {MANIFEST_NAME})" in message
    assert "vlacl never replaces it, even with --overwrite" in message
    assert file_set(out) == {"notes.txt"}
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_non_artifact_directory_appearing_during_the_run_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def occupy(writer: ArtifactWriter) -> None:
        out.mkdir()
        (out / "notes.txt").write_text("mine", encoding="utf-8")

    with pytest.raises(OutputExistsError, match="not a vlacl artifact"):
        make_artifact(out, overwrite=True, body=occupy)
    assert entries(tmp_path) == {"out"}
    assert file_set(out) == {"notes.txt"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_a_file_is_refused(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "out"
    out.write_text("keep", encoding="utf-8")
    with pytest.raises(OutputExistsError) as info:
        enter(out, overwrite=overwrite)
    assert str(info.value) == f"--out {out} is an existing file: choose a directory path that does not exist"
    assert out.read_text(encoding="utf-8") == "keep"


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_a_symlink_is_refused(tmp_path: Path, overwrite: bool) -> None:
    real = make_artifact(tmp_path / "real")
    before = (real / MANIFEST_NAME).read_bytes()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    for out, target in ((link, real), (dangling, tmp_path / "nowhere")):
        expected = (
            f"--out {out} is a symbolic link: vlacl does not write through it; "
            f"pass the real directory path instead, --out {os.path.realpath(target)}"
        )
        with pytest.raises(OutputExistsError) as info:
            check_output_dir(out, overwrite, kind="eval_results")
        assert str(info.value) == expected
        with pytest.raises(OutputExistsError) as info:
            make_artifact(out, files={"new.bin": b"new"}, overwrite=overwrite)
        assert str(info.value) == expected
        assert info.value.exit_code == 2
    assert entries(tmp_path) == {"real", "link", "dangling"}
    assert link.readlink() == real
    assert (real / MANIFEST_NAME).read_bytes() == before
    assert file_set(real) == {"data.bin", CONFIG_NAME, MANIFEST_NAME}


def test_input_equal_to_out_is_refused(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out", "ds_stats")
    before = (out / MANIFEST_NAME).read_bytes()
    artifact = open_artifact(out, "ds_stats")
    with (
        pytest.raises(OutputExistsError) as info,
        ArtifactWriter(out, "ds_stats", command=[], config_yaml=None, seed=0, overwrite=True) as w,
    ):
        w.add_input("prev", artifact)
    assert str(info.value) == (
        f"--out {out} overlaps the input {out}: writing there would change or destroy the input; "
        "choose an --out outside every input"
    )
    assert entries(tmp_path) == {"out"}
    assert (out / MANIFEST_NAME).read_bytes() == before


def test_file_input_inside_out_is_refused(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out", files={"suite.yaml": b"tasks: []\n"})
    with (
        pytest.raises(OutputExistsError, match="overlaps the input"),
        ArtifactWriter(out, "eval_results", command=[], config_yaml=None, seed=0, overwrite=True) as w,
    ):
        w.add_file_input("suite", out / "suite.yaml")
    assert entries(tmp_path) == {"out"}
    assert (out / "suite.yaml").read_bytes() == b"tasks: []\n"


def test_out_inside_an_input_is_refused(tmp_path: Path) -> None:
    source = make_artifact(tmp_path / "src", "ds_stats")
    before = entries(source)
    with pytest.raises(OutputExistsError) as info:
        enter(source / "nested" / ".." / "nested", "cl_metrics")
    assert str(info.value) == (
        f"--out {source / 'nested'} lies inside {source}, which is a ds_stats artifact (written by `vlacl ds-stats`): "
        "writing there would add files its manifest does not list; choose an --out outside every artifact directory"
    )
    assert entries(source) == before


def test_a_command_writing_config_yaml_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(ArtifactError, match=r"config\.yaml is reserved"),
        ArtifactWriter(tmp_path / "o", "cl_metrics", command=[], config_yaml="a: 1\n", seed=0) as w,
    ):
        (w.path / "config.yaml").write_text("mine")
    assert not (tmp_path / "o").exists()


def test_writing_the_manifest_name_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as info:
        make_artifact(out, files={MANIFEST_NAME: b"{}"})
    assert str(info.value) == (f"{MANIFEST_NAME} is reserved for the manifest; a command tried to write it itself")
    assert not out.exists()
    assert entries(tmp_path) == set()


def test_open_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        open_artifact(tmp_path / "nope", "eval_results")
    assert str(info.value) == (
        f"{tmp_path / 'nope'} does not exist: expected an eval_results artifact (written by `vlacl eval-suite`)"
    )


def test_open_a_file_instead_of_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    path.write_bytes(b"x")
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, "eval_results")
    assert str(info.value) == (
        f"{path} is a file, not an artifact directory: "
        "expected an eval_results artifact (written by `vlacl eval-suite`)"
    )


def test_open_a_directory_without_manifest(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "run")
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, "eval_results")
    message = str(info.value)
    assert message.startswith(f"{path} is not a complete vlacl artifact: {MANIFEST_NAME} is missing")
    assert message.endswith("; expected an eval_results artifact (written by `vlacl eval-suite`)")


def test_open_the_wrong_kind(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "metrics", "cl_metrics")
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, "eval_results")
    assert str(info.value) == (
        f"{path} is a cl_metrics artifact (written by `vlacl cl-metrics`), but this needs an eval_results "
        "artifact (written by `vlacl eval-suite`)"
    )
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, ["eval_results", "task_checkpoint"])
    assert str(info.value).endswith(
        "but this needs an eval_results artifact (written by `vlacl eval-suite`) or a task_checkpoint artifact "
        "(written by `vlacl train-task`)"
    )
    assert open_artifact(path, ["eval_results", "cl_metrics"]).kind == "cl_metrics"
    assert open_artifact(path).kind == "cl_metrics"


UNREADABLE_MANIFESTS = [
    pytest.param(b'{"kind": ', "not valid JSON (line 1)", id="truncated"),
    pytest.param(b'\xff{"kind": "eval_results"}', "not UTF-8 text (byte 0 is 0xff)", id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to read", id="deep"),
    pytest.param(b'{"seed": ' + b"7" * 5000 + b"}", "JSON holding an integer too long to read", id="long-int"),
]


@pytest.mark.parametrize(("data", "reason"), UNREADABLE_MANIFESTS)
def test_open_an_unparsable_manifest(tmp_path: Path, data: bytes, reason: str) -> None:
    path = make_artifact(tmp_path / "run")
    (path / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, "eval_results")
    assert str(info.value) == (
        f"{path / MANIFEST_NAME} is {reason}: the artifact is damaged; "
        "expected an eval_results artifact (written by `vlacl eval-suite`)"
    )


def test_open_a_newer_schema(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "run")
    manifest = read_json(path / MANIFEST_NAME)
    manifest["schema_version"] = SCHEMA_VERSION + 1
    manifest["vlacl_version"] = "9.0.0"
    write_manifest(path, manifest)
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, "eval_results")
    assert str(info.value) == (
        f"{path / MANIFEST_NAME} uses manifest schema {SCHEMA_VERSION + 1}, written by vlacl 9.0.0; "
        f"this vlacl reads schema {SCHEMA_VERSION} and older: upgrade vlacl"
    )


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"schema_version": None}, "has no valid schema_version (got None): it is not a vlacl manifest"),
        ({"schema_version": True}, "has no valid schema_version (got True)"),
        ({"kind": None}, "key `kind` should be a str, got NoneType"),
        ({"outputs": []}, "key `outputs` should be a dict, got list"),
        ({"inputs": [{"role": "x"}]}, "is malformed (KeyError('kind')): the artifact is damaged; recreate it"),
        ({"libraries": ["torch"]}, "is malformed (AttributeError("),
    ],
)
def test_open_a_malformed_manifest(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    path = make_artifact(tmp_path / "run")
    manifest = read_json(path / MANIFEST_NAME)
    manifest.update(change)
    write_manifest(path, manifest)
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, "eval_results")
    assert fragment in str(info.value)


def test_open_a_manifest_lacking_a_required_key(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "run")
    manifest = read_json(path / MANIFEST_NAME)
    del manifest["outputs"]
    write_manifest(path, manifest)
    with pytest.raises(ArtifactError) as info:
        open_artifact(path)
    assert str(info.value) == (
        f"{path / MANIFEST_NAME} lacks the required key `outputs`: the artifact is damaged; recreate it"
    )


def test_unknown_manifest_keys_warn_but_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("vlacl"), "propagate", True)
    path = make_artifact(tmp_path / "run")
    manifest = read_json(path / MANIFEST_NAME)
    manifest["zeta_future"] = 1
    manifest["alpha_future"] = {"x": 2}
    write_manifest(path, manifest)
    with caplog.at_level(logging.WARNING, logger="vlacl.artifacts.manifest"):
        artifact = open_artifact(path, "eval_results")
    assert artifact.kind == "eval_results"
    assert set(artifact.manifest.outputs) == {"data.bin", CONFIG_NAME}
    warnings = [r for r in caplog.records if r.name == "vlacl.artifacts.manifest" and r.levelno == logging.WARNING]
    # a set: after a CLI test has given the vlacl logger its handler, a record may be captured twice
    assert {r.getMessage() for r in warnings} == {
        f"{path / MANIFEST_NAME} has keys this vlacl does not know (ignored): alpha_future, zeta_future"
    }


def test_artifact_file_lookup(tmp_path: Path) -> None:
    artifact = open_artifact(make_artifact(tmp_path / "run", files={"data.bin": b"d"}))
    assert artifact.has_file("data.bin")
    assert not artifact.has_file("other.bin")
    assert artifact.file("data.bin") == tmp_path / "run" / "data.bin"
    with pytest.raises(ArtifactError, match=r"has no file other.bin: .* recreate it with `vlacl eval-suite`"):
        artifact.file("other.bin")
    (tmp_path / "run" / "data.bin").unlink()
    with pytest.raises(ArtifactError, match="is listed in the manifest but missing"):
        artifact.file("data.bin")


def test_verify_detects_modified_missing_and_extra_files(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "run", files={"a.bin": b"aaaa", "b.bin": b"bb", "c.bin": b"c", "d/e.bin": b"e"})
    artifact = open_artifact(path, "eval_results", verify=True)
    assert verify_outputs(artifact) == []
    (path / "a.bin").write_bytes(b"aaab")
    (path / "b.bin").write_bytes(b"bbb")
    (path / "c.bin").unlink()
    (path / "d" / "extra.txt").write_bytes(b"new")
    assert verify_outputs(artifact) == [
        "a.bin: sha256 differs from the manifest",
        "b.bin: 3 bytes, manifest says 2",
        "c.bin: missing",
        "d/extra.txt: not listed in the manifest",
    ]
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, "eval_results", verify=True)
    assert str(info.value) == (
        f"{path} failed verification (4 problem(s), first: a.bin: sha256 differs from the manifest): "
        "the artifact changed after it was written; recreate it with `vlacl eval-suite`"
    )
    assert open_artifact(path, "eval_results").kind == "eval_results"


def test_verify_detects_an_edited_config(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "run")
    (path / CONFIG_NAME).write_text(CONFIG_TEXT.replace("seed: 0", "seed: 1"), encoding="utf-8")
    assert verify_outputs(open_artifact(path)) == [f"{CONFIG_NAME}: sha256 differs from the manifest"]


def build_chain(root: Path) -> tuple[Path, Path, Path, Path]:
    """``stats`` <- ``ckpt`` <- ``evals`` (which also reads the file ``suite.yaml``), all under ``root``."""
    suite = root / "suite.yaml"
    suite.parent.mkdir(parents=True)
    suite.write_text("tasks: [pick]\n", encoding="utf-8")
    stats = make_artifact(root / "stats", "ds_stats")
    ckpt = make_artifact(root / "ckpt", "task_checkpoint", inputs=[("stats", open_artifact(stats, "ds_stats"))])
    evals = make_artifact(
        root / "evals",
        "eval_results",
        inputs=[("ckpt", open_artifact(ckpt, "task_checkpoint"))],
        file_inputs=[("suite", suite)],
    )
    return stats, ckpt, evals, suite


def statuses(path: Path) -> list[tuple[int, str, str, Path, str]]:
    return [(n.depth, n.role, n.kind, n.path, n.status) for n in lineage(open_artifact(path))]


def test_lineage_of_an_intact_chain(tmp_path: Path) -> None:
    stats, ckpt, evals, suite = build_chain(tmp_path / "run")
    assert [(i["role"], i["kind"], i["path"]) for i in read_json(evals / MANIFEST_NAME)["inputs"]] == [
        ("ckpt", "task_checkpoint", "../ckpt"),
        ("suite", "file", "../suite.yaml"),
    ]
    assert read_json(evals / MANIFEST_NAME)["inputs"][1]["sha256"] == sha256(b"tasks: [pick]\n")
    assert statuses(evals) == [
        (1, "ckpt", "task_checkpoint", ckpt, "ok"),
        (2, "stats", "ds_stats", stats, "ok"),
        (1, "suite", "file", suite, "ok"),
    ]
    nodes = lineage(open_artifact(evals))
    assert all(isinstance(n, LineageNode) for n in nodes)
    assert lineage(open_artifact(stats)) == []


def test_lineage_survives_moving_the_whole_tree(tmp_path: Path) -> None:
    build_chain(tmp_path / "run")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "run", moved)
    assert statuses(moved / "evals") == [
        (1, "ckpt", "task_checkpoint", moved / "ckpt", "ok"),
        (2, "stats", "ds_stats", moved / "stats", "ok"),
        (1, "suite", "file", moved / "suite.yaml", "ok"),
    ]
    assert verify_outputs(open_artifact(moved / "evals")) == []


def test_lineage_after_recreating_an_input(tmp_path: Path) -> None:
    _, ckpt, evals, suite = build_chain(tmp_path / "run")
    make_artifact(ckpt, "task_checkpoint", files={"adapter.bin": b"retrained"}, overwrite=True)
    assert statuses(evals) == [
        (1, "ckpt", "task_checkpoint", ckpt, "changed"),
        (1, "suite", "file", suite, "ok"),
    ]


def test_lineage_after_editing_an_input_manifest(tmp_path: Path) -> None:
    stats, ckpt, evals, suite = build_chain(tmp_path / "run")
    manifest = read_json(stats / MANIFEST_NAME)
    manifest["seed"] = 99
    write_manifest(stats, manifest)
    assert statuses(evals) == [
        (1, "ckpt", "task_checkpoint", ckpt, "ok"),
        (2, "stats", "ds_stats", stats, "changed"),
        (1, "suite", "file", suite, "ok"),
    ]


def test_lineage_with_missing_and_incomplete_inputs(tmp_path: Path) -> None:
    stats, ckpt, evals, suite = build_chain(tmp_path / "run")
    shutil.rmtree(stats)
    assert statuses(evals)[1] == (2, "stats", "ds_stats", stats, "missing")
    (ckpt / MANIFEST_NAME).unlink()
    assert statuses(evals) == [
        (1, "ckpt", "task_checkpoint", ckpt, "incomplete"),
        (1, "suite", "file", suite, "ok"),
    ]


def test_lineage_of_an_input_with_a_malformed_manifest_is_incomplete(tmp_path: Path) -> None:
    _, ckpt, evals, _ = build_chain(tmp_path / "run")
    manifest = read_json(ckpt / MANIFEST_NAME)
    manifest["libraries"] = ["torch"]
    write_manifest(ckpt, manifest)
    assert statuses(evals)[0] == (1, "ckpt", "task_checkpoint", ckpt, "incomplete")


def test_lineage_of_an_edited_or_deleted_file_input(tmp_path: Path) -> None:
    _, _, evals, suite = build_chain(tmp_path / "run")
    suite.write_text("tasks: [place]\n", encoding="utf-8")
    assert statuses(evals)[2] == (1, "suite", "file", suite, "changed")
    suite.write_text("tasks: [pick]\n", encoding="utf-8")
    assert statuses(evals)[2] == (1, "suite", "file", suite, "ok")
    suite.unlink()
    assert statuses(evals)[2] == (1, "suite", "file", suite, "missing")


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh directory under ``/dev/shm``: it shares no directory below ``/`` with ``tmp_path``."""
    if not SHM.is_dir():
        pytest.skip(f"{SHM} does not exist")
    directory = Path(tempfile.mkdtemp(prefix="vlacl-test-", dir=SHM))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_input_path_without_a_common_directory_stays_absolute(tmp_path: Path, shm_dir: Path) -> None:
    outside = shm_dir / "suite.yaml"
    outside.write_text("tasks: [pick]\n", encoding="utf-8")
    assert tmp_path.parts[1] != outside.parts[1], "tmp_path must not lie under /dev for this test"
    out = make_artifact(tmp_path / "run", file_inputs=[("src", outside)])
    assert read_json(out / MANIFEST_NAME)["inputs"][0]["path"] == str(outside)
    assert statuses(out) == [(1, "src", "file", outside, "ok")]


def test_input_paths_are_relative_between_real_paths(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "link").symlink_to(real, target_is_directory=True)
    stats = make_artifact(real / "stats", "ds_stats")
    suite = real / "suite.yaml"
    suite.write_text("tasks: [pick]\n", encoding="utf-8")
    out = make_artifact(
        deep / "link" / "evals",
        inputs=[("stats", open_artifact(stats)), ("again", open_artifact(deep / "link" / "stats"))],
        file_inputs=[("suite", suite)],
    )
    assert [i["path"] for i in read_json(out / MANIFEST_NAME)["inputs"]] == ["../stats", "../stats", "../suite.yaml"]
    assert statuses(out) == [
        (1, "stats", "ds_stats", stats.resolve(), "ok"),
        (1, "again", "ds_stats", stats.resolve(), "ok"),
        (1, "suite", "file", suite.resolve(), "ok"),
    ]


def test_input_path_is_absolute_when_real_paths_share_no_directory(tmp_path: Path, shm_dir: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks: [pick]\n", encoding="utf-8")
    (tmp_path / "shm").symlink_to(shm_dir, target_is_directory=True)
    out = make_artifact(tmp_path / "shm" / "run", file_inputs=[("suite", suite)])
    assert read_json(out / MANIFEST_NAME)["inputs"][0]["path"] == str(suite.resolve())
    assert statuses(out) == [(1, "suite", "file", suite.resolve(), "ok")]


def test_producer_of_every_kind() -> None:
    assert producer_of("eval_results") == "vlacl eval-suite"
    assert producer_of("task_checkpoint") == "vlacl train-task"
    assert producer_of("unknown") == "no vlacl command"


# Filesystem errors: one ArtifactError naming the path and what to do; nothing half-written remains.


def all_entries(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")}


def masked(message: object) -> str:
    """``message`` with the host, pid and random part of hidden sibling names replaced by ``HOST-PID-HEX``."""
    return re.sub(rf"\.(tmp|old)-{re.escape(HOST)}-\d+-[0-9a-f]{{8}}\b", r".\1-HOST-PID-HEX", str(message))


@pytest.mark.parametrize("below", ["x", "x/y"])
def test_out_below_a_file_is_refused_before_the_work(tmp_path: Path, below: str) -> None:
    somefile = tmp_path / "somefile.csv"
    somefile.write_text("a,b\n", encoding="utf-8")
    out = somefile / below
    expected = (
        f"--out {out} cannot be created: {somefile} is a file, not a directory; "
        "choose an --out whose parents are directories"
    )
    with pytest.raises(OutputExistsError) as info:
        check_output_dir(out, overwrite=True, kind="eval_results")
    assert str(info.value) == expected
    with pytest.raises(OutputExistsError) as info:
        enter(out)
    assert str(info.value) == expected
    assert all_entries(tmp_path) == {"somefile.csv"}
    assert somefile.read_text(encoding="utf-8") == "a,b\n"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_that_cannot_be_created_is_an_artifact_error() -> None:
    with pytest.raises(ArtifactError) as info:
        make_artifact(Path("/proc/x"))
    assert type(info.value) is ArtifactError
    cause = info.value.__cause__
    assert isinstance(cause, OSError)
    advice = {  # what mkdir in /proc fails with depends on the kernel and the user
        errno.ENOENT: "check that /proc is a writable directory, or choose another --out",
        errno.EACCES: "check the permissions of /proc, or choose another --out",
        errno.EPERM: "check the permissions of /proc, or choose another --out",
        errno.EROFS: "/proc is on a read-only filesystem: choose another --out",
    }
    assert cause.errno in advice
    assert masked(info.value) == (
        "cannot write --out /proc/x: creating the temporary directory /proc/.x.tmp-HOST-PID-HEX failed "
        f"({os.strerror(cause.errno)}); {advice[cause.errno]}"
    )
    assert not any(p.name.startswith(".x.") for p in Path("/proc").iterdir())


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_is_an_artifact_error(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ArtifactError) as info:
            make_artifact(parent / "out")
        assert str(info.value).endswith(
            f"failed (Permission denied); check the permissions of {parent}, or choose another --out"
        )
        assert entries(parent) == set()
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.EACCES, "check the permissions of {where}, or choose another --out"),
        (errno.EPERM, "check the permissions of {where}, or choose another --out"),
        (errno.EROFS, "{where} is on a read-only filesystem: choose another --out"),
        (errno.ENOSPC, "free space on the disk of {where}, or choose another --out"),
        (errno.EDQUOT, "free space on the disk of {where}, or choose another --out"),
        (errno.EFBIG, "a file is larger than the filesystem of {where} allows: choose another --out"),
        (errno.ENOTDIR, "a parent of --out is a file, not a directory: choose another --out"),
        (errno.EIO, "the disk holding {where} reported an error: check it, or choose another --out"),
        (errno.ENAMETOOLONG, "check that {where} is a writable directory, or choose another --out"),
    ],
)
@pytest.mark.parametrize("depth", [0, 2])
def test_a_directory_that_cannot_be_created_is_an_artifact_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, advice: str, depth: int
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def refuse(path: str | os.PathLike[str], mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if Path(path).parent == locked:
            raise OSError(code, os.strerror(code), os.fspath(path))
        real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", refuse)
    out = locked.joinpath(*["sub"] * depth, "out")
    with pytest.raises(ArtifactError) as info:
        make_artifact(out)
    step = f"the directory {locked / 'sub'}" if depth else f"the temporary directory {locked}/.out.tmp-HOST-PID-HEX"
    assert masked(info.value) == (
        f"cannot write --out {out}: creating {step} failed ({os.strerror(code)}); {advice.format(where=locked)}"
    )
    assert all_entries(tmp_path) == {"locked"}


def test_parents_created_for_a_failed_run_are_removed(tmp_path: Path) -> None:
    def crash(writer: ArtifactWriter) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        make_artifact(tmp_path / "a" / "b" / "out", body=crash)
    assert all_entries(tmp_path) == set()
    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        make_artifact(tmp_path / "keep" / "b" / "out", body=crash)
    assert all_entries(tmp_path) == {"keep"}


def test_disk_full_while_a_command_writes_is_an_artifact_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[Path] = []

    def full(writer: ArtifactWriter) -> None:
        seen.append(writer.path)
        raise OSError(errno.ENOSPC, "No space left on device", str(writer.path / "big.bin"))

    with pytest.raises(ArtifactError) as info:
        make_artifact(out, body=full)
    assert str(info.value) == (
        f"cannot write --out {out}: writing {seen[0] / 'big.bin'} failed (No space left on device); "
        f"free space on the disk of {tmp_path}, or choose another --out"
    )
    assert entries(tmp_path) == set()


@pytest.mark.parametrize("copy", [False, True])
def test_a_disk_error_naming_no_file_inside_is_an_artifact_error(tmp_path: Path, copy: bool) -> None:
    out = tmp_path / "out"
    seen: list[Path] = []

    def fail(writer: ArtifactWriter) -> None:
        seen.append(writer.path)
        if copy:  # as shutil.copyfile raises it: the source first, the target second
            source, target = str(tmp_path / "source.bin"), str(writer.path / "copy.bin")
            raise OSError(errno.ENOSPC, "No space left on device", source, None, target)
        raise OSError(errno.EFBIG, "File too large")  # as a write to an open file raises it: no file name

    with pytest.raises(ArtifactError) as info:
        make_artifact(out, body=fail)
    if copy:
        expected = (
            f"writing {seen[0] / 'copy.bin'} failed (No space left on device); "
            f"free space on the disk of {tmp_path}, or choose another --out"
        )
    else:
        expected = (
            f"writing into {seen[0]} failed (File too large); "
            f"a file is larger than the filesystem of {tmp_path} allows: choose another --out"
        )
    assert str(info.value) == f"cannot write --out {out}: {expected}"
    assert entries(tmp_path) == set()


def test_other_errors_of_a_command_propagate_unchanged(tmp_path: Path) -> None:
    def missing_input(writer: ArtifactWriter) -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "input.csv"))

    with pytest.raises(FileNotFoundError):
        make_artifact(tmp_path / "out", body=missing_input)
    assert entries(tmp_path) == set()


def test_a_sync_error_during_commit_is_an_artifact_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as info:
        make_artifact(out, files={"data.bin": b"d"})
    assert masked(info.value) == (
        f"cannot write --out {out}: reading and syncing {tmp_path}/.out.tmp-HOST-PID-HEX/{CONFIG_NAME} failed "
        f"(Input/output error); the disk holding {tmp_path} reported an error: check it, or choose another --out"
    )
    assert entries(tmp_path) == set()


def fail_renames(monkeypatch: pytest.MonkeyPatch, *prefixes: str) -> None:
    """Make ``os.rename`` fail with EIO for sources whose name starts with one of ``prefixes``."""
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: Any) -> None:
        if Path(src).name.startswith(prefixes):
            raise OSError(errno.EIO, "Input/output error", os.fspath(src), None, os.fspath(dst))
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_final_rename_keeps_out_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    out = tmp_path / "out"
    before = (make_artifact(out, files={"old.bin": b"old"}) / MANIFEST_NAME).read_bytes() if existing else None
    fail_renames(monkeypatch, ".out.tmp-")
    with pytest.raises(ArtifactError) as info:
        make_artifact(out, files={"new.bin": b"new"}, overwrite=True)
    assert masked(info.value) == (
        f"cannot write --out {out}: renaming {tmp_path}/.out.tmp-HOST-PID-HEX to {out} failed (Input/output error); "
        f"the disk holding {tmp_path} reported an error: check it, or choose another --out"
    )
    if before is None:
        assert entries(tmp_path) == set()
    else:
        assert entries(tmp_path) == {"out"}
        assert (out / MANIFEST_NAME).read_bytes() == before
        assert file_set(out) == {"old.bin", CONFIG_NAME, MANIFEST_NAME}


def test_a_failed_move_aside_keeps_out_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old"})
    before = (out / MANIFEST_NAME).read_bytes()
    fail_renames(monkeypatch, "out")
    with pytest.raises(ArtifactError) as info:
        make_artifact(out, files={"new.bin": b"new"}, overwrite=True)
    assert masked(info.value) == (
        f"cannot write --out {out}: moving the previous {out} aside to {tmp_path}/.out.old-HOST-PID-HEX failed "
        f"(Input/output error); the disk holding {tmp_path} reported an error: check it, or choose another --out"
    )
    assert entries(tmp_path) == {"out"}
    assert (out / MANIFEST_NAME).read_bytes() == before


def test_a_failed_restore_names_where_the_previous_artifact_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old"})
    before = (out / MANIFEST_NAME).read_bytes()
    fail_renames(monkeypatch, ".out.tmp-", ".out.old-")
    with pytest.raises(ArtifactError) as info:
        make_artifact(out, files={"new.bin": b"new"}, overwrite=True)
    (old,) = entries(tmp_path)
    assert masked(old) == ".out.old-HOST-PID-HEX"
    assert masked(info.value) == (
        f"cannot write --out {out}: renaming {tmp_path}/.out.tmp-HOST-PID-HEX to it failed (Input/output error), "
        f"and so did putting the previous artifact back; it is kept at {tmp_path}/.out.old-HOST-PID-HEX: rename it to "
        f"{out} (the next vlacl run writing this --out does it itself)"
    )
    assert str(tmp_path / old) in str(info.value)
    assert (tmp_path / old / MANIFEST_NAME).read_bytes() == before


@pytest.mark.parametrize("interruption", [Terminated(signal.SIGTERM), KeyboardInterrupt()], ids=["term", "int"])
@pytest.mark.parametrize("when", ["after-move-aside", "at-final-rename"])
def test_an_interruption_between_the_renames_puts_the_previous_artifact_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: BaseException, when: str
) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old"})
    before = (out / MANIFEST_NAME).read_bytes()
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: Any) -> None:
        if when == "after-move-aside" and Path(src).name == "out":
            real_rename(src, dst, **kwargs)
            raise interruption  # the signal arrives as the rename returns
        if when == "at-final-rename" and Path(src).name.startswith(".out.tmp-"):
            raise interruption
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(type(interruption)):
        make_artifact(out, files={"new.bin": b"new"}, overwrite=True)
    assert entries(tmp_path) == {"out"}
    assert (out / MANIFEST_NAME).read_bytes() == before
    assert file_set(out) == {"old.bin", CONFIG_NAME, MANIFEST_NAME}


def test_an_interruption_after_the_final_rename_keeps_the_new_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old"})
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: Any) -> None:
        real_rename(src, dst, **kwargs)
        if Path(src).name.startswith(".out.tmp-"):
            raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Terminated):
        make_artifact(out, files={"new.bin": b"new"}, overwrite=True)
    assert file_set(out) == {"new.bin", CONFIG_NAME, MANIFEST_NAME}
    (old,) = entries(tmp_path) - {"out"}
    assert masked(old) == ".out.old-HOST-PID-HEX"  # removed by the next writer, as a killed process's would be


def test_a_failed_restore_after_an_interruption_names_where_the_previous_artifact_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old"})
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: Any) -> None:
        if Path(src).name.startswith(".out.tmp-"):
            raise Terminated(signal.SIGTERM)
        if Path(src).name.startswith(".out.old-"):
            raise OSError(errno.EIO, "Input/output error", os.fspath(src), None, os.fspath(dst))
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ArtifactError) as info:
        make_artifact(out, files={"new.bin": b"new"}, overwrite=True)
    assert isinstance(info.value.__cause__, Terminated)
    assert masked(info.value) == (
        f"cannot write --out {out}: renaming {tmp_path}/.out.tmp-HOST-PID-HEX to it failed (terminated by SIGTERM), "
        f"and so did putting the previous artifact back; it is kept at {tmp_path}/.out.old-HOST-PID-HEX: rename it "
        f"to {out} (the next vlacl run writing this --out does it itself)"
    )
    (old,) = entries(tmp_path)
    assert file_set(tmp_path / old) == {"old.bin", CONFIG_NAME, MANIFEST_NAME}


# --overwrite replaces only an artifact of the same kind.


@pytest.mark.parametrize("overwrite", [False, True])
def test_never_replaces_an_artifact_of_another_kind(tmp_path: Path, overwrite: bool) -> None:
    out = make_artifact(tmp_path / "out", "ds_stats")
    before = (out / MANIFEST_NAME).read_bytes()
    expected = (
        f"--out {out} holds a ds_stats artifact (written by `vlacl ds-stats`), but this command writes an "
        "eval_results artifact (written by `vlacl eval-suite`); vlacl never replaces an artifact of another kind, "
        "even with --overwrite: choose another --out"
    )
    with pytest.raises(OutputExistsError) as info:
        check_output_dir(out, overwrite, kind="eval_results")
    assert str(info.value) == expected
    with pytest.raises(OutputExistsError) as info:
        enter(out, overwrite=overwrite)
    assert str(info.value) == expected
    assert info.value.exit_code == 2
    assert entries(tmp_path) == {"out"}
    assert (out / MANIFEST_NAME).read_bytes() == before


def test_check_output_dir_without_a_kind_still_works(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out", "ds_stats")
    check_output_dir(out, True)
    with pytest.raises(OutputExistsError, match="pass --overwrite to replace it"):
        check_output_dir(out, False)


def test_an_artifact_of_another_kind_appearing_during_the_run_is_kept(tmp_path: Path) -> None:
    out = make_artifact(tmp_path / "out", "eval_results", files={"old.bin": b"old"})

    def replace_with_stats(writer: ArtifactWriter) -> None:
        stats = make_artifact(tmp_path / "stats", "ds_stats", files={"stats.json": b"{}"})
        shutil.rmtree(out)
        stats.rename(out)

    with pytest.raises(OutputExistsError, match="holds a ds_stats artifact"):
        make_artifact(out, "eval_results", overwrite=True, body=replace_with_stats)
    assert entries(tmp_path) == {"out"}
    assert open_artifact(out).kind == "ds_stats"


@pytest.mark.parametrize(
    "data", [b'{"kind": ', b'["eval_results"]', b'{"kind": 3}', *(p.values[0] for p in UNREADABLE_MANIFESTS)]
)
def test_an_unreadable_manifest_at_out_is_never_replaced(tmp_path: Path, data: bytes) -> None:
    out = make_artifact(tmp_path / "out")
    (out / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(OutputExistsError) as info:
        enter(out, overwrite=True)
    assert str(info.value) == (
        f"--out {out} holds a {MANIFEST_NAME} that cannot be read, so vlacl cannot tell what it would replace; "
        "it never replaces it, even with --overwrite: choose another --out or remove it yourself"
    )
    assert (out / MANIFEST_NAME).read_bytes() == data


# No --out inside another artifact.


@pytest.mark.parametrize("below", ["sub", "a/b/sub"])
def test_out_inside_another_artifact_is_refused(tmp_path: Path, below: str) -> None:
    art = make_artifact(tmp_path / "art", "task_checkpoint")
    before = all_entries(art)
    out = art / below
    expected = (
        f"--out {out} lies inside {art}, which is a task_checkpoint artifact (written by `vlacl train-task`): "
        "writing there would add files its manifest does not list; choose an --out outside every artifact directory"
    )
    with pytest.raises(OutputExistsError) as info:
        check_output_dir(out, overwrite=True)
    assert str(info.value) == expected
    with pytest.raises(OutputExistsError) as info:
        make_artifact(out, "eval_results", overwrite=True)
    assert str(info.value) == expected
    assert all_entries(art) == before
    assert open_artifact(art, verify=True).kind == "task_checkpoint"


def test_out_inside_an_artifact_through_a_symlink_is_refused(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "art", "ds_stats")
    (tmp_path / "link").symlink_to(art, target_is_directory=True)
    with pytest.raises(OutputExistsError, match=r"/link/out lies inside \S+/link, which is a ds_stats artifact"):
        make_artifact(tmp_path / "link" / "out")
    assert entries(art) == {"data.bin", CONFIG_NAME, MANIFEST_NAME}


@pytest.mark.parametrize("data", [b"{", *(p.values[0] for p in UNREADABLE_MANIFESTS)])
def test_out_inside_an_artifact_with_a_damaged_manifest_is_refused(tmp_path: Path, data: bytes) -> None:
    art = make_artifact(tmp_path / "art")
    (art / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(OutputExistsError, match=f"lies inside {re.escape(str(art))}, which is a vlacl artifact:"):
        check_output_dir(art / "sub", overwrite=False)


# Durability: every file is synced before the directory is renamed into place.


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to name synced descriptors")
def test_every_file_is_synced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    synced: list[tuple[Path, bool]] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append((Path(f"/proc/self/fd/{fd}").readlink(), out.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    make_artifact(out, files={"data.bin": b"payload", "sub/deeper/extra.bin": bytes(range(10))})
    before_rename = [path for path, out_exists in synced if not out_exists]
    assert [path for path, out_exists in synced if out_exists] == [tmp_path]
    (tmp,) = {path.relative_to(tmp_path).parts[0] for path in before_rename}
    assert masked(tmp) == ".out.tmp-HOST-PID-HEX"
    assert sorted(path.relative_to(tmp_path / tmp).as_posix() for path in before_rename) == sorted(
        [
            ".",
            CONFIG_NAME,
            "data.bin",
            "sub",
            "sub/deeper",
            "sub/deeper/extra.bin",
            MANIFEST_NAME,
        ]
    )
    assert len(before_rename) == len(set(before_rename))


# Recovery from killed writers.


def child_env() -> dict[str, str]:
    """The environment for a child Python that imports this checkout's vlacl."""
    root = str(Path(vlacl.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    pid = int(done.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


@pytest.fixture
def warnings_of_writer(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """Capture the writer's warnings; call the result to get their messages."""
    monkeypatch.setattr(logging.getLogger("vlacl"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="vlacl.artifacts.writer")

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "vlacl.artifacts.writer"]

    return messages


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from vlacl.artifacts import ArtifactWriter

with ArtifactWriter(Path(sys.argv[1]), "eval_results", command=[], config_yaml=None, seed=0) as writer:
    (writer.path / "half.bin").write_bytes(b"half")
    print(writer.path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_a_killed_writer_is_cleaned_up_by_the_next_one(
    tmp_path: Path, warnings_of_writer: Callable[[], list[str]]
) -> None:
    out = tmp_path / "out"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True, env=child_env(), check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = Path(child.stdout.strip())
    assert left.parent == tmp_path
    match = re.fullmatch(rf"\.out\.tmp-{re.escape(HOST)}-(\d+)-[0-9a-f]{{8}}", left.name)
    assert match is not None
    assert entries(tmp_path) == {left.name}
    assert entries(left) == {"half.bin"}

    make_artifact(out, files={"data.bin": b"whole"})
    assert entries(tmp_path) == {"out"}
    assert file_set(out) == {"data.bin", CONFIG_NAME, MANIFEST_NAME}
    assert open_artifact(out, "eval_results", verify=True).kind == "eval_results"
    pid = int(match.group(1))
    assert warnings_of_writer() == [f"removed {left}, left by vlacl process {pid} that no longer runs"]


def sibling(out: Path, role: str, pid: int, host: str = HOST) -> Path:
    """The hidden sibling of ``out`` that a writer of role ``role`` on ``host`` in process ``pid`` makes."""
    return out.parent / f".{out.name}.{role}-{host}-{pid}-0a1b2c3d"


def put_aside(out: Path, pid: int) -> Path:
    """Rename the artifact ``out`` as an overwrite by process ``pid`` does just before its final rename."""
    old = sibling(out, "old", pid)
    out.rename(old)
    return old


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_writer_killed_between_the_renames_is_restored(
    tmp_path: Path, warnings_of_writer: Callable[[], list[str]], overwrite: bool
) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old"})
    before = (out / MANIFEST_NAME).read_bytes()
    pid = dead_pid()
    old = put_aside(out, pid)
    tmp = sibling(out, "tmp", pid)
    shutil.copytree(old, tmp)
    (tmp / MANIFEST_NAME).unlink()
    assert entries(tmp_path) == {old.name, tmp.name}

    if overwrite:
        make_artifact(out, files={"new.bin": b"new"}, overwrite=True)
        assert file_set(out) == {"new.bin", CONFIG_NAME, MANIFEST_NAME}
    else:
        with pytest.raises(OutputExistsError, match="already holds an artifact: pass --overwrite"):
            make_artifact(out, files={"new.bin": b"new"})
        assert (out / MANIFEST_NAME).read_bytes() == before
        assert open_artifact(out, "eval_results", verify=True).has_file("old.bin")
    assert entries(tmp_path) == {"out"}
    assert warnings_of_writer() == [
        f"removed {tmp}, left by vlacl process {pid} that no longer runs",
        f"restored {out} from {old}: vlacl process {pid} was stopped while replacing it",
    ]


def test_a_stale_previous_artifact_is_removed_once_out_was_written(
    tmp_path: Path, warnings_of_writer: Callable[[], list[str]]
) -> None:
    out = make_artifact(tmp_path / "out", files={"old.bin": b"old"})
    pid = dead_pid()
    old = put_aside(out, pid)
    shutil.copytree(old, out)
    make_artifact(out, files={"new.bin": b"new"}, overwrite=True)
    assert entries(tmp_path) == {"out"}
    assert file_set(out) == {"new.bin", CONFIG_NAME, MANIFEST_NAME}
    assert warnings_of_writer() == [f"removed {old}, left by vlacl process {pid} that no longer runs"]


def test_the_newest_of_several_previous_artifacts_is_restored(tmp_path: Path) -> None:
    olds = []
    for seed in (1, 2):
        built = make_artifact(tmp_path / "build" / f"seed{seed}" / "out", seed=seed)
        old = put_aside(built, dead_pid())
        olds.append(old.rename(tmp_path / old.name))
    shutil.rmtree(tmp_path / "build")
    os.utime(olds[0], (1_000_000, 1_000_000))
    with pytest.raises(OutputExistsError, match="already holds an artifact"):
        make_artifact(tmp_path / "out")
    assert entries(tmp_path) == {"out"}
    assert open_artifact(tmp_path / "out").manifest.seed == 2


def test_siblings_of_running_processes_are_left_alone(
    tmp_path: Path, warnings_of_writer: Callable[[], list[str]]
) -> None:
    out = make_artifact(tmp_path / "out")
    alive = [os.getpid(), 1]
    siblings = {sibling(out, role, pid) for role in ("tmp", "old") for pid in alive}
    for path in siblings:
        shutil.copytree(out, path)
    names = (".other.tmp-1-ab", ".out.tmp-x-ab", ".out.old-12-a-b", "out.tmp-1-ab", ".out.tmp-1-ab")
    unrelated = {tmp_path / name for name in names} | {
        tmp_path / f".out.tmp-{HOST}-x-ab",
        tmp_path / f".out.old-{HOST}-12-a-b",
        tmp_path / f".out.tmp-{HOST}-12-AB",
        tmp_path / f".other.tmp-{HOST}-{dead_pid()}-ab",
    }
    for path in unrelated:
        path.mkdir()
    shutil.rmtree(out)
    make_artifact(out)
    assert entries(tmp_path) == {"out"} | {p.name for p in siblings | unrelated}
    assert warnings_of_writer() == []


def test_siblings_of_another_host_are_left_alone(tmp_path: Path, warnings_of_writer: Callable[[], list[str]]) -> None:
    out = make_artifact(tmp_path / "out")
    pid = dead_pid()
    ours = sibling(out, "tmp", pid)
    ours.mkdir()
    theirs = {sibling(out, role, pid, host=host) for role in ("tmp", "old") for host in ("other", f"{HOST}-7")}
    for path in theirs:
        shutil.copytree(out, path)
    shutil.rmtree(out)
    make_artifact(out, seed=5)
    assert entries(tmp_path) == {"out"} | {p.name for p in theirs}
    assert open_artifact(out).manifest.seed == 5
    assert warnings_of_writer() == [f"removed {ours}, left by vlacl process {pid} that no longer runs"]


def test_the_host_name_is_sanitized_and_may_hold_hyphens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings_of_writer: Callable[[], list[str]]
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "node-7.lab cluster/\u00e9")
    host = "node-7.lab_cluster__"
    out = tmp_path / "out"
    pid = dead_pid()
    stale = sibling(out, "tmp", pid, host=host)
    others = {sibling(out, "tmp", pid, host=name) for name in ("node", "node-7", f"{host}-1")}
    for path in (stale, *others):
        path.mkdir()
    names: list[str] = []
    make_artifact(out, body=lambda writer: names.append(writer.path.name))
    assert re.fullmatch(rf"\.out\.tmp-{re.escape(host)}-{os.getpid()}-[0-9a-f]{{8}}", names[0])
    assert entries(tmp_path) == {"out"} | {p.name for p in others}
    assert warnings_of_writer() == [f"removed {stale}, left by vlacl process {pid} that no longer runs"]


@pytest.mark.parametrize(
    ("raised", "alive"),
    [(None, True), (PermissionError(errno.EPERM, "Operation not permitted"), True), (ProcessLookupError(), False)],
)
def test_a_process_is_dead_only_when_it_cannot_be_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: OSError | None, alive: bool
) -> None:
    out = tmp_path / "out"
    stale = sibling(out, "tmp", 4242)
    stale.mkdir()
    asked: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        asked.append((pid, sig))
        if raised is not None:
            raise raised

    monkeypatch.setattr(os, "kill", kill)
    make_artifact(out)
    assert asked == [(4242, 0)]
    assert stale.exists() == alive


def test_outputs_hashed_by_the_command_are_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlacl.artifacts.hashing import sha256_file_synced as real

    read: list[str] = []

    def counting(path: Path, *, sync: bool = True) -> tuple[str, int]:
        read.append(Path(path).name)
        return real(path, sync=sync)

    monkeypatch.setattr("vlacl.artifacts.writer.sha256_file_synced", counting)

    def body(w: ArtifactWriter) -> None:
        big, stale = w.path / "big.bin", w.path / "stale.bin"
        big.write_bytes(b"x" * 1000)
        stale.write_bytes(b"y" * 10)
        w.add_synced_output(big, hashlib.sha256(b"x" * 1000).hexdigest(), 1000)
        w.add_synced_output(stale, "0" * 64, 9)  # the size disagrees: hashed at the commit after all

    out = make_artifact(tmp_path / "out", files={}, body=body)
    assert sorted(read) == [CONFIG_NAME, "stale.bin"]
    outputs = open_artifact(out, verify=True).manifest.outputs
    assert outputs["stale.bin"].sha256 == hashlib.sha256(b"y" * 10).hexdigest()
    assert outputs["big.bin"].bytes == 1000
