"""Tests for dresd.storage.eviction: the node cache stays under its bound, least recently used
entries first, never one being filled, leased by a live process, or named by its root's
CURRENT or pins; a dead process's lease protects nothing; fillers and evictors run together."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dresd.storage import eviction
from dresd.storage.eviction import (ENV, cache_entries, cache_env, cache_limit_bytes, evict, fetched, hold_entry,
                                    drop_entry, set_cache_limit, use_entry, use_version, version_cache_folder)
from dresd.storage.leases import lease_files, lock_path, used_path
from dresd.storage.locks import file_lock

ROOT = Path(__file__).resolve().parents[2]
KB = 1000


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache root of this test's own, with no bound from the environment."""
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    no_bound_set(monkeypatch)
    return tmp_path / "cache"


def no_bound_set(monkeypatch):
    """$DRESD_CACHE_MAX_GB unset, and restored after the test even when the test sets it
    (set_cache_limit writes os.environ itself)."""
    monkeypatch.setenv(ENV, "0")
    monkeypatch.delenv(ENV)


def filler(size: int = KB, files: int = 1, pause: float = 0.0):
    def fill(entry: Path) -> None:
        entry.mkdir(parents=True)
        for i in range(files):
            (entry / f"part{i}").write_bytes(b"x" * size)
            time.sleep(pause)
    return fill


def add(entry: Path, used_at: float | None = None, size: int = KB) -> Path:
    """A released entry of `size` bytes whose last use was `used_at` (epoch seconds)."""
    use_entry(entry, filler(size)).release()
    if used_at is not None:
        os.utime(used_path(entry), (used_at, used_at))
    return entry


def derived(cache: Path, name: str) -> Path:
    return cache / "derived" / name


def test_the_bound_comes_from_the_environment(monkeypatch):
    no_bound_set(monkeypatch)
    assert cache_limit_bytes() == eviction.DEFAULT_MAX_GB * 1e9 and cache_env() == {}
    set_cache_limit(None)  # nothing configured: the node's own setting stays
    assert ENV not in os.environ
    set_cache_limit(2.5)
    assert cache_limit_bytes() == 2.5e9 and cache_env() == {ENV: "2.5"}
    monkeypatch.setenv(ENV, "inf")
    assert cache_limit_bytes() == float("inf")
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=f"DRESD_CACHE_MAX_GB must be a number of GB >= 0.*{bad}"):
            cache_limit_bytes()


def test_every_kind_of_entry_is_listed_and_the_rest_of_the_cache_is_not(cache):
    storage = cache / "storage"
    for path in (storage / "0123456789abcdef", storage / "datastores" / "k1" / "v1",
                 storage / "scratch" / "node" / "s1", cache / "derived" / "v1-abc"):
        path.mkdir(parents=True)
        (path / "f").write_bytes(b"x" * 10)
    for path in (storage / "staging" / "x", storage / "uploads" / "y", cache / "models" / "m", cache / "verified",
                 cache / "derived" / ".v1-abc.tmp-1", storage / "datastores" / "k1" / ".fetch-v2-1"):
        path.mkdir(parents=True)
    assert sorted((e.kind, e.path.relative_to(cache).as_posix(), e.bytes) for e in cache_entries()) == [
        ("corpus copy", "storage/0123456789abcdef", 10), ("datastore version", "storage/datastores/k1/v1", 10),
        ("derived cache", "derived/v1-abc", 10), ("scratch mirror", "storage/scratch/node/s1", 10)]


def test_filling_over_the_bound_evicts_the_least_recently_used(cache, monkeypatch, caplog):
    now = time.time()
    old, middle = add(derived(cache, "old"), now - 300), add(derived(cache, "middle"), now - 200)
    add(derived(cache, "recent"), now - 100)
    monkeypatch.setenv(ENV, str(3.5 * KB / 1e9))  # room for three entries
    with caplog.at_level(logging.INFO, logger="dresd.storage.eviction"):
        lease = use_entry(derived(cache, "new"), filler())  # the fourth: one must go
    assert not old.exists() and not used_path(old).exists()
    assert [e.path.name for e in cache_entries()] == ["middle", "recent", "new"]
    assert "evicted derived cache" in caplog.text and str(old) in caplog.text
    lease.release()
    os.utime(used_path(cache / "derived" / "new"), (now - 50, now - 50))
    os.utime(used_path(middle), (now, now))  # used again: now the most recent
    report = evict(1.5 * KB)
    assert [e.path.name for e in report.evicted] == ["recent", "new"] and report.after == KB
    assert [e.path.name for e in cache_entries()] == ["middle"]
    assert evict(1.5 * KB).evicted == []  # under the bound: nothing to do


def test_a_leased_entry_stays_even_when_least_recently_used(cache):
    now = time.time()
    lru = add(derived(cache, "lru"), now - 300)
    add(derived(cache, "other"), now - 100)
    child = lease_in_child(lru)
    try:
        report = evict(0)
        assert [e.path.name for e in report.evicted] == ["other"]
        assert [(e.path.name, why) for e, why in report.kept] == [
            ("lru", f"in use by pid {child.pid} on {os.uname().nodename}")]
        assert lru.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The holder died: its lease protects nothing any more.
    assert [e.path.name for e in evict(0).evicted] == ["lru"] and not lru.exists()
    assert lease_files(lru) == []


def lease_in_child(entry: Path) -> subprocess.Popen:
    """A live process on this node using `entry` (it sleeps until killed)."""
    code = ("import sys, time; from pathlib import Path; from dresd.storage.eviction import use_entry\n"
            "lease = use_entry(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(entry)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, ENV: "inf"})
    assert child.stdout.readline().strip() == "held"
    return child


def test_an_entry_being_filled_is_skipped(cache):
    busy = add(derived(cache, "busy"), time.time() - 300)
    with file_lock(lock_path(busy), 1, "a filler"):
        report = evict(0)
    assert report.evicted == [] and "being filled" in report.kept[0][1] and busy.is_dir()
    assert evict(0).evicted[0].path == busy


def test_versions_named_by_current_or_a_pin_stay(cache, tmp_path):
    root = tmp_path / "root"
    (root / "pins").mkdir(parents=True)
    (root / "CURRENT").write_text("v2 0123abcd\n")
    (root / "SERVE_PIN").write_text("v1\n")
    (root / "pins" / "pool-1").write_text("v3\npid 1 on host\n")
    for i, version in enumerate(["v1", "v2", "v3", "v4"]):
        use_version(str(root), version, filler(), Path.is_dir).release()
        os.utime(used_path(version_cache_folder(str(root)) / version), (1000 + i, 1000 + i))
    report = evict(0)
    assert [e.path.name for e in report.evicted] == ["v4"]
    assert {e.path.name: why for e, why in report.kept} == {
        "v1": f"pinned by SERVE_PIN in {root}", "v2": f"CURRENT of {root}", "v3": f"pinned by pins/pool-1 in {root}"}
    (root / "SERVE_PIN").unlink()
    assert [e.path.name for e in evict(0).evicted] == ["v1"]


def test_a_corpus_copy_is_leased_while_read(cache, tmp_path):
    src = tmp_path / "corpus.jsonl"
    src.write_text('{"prompt": "a"}\n')
    with fetched(f"file://{src}") as local:
        assert local.read_text() == src.read_text() and local.is_relative_to(cache / "storage")
        assert evict(0).evicted == [] and local.exists()
    assert [e.kind for e in evict(0).evicted] == ["corpus copy"] and not local.exists()
    with fetched(src) as same:  # a local path: read in place, nothing cached
        assert same == src


def test_a_held_scratch_mirror_stays_until_dropped(cache):
    mirror = hold_entry(cache / "storage" / "scratch" / "node" / "abc")
    assert hold_entry(mirror) == mirror and mirror.is_dir()
    (mirror / "shard").write_bytes(b"x" * KB)
    assert evict(0).evicted == []
    drop_entry(mirror)
    drop_entry(mirror)
    assert [e.kind for e in evict(0).evicted] == ["scratch mirror"]


def _fill_and_check(cache: str, prefix: str, rounds: int, errors) -> None:
    """A filler: adds entries (each trimming the cache to nothing but what is in use) and
    checks every file of its entry while it holds it."""
    os.environ["DRESD_CACHE_DIR"] = cache
    os.environ[ENV] = "0"
    try:
        for i in range(rounds):
            with use_entry(Path(cache) / "derived" / f"{prefix}{i}", filler(KB, files=4, pause=0.005)) as lease:
                parts = sorted(p.name for p in lease.entry.iterdir())
                assert parts == ["part0", "part1", "part2", "part3"], parts
                assert all((lease.entry / p).stat().st_size == KB for p in parts)
                time.sleep(0.005)
    except BaseException as err:  # noqa: BLE001 - reported to the test
        errors.put(f"{prefix}: {type(err).__name__}: {err}")
        raise


def test_fillers_and_evictors_run_together(cache):
    errors = mp.get_context("fork").Queue()
    fillers = [mp.get_context("fork").Process(target=_fill_and_check, args=(str(cache), p, 15, errors))
               for p in ("a", "b")]
    stop = threading.Event()

    def evict_loop():
        while not stop.is_set():
            evict(0)

    for f in fillers:  # forked before the evicting thread starts: no lock is copied held
        f.start()
    loop = threading.Thread(target=evict_loop)
    loop.start()
    for f in fillers:
        f.join(60)
    stop.set()
    loop.join(60)
    assert errors.empty(), errors.get()
    assert [f.exitcode for f in fillers] == [0, 0]
    assert len(cache_entries()) < 30  # entries were evicted while the others were filled
    evict(0)
    assert cache_entries() == []  # nothing is in use any more: all of it went
    assert not [p for p in (cache / "derived").iterdir() if ".evict-" in p.name]


def test_the_dead_leases_of_entries_gone_are_swept_and_a_live_holders_stays(tmp_path):
    """A build's workers keep its scratch mirror leased until they exit, after the build
    removed the mirror: their lease files and its last-use stamp stay unless swept."""
    from tests_support import hold_in_child

    from dresd.storage.eviction import sweep_orphan_leases

    gone, held, kept = tmp_path / "gone", tmp_path / "held", tmp_path / "kept"
    children = {}
    for entry in (gone, held, kept):
        entry.mkdir()
        children[entry.name] = hold_in_child(entry)
        used_path(entry).touch()
    for name in ("gone", "kept"):  # their holders die
        children[name].send_signal(signal.SIGKILL)
        children[name].wait()
    shutil.rmtree(gone)
    shutil.rmtree(held)  # removed while its holder lives
    try:
        assert sweep_orphan_leases(tmp_path) == 2  # gone's lease file and its stamp
        assert lease_files(gone) == [] and not used_path(gone).exists()
        assert len(lease_files(held)) == 1 and used_path(held).exists()  # a live holder's stays
        assert len(lease_files(kept)) == 1  # an entry still there: its next lease or eviction check cleans it
        with file_lock(lock_path(held), 5, "a test"):  # a lease being taken or checked: left alone
            children["held"].send_signal(signal.SIGKILL)
            children["held"].wait()
            assert sweep_orphan_leases(tmp_path) == 0 and len(lease_files(held)) == 1
        assert sweep_orphan_leases(tmp_path) == 2 and lease_files(held) == []
    finally:
        for child in children.values():
            child.kill()
            child.wait()


def test_an_eviction_pass_sweeps_the_dead_leases_of_entries_gone(tmp_path):
    node = tmp_path / "storage" / "scratch" / "node-1"
    node.mkdir(parents=True)
    (node / ".mirror.lease-123-abcdef01").write_text("pid 123 on a host\n")  # no flock: its holder died
    used_path(node / "mirror").touch()
    evict(1e12, tmp_path)
    assert [p.name for p in node.iterdir()] == ["mirror.lock"]  # the lease file and stamp went; the lock stays
