"""Debris of killed publishes: the next publish removes what dead publishers left (their
claims are free), never what a live one is writing, never a version that was once current.

A dead publisher is simulated in-process by a claim left unsettled: leaving the `with`
closes its lock as a killed process's exit would. tests/test_kill_points.py kills real ones.
"""

from __future__ import annotations

import shutil

import pytest

import dresd.datastore.publish as publish_mod
import dresd.datastore.store as store_mod
from dresd.datastore.debris import clean_remote, clean_root, publishing, tmp_folder, uploading, uploads_folder
from dresd.datastore.store import CURRENT, list_versions, read_current
from dresd.datastore.publish import publish
from dresd.storage.cache import cache_dir
from dresd.storage.claims import claim, claimed_names
from dresd.storage.files import resolve
from tests_support import make_manifest, make_parts


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "store"
    publish(r, make_parts(), make_manifest(), version="v1")
    return r


def _dead_orphan(root, version: str) -> None:
    """A publisher killed after its version's rename, before the CURRENT swap."""
    with publishing(root, version):
        shutil.copytree(root / "versions" / "v1", root / "versions" / version)


def test_a_version_never_made_current_is_removed_by_the_next_publish(root, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the swap")

    monkeypatch.setattr(publish_mod, "set_current", killed)
    with pytest.raises(KeyboardInterrupt):
        publish(root, make_parts(seed=1), make_manifest(), version="v2")
    monkeypatch.undo()
    assert list_versions(root) == ["v1", "v2"] and read_current(root) == "v1"
    assert claimed_names(root / "versions") == ["v2"]  # its claim stayed, its lock died with it
    publish(root, make_parts(seed=2), make_manifest(), version="v3")
    assert list_versions(root) == ["v1", "v3"] and read_current(root) == "v3"
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v1", "v3"]


def test_a_rerun_with_the_same_version_id_replaces_its_dead_orphan(root):
    _dead_orphan(root, "v2")
    publish(root, make_parts(seed=1), make_manifest(), version="v2")
    assert list_versions(root) == ["v1", "v2"] and read_current(root) == "v2"
    assert store_mod.Datastore(root).sources == make_parts(seed=1).sources


def test_half_written_folders_and_trash_go_and_once_current_versions_stay(root):
    publish(root, make_parts(seed=1), make_manifest(), version="v2")  # v1 was current: kept for rollback
    with publishing(root, "v3"):
        tmp_folder(root, "v3").mkdir()  # killed mid-write
    tmp_folder(root, "old").mkdir()  # left by a publisher older than claims: no marker at all
    (root / "versions" / ".trash-v0-abc123").mkdir()  # a cleaner killed mid-removal
    assert sorted(clean_root(root)) == [".tmp-old", ".tmp-v3"]
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v1", "v2"]
    assert read_current(root) == "v2"


def test_a_live_publishers_folders_are_never_removed(root):
    with publishing(root, "v2"), publishing(root, "v3"):
        tmp_folder(root, "v2").mkdir()  # still writing
        shutil.copytree(root / "versions" / "v1", root / "versions" / "v3")  # renamed, about to swap
        assert clean_root(root) == []
        assert (tmp_folder(root, "v2")).is_dir() and (root / "versions" / "v3").is_dir()


def test_an_unsettled_version_that_current_names_is_kept(root):
    # Killed after its swap, before settling: it is current, so it is no debris.
    with publishing(root, "v1"):
        pass
    assert clean_root(root) == []
    assert list_versions(root) == ["v1"] and claimed_names(root / "versions") == []


def test_a_uri_roots_dead_staging_and_uploads_are_removed_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"file://{tmp_path / 'remote'}"
    publish(uri, make_parts(), make_manifest(), version="v1")
    staging = cache_dir() / "staging"
    with claim(staging, "dead"):
        (staging / "dead").mkdir()  # a publisher killed while writing its local copy
    with uploading(uri, "v2"):  # killed mid-upload: some files, no manifest
        resolve(uri).child("versions", "v2", "tokens.npy").write_bytes(b"partial")
    with claim(staging, "live"), uploading(uri, "v3"):
        (staging / "live").mkdir()
        resolve(uri).child("versions", "v3", "tokens.npy").write_bytes(b"partial")
        removed = clean_remote(uri)
        assert sorted(removed) == [str(staging / "dead"), f"{uri}/versions/v2"]
        assert (staging / "live").is_dir() and resolve(uri).child("versions", "v3").exists()
    publish(uri, make_parts(seed=1), make_manifest(), version="v4")  # cleans the now-dead v3 first
    assert not resolve(uri).child("versions", "v3").exists()
    assert sorted(p.name for p in (tmp_path / "remote" / "versions").iterdir()) == ["v1", "v4"]
    assert [p.name for p in staging.iterdir()] == [] and claimed_names(uploads_folder(uri)) == []
    assert (tmp_path / "remote" / CURRENT).read_text().split()[0] == "v4"
