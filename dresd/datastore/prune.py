"""Removing old datastore versions (`dresd datastore prune ROOT --keep N`).

Versions are immutable and never removed by a change, so text a delete and a compaction
dropped still lives in every older version. Pruning removes the versions that CURRENT and
pins do not use: of the versions up to and including CURRENT, oldest first, all but the
newest `keep`, except those a pin recorded in the root names (the HTTP replicas' SERVE_PIN,
a decoder pool's `pins/pool-<id>`: dresd.storage.pins), which are kept and reported.
Versions newer than CURRENT (a publish in progress, or versions rolled back from) are kept:
removing one could pull a version from under a publisher about to make it current.

Age is the manifest's `created_at`; within one second a child is newer than its parent
(`parent` links). CURRENT cannot move, and no pin can be written, while pruning runs (the
publishers' lock, dresd.storage.pointer, which pin writers take too); but a rollback checks
its version before taking that lock: prune when no rollback is under way. A pin left by a
holder that died keeps its version until the pin file is removed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dresd.datastore.store import MANIFEST, DatastoreError, check_version_id, list_versions, read_current, \
    version_manifest
from dresd.storage.files import is_uri, resolve
from dresd.storage.pins import root_pins
from dresd.storage.pointer import pointer_lock


@dataclass
class PruneReport:
    """What a prune did: the versions removed and kept (oldest first), CURRENT, and the
    versions kept only because a pin names them ({version: where each pin is recorded})."""

    root: str
    current: str
    removed: list[str]
    kept: list[str]
    pinned: dict[str, list[str]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{self.root}: CURRENT is {self.current}",
               f"removed {len(self.removed)} version(s): {', '.join(self.removed) or '-'}",
               f"kept {len(self.kept)} version(s): {', '.join(self.kept)}"]
        if self.pinned:
            out.append("kept for their pins: " + ", ".join(f"{v} ({', '.join(where)})"
                                                         for v, where in self.pinned.items()))
        return out


def _created(manifest: dict[str, Any]) -> datetime:
    """The manifest's creation time (a missing or unreadable one counts as oldest)."""
    try:
        stamp = datetime.strptime(str(manifest.get("created_at")), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return stamp


def age_order(manifests: dict[str, dict[str, Any]]) -> list[str]:
    """Version ids oldest first: by creation time, then by depth along `parent` links (a
    child made in its parent's second is newer), then by id."""
    depth: dict[str, int] = {}
    for start in manifests:
        chain, v = [], start
        # Manifests are untrusted: a parent loop ends the walk instead of running forever.
        while v in manifests and v not in depth and v not in chain:
            chain.append(v)
            v = manifests[v].get("parent")
        base = depth.get(v, -1)
        for i, name in enumerate(reversed(chain)):
            depth[name] = base + 1 + i
    return sorted(manifests, key=lambda v: (_created(manifests[v]), depth[v], v))


def _remove_version(root: str | Path, version: str) -> None:
    """Remove one version folder, its manifest first: a half-removed version is never
    listed nor opened (both need the manifest)."""
    check_version_id(version, str(root))
    if is_uri(root):
        loc = resolve(root).child("versions", version)
        loc.fs.delete_file(loc.child(MANIFEST).path)
        loc.fs.delete_dir(loc.path)
        return
    folder = Path(root) / "versions" / version
    if folder.is_symlink():  # the link goes, never what it points at
        folder.unlink()
        return
    (folder / MANIFEST).unlink()
    shutil.rmtree(folder)


def prune_versions(root: str | Path, keep: int) -> PruneReport:
    """Remove the versions of `root` older than the newest `keep` up to CURRENT (CURRENT
    always kept; versions newer than CURRENT, and versions a pin in the root names, kept
    too). Returns what was removed and kept, and which versions only their pins kept."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1 (CURRENT counts as one), got {keep!r}")
    with pointer_lock(root):
        current = read_current(root)
        if current is None:
            raise DatastoreError(f"{root}: no CURRENT pointer, so no version is known to be in use; nothing pruned")
        check_version_id(current, str(root), "CURRENT names version id")
        versions = list_versions(root)
        if current not in versions:
            raise DatastoreError(f"{root}: CURRENT names version {current!r}, which is missing or incomplete; "
                                 "nothing pruned")
        order = age_order({v: version_manifest(root, v) for v in versions})
        upto = order[: order.index(current) + 1]
        pins: dict[str, list[str]] = {}
        for where, version in root_pins(str(root)).items():
            pins.setdefault(version, []).append(where)
        old = upto[:-keep]
        removed = [v for v in old if v not in pins]
        for version in removed:
            _remove_version(root, version)
    return PruneReport(str(root), current, removed, [v for v in order if v not in removed],
                       {v: pins[v] for v in old if v in pins})
