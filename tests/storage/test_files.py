"""dresd.storage.files: local paths and pyarrow/fsspec URIs behind one small API."""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs
import pytest

from dresd.storage.cache import fetch
from dresd.storage.files import is_uri, resolve
from dresd.datastore.corpus import CorpusError, list_corpus_files, read_rows


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


def test_fetch_caches_and_refetches_changed_files(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"a": 1}\n')
    uri = f"file://{src}"
    first = fetch(uri)
    assert first.read_text() == '{"a": 1}\n' and first != src and str(first).startswith(str(tmp_path / "cache"))
    assert fetch(uri) == first  # unchanged: the cached copy
    src.write_text('{"a": 2}\n{"a": 3}\n')
    os.utime(src, ns=(1, 1))
    again = fetch(uri)
    assert again != first and again.read_text().count("\n") == 2
    assert fetch(tmp_path / "c.jsonl") == src  # local paths are used in place
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        fetch(f"file://{tmp_path}/missing.jsonl")


def test_corpus_folder_and_rows_through_uris(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\nnot json\n')
    (folder / "notes.txt").write_text("ignored")
    uri = f"file://{folder}"
    files = list_corpus_files([uri])
    assert files == [f"{uri}/a.jsonl"]
    rows = list(read_rows(files[0], on_error="skip"))
    assert [r.row for r in rows] == [1, 2] and rows[1].error == "bad_json"
    assert all(r.file == files[0] for r in rows)  # rows name the URI, not the cached copy
    with pytest.raises(CorpusError, match=rf"{uri}/a.jsonl.*row 2"):
        list(read_rows(files[0], on_error="fail"))
    with pytest.raises(CorpusError, match="corpus path not found"):
        list_corpus_files([f"file://{tmp_path}/nope"])
