"""Publishing a datastore version: write it whole, then move CURRENT by compare-and-swap.

A version is written into a claimed temporary folder, checksummed into its manifest,
renamed into place, and only then does CURRENT move, naming the manifest's checksum beside
the id (dresd.storage.pointer): a reader never sees a half-written version, and a publisher
never replaces a change it did not start from (PublishConflict). On a URI root the version
is staged locally and uploaded with its manifest last. Debris of killed publishers is
cleared first (dresd.datastore.debris). Reading a version: dresd.datastore.store.
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

from dresd.storage.eviction import use_version
from dresd.storage.faults import fault_point
from dresd.storage.files import is_uri, resolve, sha256_file
from dresd.storage.pointer import ANY, PointerConflict, swap_pointer
from dresd.datastore.compression import Compressor, save_compressor
from dresd.datastore.debris import (clean_remote, clean_root, publishing, staging_root, tmp_folder, upload_version,
                                    uploading)
from dresd.datastore.errors import DatastoreError
from dresd.datastore.index import IVFDATA, is_on_disk, on_disk_file
from dresd.datastore.integrity import CURRENT, MANIFEST
from dresd.datastore.store import (FORMAT_VERSION, _narrow, check_version_id, derive_key_positions,
                                   read_current, resolve_version_dir)


class PublishConflict(DatastoreError):
    """CURRENT moved on since the change being published was made from it (`expected`);
    `found` is what it names now. `after_write`: seen only after this publisher's own write."""

    def __init__(self, root, new: str | None, expected: str | None, found: str | None, after_write: bool = False):
        self.new, self.expected, self.found, self.after_write = new, expected, found, after_write
        made_from = f"version {expected}" if expected else "an empty root"
        super().__init__(
            f"{root}: publish of {f'version {new}' if new else 'this change'} refused: it was made from "
            f"{made_from}, but CURRENT now names {found} (another publisher's change, kept whole); this "
            f"version is discarded. Run the command again to apply its change on top of {found}."
            if not after_write else f"{root}: CURRENT names {found} right after this publisher wrote {new}: "
            f"a publisher on another machine swapped at the same moment; check `dresd datastore list` "
            f"and rerun whichever change is missing")


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


def key_starts_of(record_offsets: np.ndarray, key_positions: np.ndarray) -> np.ndarray | None:
    """Per-record key starts that reproduce `key_positions` exactly, or None if none do."""
    offsets = np.asarray(record_offsets, dtype=np.int64)
    pos = np.asarray(key_positions, dtype=np.int64)
    starts = np.maximum(0, np.diff(offsets) - 1)  # records without keys: an empty range
    if len(pos):
        rec = np.searchsorted(offsets, pos, side="right") - 1
        recs, first = np.unique(rec, return_index=True)
        starts[recs] = pos[first] - offsets[recs]
    return starts if np.array_equal(derive_key_positions(offsets, starts), pos) else None


def publish(root: str | Path, parts: DatastoreParts, manifest: dict[str, Any], version: str | None = None,
            expect_current: Any = ANY) -> Path | str:
    """Write `parts` as a new immutable version under `root` and make it current.

    `manifest` carries the model identity, prompt format, build parameters and stats; file
    checksums, counts and the format version are added here. Returns the version folder
    (its URI for a URI root). `expect_current` is the version the change was made from
    (None: an empty root): CURRENT moves only if it still names it, else PublishConflict and
    the new version is removed. ANY (the default) replaces whatever is current.
    """
    if version is not None:
        check_version_id(version, f"publish to {root}")
    if expect_current is not ANY and (found := read_current(root)) != expect_current:
        raise PublishConflict(root, version, expect_current, found)  # stale already: write nothing
    if is_uri(root):
        return _publish_remote(str(root), parts, manifest, version, expect_current)
    root = Path(root)
    (root / "versions").mkdir(parents=True, exist_ok=True)
    clean_root(root)  # what killed publishers left (dresd.datastore.debris), before this one writes
    version = version or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    with publishing(root, version) as held:  # claimed until CURRENT names it, or it is discarded
        final = _write_version(root, parts, manifest, version, held)
        fault_point("after_version_rename")
        _make_current(root, version, expect_current, lambda: shutil.rmtree(final, ignore_errors=True), held)
    return final


def _write_version(root: Path, parts: DatastoreParts, manifest: dict[str, Any], version: str, held) -> Path:
    """`parts` as `<root>/versions/<version>`: written into a temporary folder, checksummed, renamed."""
    final = root / "versions" / version
    if final.exists():
        held.settle()
        raise DatastoreError(f"version {version} already exists under {root}; versions are immutable")
    tmp = tmp_folder(root, version)
    tmp.mkdir()
    try:
        # The narrowest integer types that hold the values: bytes per token is a product goal.
        np.save(tmp / "tokens.npy", np.asarray(parts.tokens).astype(_narrow(int(np.max(parts.tokens, initial=0)))))
        np.save(tmp / "record_offsets.npy", np.asarray(parts.record_offsets, dtype=np.int64))
        starts = key_starts_of(parts.record_offsets, parts.key_positions)
        if starts is not None:
            np.save(tmp / "key_starts.npy", starts.astype(_narrow(int(np.max(starts, initial=0)))))
        else:
            np.save(tmp / "key_positions.npy", np.asarray(parts.key_positions).astype(_narrow(len(parts.tokens))))
        (tmp / "sources.json").write_text(json.dumps(parts.sources))
        if parts.deleted is not None and parts.deleted.any():
            np.save(tmp / "deleted.npy", np.asarray(parts.deleted, dtype=bool))
        save_compressor(parts.compressor, tmp / "compressor.npz")
        if is_on_disk(parts.index):  # its lists' file travels with it (found by read_index)
            try:  # the merge wrote it once and never again: a hard link saves copying it
                os.link(on_disk_file(parts.index), tmp / IVFDATA)
            except OSError:  # another filesystem
                shutil.copyfile(on_disk_file(parts.index), tmp / IVFDATA)
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
        held.settle()
        raise
    return final


def _publish_remote(root: str, parts: DatastoreParts, manifest: dict[str, Any], version: str | None,
                    expect_current: Any) -> str:
    """Publish into a local staging root, upload the version (manifest last: a version
    without its manifest is never readable), then move CURRENT."""
    loc = resolve(root)
    clean_remote(root)  # this node's staging folders and uploads of killed publishers
    with staging_root() as staging:
        vdir = publish(staging, parts, manifest, version)
        target = loc.child("versions", vdir.name)
        if target.exists():
            raise DatastoreError(f"version {vdir.name} already exists under {root}; versions are immutable")
        with uploading(root, vdir.name) as held:  # claimed until CURRENT names it, or it is discarded
            upload_version(vdir, target, last=MANIFEST)
            _cache_version(root, vdir)  # the publisher's own copy: no download on first open
            _make_current(root, vdir.name, expect_current, lambda: target.fs.delete_dir(target.path), held)
    return target.uri


def _make_current(root, version: str, expect_current: Any, discard, held) -> None:
    """set_current; on a conflict, `discard()` the new version first (never current: unread).
    The publisher's claim `held` is settled then; after any other error it stays, and the next
    publish removes the version unless CURRENT names it (dresd.datastore.debris)."""
    try:
        set_current(root, version, expect_current)
    except PublishConflict as err:
        if not err.after_write:
            discard()
        held.settle()
        raise
    held.settle()


def _cache_version(root: str, vdir: Path) -> None:
    """Keep the version just uploaded as this node's fetched copy (a cache entry like any
    fetched version: leased only while it is copied, evictable afterwards)."""
    def copy(dst: Path) -> None:
        tmp = dst.parent / f".tmp-{vdir.name}-{uuid.uuid4().hex[:6]}"
        shutil.copytree(vdir, tmp)
        os.replace(tmp, dst)

    use_version(root, vdir.name, copy, Path.exists).release()


def set_current(root: str | Path, version: str, expect_current: Any = ANY) -> None:
    """Point CURRENT at an existing version (atomic; used to publish, pin or roll back):
    only while CURRENT names `expect_current` (PublishConflict otherwise), or whatever it
    names with ANY. The swap's guarantees on paths and URIs: dresd.storage.pointer."""
    check_version_id(version, str(root))
    if is_uri(root):
        mloc = resolve(root).child("versions", version, MANIFEST)
        if version.startswith(".") or not mloc.is_file():
            raise DatastoreError(f"{root}: version {version!r} is missing or incomplete")
        sha = hashlib.sha256(mloc.read_bytes()).hexdigest()
    else:  # resolve_version_dir raises unless a complete, published version
        sha = sha256_file(resolve_version_dir(root, version) / MANIFEST)
    try:  # the manifest's checksum rides with the id: readers check the manifest they read first
        swap_pointer(root, version, expect_current, CURRENT, note=sha)
    except PointerConflict as err:
        raise PublishConflict(root, version, err.expected, err.found, err.after_write) from err

