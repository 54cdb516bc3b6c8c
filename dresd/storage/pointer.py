"""A root's pointer file (a datastore's CURRENT), moved by compare-and-swap under a lock.

Every change to a datastore is made from the version CURRENT named when the change began,
its parent. Publishing the change must not replace a version that another publisher made
current meanwhile, or that publisher's change is lost. So a publisher moves the pointer
only while it still names the parent, and the read, the compare and the write happen
under one lock:

- Local paths and file:// URIs: an flock on `<root>/.CURRENT.lock` (dresd.storage.locks),
  shared by every process on every machine that mounts the root. The swap is exact: a
  publisher whose parent is no longer current always fails.
- Other URIs (s3://, gs://, hdfs://, ...): pyarrow's filesystems expose no conditional
  write, so the swap is read, compare, write. Publishers on one machine serialise on a
  lock file in the local cache keyed by the root's URI, so among them the swap is exact.
  Across machines a swap that landed before this one's read is always caught; two whose
  read-to-write spans overlap (one small read and one small write each) can both pass,
  and the read-back after the write reports that case when it sees the other write.

The pointer file is one line: its value, then optionally a note (a datastore's CURRENT notes
the sha256 of the version's manifest); the swap compares values only. A local pointer is
fsynced, file and folder, so a crash leaves the old line or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from dresd.storage.cache import cache_root
from dresd.storage.faults import fault_point
from dresd.storage.files import is_uri, resolve
from dresd.storage.locks import file_lock

# The most a publisher waits for the lock. A holder keeps it for one small read and write,
# so a longer wait means a hung holder: failing names it, where waiting on would hang too.
LOCK_TIMEOUT_S = 120.0


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # `expected` for a deliberate move (pin, rollback): whatever is current is replaced


class PointerConflict(RuntimeError):
    """The pointer no longer names the value a change was made from."""

    def __init__(self, where: str, expected: str | None, found: str | None, new: str, after_write: bool = False):
        self.where, self.expected, self.found, self.new, self.after_write = where, expected, found, new, after_write
        if after_write:
            msg = (f"{where}: CURRENT names {found!r} right after this publisher wrote {new!r}: another "
                   f"publisher on another machine swapped at the same moment, and one change may be lost")
        else:
            msg = f"{where}: CURRENT names {found!r}, not {expected!r}, which {new!r} was made from"
        super().__init__(msg)


def _local_root(root: str | os.PathLike) -> Path | None:
    """The local folder of `root` (a path, or a URI on the local filesystem), else None."""
    if not is_uri(root):
        return Path(root)
    loc = resolve(root)
    return Path(loc.path) if isinstance(loc.fs, pafs.LocalFileSystem) else None


def lock_path(root: str | os.PathLike, name: str = "CURRENT") -> Path:
    """The lock file publishers of `root` serialise on (see the module docstring)."""
    local = _local_root(root)
    if local is not None:
        return local / f".{name}.lock"
    key = hashlib.sha256(f"{str(root).rstrip('/')}|{name}".encode()).hexdigest()[:16]
    return cache_root() / "locks" / f"{key}.lock"


def read_pointer(root: str | os.PathLike, name: str = "CURRENT") -> str | None:
    """The pointer's value (the first word of its line; what follows is its note), or None
    when there is no pointer file (other errors raise)."""
    local = _local_root(root)
    try:
        text = (local / name).read_text() if local is not None else resolve(root).child(name).read_text()
    except FileNotFoundError:
        return None
    words = text.split()
    return words[0] if words else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems cannot sync a folder (EINVAL); their renames are as durable as they get.
        if not (err.errno == errno.EINVAL and path.is_dir()):
            raise
    finally:
        os.close(fd)


def _write_pointer(root: str | os.PathLike, name: str, value: str) -> None:
    local = _local_root(root)
    if local is None:
        fault_point("during_current_write")
        resolve(root).child(name).write_bytes((value + "\n").encode())
        return
    # Called under the publishers' lock, so a temporary pointer file found here is a dead writer's.
    for stale in local.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = local / f".{name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(value + "\n")
    # On disk before the rename, and the rename on disk after it: a crash (power loss included)
    # then leaves the old pointer or the new one, never an empty file or a rename undone.
    _fsync(tmp)
    fault_point("during_current_write")
    os.replace(tmp, local / name)  # atomic: a reader sees the old value or the new
    _fsync(local)


@contextlib.contextmanager
def pointer_lock(root: str | os.PathLike, name: str = "CURRENT", timeout_s: float | None = None) -> Iterator[None]:
    """Hold the publishers' lock of `root` (LockTimeout after `timeout_s`, default LOCK_TIMEOUT_S)."""
    wait = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    with file_lock(lock_path(root, name), wait, f"publishing to {root}"):
        yield


def swap_pointer(root: str | os.PathLike, new: str, expected: str | None | _Any = ANY, name: str = "CURRENT",
                 note: str | None = None) -> str | None:
    """Point `root`'s pointer at `new` if it still names `expected` (None: no pointer yet; ANY:
    whatever it names). Returns the value replaced; PointerConflict when it named another.
    `note` (one word, e.g. a checksum of what `new` names) follows the value on its line."""
    if new.split() != [new] or (note is not None and note.split() != [note]):
        raise ValueError(f"{root}: pointer value {new!r} and note {note!r} must be one word each")
    with pointer_lock(root, name):
        found = read_pointer(root, name)
        if expected is not ANY and found != expected:
            raise PointerConflict(str(root), expected, found, new)  # type: ignore[arg-type]
        fault_point("before_current_swap")
        _write_pointer(root, name, new if note is None else f"{new} {note}")
        if _local_root(root) is None:
            back = read_pointer(root, name)
            if back != new:
                raise PointerConflict(str(root), found, back, new, after_write=True)
    return found
