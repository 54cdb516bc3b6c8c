"""Claims on things being written: who may remove what a dead writer left behind.

A writer claims a name in a folder before it creates anything under that name, and holds
the claim until its work is settled (done, or undone). The claim is an flock on a marker
file beside the thing, `<parent>/.claim-<name>`: the kernel drops the lock when its holder
dies, however it dies, so a marker whose lock is free belongs to a dead writer. A cleaner
removes a thing only while holding its claim itself: it never removes the work of a live
writer, and two cleaners never both act on one name.

A writer settles by removing its marker while it still holds the lock. Locking a marker
that was just settled would lock a file no longer in the folder, so a claim checks, once
locked, that the marker it holds is the one the folder names, and locks again if not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from dresd.storage.locks import LockTimeout, lock_holder

MARKER = ".claim-"
# The most a writer waits for its own fresh claim. Only a cleaner can hold it meanwhile, for
# as long as removing one dead writer's folder takes; waiting longer means a hung cleaner.
CLAIM_WAIT_S = 60.0


class Claim:
    """A held claim on `name` in `parent` (see the module docstring)."""

    def __init__(self, parent: Path, name: str, fd: int):
        self.parent, self.name, self.fd = parent, name, fd
        self.marker = marker_path(parent, name)
        self.settled = False

    def settle(self) -> None:
        """Mark the claimed work settled: its marker goes, so no cleaner will look at it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.marker)
        self.settled = True


def marker_path(parent: str | os.PathLike, name: str) -> Path:
    return Path(parent) / f"{MARKER}{name}"


def claimed_names(parent: str | os.PathLike) -> list[str]:
    """Names in `parent` that have a marker (held by a live writer or left by a dead one)."""
    folder = Path(parent)
    if not folder.is_dir():
        return []
    return sorted(p.name[len(MARKER):] for p in folder.iterdir() if p.name.startswith(MARKER))


def _lock(path: Path, timeout_s: float | None, create: bool = True) -> int | None:
    """An fd holding the flock of the marker file `path` names now; None when another holder
    keeps it past `timeout_s` (None: do not wait), or when there is no marker and not `create`."""
    deadline, pause = time.monotonic() + (timeout_s or 0.0), 0.01
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if timeout_s is None or time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
            continue
        try:
            held, named = os.fstat(fd), os.stat(path)
            if (held.st_ino, held.st_dev) == (named.st_ino, named.st_dev):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # settled and removed while this waited: lock the marker there now


def _sign(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


@contextlib.contextmanager
def claim(parent: str | os.PathLike, name: str, timeout_s: float = CLAIM_WAIT_S) -> Iterator[Claim]:
    """Hold the claim on `name` in `parent` for the `with` body (LockTimeout after `timeout_s`).
    The marker stays after the body unless the body called `settle()`."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(marker_path(parent, name), timeout_s)
    if fd is None:
        path = marker_path(parent, name)
        raise LockTimeout(f"claiming {name} in {parent}: {path} is still held after {timeout_s:g} s "
                          f"({lock_holder(path)})")
    try:
        _sign(fd)
        yield Claim(parent, name, fd)
    finally:
        os.close(fd)  # closing drops the flock


@contextlib.contextmanager
def claim_if_free(parent: str | os.PathLike, name: str, create: bool = False) -> Iterator[Claim | None]:
    """The claim on `name` in `parent` when no live writer holds it, else None; never waits.
    A cleaner that gets it owns whatever the dead writer left under `name`; the marker goes
    when the body ends without an error (the cleaner has dealt with the name).

    Without a marker the work is settled and nothing is claimed (None), unless `create`: for
    a thing that exists only while claimed (a temporary folder), a missing marker means a
    writer that never made one, and the thing is the cleaner's."""
    parent = Path(parent)
    if not parent.is_dir():
        yield None
        return
    fd = _lock(marker_path(parent, name), None, create)
    if fd is None:
        yield None
        return
    try:
        _sign(fd)
        held = Claim(parent, name, fd)
        yield held
        held.settle()
    finally:
        os.close(fd)
