"""Leases on cache entries: which entries a live process on this node is using, and when
each was last used. What dresd.storage.eviction reads before it removes anything.

An entry is a folder of the node cache. Beside it, in its parent folder:

    <name>.lock                 the entry's lock (the one dresd.storage.cache.ensure_cached
                                builds under): held while the entry is filled, while a lease
                                on it is taken, and while an evictor checks and removes it
    .<name>.lease-<pid>-<rand>  one per process using the entry: flocked by that process for
                                as long as it uses the entry; its text says who ("pid N on host")
    .<name>.used                its mtime is the entry's last use (atime is unreliable: noatime
                                mounts, and reads through a memory map do not update it)

A lease is alive while its flock is held. The kernel drops the flock when its process exits,
however it exits, so a dead process's lease protects nothing, and a pid reused by another
process cannot keep a stale lease alive. Taking a lease and checking an entry's leases both
happen under the entry's lock, so an evictor never misses a lease being taken.

One process holds one lease file per entry, counted: every `Lease` object on the entry adds
one, and the file goes when the last is released (or garbage-collected).
A dead holder's file goes at the entry's next lease or eviction check; once the entry itself
is gone, at the next eviction pass (dresd.storage.eviction.sweep_orphan_leases).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import uuid
from pathlib import Path

_LEASE = ".lease-"


def lock_path(entry: Path) -> Path:
    """The entry's lock file (ensure_cached's `<parent>/<name>.lock`)."""
    return entry.parent / f"{entry.name}.lock"


def used_path(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.used"


def touch(entry: Path) -> None:
    """Record a use of `entry` now."""
    marker = used_path(entry)
    with contextlib.suppress(OSError):  # a read-only cache still serves; its order is only older
        marker.touch()
        os.utime(marker)


def last_used(entry: Path) -> float:
    """When `entry` was last used (its folder's mtime when no use was recorded: an entry
    written by code that predates the record)."""
    for path in (used_path(entry), entry):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


# This process's leases: entry path -> [fd of its lease file, lease file, count, pid that took it].
_held: dict[str, list] = {}
_held_lock = threading.Lock()


class Lease:
    """This process uses `entry` until `release()` (or until the object is collected).
    Take it only under the entry's lock (dresd.storage.eviction.use_entry does)."""

    def __init__(self, entry: Path):
        self.entry = Path(entry)
        self._key = str(self.entry)
        self._pid = os.getpid()
        with _held_lock:
            held = _held.get(self._key)
            if held is not None and held[3] == self._pid:
                held[2] += 1
            else:  # none here (or one inherited through fork, which is the parent's to release)
                # Under the entry's lock: the lease files of holders that died (a killed job)
                # go now, rather than at the next eviction check.
                live_leases(self.entry, clean=True)
                path = self.entry.parent / f".{self.entry.name}{_LEASE}{self._pid}-{uuid.uuid4().hex[:8]}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else holds it
                os.pwrite(fd, f"pid {self._pid} on {socket.gethostname()}\n".encode(), 0)
                _held[self._key] = [fd, path, 1, self._pid]
        self.released = False
        touch(self.entry)

    def release(self) -> None:
        """Stop using the entry (idempotent); its last use is now."""
        if self.released:
            return
        self.released = True
        if os.getpid() != self._pid:  # a forked copy: the lease is the parent's
            return
        touch(self.entry)
        with _held_lock:
            held = _held.get(self._key)
            if held is None or held[3] != self._pid:
                return
            held[2] -= 1
            if held[2] == 0:
                del _held[self._key]
                with contextlib.suppress(OSError):
                    os.unlink(held[1])
                os.close(held[0])  # drops the flock

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the kernel drops the flock anyway
            self.release()


def lease_files(entry: Path) -> list[Path]:
    """Every lease file of `entry` (of live and dead processes)."""
    prefix = f".{entry.name}{_LEASE}"
    try:
        return sorted(p for p in entry.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def leased_names(folder: Path) -> set[str]:
    """The names of the entries in `folder` that lease files are beside (the entries may be gone)."""
    try:
        return {p.name[1 : p.name.index(_LEASE)] for p in folder.iterdir() if p.name.startswith(".") and _LEASE in p.name}
    except OSError:
        return set()


def live_leases(entry: Path, clean: bool = True) -> list[str]:
    """Who holds a lease on `entry` now ("pid N on host" each). With `clean`, the files of
    dead holders are removed on the way: only under the entry's lock, where no lease file is
    between its creation and its flock."""
    live = []
    for path in lease_files(entry):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.append(os.pread(fd, 200, 0).decode(errors="replace").strip() or path.name)
                continue
            if clean:
                with contextlib.suppress(OSError):  # its holder died: the lease protects nothing
                    os.unlink(path)
        finally:
            os.close(fd)
    return live

