"""The hash cache of large inputs: a hit for an unchanged file, a miss after any write, never in the way."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from vlacl.artifacts import hashing
from vlacl.artifacts.hashing import CACHE_DIR_ENV, HASH_CACHE_ENV, cache_dir, sha256_file_cached


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(root))
    return root


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = hashing.sha256_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    return calls


def test_an_unchanged_file_is_hashed_once(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"weights" * 1000)
    calls = _count_hashes(monkeypatch)
    want = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert sha256_file_cached(shard) == want
    assert sha256_file_cached(shard) == want
    assert calls == [shard]
    entries = list((cache / "sha256").glob("*.json"))
    assert len(entries) == 1
    assert json.loads(entries[0].read_text())["sha256"] == want
    assert not list((cache / "sha256").glob(".*"))  # no temporary file left


def test_a_rewritten_file_is_hashed_again_even_with_its_old_times(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"a" * 4096)
    first = sha256_file_cached(shard)
    before = shard.stat()
    shard.write_bytes(b"b" * 4096)  # same size
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # modification time set back
    calls = _count_hashes(monkeypatch)
    second = sha256_file_cached(shard)
    assert second == hashlib.sha256(b"b" * 4096).hexdigest() != first
    assert calls == [shard]


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


def test_the_cache_can_be_turned_off(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"y" * 10)
    monkeypatch.setenv(HASH_CACHE_ENV, "off")
    calls = _count_hashes(monkeypatch)
    sha256_file_cached(shard)
    sha256_file_cached(shard)
    assert len(calls) == 2
    assert not cache.exists()


def test_the_cache_directory_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vlacl"
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
