"""Tests for dresd.datastore.publish: versions written whole, CURRENT moved after, key
positions stored compactly, nothing left by a failed publish, URI roots."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import dresd.datastore.publish as publish_mod
import dresd.datastore.store as datastore_mod
from dresd.storage.files import resolve, sha256_file
from dresd.datastore.store import (CURRENT, MANIFEST, Datastore, DatastoreError, list_versions, read_current,
                                   resolve_version_dir)
from dresd.datastore.publish import publish, set_current
from tests_support import EOS, RECORDS, VALUE_LEN, make_manifest, make_parts


def test_publish_writes_version_and_moves_current(root):
    vdir = root / "versions" / "v1"
    # CURRENT: the id, then the sha256 of the manifest it names (checked when that is read).
    assert (root / CURRENT).read_text() == f"v1 {sha256_file(vdir / MANIFEST)}\n"
    assert sorted(p.name for p in vdir.iterdir()) == sorted(
        [MANIFEST, "compressor.npz", "index.faiss", "tokens.npy", "record_offsets.npy", "key_starts.npy",
         "sources.json"]
    )
    store = Datastore(root)
    assert store.path == vdir
    assert store.version == "v1"
    assert store.num_keys == 4 + 2 + 3
    np.testing.assert_array_equal(store.key_positions, [0, 1, 2, 3, 5, 6, 8, 9, 10])
    assert store.eos_id == EOS and store.value_len == VALUE_LEN
    assert store.index.ntotal == store.num_keys
    assert store.compressor.out_dim == 8 and store.compressor.in_dim == 16
    m = store.manifest
    assert m["format_version"] == datastore_mod.FORMAT_VERSION
    assert m["counts"] == {"records": 3, "tokens": 12, "keys": 9}
    assert set(m["files"]) == {p.name for p in vdir.iterdir()} - {MANIFEST}
    assert json.loads((vdir / "sources.json").read_text()) == ["src-0", "src-1", "src-2"]
    np.testing.assert_array_equal(store.tokens, np.concatenate(RECORDS))
    store.verify()  # fresh store: all checksums match
    # No temporary leftovers.
    assert [p.name for p in (root / "versions").iterdir()] == ["v1"]
    assert not any(p.name.endswith(".tmp") for p in root.iterdir())


def test_second_publish_moves_current_and_rollback(root):
    records2 = [[40, 41, 42, 43, 44, 45]]
    v2 = publish(root, make_parts(records2, seed=1), make_manifest(), version="v2")
    assert v2 == root / "versions" / "v2"
    assert read_current(root) == "v2"
    assert list_versions(root) == ["v1", "v2"]
    store = Datastore(root)
    assert store.version == "v2"
    np.testing.assert_array_equal(store.values(np.array([0])), [[41, 42, 43, 44]])
    # The old version is untouched and still complete.
    Datastore(root, version="v1", verify=True)
    # Roll back.
    set_current(root, "v1")
    assert Datastore(root).version == "v1"
    np.testing.assert_array_equal(Datastore(root).values(np.array([0])), [[11, 12, 13, 14]])
    with pytest.raises(DatastoreError, match="missing or incomplete"):
        set_current(root, "v3")
    assert Datastore(root).version == "v1"


def test_versions_are_immutable(root):
    before = (root / "versions" / "v1" / "tokens.npy").read_bytes()
    with pytest.raises(DatastoreError, match="already exists"):
        publish(root, make_parts([[1, 2, 3]]), make_manifest(), version="v1")
    assert (root / "versions" / "v1" / "tokens.npy").read_bytes() == before
    assert list_versions(root) == ["v1"]


def test_default_version_names_are_unique_and_sorted(tmp_path):
    a = publish(tmp_path, make_parts(), make_manifest())
    b = publish(tmp_path, make_parts(), make_manifest())
    assert a.name != b.name
    assert set(list_versions(tmp_path)) == {a.name, b.name}
    assert Datastore(tmp_path).version == b.name


def test_failed_publish_leaves_no_trace(root, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(publish_mod.faiss, "write_index", boom)
    with pytest.raises(OSError, match="disk full"):
        publish(root, make_parts(), make_manifest(), version="v2")
    assert [p.name for p in (root / "versions").iterdir()] == ["v1"]
    assert read_current(root) == "v1"


@pytest.mark.parametrize("records,positions,derivable", [
    (RECORDS, [2, 3, 6, 9, 10], True),  # keys start later in each record (after a template head)
    ([[1], [2, 3, 4], [5, 6]], [2, 4], True),  # a one-token record holds no key
    (RECORDS, [0, 2, 3, 5, 6], False),  # a gap inside a record
    (RECORDS, [0, 1, 2, 3, 4], False),  # a key on a record's last token (no next token)
])
def test_key_positions_stored_as_per_record_starts_when_derivable(tmp_path, records, positions, derivable):
    publish(tmp_path / "s", make_parts(records, positions), make_manifest(), version="v1")
    names = {p.name for p in (tmp_path / "s" / "versions" / "v1").iterdir()}
    assert ("key_starts.npy" in names) == derivable and ("key_positions.npy" in names) != derivable
    store = Datastore(tmp_path / "s")
    np.testing.assert_array_equal(store.key_positions, positions)


def test_half_written_tmp_folder_not_listed_nor_openable(root):
    # A publish that crashed mid-write leaves versions/.tmp-<id> without a manifest.
    shutil.copytree(root / "versions" / "v1", root / "versions" / ".tmp-v2")
    (root / "versions" / ".tmp-v2" / MANIFEST).unlink()
    (root / "versions" / "v3").mkdir()  # an empty (never completed) folder too
    assert list_versions(root) == ["v1"]
    for name in (".tmp-v2", "v3"):
        with pytest.raises(DatastoreError, match="missing or incomplete"):
            Datastore(root, version=name)
        with pytest.raises(DatastoreError):
            set_current(root, name)
        with pytest.raises(DatastoreError):
            resolve_version_dir(root, name)
    assert Datastore(root).version == "v1"
    # Crashed between writing the manifest and the rename: still never listed.
    shutil.copytree(root / "versions" / "v1", root / "versions" / ".tmp-v4")
    assert list_versions(root) == ["v1"]


def test_publish_and_open_through_a_uri_root(tmp_path, monkeypatch):
    """A datastore root behind a URI (fsspec memory://, no renames): publish, list, open,
    roll back; a version whose manifest is not uploaded yet is never readable."""
    import uuid

    from dresd.datastore.store import list_versions, read_current, version_manifest

    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    root = f"memory://stores-{uuid.uuid4().hex}/ds"
    v1 = publish(root, make_parts(), make_manifest(), version="v1")
    assert v1 == f"{root}/versions/v1" and read_current(root) == "v1"
    publish(root, make_parts(seed=1), make_manifest(), version="v2")
    assert list_versions(root) == ["v1", "v2"] and read_current(root) == "v2"
    assert version_manifest(root, "v1")["counts"]["keys"] == 9
    with pytest.raises(DatastoreError, match="immutable"):
        publish(root, make_parts(), make_manifest(), version="v1")

    store = Datastore(root, verify=True)  # fetched into the local cache, checksums re-checked
    assert store.version == "v2" and str(store.path).startswith(str(tmp_path / "cache"))
    np.testing.assert_array_equal(store.tokens, np.concatenate(RECORDS))
    assert Datastore(f"{root}/versions/v1").version == "v1"  # a version folder's URI

    set_current(root, "v1")  # roll back
    assert Datastore(root).version == "v1"
    # An upload in progress (data files there, manifest not yet): invisible and unpinnable.
    loc = resolve(root).child("versions", "v3")
    loc.child("tokens.npy").write_bytes(b"partial")
    assert list_versions(root) == ["v1", "v2"]
    with pytest.raises(DatastoreError, match="missing or incomplete"):
        set_current(root, "v3")
    with pytest.raises(DatastoreError, match="missing or incomplete"):
        Datastore(root, version="v3")
    with pytest.raises(DatastoreError, match="not a datastore"):
        Datastore(f"memory://empty-{uuid.uuid4().hex}")
