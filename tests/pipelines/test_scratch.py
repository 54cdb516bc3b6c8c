"""The build's scratch folder (pipelines/scratch.py) on its own, no Ray: a local folder is
used in place; a URI is mirrored per node, pushed file by file with a completion marker
last, and pulled again only when a file's size changed."""

from __future__ import annotations

import hashlib

import pytest

import dresd.storage.files as files_mod
from dresd.storage.cache import cache_dir
from pipelines.scratch import Scratch


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    """This test's own cache root: a node's mirror of a URI scratch lives under it."""
    def use(name: str):
        monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / name))
    use("cache-a")
    return use


def test_a_local_scratch_is_used_in_place(tmp_path, node_cache):
    work = Scratch(str(tmp_path / "work"))
    assert not work.remote and work.path == tmp_path / "work"
    assert work.children("shards") == [] and not work.exists("shards")
    for name in ("b", "a", "c"):
        (work.path / "shards" / name).mkdir(parents=True)
    (work.path / "shards" / "a" / "meta.json").write_text("{}")
    assert work.children("shards") == ["a", "b", "c"]
    assert work.exists("shards/a/meta.json") and not work.exists("shards/b/meta.json")
    work.push("shards/a", last="meta.json")  # nothing to publish: no copy anywhere
    assert work.pull("shards/a") == work.path / "shards" / "a"
    assert not (tmp_path / "cache-a").exists()
    work.remove()
    assert not work.path.exists()


def test_a_uri_scratch_is_mirrored_under_the_nodes_cache(tmp_path, node_cache):
    loc = f"file://{tmp_path}/remote/build-1"
    work = Scratch(loc)
    assert work.remote
    assert work.path.parent.parent == cache_dir() / "scratch"  # <cache>/scratch/<node>/<location hash>
    assert work.path.name == hashlib.sha256(loc.encode()).hexdigest()[:16]
    assert Scratch(loc).path == work.path and Scratch(loc + "-other").path != work.path
    node_cache("cache-b")
    assert str(work.path).startswith(str(tmp_path / "cache-b"))  # another node: another mirror


def test_push_copies_files_with_the_marker_last(tmp_path, node_cache, monkeypatch):
    work = Scratch(f"file://{tmp_path}/remote/w")
    shard = work.path / "shards" / "s1"
    shard.mkdir(parents=True)
    for name in ("a.npy", "meta.json", "z.npy"):
        (shard / name).write_text(name)
    (shard / "sub").mkdir()  # folders are not part of a shard push
    order = []
    real = files_mod.Location.upload_file
    monkeypatch.setattr(files_mod.Location, "upload_file",
                        lambda self, local: order.append(local.name) or real(self, local))
    work.push("shards/s1", last="meta.json")
    assert order == ["a.npy", "z.npy", "meta.json"]
    remote = tmp_path / "remote" / "w" / "shards" / "s1"
    assert sorted(p.name for p in remote.iterdir()) == ["a.npy", "meta.json", "z.npy"]
    assert (remote / "z.npy").read_text() == "z.npy"
    assert work.exists("shards/s1/meta.json") and work.children("shards") == ["s1"]
    (work.path / "trained.faiss").write_text("index")
    work.push("trained.faiss")  # a single file
    assert (tmp_path / "remote" / "w" / "trained.faiss").read_text() == "index"


def test_pull_fetches_missing_files_and_refreshes_only_on_a_size_change(tmp_path, node_cache):
    remote = tmp_path / "remote" / "w"
    (remote / "shards" / "s1" / "deeper").mkdir(parents=True)
    (remote / "shards" / "s1" / "hidden.npy").write_text("1234")
    (remote / "shards" / "s1" / "meta.json").write_text("{}")
    (remote / "shards" / "s1" / "deeper" / "x").write_text("x")
    work = Scratch(f"file://{remote}")
    local = work.pull("shards/s1")
    assert local == work.path / "shards" / "s1"
    assert sorted(p.name for p in local.iterdir()) == ["hidden.npy", "meta.json"]  # files, not subfolders
    assert (local / "hidden.npy").read_text() == "1234"

    # Names say what a file depends on, so a same-size local copy is trusted as is ...
    (local / "hidden.npy").write_text("abcd")
    assert work.pull("shards/s1/hidden.npy").read_text() == "abcd"
    # ... and a re-embedded (resized) file is fetched again.
    (remote / "shards" / "s1" / "hidden.npy").write_text("123456")
    assert work.pull("shards/s1/hidden.npy").read_text() == "123456"
    (remote / "shards" / "s1" / "meta.json").write_text('{"keys": 3}')
    work.pull("shards/s1")
    assert (local / "meta.json").read_text() == '{"keys": 3}'
    assert sorted(p.name for p in local.iterdir()) == ["hidden.npy", "meta.json"]  # no temp files left

    work.remove()
    assert not remote.exists() and not work.path.exists()


def test_remove_drops_every_mirror_on_this_machine(tmp_path, node_cache):
    # A killed run's Ray node had another id, so its mirror sits beside this node's.
    work = Scratch(f"file://{tmp_path}/remote/build-1")
    other = Scratch(f"file://{tmp_path}/remote/build-2")
    (work.path / "shards").mkdir(parents=True)
    (other.path / "shards").mkdir(parents=True)
    dead = cache_dir() / "scratch" / "deadnode1234" / work.path.name
    (dead / "shards").mkdir(parents=True)
    (tmp_path / "remote" / "build-1").mkdir(parents=True)
    work.remove()
    assert not work.path.exists() and not dead.exists() and not (tmp_path / "remote" / "build-1").exists()
    assert other.path.is_dir()  # another location's mirror stays
