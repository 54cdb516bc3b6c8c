"""File locks: a bounded wait that names the holder; a dead holder leaves no lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dresd.storage.locks import LockTimeout, file_lock, lock_holder
from dresd.storage.pointer import lock_path, pointer_lock


def test_the_publish_lock_waits_a_bounded_time_and_names_its_holder(tmp_path):
    with pointer_lock(tmp_path):  # another open of the lock file conflicts, even in one process
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=rf"publishing to {tmp_path}: lock .*\.CURRENT\.lock is still held after 0\.3 s \(pid {os.getpid()}"):
            with file_lock(lock_path(tmp_path), 0.3, f"publishing to {tmp_path}"):
                pass
        assert time.monotonic() - t0 < 5


def test_a_killed_holder_leaves_no_lock(tmp_path):
    lock = tmp_path / "x.lock"
    code = ("import os, sys; from dresd.storage.locks import file_lock\n"
            "with file_lock(sys.argv[1], 5, 'test'):\n    os._exit(9)\n")
    out = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True, timeout=60)
    assert out.returncode == 9
    assert lock_holder(lock).startswith("pid ")  # it held the lock and wrote its name
    with file_lock(lock, 0.5, "after the holder died"):  # the kernel dropped the flock
        assert lock_holder(lock) == f"pid {os.getpid()} on {os.uname().nodename}"
