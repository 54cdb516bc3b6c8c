"""Exclusive file locks with a bounded wait.

The lock is an fcntl.flock on an open file: the kernel drops it when its holder exits,
however it exits (a crash or `kill -9` included), so a dead holder never leaves a stale
lock. The file itself stays (removing a lock file races with a process about to lock it);
the holder writes its pid and host into it, so a waiter that gives up can say who holds it.
Linux maps flock to POSIX byte-range locks on NFS, so it holds across NFS clients too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator


class LockTimeout(TimeoutError):
    """A lock stayed held by someone else for longer than the caller would wait."""


def lock_holder(path: Path) -> str:
    """What the lock file at `path` says about its last holder ("unknown" when nothing)."""
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the `with` body.

    Waits at most `timeout_s` seconds for another holder (another process, or another open
    of the same file in this one), then raises LockTimeout naming `what`, the lock file and
    its holder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline, pause = time.monotonic() + timeout_s, 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"{what}: lock {path} is still held after {timeout_s:g} s ({lock_holder(path)})"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.25)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
