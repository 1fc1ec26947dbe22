"""The hash cache of large inputs: a hit for an unchanged file, a miss after any write, never in the way."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from vlacl.artifacts import hashing
from vlacl.artifacts.hashing import CACHE_DIR_ENV, HASH_CACHE_ENV, cache_dir, sha256_file_cached


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache that trusts files changed just before they were hashed (the tests' files all are)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(root))
    monkeypatch.setattr(hashing, "RACY_NS", 0)
    return root


def test_an_unchanged_file_is_hashed_once(cache: Path, tmp_path: Path, hashed_files: list[Path]) -> None:
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"weights" * 1000)
    want = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert sha256_file_cached(shard) == want
    assert sha256_file_cached(shard) == want
    assert hashed_files == [shard]
    entries = list((cache / "sha256").glob("*.json"))
    assert len(entries) == 1
    assert json.loads(entries[0].read_text())["sha256"] == want
    assert not list((cache / "sha256").glob(".*"))  # no temporary file left


def test_a_rewritten_file_is_hashed_again_even_with_its_old_times(
    cache: Path, tmp_path: Path, hashed_files: list[Path]
) -> None:
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"a" * 4096)
    first = sha256_file_cached(shard)
    before = shard.stat()
    time.sleep(0.05)  # past the clock tick of the first write, on kernels whose file times move in ticks
    shard.write_bytes(b"b" * 4096)  # same size
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # modification time set back
    second = sha256_file_cached(shard)
    assert second == hashlib.sha256(b"b" * 4096).hexdigest() != first
    assert hashed_files == [shard, shard]


def test_a_broken_cache_entry_or_an_unwritable_cache_only_costs_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"x" * 100)
    want = hashlib.sha256(b"x" * 100).hexdigest()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker))  # the cache cannot be created under a file
    assert sha256_file_cached(shard) == want
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(root))
    sha256_file_cached(shard)
    (entry,) = (root / "sha256").glob("*.json")
    entry.write_text("{not json")
    assert sha256_file_cached(shard) == want
    entry.write_text(json.dumps({"sha256": "0" * 64}))  # matches no file
    assert sha256_file_cached(shard) == want


def test_the_cache_can_be_turned_off(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashed_files: list[Path]
) -> None:
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"y" * 10)
    monkeypatch.setenv(HASH_CACHE_ENV, "off")
    sha256_file_cached(shard)
    sha256_file_cached(shard)
    assert hashed_files == [shard, shard]
    assert not cache.exists()


def test_the_cache_directory_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vlacl"
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_a_file_changed_just_before_its_hashing_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashed_files: list[Path]
) -> None:
    """A change within a clock tick of the hashing could leave the file's times as they were."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"z" * 64)
    sha256_file_cached(shard)
    sha256_file_cached(shard)
    assert hashed_files == [shard, shard]
    (entry,) = (tmp_path / "cache" / "sha256").glob("*.json")
    recorded = json.loads(entry.read_text())
    assert recorded["hashed_ns"] - recorded["ctime_ns"] < hashing.RACY_NS
    recorded["hashed_ns"] = recorded["ctime_ns"] + hashing.RACY_NS + 1  # as if hashed 2 s after the change
    entry.write_text(json.dumps(recorded))
    assert sha256_file_cached(shard) == recorded["sha256"]
    assert hashed_files == [shard, shard]


def test_no_home_directory_only_costs_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def homeless() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(homeless))
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"h" * 8)
    assert sha256_file_cached(shard) == hashlib.sha256(b"h" * 8).hexdigest()
