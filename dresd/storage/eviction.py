"""The node cache stays under a size: least recently used entries are evicted, never one in use.

Evictable entries, each a folder of the cache (dresd.storage.cache.cache_root()):

    storage/datastores/<root key>/<version>/   datastore versions fetched from a URI root
                                               (`.root` beside them names the root)
    storage/<key>/                             files fetched from storage URIs (corpus copies)
    storage/scratch/<node>/<key>/              a URI build scratch's mirror on this node
    derived/<version>-<digest>/                indexes derived from one version (REST's)

Converted and fetched models, locks, claims and verification markers are small or few, and
neither counted nor evicted.

The bound is `CacheConfig.max_gb` (dresd.config.schema), which commands and jobs export as
$DRESD_CACHE_MAX_GB to this process, its children and the job's Ray workers; unset, it is
DEFAULT_MAX_GB. After an entry is added (use_entry), the entries are summed; while they
exceed the bound, the least recently used one (dresd.storage.leases.last_used) is removed,
unless:

- its lock is held: a process is filling it (or taking a lease on it) right now;
- a live process holds a lease on it (an open Datastore, a running drafter, a build's scratch);
- it is a fetched version that its root's CURRENT or a pin recorded in the root names
  (dresd.storage.pins): the version servers return to, so it is not fetched again.

Whole entries go: an entry is renamed aside under its lock and then deleted, so no reader
ever sees a partial one. Every eviction is logged. `dresd cache show|prune` runs this by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs

from dresd.storage.cache import CACHE_LOCK_TIMEOUT_S, cache_dir, cache_root, fetch_target
from dresd.storage.files import is_uri
from dresd.storage.leases import Lease, last_used, lease_files, leased_names, live_leases, lock_path, used_path
from dresd.storage.locks import LockTimeout, file_lock
from dresd.storage.pins import root_pins
from dresd.storage.pointer import read_pointer

log = logging.getLogger(__name__)

ENV = "DRESD_CACHE_MAX_GB"
# The bound when none is configured: room for a few fetched versions of a large datastore
# beside their derived indexes, small beside a node's disk.
DEFAULT_MAX_GB = 50.0
ORIGIN = ".root"  # beside fetched versions: the root they came from
_HEX_KEY = re.compile(r"[0-9a-f]{16}")
_TRASH = ".evict-"


def cache_limit_bytes() -> float:
    """The bound in bytes: $DRESD_CACHE_MAX_GB (GB of 10^9 bytes; "inf": no bound), else
    DEFAULT_MAX_GB. ValueError naming the variable when it is not a number >= 0."""
    text = os.environ.get(ENV, "").strip()
    try:
        gb = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0:
        raise ValueError(f"${ENV} must be a number of GB >= 0 (or inf), got {text!r}")
    return gb * 1e9


def set_cache_limit(max_gb: float | None) -> None:
    """Make `max_gb` the bound of this process and of the processes it starts (None: leave it)."""
    if max_gb is not None:
        os.environ[ENV] = repr(float(max_gb))


def cache_env() -> dict[str, str]:
    """The bound, for the environment of a job's Ray workers ({} when none is set here: the
    nodes' own environment, or the default, applies)."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}


# ----------------------------------------------------------------------------- the entries


@dataclass
class CacheEntry:
    kind: str
    path: Path
    bytes: int
    last_used: float


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):  # symlinks are not followed: what they lead to is not ours
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _folders(parent: Path) -> list[Path]:
    try:
        return sorted(p for p in parent.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    except OSError:
        return []


def _parents(root: Path) -> Iterator[tuple[str, Path, Callable[[str], object]]]:
    """(kind, a folder of such entries, which of its names are entries)."""
    storage = root / "storage"
    yield "corpus copy", storage, _HEX_KEY.fullmatch
    for folder in _folders(storage / "datastores"):
        yield "datastore version", folder, bool
    for folder in _folders(storage / "scratch"):
        yield "scratch mirror", folder, bool
    yield "derived cache", root / "derived", bool


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every evictable entry of the cache at `root` (default cache_root()), least recently used first."""
    root = cache_root() if root is None else Path(root)
    out = [CacheEntry(kind, p, _size(p), last_used(p))
           for kind, parent, named in _parents(root) for p in _folders(parent) if named(p.name)]
    return sorted(out, key=lambda e: e.last_used)


def _protected(parent: Path, seen: dict[Path, dict[str, str]]) -> dict[str, str]:
    """{version: why it is kept} for the fetched versions in `parent`: CURRENT and the pins of
    the root they came from. A root that cannot be read protects nothing (leases still do)."""
    if parent not in seen:
        seen[parent] = {}
        try:
            origin = (parent / ORIGIN).read_text().strip()
            if current := read_pointer(origin):
                seen[parent][current] = f"CURRENT of {origin}"
            for where, version in root_pins(origin).items():
                seen[parent].setdefault(version, f"pinned by {where} in {origin}")
        except (OSError, ValueError) as err:
            log.debug("cache: cannot read the root of %s (%s); its versions are not kept for it", parent, err)
    return seen[parent]


# ----------------------------------------------------------------------------- eviction


@dataclass
class EvictReport:
    limit: float
    before: int
    after: int
    evicted: list[CacheEntry] = field(default_factory=list)
    kept: list[tuple[CacheEntry, str]] = field(default_factory=list)  # would have gone: why not
    busy: bool = False  # another process was evicting

    def lines(self) -> list[str]:
        if self.busy:
            return ["another process is evicting from this cache now; nothing done"]
        out = [f"cache holds {_gb(self.before)} of evictable entries (bound {_gb(self.limit)})"]
        out += [f"evicted {e.kind} {e.path} ({_gb(e.bytes)})" for e in self.evicted]
        out += [f"kept {e.kind} {e.path} ({_gb(e.bytes)}): {why}" for e, why in self.kept]
        if self.evicted:
            out.append(f"cache now holds {_gb(self.after)}")
        return out


def _gb(n: float) -> str:
    if n == float("inf"):
        return "no bound"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _remove_if_free(entry: Path) -> str | None:
    """Remove `entry` unless it is being filled or used; None when removed, else why kept."""
    try:
        with file_lock(lock_path(entry), 0, f"evicting {entry}"):
            if holders := live_leases(entry):
                return "in use by " + "; ".join(holders)
            trash = entry.parent / f".{entry.name}{_TRASH}{uuid.uuid4().hex[:8]}"
            os.rename(entry, trash)  # gone at once: nobody sees a half-deleted entry
            with contextlib.suppress(OSError):
                used_path(entry).unlink()
    except LockTimeout:
        return "being filled or leased right now (its lock is held)"
    except FileNotFoundError:
        return None  # removed by someone else meanwhile
    shutil.rmtree(trash, ignore_errors=True)
    return None


def _sweep_trash(root: Path) -> None:
    """Entries set aside by an evictor that died before deleting them, and the lease files of
    entries that are gone."""
    for _, parent, _ in _parents(root):
        with contextlib.suppress(OSError):
            for p in parent.iterdir():
                if p.name.startswith(".") and _TRASH in p.name and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
        sweep_orphan_leases(parent)


def sweep_orphan_leases(folder: Path) -> int:
    """Remove the lease files of processes that died, and the last-use stamps, of entries in
    `folder` that no longer exist; the number of files removed. A removed entry's lease files
    stay when their holders outlive its removal (a build's workers keep its scratch mirror
    leased until they exit, after the build removed it), and nothing leases that entry again
    to clean them. Each entry's lock is taken without waiting, as leases are taken under it:
    an entry whose lock is held is left to a later sweep, and a live holder's file stays."""
    removed = 0
    for name in sorted(leased_names(folder)):
        entry = folder / name
        try:
            with file_lock(lock_path(entry), 0, f"sweeping the leases of {entry}"):
                if entry.exists():
                    continue  # its next lease or eviction check cleans it (leases.live_leases)
                before = len(lease_files(entry))
                live = live_leases(entry, clean=True)
                removed += before - len(lease_files(entry))
                if not live:
                    with contextlib.suppress(FileNotFoundError):
                        used_path(entry).unlink()
                        removed += 1
        except LockTimeout:
            continue
    return removed


def evict(limit_bytes: float | None = None, root: Path | None = None) -> EvictReport:
    """Evict least recently used entries until the cache at `root` (default cache_root())
    holds at most `limit_bytes` (default cache_limit_bytes()). See the module docstring."""
    root = cache_root() if root is None else Path(root)
    limit = cache_limit_bytes() if limit_bytes is None else float(limit_bytes)
    try:
        with file_lock(root / "locks" / "evict.lock", 0, "evicting from the cache"):
            _sweep_trash(root)
            entries = cache_entries(root)
            total = sum(e.bytes for e in entries)
            report = EvictReport(limit, total, total)
            seen: dict[Path, dict[str, str]] = {}
            for entry in entries:
                if report.after <= limit:
                    break
                pinned = _protected(entry.path.parent, seen) if entry.kind == "datastore version" else {}
                why = pinned.get(entry.path.name) or _remove_if_free(entry.path)
                if why:
                    report.kept.append((entry, why))
                    continue
                report.evicted.append(entry)
                report.after -= entry.bytes
                log.info("cache: evicted %s %s (%s, last used %s) to stay under %s", entry.kind, entry.path,
                         _gb(entry.bytes), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used)),
                         _gb(limit))
            if report.after > limit:
                log.warning("cache: %s still holds %s, over its bound of %s: the rest is in use or pinned",
                            root, _gb(report.after), _gb(limit))
            return report
    except LockTimeout:
        return EvictReport(limit, 0, 0, busy=True)


def trim() -> EvictReport | None:
    """evict() after an entry was added; a failure is logged, never raised: the caller's
    work does not depend on it."""
    try:
        return evict()
    except Exception as err:  # noqa: BLE001 - a full or read-only cache must not fail a fetch
        log.warning("cache: eviction failed: %s: %s", type(err).__name__, err)
        return None


# ----------------------------------------------------------------------------- using entries


def use_entry(entry: Path, fill: Callable[[Path], object] | None = None,
              complete: Callable[[Path], bool] | None = None) -> Lease:
    """A lease on cache entry `entry`, filled first by `fill(entry)` when not `complete(entry)`
    (default: it is a folder). Fill and lease happen under the entry's lock; once a new entry
    is in, the cache is trimmed (the new one is leased, so it stays)."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    complete = complete or Path.is_dir
    with file_lock(lock_path(entry), CACHE_LOCK_TIMEOUT_S, f"using cache entry {entry}"):
        added = not complete(entry)
        if added:
            (fill or (lambda e: e.mkdir(parents=True, exist_ok=True)))(entry)
        lease = Lease(entry)
    if added:
        trim()
    return lease


# Entries this process uses until it exits (a build's scratch mirror): path -> lease.
_kept: dict[str, Lease] = {}


def hold_entry(entry: Path) -> Path:
    """`entry` (made when missing) leased until this process exits or drop_entry(entry)."""
    if str(entry) not in _kept:
        _kept[str(entry)] = use_entry(entry)
    return entry


def drop_entry(entry: Path) -> None:
    if (lease := _kept.pop(str(entry), None)) is not None:
        lease.release()


@contextlib.contextmanager
def fetched(location: str | os.PathLike) -> Iterator[Path]:
    """A local path holding `location` (itself when local) for the `with` body: a URI's copy
    in the cache (dresd.storage.cache.fetch's) is leased meanwhile, so it is not evicted."""
    if not is_uri(location):
        yield Path(location)
        return
    loc, info, target = fetch_target(location)
    is_file = info.type == pafs.FileType.File
    # A folder's key does not follow its content, so it is fetched again each time, as fetch() does.
    with use_entry(target.parent, lambda _: loc.download(target), lambda _: is_file and target.exists()):
        yield target


def version_cache_folder(root: str) -> Path:
    """Where this node keeps the versions it fetched from URI root `root`."""
    return cache_dir() / "datastores" / hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:16]


def use_version(root: str, version: str, fill: Callable[[Path], object],
                complete: Callable[[Path], bool]) -> Lease:
    """use_entry for `version` of URI root `root`, recording the root beside it so that an
    evictor keeps the versions CURRENT and the root's pins name."""
    folder = version_cache_folder(root)
    origin = folder / ORIGIN
    if not origin.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".root.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(root.rstrip("/") + "\n")
        os.replace(tmp, origin)
    return use_entry(folder / version, fill, complete)
