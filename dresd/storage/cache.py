"""DReSD's on-disk cache: its root, cached machine measurements, and folders built once
(a converted model, a derived index) published whole, so concurrent builders and readers on
one node never see a partial entry."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from dresd.storage.files import is_uri, resolve, sha256_file
from dresd.storage.names import escape_problem, name_problem
from dresd.storage.locks import file_lock

log = logging.getLogger(__name__)

MARKER_FILE = "DRESD_COMPLETE.json"
# Bump when the marker layout changes so entries written by older code are rebuilt.
CACHE_FORMAT = 1
# Files up to this size are fully hashed on every load; larger ones (weights) are only
# size-checked so a reload stays fast.
_FULL_HASH_LIMIT = 16 * 1024 * 1024


def cache_root() -> Path:
    """Root of DReSD's on-disk cache: $DRESD_CACHE_DIR, else ~/.cache/dresd."""
    env = os.environ.get("DRESD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dresd"


def inside_cache(path: Path, what: str) -> Path:
    """`path` once checked to lie inside cache_root(): cache folders are named after
    datastore versions and URIs, which are untrusted, and one must never point elsewhere."""
    if problem := escape_problem(path, cache_root()):
        raise ValueError(f"{what}: cache folder {path} {problem}")
    return Path(path)


def cached_measurement(path: Path, key: str, measure: Callable[[], dict], refresh: bool = False) -> dict:
    """A machine measurement cached as JSON at `path`: read back when it was taken for `key`
    (what was measured: model, device, threads ...), else measured and written atomically."""
    if not refresh and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return data["value"]
        except (ValueError, KeyError, AttributeError):
            pass  # unreadable cache: measure again
    value = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    os.replace(tmp, path)
    return value


def _content_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER_FILE)


def _write_marker(folder: Path) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _content_files(folder)
    }
    (folder / MARKER_FILE).write_text(json.dumps({"format": CACHE_FORMAT, "files": files}, indent=1))


def cache_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete cache entry, or None when it is.

    Sizes of all files are checked; sha256 only for files up to 16 MiB (configs,
    tokenizer), so that a multi-hundred-MB weights file does not slow every reload.
    """
    if not folder.is_dir():
        return "missing"
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        expected = marker["files"]
        if marker.get("format") != CACHE_FORMAT:
            return f"cache format {marker.get('format')} != {CACHE_FORMAT}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no valid {MARKER_FILE} ({type(exc).__name__})"
    actual = {p.relative_to(folder).as_posix(): p for p in _content_files(folder)}
    if set(actual) != set(expected):
        return f"file set differs from marker (missing {sorted(set(expected) - set(actual))}, extra {sorted(set(actual) - set(expected))})"
    for rel, path in actual.items():
        size = path.stat().st_size
        if size != expected[rel]["size"]:
            return f"{rel}: size {size} != {expected[rel]['size']}"
        if size <= _FULL_HASH_LIMIT and sha256_file(path) != expected[rel]["sha256"]:
            return f"{rel}: sha256 mismatch"
    return None


# The most a caller waits for another process building the same entry. A model conversion
# holds it for as long as the conversion runs, so the bound is generous; past it the builder
# is taken to be hung and the caller fails naming it rather than waiting on.
CACHE_LOCK_TIMEOUT_S = 3600.0


def ensure_cached(target: Path, build_fn: Callable[[Path], None]) -> Path:
    """Return `target` once it is a complete cache entry, building it with `build_fn` if not.

    `build_fn(tmp_dir)` fills an empty temporary folder. Concurrent callers (threads or
    processes) serialise on `<target>.lock`, so the builder runs once; the folder is
    published with an atomic rename, marker already inside, so readers never see a partial
    entry. A partial or corrupt entry is removed and rebuilt.
    """
    target = Path(target)
    if cache_problem(target) is None:  # fast path: no lock needed for a complete entry
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with file_lock(parent / f"{target.name}.lock", CACHE_LOCK_TIMEOUT_S, f"building cache entry {target}"):
        problem = cache_problem(target)
        if problem is None:  # another process built it while we waited
            return target
        if problem != "missing":
            log.warning("cache entry %s is corrupt or partial (%s); rebuilding", target, problem)
            shutil.rmtree(target)
        # Temp folders left by a crashed builder; safe to drop since we hold the lock.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared between users
        try:
            build_fn(tmp)
            _write_marker(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def cache_dir() -> Path:
    """Where fetched remote files live on this node (under cache_root())."""
    return cache_root() / "storage"


def fetch_target(location: str | os.PathLike) -> tuple:
    """(Location, its FileInfo, the cache path a copy of it lives at) for storage URI
    `location`: `<cache>/storage/<key>/<name>`, the key naming the URI (and a file's size
    and mtime, so replaced content gets a new entry)."""
    loc = resolve(location)
    info = loc.info()
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{loc.uri}: not found")
    stamp = f"{loc.uri}|{info.size}|{info.mtime_ns}" if info.type == pafs.FileType.File else loc.uri
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    name = loc.path.rstrip("/").rsplit("/", 1)[-1] or "root"
    if problem := name_problem(name):
        raise ValueError(f"{loc.uri}: its last part {name!r}, which {problem}, cannot name a cache folder")
    return loc, info, inside_cache(cache_dir() / key / name, loc.uri)


def fetch(location: str | os.PathLike, into: Path | None = None) -> Path:
    """A local path holding `location`'s content: the path itself when local, otherwise a
    copy of the file or folder at `into`, or cached (fetched again when its size or mtime
    changed). Readers of the node cache take a lease instead (dresd.storage.eviction.fetched),
    so the bounded cache never evicts a copy while they read it."""
    if not is_uri(location):
        return Path(location)
    if into is not None:
        loc = resolve(location)
        if not loc.exists():
            raise FileNotFoundError(f"{loc.uri}: not found")
        return loc.download(into)
    loc, info, target = fetch_target(location)
    if target.exists() and info.type == pafs.FileType.File:
        return target
    return loc.download(target)


def fetch_once(uri: str, group: str = "models") -> Path:
    """A local copy of the file or folder at storage URI `uri`, fetched once per node into
    the cache (`<cache>/<group>/fetched/`) under the entry's lock, so concurrent workers of
    one node fetch it once. The entry is named by the URI and the remote files' names and
    sizes: content replaced at the same URI is fetched again."""
    loc = resolve(uri)
    if not loc.exists():
        raise FileNotFoundError(f"{uri}: not found on storage")
    name = loc.path.rstrip("/").rsplit("/", 1)[-1]
    if problem := name_problem(name):
        raise ValueError(f"{uri}: its last part {name!r}, which {problem}, cannot name a cache folder")
    if loc.is_dir():
        stamp = sorted((e.path.removeprefix(loc.path.rstrip("/") + "/"), e.size)
                       for e in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)) if e.is_file)
    else:
        stamp = [(name, loc.info().size)]
    key = hashlib.sha256(json.dumps([uri, stamp]).encode()).hexdigest()[:16]
    target = inside_cache(cache_root() / group / "fetched" / f"{name}-{key}", uri)
    entry = ensure_cached(target, lambda tmp: loc.download(tmp / name))
    return entry / name
