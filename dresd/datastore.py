"""The datastore format: the contract between build and decode.

A datastore root holds immutable versions and a pointer to the current one:

    <root>/CURRENT                  text: the id of the published version
    <root>/versions/<id>/manifest.json
                         compressor.npz     z-score + PCA (no pickle)
                         index.faiss        faiss index over compressed keys (id i = key i)
                         tokens.npy         every record's tokens, concatenated (uint16 when the
                                            vocabulary fits, else uint32)
                         record_offsets.npy int64, start of each record in tokens (+ end)
                         key_positions.npy  stream position of each key's token (uint32 below 4G tokens)
                         sources.json       source id of each record
                         deleted.npy        (optional) bool per key: deleted, not yet compacted

The value of key i is tokens[p+1 : p+1+N] (p = key_positions[i]), cut at the end of its
record and padded with EOS, so values cost nothing beyond the token stream. A version is
written into a temporary folder, checksummed, renamed into place, and only then does
CURRENT move (atomic rename), so a reader never sees a half-written version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dresd.compression import Compressor, load_compressor, save_compressor

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_ARRAYS = ("tokens", "record_offsets", "key_positions")


class DatastoreError(RuntimeError):
    """A datastore is missing, corrupt, or does not fit the model / prompt format."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class DatastoreParts:
    """Everything a build produces, ready to be written as one version."""

    tokens: np.ndarray  # int32 token stream
    record_offsets: np.ndarray  # int64 (n_records + 1,)
    key_positions: np.ndarray  # int64 (n_keys,)
    sources: list[str]  # one source id per record
    compressor: Compressor
    index: faiss.Index
    deleted: np.ndarray | None = None  # bool per key: tombstoned by a delete, until compaction


def _narrow(max_value: int) -> type:
    """uint16 / uint32 / int64: the smallest dtype holding 0..max_value."""
    if max_value < 2**16:
        return np.uint16
    return np.uint32 if max_value < 2**32 else np.int64


def publish(root: str | Path, parts: DatastoreParts, manifest: dict[str, Any], version: str | None = None) -> Path:
    """Write `parts` as a new immutable version under `root` and make it current.

    `manifest` carries the model identity, prompt format, build parameters and stats; file
    checksums, counts and the format version are added here. Returns the version folder.
    """
    root = Path(root)
    (root / "versions").mkdir(parents=True, exist_ok=True)
    version = version or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    final = root / "versions" / version
    if final.exists():
        raise DatastoreError(f"version {version} already exists under {root}; versions are immutable")
    tmp = root / "versions" / f".tmp-{version}"
    tmp.mkdir()
    try:
        # The narrowest integer types that hold the values: bytes per token is a product goal.
        np.save(tmp / "tokens.npy", np.asarray(parts.tokens).astype(_narrow(int(np.max(parts.tokens, initial=0)))))
        np.save(tmp / "record_offsets.npy", np.asarray(parts.record_offsets, dtype=np.int64))
        np.save(tmp / "key_positions.npy", np.asarray(parts.key_positions).astype(_narrow(len(parts.tokens))))
        (tmp / "sources.json").write_text(json.dumps(parts.sources))
        if parts.deleted is not None and parts.deleted.any():
            np.save(tmp / "deleted.npy", np.asarray(parts.deleted, dtype=bool))
        save_compressor(parts.compressor, tmp / "compressor.npz")
        faiss.write_index(parts.index, str(tmp / "index.faiss"))
        files = sorted(p.name for p in tmp.iterdir())
        full = dict(manifest)
        full.update(
            format_version=FORMAT_VERSION,
            version=version,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            counts={
                "records": int(len(parts.record_offsets) - 1),
                "tokens": int(len(parts.tokens)),
                "keys": int(len(parts.key_positions)),
                **manifest.get("counts", {}),
            },
            files={name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files},
        )
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_current(root, version)
    return final


def set_current(root: str | Path, version: str) -> None:
    """Point CURRENT at an existing version (atomic; used to publish, pin or roll back)."""
    root = Path(root)
    resolve_version_dir(root, version)  # raises unless a complete, published version
    tmp = root / f".{CURRENT}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / CURRENT)


def list_versions(root: str | Path) -> list[str]:
    """Complete versions under `root`, oldest first."""
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    return sorted(p.name for p in vdir.iterdir() if (p / MANIFEST).is_file() and not p.name.startswith("."))


def resolve_version_dir(path: str | Path, version: str | None = None) -> Path:
    """The version folder that `path` designates: a version folder itself, or a root's
    CURRENT (or `version` when given)."""
    path = Path(path)
    if version is None and (path / MANIFEST).is_file():
        return path
    if version is None:
        cur = path / CURRENT
        if not cur.is_file():
            raise DatastoreError(f"{path} is not a datastore (no {MANIFEST} and no {CURRENT} pointer)")
        version = cur.read_text().strip()
    vdir = path / "versions" / version
    # Dot-folders are publishes in progress (or crashed ones): never readable as versions.
    if version.startswith(".") or "/" in version or not (vdir / MANIFEST).is_file():
        raise DatastoreError(f"{path}: version {version!r} is missing or incomplete")
    return vdir


class Datastore:
    """An opened, read-only datastore version: index, compressor, token stream, manifest."""

    def __init__(self, path: str | Path, version: str | None = None, verify: bool = False, mmap: bool = True):
        self.path = resolve_version_dir(path, version)
        self.manifest: dict[str, Any] = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DatastoreError(
                f"{self.path}: format version {self.manifest.get('format_version')} is not supported "
                f"(this DReSD reads version {FORMAT_VERSION})"
            )
        self._check_files(full=verify)
        mode = "r" if mmap else None
        self.tokens = np.load(self.path / "tokens.npy", mmap_mode=mode)
        self.record_offsets = np.load(self.path / "record_offsets.npy")
        self.key_positions = np.load(self.path / "key_positions.npy", mmap_mode=mode)
        self.compressor = load_compressor(self.path / "compressor.npz")
        self.index = faiss.read_index(str(self.path / "index.faiss"))
        self.sources: list[str] = json.loads((self.path / "sources.json").read_text())
        deleted = self.path / "deleted.npy"
        self.deleted: np.ndarray | None = np.load(deleted) if deleted.is_file() else None
        self.eos_id = int(self.manifest["eos_id"])
        self.value_len = int(self.manifest["value_len"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def num_keys(self) -> int:
        return int(len(self.key_positions))

    def _check_files(self, full: bool) -> None:
        for name, meta in self.manifest["files"].items():
            p = self.path / name
            if not p.is_file():
                raise DatastoreError(f"{self.path}: file {name} listed in the manifest is missing")
            if p.stat().st_size != meta["bytes"]:
                raise DatastoreError(f"{self.path}: {name} has {p.stat().st_size} bytes, manifest says {meta['bytes']}")
            if full and sha256_file(p) != meta["sha256"]:
                raise DatastoreError(f"{self.path}: {name} checksum mismatch (corrupt file)")

    def verify(self) -> None:
        """Re-check every file's size and sha256 against the manifest."""
        self._check_files(full=True)

    def check_compatible(self, identity: dict[str, Any], format_fingerprint: str | None = None) -> None:
        """Refuse a store built for another model or prompt format, saying which differs."""
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


def reusable_store(root: str | Path, build_config: Any) -> bool:
    """True when `root`'s current version was built with exactly this BuildConfig."""
    from dresd.config import to_dict

    try:
        return Datastore(root).manifest.get("build_config") == to_dict(build_config)
    except DatastoreError:
        return False
