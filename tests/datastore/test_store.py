"""Tests for dresd.datastore.store: versioned publish, CURRENT pointer, values, integrity checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dresd.datastore.store as datastore_mod
from dresd.storage.files import sha256_file
from dresd.datastore.store import (CURRENT, MANIFEST, Datastore, DatastoreError, list_versions)
from dresd.datastore.publish import publish, set_current
from tests_support import EOS, IDENTITY, RECORDS, VALUE_LEN, make_manifest, make_parts

def test_open_version_folder_directly_and_by_name(root):
    assert Datastore(root / "versions" / "v1").version == "v1"
    assert Datastore(root, version="v1").version == "v1"
    with pytest.raises(DatastoreError, match="missing or incomplete"):
        Datastore(root, version="v9")
    with pytest.raises(DatastoreError, match="not a datastore"):
        Datastore(root.parent)


@pytest.mark.parametrize("mmap", [True, False])
def test_values_cut_at_record_end_and_eos_padded(root, mmap):
    store = Datastore(root, mmap=mmap)
    # key_positions: [0, 1, 2, 3, 5, 6, 8, 9, 10]
    np.testing.assert_array_equal(store.key_positions, [0, 1, 2, 3, 5, 6, 8, 9, 10])
    vals = store.values(np.array([0, 2, 3, 4, 5, 7]))
    assert vals.shape == (6, VALUE_LEN)
    expected = [
        [11, 12, 13, 14],  # pos 0: whole record ahead
        [13, 14, EOS, EOS],  # pos 2: record 0 ends after 14
        [14, EOS, EOS, EOS],  # pos 3: last key of record 0
        [21, 22, EOS, EOS],  # pos 5: record 1 (not record 2's 30, 31)
        [22, EOS, EOS, EOS],  # pos 6
        [32, 33, EOS, EOS],  # pos 9: record 2 ends at the stream's end
    ]
    np.testing.assert_array_equal(vals, expected)
    # An explicit length overrides value_len (shorter and longer).
    np.testing.assert_array_equal(store.values(np.array([0]), 2), [[11, 12]])
    np.testing.assert_array_equal(store.values(np.array([0]), 6), [[11, 12, 13, 14, EOS, EOS]])


def test_values_at_record_last_token_and_stream_end(tmp_path):
    # Keys on each record's last token (and the stream's very last) have only padding.
    parts = make_parts(key_positions=[4, 7, 11, 0])
    publish(tmp_path, parts, make_manifest(), version="v1")
    vals = Datastore(tmp_path).values(np.arange(4))
    np.testing.assert_array_equal(vals[:3], np.full((3, VALUE_LEN), EOS))
    np.testing.assert_array_equal(vals[3], [11, 12, 13, 14])


def test_list_versions_of_missing_root(tmp_path):
    assert list_versions(tmp_path / "nothing") == []


def test_corrupted_file_fails_verify_naming_it(root):
    path = root / "versions" / "v1" / "tokens.npy"
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # flip the last token's bytes
    path.write_bytes(bytes(data))
    store = Datastore(root)  # opening checks sizes only: same size, opens
    with pytest.raises(DatastoreError, match=r"tokens\.npy checksum mismatch"):
        store.verify()
    with pytest.raises(DatastoreError, match=r"tokens\.npy checksum mismatch"):
        Datastore(root, verify=True)


def test_truncated_file_fails_on_open(root):
    path = root / "versions" / "v1" / "index.faiss"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatastoreError, match=rf"index\.faiss has {len(data) // 2} bytes, manifest says {len(data)}"):
        Datastore(root)


def test_missing_file_fails_on_open(root):
    (root / "versions" / "v1" / "compressor.npz").unlink()
    with pytest.raises(DatastoreError, match=r"compressor\.npz listed in the manifest is missing"):
        Datastore(root)


def test_format_1_store_with_key_positions_file_still_opens(root):
    vdir = root / "versions" / "v1"
    starts = np.load(vdir / "key_starts.npy")
    (vdir / "key_starts.npy").unlink()
    positions = datastore_mod.derive_key_positions(np.load(vdir / "record_offsets.npy"), starts)
    np.save(vdir / "key_positions.npy", positions.astype(np.uint32))
    m = json.loads((vdir / MANIFEST).read_text())
    m["format_version"] = 1
    del m["files"]["key_starts.npy"]
    m["files"]["key_positions.npy"] = {"bytes": (vdir / "key_positions.npy").stat().st_size,
                                       "sha256": sha256_file(vdir / "key_positions.npy")}
    (vdir / MANIFEST).write_text(json.dumps(m))
    (root / CURRENT).write_text("v1\n")  # as format 1 wrote it: the id alone, no manifest checksum
    store = Datastore(root, verify=True)
    np.testing.assert_array_equal(store.key_positions, positions)
    np.testing.assert_array_equal(store.values([0], 3), [[11, 12, 13]])


def test_unknown_format_version_refused(root):
    mpath = root / "versions" / "v1" / MANIFEST
    m = json.loads(mpath.read_text())
    m["format_version"] = 99
    mpath.write_text(json.dumps(m))
    set_current(root, "v1")  # published whole by a newer DReSD: CURRENT records this manifest
    with pytest.raises(DatastoreError, match="format version 99"):
        Datastore(root)


def test_check_compatible(root):
    store = Datastore(root)
    store.check_compatible(dict(IDENTITY), "fmt-1")
    store.check_compatible(dict(IDENTITY))  # no format given: only the model is checked
    other = dict(IDENTITY, name="other-model", fingerprint="zzz")
    with pytest.raises(DatastoreError, match="tiny-model") as exc:
        store.check_compatible(other, "fmt-1")
    assert "other-model" in str(exc.value)
    # Same name, different weights: the fingerprint gives it away.
    with pytest.raises(DatastoreError, match="fingerprint"):
        store.check_compatible(dict(IDENTITY, fingerprint="zzz"), "fmt-1")
    with pytest.raises(DatastoreError, match="hidden_size"):
        store.check_compatible(dict(IDENTITY, hidden_size=32), "fmt-1")
    with pytest.raises(DatastoreError, match="prompt format 'chat'"):
        store.check_compatible(dict(IDENTITY), "fmt-2")


def test_deleted_records_and_live_records_follow_the_tombstones(tmp_path):
    parts = make_parts()
    publish(tmp_path / "a", parts, make_manifest(), version="v1")
    whole = Datastore(tmp_path / "a")
    assert whole.deleted_records().tolist() == [False, False, False] and list(whole.live_records()) == RECORDS
    # Tombstones on the middle record's keys (positions 5 and 6 of the stream).
    parts.deleted = np.isin(parts.key_positions, [5, 6])
    publish(tmp_path / "b", parts, make_manifest(), version="v1")
    store = Datastore(tmp_path / "b")
    assert store.deleted_records().tolist() == [False, True, False]
    assert list(store.live_records()) == [RECORDS[0], RECORDS[2]]
    assert list(store.records()) == RECORDS  # the stream itself keeps them until compaction


def test_an_open_uri_version_is_leased_and_current_stays_cached(tmp_path, monkeypatch):
    """The node cache's bound (dresd.storage.eviction) never takes a version a Datastore has
    open, nor the one CURRENT names; a closed, older version is evicted like any entry."""
    import gc
    import uuid

    from dresd.storage.eviction import cache_entries, evict

    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    root = f"memory://leased-{uuid.uuid4().hex}"
    for name in ("v1", "v2"):
        publish(root, make_parts(), make_manifest(), version=name)
    old, current = Datastore(root, "v1"), Datastore(root)
    assert current.version == "v2" and sorted(e.path.name for e in cache_entries()) == ["v1", "v2"]
    report = evict(0)
    assert report.evicted == [] and {e.path.name: why.split(" ")[0] for e, why in report.kept} == {
        "v1": "in", "v2": "CURRENT"}  # v1: "in use by pid ..."
    assert old.values(np.array([0])).shape == (1, VALUE_LEN)
    del old, current
    gc.collect()
    assert [e.path.name for e in evict(0).evicted] == ["v1"]
    assert [e.path.name for e in cache_entries()] == ["v2"]
    assert Datastore(root, "v1").version == "v1"  # fetched again when asked for


def test_a_store_is_reused_only_for_its_own_build_config(tmp_path):
    """reusable_store: the same BuildConfig reuses the store, a field that changes what is
    written does not, and a decode-time speed switch (dresd.datastore.store.DECODE_ONLY_MODEL_FIELDS)
    never forces a rebuild."""
    from dataclasses import replace

    from dresd.config import BuildConfig, ModelConfig, to_dict
    from dresd.datastore.store import reusable_store

    built = BuildConfig(model=ModelConfig(dual_layout=True), output=str(tmp_path / "store"))
    manifest = {**make_manifest(), "build_config": to_dict(built)}
    publish(tmp_path / "store", make_parts(), manifest, version="v1")
    assert reusable_store(tmp_path / "store", built)
    assert reusable_store(tmp_path / "store", replace(built, model=ModelConfig(dual_layout="auto", weight_codes=False)))
    assert not reusable_store(tmp_path / "store", replace(built, value_len=built.value_len + 1))
    assert not reusable_store(tmp_path / "store", replace(built, model=ModelConfig(dual_layout="auto", dtype="bfloat16")))
    assert not reusable_store(tmp_path / "missing", built)
