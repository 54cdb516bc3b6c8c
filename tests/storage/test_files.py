"""dresd.storage.files: local paths and pyarrow/fsspec URIs behind one small API."""

from __future__ import annotations

import uuid

import pyarrow.fs as pafs
import pytest

from dresd.storage.files import is_uri, resolve


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))


def test_resolve_local_file_uri_and_fsspec_scheme(tmp_path):
    assert not is_uri(tmp_path) and is_uri("file:///x") and is_uri("s3://b/k")
    local = resolve(tmp_path / "a")
    assert isinstance(local.fs, pafs.LocalFileSystem) and local.path == str(tmp_path / "a")
    uri = resolve(f"file://{tmp_path}/a")
    assert isinstance(uri.fs, pafs.LocalFileSystem) and uri.path == f"{tmp_path}/a"
    mem = resolve("memory://bucket/x")  # a scheme pyarrow does not know: fsspec's
    assert isinstance(mem.fs, pafs.PyFileSystem)
    with pytest.raises(ValueError, match="no filesystem for scheme 'nosuch'"):
        resolve("nosuch://x")


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_write_read_list_atomically(tmp_path, kind):
    base = f"file://{tmp_path}/root" if kind == "file" else f"memory://t-{uuid.uuid4().hex}"
    loc = resolve(base)
    loc.child("d", "f.txt").write_bytes(b"one")
    loc.child("d", "f.txt").write_bytes(b"two")  # replaced whole
    loc.child("d", "g.txt").write_bytes(b"x")
    assert loc.child("d", "f.txt").read_text() == "two"
    assert loc.child("d").children() == ["f.txt", "g.txt"]  # no temporary leftovers
    assert loc.child("d").is_dir() and loc.child("d", "f.txt").is_file() and not loc.child("nope").exists()
    assert loc.child("nope").children() == []
