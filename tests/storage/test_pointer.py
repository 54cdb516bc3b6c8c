"""A root's pointer file moved by compare-and-swap: a stale expectation never overwrites."""

from __future__ import annotations

import pytest

from dresd.storage.pointer import ANY, PointerConflict, lock_path, read_pointer, swap_pointer


def test_swap_moves_the_pointer_only_from_what_it_expected(tmp_path):
    assert read_pointer(tmp_path) is None
    assert swap_pointer(tmp_path, "v1", expected=None) is None
    assert read_pointer(tmp_path) == "v1"
    assert swap_pointer(tmp_path, "v2", expected="v1") == "v1"
    with pytest.raises(PointerConflict, match=r"CURRENT names 'v2', not 'v1', which 'v3' was made from"):
        swap_pointer(tmp_path, "v3", expected="v1")
    assert read_pointer(tmp_path) == "v2"  # the loser changed nothing
    with pytest.raises(PointerConflict, match="not None"):
        swap_pointer(tmp_path, "v3", expected=None)  # "first publish" on a root that has one
    assert swap_pointer(tmp_path, "v1", expected=ANY) == "v2"  # a deliberate rollback
    assert (tmp_path / "CURRENT").read_text() == "v1\n"
    assert not list(tmp_path.glob(".CURRENT.*.tmp"))  # the atomic write left no temporary


def test_local_roots_lock_beside_the_pointer_and_uri_roots_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    assert lock_path(tmp_path / "root") == tmp_path / "root" / ".CURRENT.lock"
    assert lock_path(f"file://{tmp_path}/root") == tmp_path / "root" / ".CURRENT.lock"
    remote = lock_path("memory://bucket/stores/a")
    assert remote.parent == tmp_path / "cache" / "locks"
    assert remote != lock_path("memory://bucket/stores/b") and remote == lock_path("memory://bucket/stores/a/")


def test_a_local_pointer_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    import os

    import dresd.storage.pointer as pointer_mod

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(pointer_mod.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(pointer_mod.os, "replace",
                        lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    swap_pointer(tmp_path, "v1", expected=None, note="0" * 64)
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".CURRENT.")) and events[0][1].endswith(".tmp")
    assert events[1][1] == str(tmp_path / "CURRENT") and events[2][1] == str(tmp_path)
    # The note rides after the value; the value alone is compared and returned.
    assert (tmp_path / "CURRENT").read_text() == "v1 " + "0" * 64 + "\n" and read_pointer(tmp_path) == "v1"
    assert swap_pointer(tmp_path, "v2", expected="v1") == "v1"
    with pytest.raises(ValueError, match="must be one word each"):
        swap_pointer(tmp_path, "v3", note="two words")
