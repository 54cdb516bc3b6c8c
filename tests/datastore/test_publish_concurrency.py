"""Concurrent publishers on one root never lose a change (issue 25): CURRENT moves by
compare-and-swap under a lock (dresd.storage.pointer), and the fault hook
DRESD_FAULT=before_current_swap:wait|kill holds or kills a real process just before its swap.

A delete (pipelines.update.delete_sources, the real one) that loses the race is made again on
the new CURRENT; an add or a build that loses fails loudly, and CURRENT keeps the winner's
complete change. The add and the build here are store-level stand-ins that publish exactly as
pipelines.update.update_datastore and pipelines.build.build_datastore do (expect_current =
the version they started from), without Ray or a model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dresd.datastore.store import CURRENT, Datastore, list_versions, read_current
from dresd.datastore.publish import PublishConflict, publish, set_current
from dresd.storage.faults import FAULT_EXIT_CODE
from dresd.storage.pointer import lock_path, pointer_lock
from tests_support import make_manifest, make_parts

REPO = Path(__file__).resolve().parents[2]

# One publisher per process. `add` appends a record to the current version's content; `build`
# republishes the original three records from scratch; both publish with expect_current set
# to the version CURRENT named when they started, as the real commands do.
WORKER = r"""
import sys
import faiss, numpy as np
from dresd.datastore.store import Datastore, read_current
from dresd.datastore.publish import DatastoreParts, publish

op, root = sys.argv[1], sys.argv[2]
if op == "delete":
    from pipelines.update import delete_sources
    print(delete_sources(root, [sys.argv[3]]).name)
    sys.exit(0)
parent = read_current(root)
store = Datastore(root)
manifest = {k: v for k, v in store.manifest.items() if k not in ("files", "version", "created_at", "format_version", "counts")}
manifest.update(parent=parent, change={"kind": op})
tokens, offsets = np.asarray(store.tokens, dtype=np.int64), store.record_offsets
# A published index is mapped read-only (clone_index would share the mapping): copy it to add.
index = faiss.deserialize_index(faiss.serialize_index(store.index))
sources, keys, deleted = list(store.sources), np.asarray(store.key_positions, dtype=np.int64), store.deleted
if op == "add":
    end = int(offsets[-1])
    tokens = np.concatenate([tokens, [40, 41, 42]])
    offsets = np.concatenate([offsets, [end + 3]])
    keys = np.concatenate([keys, [end, end + 1]])
    index.add(np.random.default_rng(0).normal(size=(2, index.d)).astype(np.float32))
    sources.append("added")
    deleted = None if deleted is None else np.concatenate([deleted, [False, False]])
else:  # build: the original corpus, nothing deleted
    deleted = None
parts = DatastoreParts(tokens, offsets, keys, sources, store.compressor, index, deleted)
print(publish(root, parts, manifest, version=sys.argv[3], expect_current=parent).name)
"""


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "store"
    publish(r, make_parts(), make_manifest(), version="v1")
    return r


def start(op: str, root: Path, arg: str, fault: str | None = None, release: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRESD_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    if fault:
        env.update(DRESD_FAULT=f"before_current_swap:{fault}", DRESD_FAULT_RELEASE=str(release), DRESD_FAULT_TIMEOUT="60")
    return subprocess.Popen([sys.executable, "-c", WORKER, op, str(root), arg], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.strip(), err


def race(root: Path, tmp_path: Path, first: tuple[str, str], second: tuple[str, str]):
    """`first` publishes and is held just before its swap (holding the publish lock); `second`
    starts from the same parent, writes its version and reaches the lock; then `first` is let go."""
    release = tmp_path / "release"
    a = start(first[0], root, first[1], fault="wait", release=release)
    wait_until(lambda: Path(f"{release}.reached").exists() or a.poll() is not None, "the first publisher's swap")
    assert a.poll() is None, a.communicate()
    b = start(second[0], root, second[1])
    # The second has written its version folder once three versions exist; it then waits on the lock.
    wait_until(lambda: len(list_versions(root)) == 3 or b.poll() is not None, "the second publisher's version")
    time.sleep(0.3)
    release.touch()
    return finish(a), finish(b)


def tombstoned(store: Datastore) -> set[str]:
    """Sources whose every key is deleted in `store`."""
    if store.deleted is None:
        return set()
    pos = np.asarray(store.key_positions)
    out = set()
    for r, src in enumerate(store.sources):
        mine = (pos >= store.record_offsets[r]) & (pos < store.record_offsets[r + 1])
        if mine.any() and store.deleted[mine].all():
            out.add(src)
    return out


def test_delete_vs_delete_both_land_in_sequence(root, tmp_path):
    (rc_a, va, err_a), (rc_b, vb, err_b) = race(root, tmp_path, ("delete", "src-0"), ("delete", "src-1"))
    assert (rc_a, rc_b) == (0, 0), err_a + err_b
    assert "making it again from " + va in err_b  # the loser redid its delete on the winner's version
    final = Datastore(root)
    assert final.version == vb and final.manifest["parent"] == va
    assert Datastore(root, version=va).manifest["parent"] == "v1"
    assert tombstoned(final) == {"src-0", "src-1"}
    assert set(list_versions(root)) == {"v1", va, vb}  # the loser's stale version was discarded


def test_delete_vs_add_the_delete_retries_on_top_of_the_add(root, tmp_path):
    (rc_a, va, err_a), (rc_b, vb, err_b) = race(root, tmp_path, ("add", "v-add"), ("delete", "src-0"))
    assert (rc_a, rc_b, va) == (0, 0, "v-add"), err_a + err_b
    final = Datastore(root)
    assert final.version == vb and final.manifest["parent"] == "v-add"
    assert final.sources[-1] == "added" and tombstoned(final) == {"src-0"}


def test_add_vs_delete_the_add_fails_loudly_and_the_delete_is_kept(root, tmp_path):
    # The case seen in the issue: an add and a delete from one parent. The delete swaps first.
    (rc_a, va, err_a), (rc_b, _, err_b) = race(root, tmp_path, ("delete", "src-0"), ("add", "v-add"))
    assert rc_a == 0, err_a
    assert rc_b == 1 and "PublishConflict" in err_b
    assert f"publish of version v-add refused: it was made from version v1, but CURRENT now names {va}" in err_b
    assert read_current(root) == va and tombstoned(Datastore(root)) == {"src-0"}
    assert set(list_versions(root)) == {"v1", va}  # the add's version is removed, never current


@pytest.mark.parametrize("first,second", [("build", "add"), ("add", "build")])
def test_build_vs_update_the_loser_fails_and_the_winner_is_whole(root, tmp_path, first, second):
    (rc_a, va, err_a), (rc_b, _, err_b) = race(root, tmp_path, (first, f"v-{first}"), (second, f"v-{second}"))
    assert rc_a == 0 and va == f"v-{first}", err_a
    assert rc_b == 1 and f"CURRENT now names v-{first}" in err_b and f"publish of version v-{second}" in err_b
    final = Datastore(root, verify=True)
    assert final.version == f"v-{first}"
    assert ("added" in final.sources) == (first == "add")


def test_a_publisher_killed_before_its_swap_leaves_no_lock_and_no_change(root, tmp_path):
    a = start("add", root, "v-killed", fault="kill", release=tmp_path / "unused")
    rc, _, err = finish(a)
    assert rc == FAULT_EXIT_CODE, err
    assert read_current(root) == "v1"  # killed before the swap: CURRENT never moved
    assert "v-killed" in list_versions(root)  # complete, never current: inert until pinned
    # The dead publisher held the lock; the kernel released it, so the next publish goes straight through.
    with pointer_lock(root, timeout_s=1):
        pass
    rc, vb, err = finish(start("add", root, "v-next"))
    assert (rc, vb) == (0, "v-next"), err
    assert Datastore(root).manifest["parent"] == "v1"


# ----------------------------------------------------------------------------- in-process checks


def test_stale_parent_is_refused_before_anything_is_written(root):
    publish(root, make_parts(seed=1), make_manifest(), version="v2")
    with pytest.raises(PublishConflict, match="made from version v1, but CURRENT now names v2") as exc:
        publish(root, make_parts(seed=2), make_manifest(), version="v3", expect_current="v1")
    assert (exc.value.expected, exc.value.found, exc.value.new) == ("v1", "v2", "v3")
    assert list_versions(root) == ["v1", "v2"] and read_current(root) == "v2"
    with pytest.raises(PublishConflict, match="made from an empty root, but CURRENT now names v2"):
        publish(root, make_parts(seed=2), make_manifest(), version="v3", expect_current=None)
    with pytest.raises(PublishConflict, match="CURRENT now names v2"):
        set_current(root, "v1", expect_current="v1")
    set_current(root, "v1")  # ANY: a deliberate rollback replaces whatever is current
    assert read_current(root) == "v1"


def test_first_publish_on_an_empty_root_expects_none(tmp_path):
    publish(tmp_path / "s", make_parts(), make_manifest(), version="v1", expect_current=None)
    assert read_current(tmp_path / "s") == "v1"


def test_uri_root_compares_and_swaps_too(tmp_path, monkeypatch):
    import uuid

    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    root = f"memory://cas-{uuid.uuid4().hex}/ds"
    publish(root, make_parts(), make_manifest(), version="v1", expect_current=None)
    publish(root, make_parts(seed=1), make_manifest(), version="v2", expect_current="v1")
    # v3 made from v1: the early check refuses it before anything is uploaded.
    with pytest.raises(PublishConflict, match="CURRENT now names v2"):
        publish(root, make_parts(seed=2), make_manifest(), version="v3", expect_current="v1")
    assert list_versions(root) == ["v1", "v2"] and read_current(root) == "v2"
    assert lock_path(root).is_relative_to(tmp_path / "cache")  # same-machine publishers share it


def test_a_conflict_found_at_swap_time_discards_the_new_version(root, monkeypatch):
    # Another publisher swaps between this one's early check and its swap: the early check
    # still sees v1 (stale), the swap under the lock sees the other's version.
    import dresd.datastore.publish as publish_mod

    publish(root, make_parts(seed=1), make_manifest(), version="v1-other")
    monkeypatch.setattr(publish_mod, "read_current", lambda r: "v1")
    with pytest.raises(PublishConflict, match="made from version v1, but CURRENT now names v1-other"):
        publish(root, make_parts(seed=2), make_manifest(), version="v2", expect_current="v1")
    assert list_versions(root) == ["v1", "v1-other"]
    assert (root / CURRENT).read_text().split()[0] == "v1-other"


