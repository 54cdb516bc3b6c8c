"""The datastore format: the contract between build and decode.

A datastore root holds immutable versions and a pointer to the current one:

    <root>/CURRENT                  one line: the published version's id and its manifest's sha256
    <root>/versions/<id>/manifest.json
                         compressor.npz     z-score + PCA (no pickle)
                         index.faiss        faiss index over compressed keys (id i = key i)
                         index.ivfdata      (on-disk indexes only) its inverted lists, memory-mapped
                         tokens.npy         every record's tokens, concatenated (uint16 when the
                                            vocabulary fits, else uint32)
                         record_offsets.npy int64, start of each record in tokens (+ end)
                         key_starts.npy     per record: offset of its first key; its keys are every
                                            position from there to the record's second-last token,
                                            so key positions cost ~0 bytes on disk (format 2)
                         key_positions.npy  (only when keys are not that layout, and in format 1)
                                            stream position of each key's token
                         sources.json       source id of each record
                         deleted.npy        (optional) bool per key: deleted, not yet compacted

The value of key i is tokens[p+1 : p+1+N] (p = key_positions[i]), cut at the end of its
record and padded with EOS, so values cost nothing beyond the token stream. Versions are
written whole before CURRENT moves (dresd.datastore.publish), so a reader never sees a
half-written one; this module reads them.
Version ids, manifest file names and symlinks are checked as untrusted (docs/reliability.md);
checksums, fetches and read-only opening: dresd.datastore.integrity.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dresd.storage.eviction import use_version
from dresd.storage.files import is_uri, resolve
from dresd.storage.leases import Lease
from dresd.storage.names import escape_problem, name_problem
from dresd.datastore.compression import load_compressor
from dresd.datastore.errors import DatastoreError  # defined there, imported from here by callers
from dresd.datastore.index import read_index
from dresd.datastore.integrity import (CURRENT, MANIFEST, check_token_ids, current_id, fetch_checked,
                                       file_mismatches, load_array, parse_current, read_manifest, reading)

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1 always stored key_positions.npy


def check_version_id(version: object, where: str, what: str = "version id") -> str:
    """`version` when it is one plain folder name; DatastoreError naming the problem otherwise."""
    problem = name_problem(version)
    if not problem and any(c.isspace() for c in str(version)):
        problem = f"contains whitespace, which would end it early in {CURRENT}'s line"
    if problem:
        raise DatastoreError(f"{where}: {what} {version!r}, which {problem}; a version id is one plain folder name")
    return str(version)


def _narrow(max_value: int) -> type:
    """uint16 / uint32 / int64: the smallest dtype holding 0..max_value."""
    if max_value < 2**16:
        return np.uint16
    return np.uint32 if max_value < 2**32 else np.int64


def derive_key_positions(record_offsets: np.ndarray, key_starts: np.ndarray) -> np.ndarray:
    """Key positions of records whose keys run from `offset + key_start` to their last-but-one token."""
    lo = np.asarray(record_offsets[:-1], dtype=np.int64) + np.asarray(key_starts, dtype=np.int64)
    counts = np.maximum(0, np.asarray(record_offsets[1:], dtype=np.int64) - 1 - lo)
    first = np.cumsum(counts) - counts
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(first, counts) + np.repeat(lo, counts)


def read_current(root: str | Path) -> str | None:
    """The version id CURRENT points at, or None when `root` has no readable pointer (the
    manifest checksum beside it is checked by opening: locate_version)."""
    loc = resolve(root).child(CURRENT)
    try:
        return current_id(loc.read_text())
    except (OSError, ValueError):
        return None


def _current_entry(root: str | Path) -> tuple[str | None, str | None]:
    """CURRENT's version id and the manifest checksum it records ((None, None) when there
    is no pointer); DatastoreError when it cannot be read or is not one such line."""
    try:
        text = resolve(root).child(CURRENT).read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        raise DatastoreError(f"{root}: {CURRENT} is unreadable ({err})") from err
    return parse_current(text, f"{root}: {CURRENT}")


def _checksum_of(root: str | Path, version: str) -> str | None:
    """The manifest checksum CURRENT records for `version`; None when CURRENT names another
    version, records none, or is unreadable (such a version is checked through its files)."""
    try:
        named, sha = _current_entry(root)
    except DatastoreError:
        return None
    return sha if named == version else None


def version_manifest(root: str | Path, version: str) -> dict[str, Any]:
    """The manifest of one version under `root` (no data files are read or fetched)."""
    return json.loads(resolve(root).child("versions", check_version_id(version, str(root)), MANIFEST).read_text())


def list_versions(root: str | Path) -> list[str]:
    """Complete versions under `root`, oldest first."""
    if is_uri(root):
        vloc = resolve(root).child("versions")
        return [v for v in vloc.children() if not v.startswith(".") and vloc.child(v, MANIFEST).is_file()]
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    return sorted(p.name for p in vdir.iterdir() if (p / MANIFEST).is_file() and not p.name.startswith("."))


def resolve_version_dir(path: str | Path, version: str | None = None) -> Path:
    """The version folder that `path` designates: a version folder itself, or a root's
    CURRENT (or `version` when given). A URI's version is fetched into the local cache
    (versions are immutable, so a cached copy stays valid)."""
    return locate_version(path, version)[0]


def locate_version(path: str | Path, version: str | None = None) -> tuple[Path, str | None]:
    """resolve_version_dir, and the sha256 that version's manifest must have: the one CURRENT
    records beside its id (None when CURRENT names another version or records none)."""
    return leased_version(path, version)[:2]


def leased_version(path: str | Path, version: str | None = None) -> tuple[Path, str | None, Lease | None]:
    """locate_version, and for a URI the lease on its cached copy (None for local paths): the
    node cache never evicts the copy while the lease is held (dresd.storage.eviction)."""
    if is_uri(path):
        return _fetch_version(str(path), version)
    path = Path(path)
    if version is None and (path / MANIFEST).is_file():
        return path, (_checksum_of(path.parent.parent, path.name) if path.parent.name == "versions" else None), None
    what, sha = "version id", None
    if version is None:
        if not (path / CURRENT).is_file():
            raise DatastoreError(f"{path} is not a datastore (no {MANIFEST} and no {CURRENT} pointer)")
        (version, sha), what = _current_entry(path), f"{CURRENT} names version id"
    vdir = path / "versions" / check_version_id(version, str(path), what)
    # Dot-folders are publishes in progress (or crashed ones): never readable as versions.
    if version.startswith(".") or not (vdir / MANIFEST).is_file():
        raise DatastoreError(f"{path}: version {version!r} is missing or incomplete")
    if problem := escape_problem(vdir, path):
        raise DatastoreError(f"{path}: version folder {version} {problem}")
    return vdir, (sha if what != "version id" else _checksum_of(path, version)), None


def _fetch_version(root: str, version: str | None) -> tuple[Path, str | None, Lease]:
    loc = resolve(root)
    if version is None and loc.child(MANIFEST).is_file():  # a version folder's URI
        root, version = root.rstrip("/").rsplit("/versions/", 1)[0], loc.path.rstrip("/").rsplit("/", 1)[1]
        loc = resolve(root)
    what, sha = "version id", None
    if version is None:
        (version, sha), what = _current_entry(root), f"{CURRENT} names version id"
        if not version:
            raise DatastoreError(f"{root} is not a datastore (no {MANIFEST} and no {CURRENT} pointer)")
    check_version_id(version, root, what)
    if version.startswith(".") or not loc.child("versions", version, MANIFEST).is_file():
        raise DatastoreError(f"{root}: version {version!r} is missing or incomplete")
    if what == "version id":
        sha = _checksum_of(root, version)
    uri = loc.child("versions", version).uri
    # Fetched once per node, under the entry's lock; every file checked against the manifest
    # before the copy lands.
    lease = use_version(root, version, lambda local: fetch_checked(uri, local, sha),
                        lambda local: (local / MANIFEST).is_file())
    return lease.entry, sha, lease


class Datastore:
    """An opened, read-only datastore version: index, compressor, token stream, manifest.

    `index` maps the published file (dresd.datastore.index.read_index): search it as it is,
    and copy it (serialize / deserialize, not faiss.clone_index, which shares the mapping)
    before adding to it or merging from it."""

    def __init__(self, path: str | Path, version: str | None = None, verify: bool = False, mmap: bool = True):
        self.path, expected_sha, lease = leased_version(path, version)
        # What this version's files live on while it is open: a URI version's cached copy,
        # derived indexes (dresd.drafters.registry.derived_dir). Held until the store is collected.
        self.leases: dict[str, Lease] = {str(self.path): lease} if lease is not None else {}
        # Checked against CURRENT's checksum before anything else trusts it (dresd.datastore.integrity).
        self.manifest, self.manifest_sha256 = read_manifest(self.path, expected_sha)
        if self.manifest.get("version") != self.path.name:
            raise DatastoreError(f"{self.path}: its manifest says version {self.manifest.get('version')!r}, "
                                 f"not its folder's name {self.path.name!r}; a version is read under its own id only")
        if self.manifest.get("format_version") not in READABLE_FORMATS:
            raise DatastoreError(
                f"{self.path}: format version {self.manifest.get('format_version')} is not supported "
                f"(this DReSD reads versions {READABLE_FORMATS})"
            )
        self._check_files(full=verify)
        # Every array is read-only (memory-mapped, or in memory and frozen); a file that does not
        # parse is a DatastoreError naming it.
        self.tokens = load_array(self.path / "tokens.npy", mmap)
        self.record_offsets = load_array(self.path / "record_offsets.npy", False)
        if (self.path / "key_positions.npy").is_file():
            self.key_positions = load_array(self.path / "key_positions.npy", mmap)
        else:
            derived = derive_key_positions(self.record_offsets, load_array(self.path / "key_starts.npy", False))
            self.key_positions = derived.astype(_narrow(len(self.tokens)))
            self.key_positions.flags.writeable = False
        with reading(self.path / "compressor.npz"):
            self.compressor = load_compressor(self.path / "compressor.npz")
        with reading(self.path / "index.faiss"):
            self.index = read_index(self.path / "index.faiss")
        with reading(self.path / "sources.json"):
            self.sources: list[str] = json.loads((self.path / "sources.json").read_text())
        deleted = self.path / "deleted.npy"
        self.deleted: np.ndarray | None = load_array(deleted, False) if deleted.is_file() else None
        if self.deleted is not None and (self.deleted.dtype != bool or self.deleted.shape != (self.num_keys,)):
            # A mask of another length would tombstone the wrong keys or fail mid-decode.
            raise DatastoreError(f"{deleted}: {self.deleted.size} tombstones (dtype {self.deleted.dtype}, shape "
                                 f"{self.deleted.shape}), but the version has {self.num_keys} keys; it needs one bool "
                                 "per key")
        self.eos_id = int(self.manifest["eos_id"])
        self.value_len = int(self.manifest["value_len"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def num_keys(self) -> int:
        return int(len(self.key_positions))

    @property
    def key_dtype(self) -> str:
        """The model dtype its keys were made in ("float32" for stores that predate the record:
        every build ran in float32 then)."""
        return str(self.manifest.get("key_dtype", "float32"))

    def _check_files(self, full: bool) -> None:
        if damage := file_mismatches(self.path, self.manifest["files"], full):
            raise DatastoreError(f"{self.path}: " + "; ".join(map(str, damage)))

    def verify(self) -> None:
        """Re-check every file's size and sha256 against the manifest."""
        self._check_files(full=True)

    def check_compatible(self, identity: dict[str, Any], format_fingerprint: str | None = None,
                         dtype: str | None = None) -> None:
        """Refuse a store built for another model or prompt format, saying which differs; warn
        when `dtype` (the decoding model's) is not the one the keys were made in."""
        built = self.manifest["model"]
        for key in ("name", "architecture", "vocab_size", "hidden_size", "num_layers", "fingerprint"):
            if built.get(key) != identity.get(key):
                raise DatastoreError(
                    f"datastore {self.path} was built for model {built.get('name')!r} "
                    f"({key}={built.get(key)!r}) but the loaded model is {identity.get('name')!r} "
                    f"({key}={identity.get(key)!r}); rebuild the datastore for this model"
                )
        if format_fingerprint is not None and self.manifest["prompt_format"]["fingerprint"] != format_fingerprint:
            raise DatastoreError(
                f"datastore {self.path} was built with prompt format "
                f"{self.manifest['prompt_format']['name']!r} whose token layout differs from this run's; "
                "decode with the datastore's prompt format or rebuild"
            )
        if dtype is not None and dtype != self.key_dtype:
            # Allowed: queries in another precision still find near neighbours, a little less often.
            log.warning("datastore %s holds keys made in %s but the model decodes in %s: the model still "
                        "verifies every draft; acceptance may be lower (docs/precision.md); build in %s to match",
                        self.path, self.key_dtype, dtype, dtype)
        if isinstance(identity.get("vocab_size"), int):  # a drafted id past the embeddings fails in the model
            check_token_ids(f"datastore {self.path}", self.tokens, self.eos_id, identity["vocab_size"])

    def records(self):
        """Every record of the datastore as a list of token ids, in order."""
        offsets = self.record_offsets
        for i in range(len(offsets) - 1):
            yield self.tokens[offsets[i] : offsets[i + 1]].tolist()

    def deleted_records(self) -> np.ndarray:
        """Bool per record: True when a delete tombstoned its keys. A delete marks every key of
        a record and compaction drops a record with any marked key, so one marked key decides."""
        out = np.zeros(len(self.record_offsets) - 1, dtype=bool)
        if self.deleted is not None and self.deleted.any():
            pos = np.asarray(self.key_positions[np.flatnonzero(self.deleted)], dtype=np.int64)
            out[np.searchsorted(self.record_offsets, pos, side="right") - 1] = True
        return out

    def live_records(self):
        """The records no delete has reached, as lists of token ids, in order: what every
        drafter that reads the token streams draws from, so a delete reaches it at once."""
        offsets, dead = self.record_offsets, self.deleted_records()
        for i in np.flatnonzero(~dead).tolist():
            yield self.tokens[offsets[i] : offsets[i + 1]].tolist()

    def values(self, key_ids: np.ndarray, n: int | None = None) -> np.ndarray:
        """(len(key_ids), n) token ids following each key, EOS-padded past its record's end."""
        n = n or self.value_len
        ids = np.asarray(key_ids, dtype=np.int64)
        pos = np.asarray(self.key_positions[ids], dtype=np.int64)
        rec = np.searchsorted(self.record_offsets, pos, side="right") - 1
        end = self.record_offsets[rec + 1]
        idx = pos[:, None] + 1 + np.arange(n)[None, :]
        inside = idx < end[:, None]
        vals = np.asarray(self.tokens[np.minimum(idx, len(self.tokens) - 1)], dtype=np.int64)
        return np.where(inside, vals, self.eos_id)


# ModelConfig fields that choose how decoding runs, never what a build writes (builds run
# the stock layers): a store built under another setting of them is the same store.
DECODE_ONLY_MODEL_FIELDS = ("dual_layout", "weight_codes")


def reusable_store(root: str | Path, build_config: Any) -> bool:
    """True when `root`'s current version was built with exactly this BuildConfig (fields
    added to the config since that build count as their defaults; DECODE_ONLY_MODEL_FIELDS
    are not compared)."""
    from dataclasses import replace

    from dresd.config import from_dict

    try:
        built = from_dict(type(build_config), Datastore(root).manifest.get("build_config"), "build_config")
        model = build_config.model
        built = replace(built, model=replace(built.model, **{f: getattr(model, f) for f in DECODE_ONLY_MODEL_FIELDS}))
        return built == build_config
    except (DatastoreError, ValueError, TypeError):
        return False
