"""The converted-model cache is keyed by the GGUF file's content, not by where the file lies."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from chatstream import model_loader


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CHATSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def legacy_folder(cache: Path, gguf: Path) -> Path:
    """Where the previous scheme (path, size and mtime) put this file's conversion."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache / "models" / f"{gguf.stem}-{key}"


def test_two_copies_of_one_file_share_one_conversion(cache: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    # A conversion made by the old scheme for the first copy is taken over, not redone.
    old = legacy_folder(cache, first)
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / "model.safetensors").write_bytes(b"weights")

    folder = model_loader.resolve_model_folder(first)
    assert folder != old and (folder / "model.safetensors").read_bytes() == b"weights"
    assert (folder / "model.safetensors").stat().st_ino == (old / "model.safetensors").stat().st_ino  # linked
    assert model_loader.resolve_model_folder(second) == folder

    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert folder.name == f"m-{digest[:16]}"
    index = json.loads((cache / "content-hashes.json").read_text())
    assert {entry["sha256"] for entry in index.values()} == {digest} and len(index) == 2


def test_the_hash_is_read_again_only_when_the_file_changes(cache: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    first = model_loader._content_hash(gguf)
    # A recorded hash is trusted while size and mtime match: prove it by planting a fake one.
    index_path = cache / "content-hashes.json"
    index = json.loads(index_path.read_text())
    index[str(gguf.resolve())]["sha256"] = "planted"
    index_path.write_text(json.dumps(index))
    assert model_loader._content_hash(gguf) == "planted"

    gguf.write_bytes(b"two!")
    assert model_loader._content_hash(gguf) == hashlib.sha256(b"two!").hexdigest() != first
