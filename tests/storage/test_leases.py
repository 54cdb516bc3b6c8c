"""Tests for dresd.storage.leases: a lease is a flocked file beside its entry, counted per
process; a dead holder's lease is seen as dead; the last use is recorded on take and release."""

from __future__ import annotations

import gc
import os
import signal
import time

from dresd.storage.leases import Lease, last_used, lease_files, live_leases, lock_path, touch, used_path
from tests_support import hold_in_child


def test_a_lease_is_one_counted_file_per_process(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    assert lock_path(entry) == tmp_path / "entry.lock"  # ensure_cached's lock
    first, second = Lease(entry), Lease(entry)
    files = lease_files(entry)
    assert len(files) == 1 and files[0].name.startswith(f".entry.lease-{os.getpid()}-")
    assert live_leases(entry) == [f"pid {os.getpid()} on {os.uname().nodename}"]
    first.release()
    first.release()  # idempotent: the second lease still counts
    assert live_leases(entry) and lease_files(entry) == files
    with second:
        pass
    assert lease_files(entry) == [] and live_leases(entry) == []


def test_a_collected_lease_is_released(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    Lease(entry)  # dropped at once
    gc.collect()
    assert lease_files(entry) == []


def test_a_live_process_lease_counts_and_a_dead_one_is_removed(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    child = hold_in_child(entry)
    try:
        assert live_leases(entry) == [f"pid {child.pid} on {os.uname().nodename}"]
        assert live_leases(entry, clean=False)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert len(lease_files(entry)) == 1  # its file outlives it ...
    assert live_leases(entry, clean=False) == [] and len(lease_files(entry)) == 1
    assert live_leases(entry) == [] and lease_files(entry) == []  # ... and protects nothing


def test_last_use_is_recorded_on_take_and_release(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    os.utime(entry, (1000, 1000))
    assert last_used(entry) == 1000  # nothing recorded: the folder's mtime
    assert last_used(tmp_path / "missing") == 0.0
    lease = Lease(entry)
    taken = last_used(entry)
    assert used_path(entry).is_file() and taken > time.time() - 60
    os.utime(used_path(entry), (2000, 2000))
    lease.release()
    assert last_used(entry) > 2000
    os.utime(used_path(entry), (3000, 3000))
    touch(entry)
    assert last_used(entry) > 3000


def test_taking_a_lease_removes_the_files_of_dead_holders(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    child = hold_in_child(entry)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(lease_files(entry)) == 1  # a killed job's lease file
    with Lease(entry):
        files = lease_files(entry)
        assert len(files) == 1 and files[0].name.startswith(f".entry.lease-{os.getpid()}-")  # only ours
    assert lease_files(entry) == []
