"""Datastore integrity (issue 25): CURRENT records its manifest's checksum, fetches and first
uses check every file's sha256 (once per node), files open read-only and damaged ones are
named, token ids fit the model's vocabulary."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid

import numpy as np
import pytest

import dresd.datastore.integrity as integrity
from dresd.datastore.integrity import Mismatch, find_damage, parse_current, verify_once
from dresd.datastore.store import CURRENT, MANIFEST, Datastore, DatastoreError, locate_version, read_current
from dresd.datastore.publish import publish, set_current
from dresd.storage.cache import cache_root
from dresd.storage.files import resolve, sha256_file
from tests_support import IDENTITY, make_manifest, make_parts


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "store"
    publish(r, make_parts(), make_manifest(), version="v1")
    return r


def flip(path, at=-1):
    """Change one byte of `path`, keeping its size (what only a checksum can see)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(vdir, **changes):
    m = json.loads((vdir / MANIFEST).read_text())
    m.update(changes)
    (vdir / MANIFEST).write_text(json.dumps(m))


def test_current_records_the_manifest_checksum_and_an_edited_manifest_is_refused(root):
    vdir = root / "versions" / "v1"
    assert (root / CURRENT).read_text() == f"v1 {sha256_file(vdir / MANIFEST)}\n"
    assert locate_version(root) == (vdir, sha256_file(vdir / MANIFEST))
    edit_manifest(vdir, eos_id=3)  # edited by hand after publishing
    found = sha256_file(vdir / MANIFEST)
    for open_ in (lambda: Datastore(root), lambda: Datastore(root, version="v1"), lambda: Datastore(vdir)):
        with pytest.raises(DatastoreError, match=rf"manifest\.json checksum mismatch: sha256 {found}, CURRENT says"):
            open_()
    set_current(root, "v1")  # a deliberate re-publish records the manifest as it is now
    assert Datastore(root).eos_id == 3


def test_an_old_current_holding_the_id_alone_still_opens(root):
    vdir = root / "versions" / "v1"
    edit_manifest(vdir, eos_id=3)
    (root / CURRENT).write_text("v1\n")  # written before CURRENT carried checksums
    assert read_current(root) == "v1" and locate_version(root) == (vdir, None)
    assert Datastore(root).eos_id == 3


@pytest.mark.parametrize("line", ["v1 1234", "v1 " + "0" * 64 + " extra", "v1 " + "G" * 64])
def test_a_current_line_of_another_shape_is_refused_naming_it(root, line):
    (root / CURRENT).write_text(line + "\n")
    with pytest.raises(DatastoreError, match=r"CURRENT holds .*; expected one line '<version id> <sha256"):
        Datastore(root)
    with pytest.raises(DatastoreError, match="expected one line"):
        parse_current(line, "here")
    assert parse_current("v1\n", "here") == ("v1", None)


def test_a_version_id_with_whitespace_is_refused(root):
    with pytest.raises(DatastoreError, match="contains whitespace"):
        publish(root, make_parts(), make_manifest(), version="v 2")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_pin_and_rollback_record_the_checksum_of_the_version_they_name(tmp_path, where):
    root = str(tmp_path / "s") if where == "local" else f"memory://integrity-{uuid.uuid4().hex}/s"
    publish(root, make_parts(), make_manifest(), version="v1")
    publish(root, make_parts(seed=1), make_manifest(eos=5), version="v2")
    set_current(root, "v1")
    manifest = resolve(root).child("versions", "v1", MANIFEST).read_bytes()
    assert resolve(root).child(CURRENT).read_text() == f"v1 {hashlib.sha256(manifest).hexdigest()}\n"
    assert Datastore(root).version == "v1"


def remote_store(tmp_path, monkeypatch):
    """A memory:// root with v1, read through a fresh cache (no publisher's copy in it)."""
    uri = f"memory://integrity-{uuid.uuid4().hex}/ds"
    publish(uri, make_parts(), make_manifest(), version="v1")
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "reader-cache"))
    return uri


def test_a_fetch_damaged_in_transit_is_fetched_again(tmp_path, monkeypatch, caplog):
    uri = remote_store(tmp_path, monkeypatch)
    real, calls = integrity.fetch, []

    def damaging_once(location, into):
        out = real(location, into=into)
        calls.append(location)
        if len(calls) == 1:
            flip(into / "tokens.npy")
        return out

    monkeypatch.setattr(integrity, "fetch", damaging_once)
    with caplog.at_level(logging.WARNING, logger=integrity.__name__):
        store = Datastore(uri)
    assert len(calls) == 2 and store.version == "v1"
    assert "download 1 of 2 differs from its manifest (tokens.npy checksum mismatch" in caplog.text
    store.verify()  # the copy kept is the good one
    # No temporary download left (beside the entry: its lock, lease and last-use files).
    assert [p.name for p in store.path.parent.iterdir() if p.is_dir()] == ["v1"]


def test_a_stored_file_that_differs_from_its_manifest_fails_the_fetch_naming_it(tmp_path, monkeypatch):
    uri = remote_store(tmp_path, monkeypatch)
    loc = resolve(uri).child("versions", "v1", "index.faiss")
    data = bytearray(loc.read_bytes())
    data[-1] ^= 0xFF
    loc.write_bytes(bytes(data))
    with pytest.raises(DatastoreError, match=r"each of 2 downloads differs from its manifest: index\.faiss checksum "
                                             r"mismatch \(corrupt file\): sha256 [0-9a-f]{64}, manifest says"):
        Datastore(uri)
    assert not list((tmp_path / "reader-cache").rglob(MANIFEST))  # nothing unchecked is cached
    # A manifest changed in the store no longer matches CURRENT's checksum.
    mloc = resolve(uri).child("versions", "v1", MANIFEST)
    mloc.write_bytes(mloc.read_bytes().replace(b'"eos_id": 2', b'"eos_id": 4'))
    with pytest.raises(DatastoreError, match=r"manifest\.json checksum mismatch: sha256 [0-9a-f]{64}, CURRENT says"):
        Datastore(uri)


def test_verify_once_hashes_once_per_node_and_keeps_its_verdict(root, monkeypatch):
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    verify_once(Datastore(root))
    n_files = len(Datastore(root).manifest["files"])
    assert len(hashed) == n_files
    assert len(list((cache_root() / "verified").glob("*.json"))) == 1
    verify_once(Datastore(root))  # another process on this node: the marker spares the re-hash
    assert len(hashed) == n_files

    flip(root / "versions" / "v1" / "tokens.npy")  # damaged since: the marker is stale
    with pytest.raises(DatastoreError, match=r"full verification failed, so this version is not used: "
                                             r"tokens\.npy checksum mismatch"):
        verify_once(Datastore(root))
    assert len(hashed) == 2 * n_files
    with pytest.raises(DatastoreError, match=r"tokens\.npy checksum mismatch"):
        verify_once(Datastore(root))  # the verdict is kept too: refused without re-reading
    assert len(hashed) == 2 * n_files


def test_arrays_are_read_only(tmp_path):
    parts = make_parts()
    parts.deleted = np.zeros(len(parts.key_positions), dtype=bool)
    parts.deleted[0] = True
    publish(tmp_path / "s", parts, make_manifest(), version="v1")
    for mmap in (True, False):
        store = Datastore(tmp_path / "s", mmap=mmap)
        for name in ("tokens", "record_offsets", "key_positions", "deleted"):
            with pytest.raises(ValueError, match="read-only"):
                getattr(store, name)[0] = 1


def test_a_file_that_does_not_parse_is_named(root):
    vdir = root / "versions" / "v1"
    flip(vdir / "tokens.npy", at=1)  # inside the magic string: not an .npy header any more
    with pytest.raises(DatastoreError, match=r"tokens\.npy is unreadable \(a damaged header or content\): ValueError"):
        Datastore(root)


def test_find_damage_lists_every_mismatch_at_once(root):
    vdir = root / "versions" / "v1"
    assert find_damage(vdir, sha256_file(vdir / MANIFEST)) == []
    flip(vdir / "tokens.npy", at=1)
    data = (vdir / "index.faiss").read_bytes()
    (vdir / "index.faiss").write_bytes(data[: len(data) // 2])
    (vdir / "sources.json").unlink()
    damage = find_damage(vdir, "0" * 64)
    assert [(m.file, m.what) for m in damage] == [
        (MANIFEST, "manifest"), ("index.faiss", "size"), ("sources.json", "missing"), ("tokens.npy", "sha256"),
        ("tokens.npy", "unreadable")]
    assert damage[1] == Mismatch("index.faiss", "size", len(data), len(data) // 2)
    assert str(damage[1]) == f"index.faiss has {len(data) // 2} bytes, manifest says {len(data)}"
    (vdir / MANIFEST).write_text("{not json")
    assert [(m.file, m.what) for m in find_damage(vdir, None)] == [(MANIFEST, "unreadable")]
    # A hand-made entry without size or checksum is named, not a KeyError.
    entry = integrity.file_mismatches(vdir, {"record_offsets.npy": {"bytes": "12"}}, full=True)
    assert [(m.file, m.what) for m in entry] == [("record_offsets.npy", "entry")]


def test_token_ids_past_the_vocabulary_are_refused_naming_count_and_maximum(tmp_path):
    records = [[10, 11, 300, 13], [20, 500, 22]]
    publish(tmp_path / "s", make_parts(records), make_manifest(), version="v1")
    store = Datastore(tmp_path / "s")
    with pytest.raises(DatastoreError, match=r"2 token ids in tokens\.npy are outside the model's vocabulary of 272 "
                                             r"\(ids 0\.\.271\); the largest in the stream is 500"):
        store.check_compatible(dict(IDENTITY), "fmt-1")
    publish(tmp_path / "s", make_parts([[10, 11, 271, 13]]), make_manifest(), version="v2")
    Datastore(tmp_path / "s").check_compatible(dict(IDENTITY), "fmt-1")  # 271 is the last id: fine
    publish(tmp_path / "s", make_parts(), make_manifest(eos=272), version="v3")
    with pytest.raises(DatastoreError, match="its EOS id 272 is outside the model's vocabulary"):
        Datastore(tmp_path / "s").check_compatible(dict(IDENTITY), "fmt-1")


def test_token_id_check_streams_in_chunks(monkeypatch):
    monkeypatch.setattr(integrity, "_TOKEN_CHUNK", 3)
    tokens = np.array([1, 2, 3, 4, 900, 5, 6, 7, 901, -1], dtype=np.int64)
    with pytest.raises(DatastoreError, match=r"3 token ids .* largest in the stream is 901 and the smallest -1"):
        integrity.check_token_ids("s", tokens, 0, 100)
    integrity.check_token_ids("s", np.arange(100, dtype=np.uint32), 0, 100)


def test_an_unwritable_cache_root_costs_the_marker_not_the_check(root, monkeypatch):
    monkeypatch.setattr(integrity, "_writable", lambda folder: False)
    verify_once(Datastore(root))
    assert not (cache_root() / "verified").exists()
    flip(root / "versions" / "v1" / "tokens.npy")
    with pytest.raises(DatastoreError, match=r"tokens\.npy checksum mismatch"):
        verify_once(Datastore(root))
