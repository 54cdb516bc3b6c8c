"""Crafted datastores are refused with an error naming the problem (issue 25): version ids and
manifest file names are plain names, a manifest's version is its folder's name, no symlink
leads out of the root, and every cache folder named after a store stays in the cache root."""

from __future__ import annotations

import json
import shutil
import uuid
from types import SimpleNamespace

import pytest

from dresd.datastore.store import CURRENT, MANIFEST, Datastore, DatastoreError, resolve_version_dir, version_manifest
from dresd.datastore.publish import publish, set_current
from dresd.drafters.registry import derived_dir
from dresd.storage.cache import cache_root, inside_cache
from dresd.storage.files import resolve
from tests_support import make_manifest, make_parts


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "store"
    publish(r, make_parts(), make_manifest(), version="v1")
    return r


def edit_manifest(root, **changes):
    path = root / "versions" / "v1" / MANIFEST
    m = json.loads(path.read_text())
    for key, change in changes.items():
        change(m[key]) if callable(change) else m.__setitem__(key, change)
    path.write_text(json.dumps(m))
    set_current(root, "v1")  # crafted whole, not damaged later: CURRENT records this manifest


@pytest.mark.parametrize("bad,problem", [
    ("../x", r"the manifest lists file '\.\./x', whose name climbs out of its folder \('\.\.'\)"),
    ("/etc/passwd", r"the manifest lists file '/etc/passwd', whose name is an absolute path"),
    ("sub/tokens.npy", r"the manifest lists file 'sub/tokens\.npy', whose name contains a path separator"),
])
def test_manifest_file_names_must_be_plain(root, bad, problem):
    edit_manifest(root, files=lambda files: files.update({bad: {"bytes": 1, "sha256": "0" * 64}}))
    with pytest.raises(DatastoreError, match=problem):
        Datastore(root)


def test_a_file_symlinked_outside_the_root_is_refused(root, tmp_path):
    vdir = root / "versions" / "v1"
    outside = tmp_path / "elsewhere.npy"
    shutil.copyfile(vdir / "tokens.npy", outside)  # same bytes: only where it lives is wrong
    (vdir / "tokens.npy").unlink()
    (vdir / "tokens.npy").symlink_to(outside)
    with pytest.raises(DatastoreError, match=rf"file tokens\.npy is a symlink leading outside {root} \(to {outside}\)"):
        Datastore(root)


def test_a_symlink_that_stays_inside_the_root_is_fine(root):
    # e.g. two versions sharing one unchanged file
    publish(root, make_parts(), make_manifest(), version="v2")
    v2 = root / "versions" / "v2"
    (v2 / "tokens.npy").unlink()
    (v2 / "tokens.npy").symlink_to(root / "versions" / "v1" / "tokens.npy")
    assert Datastore(root, verify=True).version == "v2"


def test_a_version_folder_symlinked_outside_the_root_is_refused(root, tmp_path):
    shutil.copytree(root / "versions" / "v1", tmp_path / "outside-v2")
    m = json.loads((tmp_path / "outside-v2" / MANIFEST).read_text())
    (tmp_path / "outside-v2" / MANIFEST).write_text(json.dumps(dict(m, version="v2")))
    (root / "versions" / "v2").symlink_to(tmp_path / "outside-v2")
    with pytest.raises(DatastoreError, match="version folder v2 is a symlink leading outside"):
        Datastore(root, version="v2")
    with pytest.raises(DatastoreError, match="version folder v2 is a symlink leading outside"):
        set_current(root, "v2")


def test_manifest_version_must_be_its_folder_name(root):
    edit_manifest(root, version="v0")
    with pytest.raises(DatastoreError, match="its manifest says version 'v0', not its folder's name 'v1'"):
        Datastore(root)
    # A version folder copied under another name is refused too.
    shutil.copytree(root / "versions" / "v1", root / "versions" / "v9")
    with pytest.raises(DatastoreError, match="says version 'v0', not its folder's name 'v9'"):
        Datastore(root, version="v9")


@pytest.mark.parametrize("current,problem", [
    ("../..", r"CURRENT names version id '\.\./\.\.', which climbs out of its folder"),
    ("../v1", r"CURRENT names version id '\.\./v1', which climbs out of its folder"),
    ("/etc", r"CURRENT names version id '/etc', which is an absolute path"),
    ("v1/../v1", r"CURRENT names version id 'v1/\.\./v1', which climbs out"),
    ("versions/v1", r"CURRENT names version id 'versions/v1', which contains a path separator"),
])
def test_current_must_name_a_plain_version_id(root, current, problem):
    (root / CURRENT).write_text(current + "\n")
    with pytest.raises(DatastoreError, match=problem):
        Datastore(root)
    with pytest.raises(DatastoreError, match=problem):
        resolve_version_dir(root)


@pytest.mark.parametrize("version", ["../v1", "/tmp/v1", "a/b"])
def test_asked_for_version_ids_are_checked_everywhere(root, version):
    for call in (lambda: Datastore(root, version=version), lambda: set_current(root, version),
                 lambda: version_manifest(root, version),
                 lambda: publish(root, make_parts(), make_manifest(), version=version)):
        with pytest.raises(DatastoreError, match=rf"version id '{version}', which "):
            call()
    assert not any((root.parent / p).exists() for p in ("v1", "b"))


def test_a_uri_root_checks_current_before_fetching(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"memory://untrusted-{uuid.uuid4().hex}/ds"
    publish(uri, make_parts(), make_manifest(), version="v1")
    resolve(uri).child(CURRENT).write_bytes(b"../../escape\n")
    with pytest.raises(DatastoreError, match=r"CURRENT names version id '\.\./\.\./escape', which climbs out"):
        Datastore(uri)
    assert not (tmp_path / "cache" / "escape").exists()


def test_derived_cache_folders_stay_in_the_cache_root(root, tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    store = Datastore(root)
    assert derived_dir(store).parent == cache_root() / "derived"
    # The folder name comes from the manifest's checksum: a crafted one cannot climb out.
    crafted = SimpleNamespace(path=store.path, version="v1", manifest={"files": {"tokens.npy": {"sha256": "/../../../x"}}})
    with pytest.raises(ValueError, match=r"derived cache folder name 'v1-/\.\./\.\./\.\./x', which climbs out"):
        derived_dir(crafted)
    # A symlinked cache folder leading out of the cache root is refused as well.
    (tmp_path / "cache" / "derived").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "derived" / "v1-link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match=r"what: cache folder .*v1-link is a symlink leading outside"):
        inside_cache(cache_root() / "derived" / "v1-link", "what")
