"""Tests for dresd.datastore.prune: old versions removed, CURRENT and newer ones kept."""

from __future__ import annotations

import uuid

import pytest

from dresd.datastore.prune import age_order, prune_versions
from dresd.datastore.store import Datastore, DatastoreError, list_versions, read_current
from dresd.datastore.publish import publish, set_current
from tests_support import make_manifest, make_parts


def publish_chain(root, names):
    """Publish `names` in order, each naming the one before as its parent (as updates do)."""
    parent = None
    for name in names:
        manifest = make_manifest()
        if parent:
            manifest["parent"] = parent
        publish(root, make_parts(), manifest, version=name)
        parent = name


def test_prune_keeps_the_newest_up_to_current_and_removes_the_rest(tmp_path):
    # Names that sort against their age: made within one second, so the parent links decide.
    publish_chain(tmp_path, ["z-build", "y-delete", "x-compact"])
    report = prune_versions(tmp_path, keep=2)
    assert report.removed == ["z-build"] and report.kept == ["y-delete", "x-compact"]
    assert list_versions(tmp_path) == ["x-compact", "y-delete"] and read_current(tmp_path) == "x-compact"
    assert not (tmp_path / "versions" / "z-build").exists()
    assert Datastore(tmp_path).version == "x-compact"
    assert prune_versions(tmp_path, keep=1).removed == ["y-delete"]
    assert list_versions(tmp_path) == ["x-compact"]
    assert prune_versions(tmp_path, keep=1).removed == []  # nothing left to remove


def test_versions_newer_than_current_are_kept(tmp_path):
    publish_chain(tmp_path, ["a", "b", "c"])
    set_current(tmp_path, "b")  # rolled back: c is newer than CURRENT (or a publish in progress)
    report = prune_versions(tmp_path, keep=1)
    assert report.removed == ["a"] and report.kept == ["b", "c"]
    assert list_versions(tmp_path) == ["b", "c"]


def test_age_is_creation_time_first_then_parent_links_then_id():
    manifests = {
        "old": {"created_at": "2024-01-01T00:00:00+0000"},
        "child": {"created_at": "2024-01-02T00:00:00+0000", "parent": "parent"},
        "parent": {"created_at": "2024-01-02T00:00:00+0000"},
        "later-elsewhere": {"created_at": "2024-01-02T01:30:00+0100"},  # 00:30 UTC: after both
        "loop-a": {"created_at": "2024-01-03T00:00:00+0000", "parent": "loop-b"},
        "loop-b": {"created_at": "2024-01-03T00:00:00+0000", "parent": "loop-a"},
        "no-date": {},
    }
    order = age_order(manifests)
    assert order[:5] == ["no-date", "old", "parent", "child", "later-elsewhere"]
    assert set(order[5:]) == {"loop-a", "loop-b"}  # a parent loop ends, in some order


def test_prune_refuses_bad_keep_and_roots_without_a_usable_current(tmp_path):
    for keep in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="keep must be"):
            prune_versions(tmp_path, keep)
    with pytest.raises(DatastoreError, match="no CURRENT"):
        prune_versions(tmp_path, 1)
    publish_chain(tmp_path, ["a", "b"])
    (tmp_path / "CURRENT").write_text("gone\n")
    with pytest.raises(DatastoreError, match="'gone', which is missing"):
        prune_versions(tmp_path, 1)
    assert list_versions(tmp_path) == ["a", "b"]  # nothing removed


def test_a_version_folder_symlinked_elsewhere_loses_only_its_link(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    publish_chain(outside, ["ext"])
    publish_chain(root, ["old"])
    (root / "versions" / "ext").symlink_to(outside / "versions" / "ext")
    manifest = make_manifest()
    manifest["parent"] = "ext"
    publish(root, make_parts(), manifest, version="new")
    # "ext" and "old" are older than "new"; the link goes, the folder it points at stays.
    assert sorted(prune_versions(root, keep=1).removed) == ["ext", "old"]
    assert not (root / "versions" / "ext").exists() and (outside / "versions" / "ext" / "manifest.json").is_file()


def test_prune_through_a_uri_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    root = f"memory://prune-{uuid.uuid4().hex}"
    publish_chain(root, ["a", "b"])
    assert prune_versions(root, keep=1).removed == ["a"]
    assert list_versions(root) == ["b"] and Datastore(root).version == "b"
    assert prune_versions(root, keep=1).lines()[1] == "removed 0 version(s): -"


def test_pinned_versions_are_kept_and_reported(tmp_path):
    from dresd.storage.pins import pin

    publish_chain(tmp_path, ["a", "b", "c", "d"])
    (tmp_path / "SERVE_PIN").write_text("a\n")
    pin(str(tmp_path), "pool-1234", "b")
    report = prune_versions(tmp_path, keep=1)
    assert report.removed == ["c"] and report.kept == ["a", "b", "d"]
    assert report.pinned == {"a": ["SERVE_PIN"], "b": ["pins/pool-1234"]}
    assert report.lines()[-1] == "kept for their pins: a (SERVE_PIN), b (pins/pool-1234)"
    (tmp_path / "SERVE_PIN").unlink()
    assert prune_versions(tmp_path, keep=1).removed == ["a"]
    assert prune_versions(tmp_path, keep=1).pinned == {"b": ["pins/pool-1234"]}
