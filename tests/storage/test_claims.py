"""Claims on things being written: a live writer's claim is never taken, a dead one's is."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from dresd.storage.claims import claim, claim_if_free, claimed_names, marker_path
from dresd.storage.locks import LockTimeout

HOLDER = r"""
import sys, time
from dresd.storage.claims import claim
with claim(sys.argv[1], "v1"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_live_writers_claim_is_never_taken_and_a_dead_ones_is(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with claim_if_free(tmp_path, "v1") as held:
            assert held is None
        assert "pid" in marker_path(tmp_path, "v1").read_text()
    finally:
        proc.kill()
        proc.wait()
    assert claimed_names(tmp_path) == ["v1"]  # a dead writer leaves its marker, lock free
    with claim_if_free(tmp_path, "v1") as held:
        assert held is not None
    assert claimed_names(tmp_path) == []  # the cleaner dealt with it: the marker goes


def test_settle_removes_the_marker_and_an_unsettled_claim_keeps_it(tmp_path):
    with claim(tmp_path, "a") as held:
        held.settle()
    with claim(tmp_path, "b"):
        pass
    assert claimed_names(tmp_path) == ["b"]
    # A settled claim is never taken again: a cleaner that listed it while its writer lived
    # must not mistake the finished work for a dead writer's.
    with claim_if_free(tmp_path, "a") as held:
        assert held is None
    with claim_if_free(tmp_path, "a", create=True) as held:  # a thing that exists only while claimed
        assert held is not None
    assert claimed_names(tmp_path) == ["b"]
    with claim_if_free(tmp_path / "missing", "x") as held:
        assert held is None  # no folder: nothing to clean


def test_a_claim_waits_a_bounded_time_and_names_its_holder(tmp_path):
    with claim(tmp_path, "v1"):
        with pytest.raises(LockTimeout, match=r"claiming v1 in .*still held after 0.2 s \(pid \d+ on "):
            with claim(tmp_path, "v1", timeout_s=0.2):
                pass


def test_a_waiter_never_holds_a_marker_that_was_settled_under_it(tmp_path):
    # The waiter opens the marker while the first holder has it, then the holder settles
    # (removes it): the waiter's lock must end on the marker the folder names now.
    got = {}

    def waiter():
        with claim(tmp_path, "v1", timeout_s=10) as held:
            got["inode"] = __import__("os").fstat(held.fd).st_ino
            got["named"] = marker_path(tmp_path, "v1").stat().st_ino

    with claim(tmp_path, "v1") as first:
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        first.settle()
    t.join(10)
    assert got and got["inode"] == got["named"]
