"""What a reader checks before it trusts a datastore version's bytes.

- CURRENT holds one line, `<version id> <sha256 of that version's manifest.json>`. The
  manifest is the first file a reader reads and every other check trusts it, so its own
  checksum sits where the reader finds it first. A CURRENT holding the id alone (written
  before checksums were) still opens, without that check.
- The manifest lists every file's size and sha256. Sizes are checked at every open (a stat
  each); checksums when a version is fetched from a URI (`fetch_checked`: every file, fetched
  again before failing), and once per node before a decoder or an update first uses a
  version (`verify_once`: a marker under the cache root spares the node's other processes).
- Every file is opened read-only (`load_array`, faiss's read-only flag in `index.read_index`),
  and a file that does not parse is a DatastoreError naming it (`reading`), never a traceback
  from numpy or faiss.
- Token ids are checked against the vocabulary of the model decoding with them
  (`check_token_ids`), since a drafted id past the embedding table fails inside the model.
- `find_damage` lists every mismatch of a version at once, for `dresd datastore verify`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dresd.datastore.compression import load_compressor
from dresd.datastore.errors import DatastoreError
from dresd.datastore.index import read_index
from dresd.storage.cache import cache_root, fetch
from dresd.storage.files import sha256_file
from dresd.storage.locks import file_lock
from dresd.storage.names import escape_problem, name_problem

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
# Downloads of one version before a fetch fails: a copy damaged in transit is fetched once more;
# a second damaged copy means the stored files themselves differ from their manifest.
FETCH_ATTEMPTS = 2
# The most a process waits for another one on its node verifying the same version. The holder
# hashes every file of the version, which takes as long as reading it; past this it is taken to
# be hung, and the version is refused (LockTimeout naming the holder) rather than waited on.
VERIFY_LOCK_TIMEOUT_S = 3600.0
# Token ids checked per step: bounds the temporary arrays of a range check over a long stream.
_TOKEN_CHUNK = 1 << 24
# What numpy, zipfile, json and faiss raise on a file that is cut short or not what its name says.
_UNREADABLE = (ValueError, OSError, RuntimeError, EOFError, KeyError, SyntaxError, zipfile.BadZipFile)


@dataclass(frozen=True)
class Mismatch:
    """One way a version's bytes differ from what its manifest (or CURRENT) says."""

    file: str
    what: str  # name | escape | missing | entry | size | sha256 | manifest | version | unreadable
    expected: Any = None
    found: Any = None

    def __str__(self) -> str:
        f, want, got = self.file, self.expected, self.found
        return {
            "name": f"the manifest lists file {f!r}, whose name {got}",
            "escape": f"file {f} {got}",
            "missing": f"file {f} listed in the manifest is missing",
            "entry": f"the manifest's entry for {f} is {got!r}, not {{'bytes': <int>, 'sha256': <hex>}}",
            "size": f"{f} has {got} bytes, manifest says {want}",
            "sha256": f"{f} checksum mismatch (corrupt file): sha256 {got}, manifest says {want}",
            "manifest": f"{f} checksum mismatch: sha256 {got}, {CURRENT} says {want} "
                        f"(the manifest was edited or damaged after it was published)",
            "version": f"{f} says version {got!r}, not its folder's name {want!r}",
            "unreadable": f"{f} is unreadable (a damaged header or content): {got}",
        }[self.what]


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def current_line(version: str, manifest_sha: str) -> str:
    """CURRENT's content for `version` whose manifest has sha256 `manifest_sha`."""
    return f"{version} {manifest_sha}"


def current_id(text: str) -> str | None:
    """The version id a CURRENT file's `text` names (its first word), None when empty."""
    words = text.split()
    return words[0] if words else None


def parse_current(text: str, where: str) -> tuple[str, str | None]:
    """(version id, manifest sha256 or None for an id-only CURRENT) of CURRENT's `text`;
    DatastoreError naming `where` when the line is neither form."""
    words = text.split()
    if len(words) > 2 or (len(words) == 2 and not _is_sha256(words[1])):
        raise DatastoreError(f"{where} holds {text.strip()[:200]!r}; expected one line '<version id> "
                             f"<sha256 of its {MANIFEST}>' (or, from older stores, the id alone)")
    return (words[0] if words else ""), (words[1] if len(words) == 2 else None)


def _parse_manifest(raw: bytes) -> tuple[dict | None, str | None]:
    try:
        manifest = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not JSON ({err})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, "not a manifest (no 'files' table)"
    return manifest, None


def read_manifest(vdir: Path, expected_sha: str | None) -> tuple[dict, str]:
    """The manifest of version folder `vdir` and its sha256, checked against `expected_sha`
    (what CURRENT says; None: nothing to check against)."""
    try:
        raw = (vdir / MANIFEST).read_bytes()
    except OSError as err:
        raise DatastoreError(f"{vdir}: {Mismatch(MANIFEST, 'unreadable', found=err)}") from err
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha is not None and sha != expected_sha:
        raise DatastoreError(f"{vdir}: {Mismatch(MANIFEST, 'manifest', expected_sha, sha)}")
    manifest, problem = _parse_manifest(raw)
    if problem:
        raise DatastoreError(f"{vdir}: {Mismatch(MANIFEST, 'unreadable', found=problem)}")
    return manifest, sha  # type: ignore[return-value]


def _entry_ok(meta: object) -> bool:
    return isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)


def file_mismatches(vdir: Path, files: dict, full: bool) -> list[Mismatch]:
    """How the files of version folder `vdir` differ from the manifest's `files` table: names,
    symlinks, presence and sizes always; sha256 too when `full`."""
    # Symlinks may stay inside the root (the folder above versions/), never leave it.
    root = vdir.parent.parent if vdir.parent.name == "versions" else vdir
    out = []
    for name, meta in files.items():
        if problem := name_problem(name):
            out.append(Mismatch(str(name), "name", found=problem))
            continue
        path = vdir / name
        if problem := escape_problem(path, root):
            out.append(Mismatch(name, "escape", found=problem))
        elif not path.is_file():
            out.append(Mismatch(name, "missing"))
        elif not _entry_ok(meta):
            out.append(Mismatch(name, "entry", found=meta))
        elif (size := path.stat().st_size) != meta["bytes"]:
            out.append(Mismatch(name, "size", meta["bytes"], size))
        elif full and (sha := sha256_file(path)) != meta["sha256"]:
            out.append(Mismatch(name, "sha256", meta["sha256"], sha))
    return out


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Errors raised while parsing `path` become a DatastoreError naming it."""
    try:
        yield
    except _UNREADABLE as err:
        damage = Mismatch(path.name, "unreadable", found=f"{type(err).__name__}: {err}")
        raise DatastoreError(f"{path.parent}: {damage}") from err


def load_array(path: Path, mmap: bool) -> np.ndarray:
    """A .npy file as a read-only array: memory-mapped read-only, or read into memory and
    frozen, so that no code path can write into a published version's data."""
    with reading(path):
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    arr.flags.writeable = False
    return arr


def _parse(path: Path) -> None:
    """Parse `path` the way opening a version does (headers and structure), or raise."""
    if path.suffix == ".npy":
        np.load(path, mmap_mode="r", allow_pickle=False)
    elif path.suffix == ".npz":
        load_compressor(path)
    elif path.suffix == ".faiss":
        read_index(path)
    elif path.suffix == ".json":
        json.loads(path.read_bytes())


def find_damage(vdir: Path, expected_sha: str | None) -> list[Mismatch]:
    """Every way version folder `vdir` differs from its manifest and its manifest from
    `expected_sha` (CURRENT's checksum, None when unknown), plus every file that does not
    parse; [] for an intact version. Nothing raises for damage: it is all in the list."""
    try:
        raw = (vdir / MANIFEST).read_bytes()
    except OSError as err:
        return [Mismatch(MANIFEST, "unreadable", found=err)]
    out = []
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha is not None and sha != expected_sha:
        out.append(Mismatch(MANIFEST, "manifest", expected_sha, sha))
    manifest, problem = _parse_manifest(raw)
    if manifest is None:
        return out + [Mismatch(MANIFEST, "unreadable", found=problem)]
    if manifest.get("version") != vdir.name:
        out.append(Mismatch(MANIFEST, "version", vdir.name, manifest.get("version")))
    damage = file_mismatches(vdir, manifest["files"], full=True)
    # Files cut short or out of place are not parsed: their mismatch already says enough.
    skip = {m.file for m in damage if m.what != "sha256"}
    for name in manifest["files"]:
        if name in skip or name_problem(name):
            continue
        try:
            _parse(vdir / name)
        except Exception as err:  # whatever a damaged file makes its parser raise
            damage.append(Mismatch(name, "unreadable", found=f"{type(err).__name__}: {err}"))
    return out + damage


def fetch_checked(uri: str, into: Path, expected_sha: str | None) -> Path:
    """Download version folder `uri` to `into`, every file checked against the manifest (and
    the manifest against `expected_sha`) before the copy takes its place; a damaged copy is
    fetched again, up to FETCH_ATTEMPTS downloads, then DatastoreError naming each mismatch."""
    damage: list[Mismatch] = []
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        tmp = into.parent / f".fetch-{into.name}-{uuid.uuid4().hex[:8]}"
        try:
            fetch(uri, into=tmp)
            damage = _copy_damage(tmp, expected_sha)
            if not damage:
                try:
                    os.replace(tmp, into)
                except OSError:  # a concurrent fetch put its own (checked) copy there first
                    if not (into / MANIFEST).is_file():
                        raise
                return into
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s: download %d of %d differs from its manifest (%s)%s", uri, attempt, FETCH_ATTEMPTS,
                    "; ".join(map(str, damage)), "; fetching again" if attempt < FETCH_ATTEMPTS else "")
    raise DatastoreError(f"{uri}: each of {FETCH_ATTEMPTS} downloads differs from its manifest: "
                         + "; ".join(map(str, damage)))


def _copy_damage(vdir: Path, expected_sha: str | None) -> list[Mismatch]:
    try:
        raw = (vdir / MANIFEST).read_bytes()
    except OSError as err:
        return [Mismatch(MANIFEST, "unreadable", found=err)]
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha is not None and sha != expected_sha:
        return [Mismatch(MANIFEST, "manifest", expected_sha, sha)]
    manifest, problem = _parse_manifest(raw)
    if manifest is None:
        return [Mismatch(MANIFEST, "unreadable", found=problem)]
    return file_mismatches(vdir, manifest["files"], full=True)


def _marker_path(vdir: Path, manifest_sha: str) -> Path:
    # Keyed by the manifest's checksum (what was verified) and the folder (where: a copy of the
    # same version elsewhere on the node has its own bytes, verified on their own).
    where = hashlib.sha256(os.path.realpath(vdir).encode()).hexdigest()[:16]
    return cache_root() / "verified" / f"{manifest_sha}-{where}.json"


def _stats(vdir: Path, files: dict) -> dict[str, list[int] | None]:
    """[size, mtime] of the manifest and each file: a file replaced since its verification
    makes the marker stale."""
    out: dict[str, list[int] | None] = {}
    for name in [MANIFEST, *files]:
        try:
            st = (vdir / name).stat()
            out[name] = [st.st_size, st.st_mtime_ns]
        except (OSError, TypeError, ValueError):
            out[name] = None
    return out


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _marker_damage(marker: Path, stats: dict) -> list[str] | None:
    """The damage a marker recorded (a list, [] when none), or None when there is no marker
    for these exact files."""
    try:
        seen = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(seen, dict) or seen.get("stats") != stats or not isinstance(seen.get("damage"), list):
        return None
    return [str(d) for d in seen["damage"]]


def verify_once(store: Any) -> None:
    """Check the sha256 of every file of an opened Datastore `store` once per node, before
    its first use; DatastoreError naming each mismatch. The outcome is kept in a marker
    under the cache root keyed by the manifest's checksum and the version folder, so the
    node's other processes (a pool's replicas, the next update) read it instead of
    re-reading every byte, and one verifies while the others wait for its marker."""
    vdir, files = Path(store.path), store.manifest["files"]
    marker = _marker_path(vdir, store.manifest_sha256)
    stats = _stats(vdir, files)
    damage = _marker_damage(marker, stats)
    if damage is None:
        # A cache root this process cannot write (a read-only image) costs the marker, not the check.
        shared = _writable(marker.parent)
        if not shared:
            log.warning("%s: cannot write verification markers there; verifying %s without one", marker.parent, vdir)
        lock = file_lock(marker.with_suffix(".lock"), VERIFY_LOCK_TIMEOUT_S, f"verifying {vdir}") if shared \
            else contextlib.nullcontext()
        with lock:
            damage = _marker_damage(marker, stats)
            if damage is None:
                damage = [str(m) for m in file_mismatches(vdir, files, full=True)]
                if shared:
                    record = {"version": store.manifest.get("version"), "path": str(vdir), "stats": stats,
                              "damage": damage, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                    tmp = marker.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
                    tmp.write_text(json.dumps(record, indent=1))
                    os.replace(tmp, marker)
    if damage:
        raise DatastoreError(f"{vdir}: full verification failed, so this version is not used: " + "; ".join(damage))


def check_token_ids(where: Any, tokens: np.ndarray, eos_id: int, vocab_size: int) -> None:
    """DatastoreError when a token id of `tokens` or `eos_id` is outside [0, vocab_size),
    naming how many are and the largest; one pass over the stream, skipped when its dtype
    cannot hold an id that large."""
    if not 0 <= int(eos_id) < vocab_size:
        raise DatastoreError(f"{where}: its EOS id {eos_id} is outside the model's vocabulary "
                             f"(ids 0..{vocab_size - 1})")
    dtype = np.asarray(tokens[:0]).dtype
    if dtype.kind == "u" and np.iinfo(dtype).max < vocab_size:
        return
    count, largest, smallest = 0, 0, 0
    for start in range(0, len(tokens), _TOKEN_CHUNK):
        part = np.asarray(tokens[start : start + _TOKEN_CHUNK])
        hi, lo = int(part.max()), int(part.min())
        largest, smallest = max(largest, hi), min(smallest, lo)
        if hi >= vocab_size or lo < 0:
            count += int(np.count_nonzero((part >= vocab_size) | (part < 0)))
    if count:
        low = f" and the smallest {smallest}" if smallest < 0 else ""
        raise DatastoreError(
            f"{where}: {count} token ids in tokens.npy are outside the model's vocabulary of {vocab_size} "
            f"(ids 0..{vocab_size - 1}); the largest in the stream is {largest}{low}: it was built with "
            "another tokenizer, or the stream is damaged")
