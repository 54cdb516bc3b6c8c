"""The build's scratch folder (`BuildConfig.work_dir`): where shards and fill outputs live
between stages, and what makes a build resumable.

It is a local folder (every node must see it: one machine, or a shared mount), or any
storage URI (s3://, gs://, file://, ...). A URI scratch is mirrored into a per-node folder
of the DReSD cache: a stage writes a file locally and pushes it; a stage on another node
pulls it before reading. Every scratch file is written once under a name that says what it
depends on (shard id, compressor/index fingerprint, first key id), so a pulled copy never
goes stale; a re-embedded (previously damaged) shard is caught by its size.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray

from dresd.storage.cache import cache_dir
from dresd.storage.eviction import drop_entry, hold_entry, sweep_orphan_leases
from dresd.storage.files import Location, is_uri, resolve


@dataclass(frozen=True)
class Scratch:
    """A build's work folder; `path` is where this process reads and writes it."""

    location: str  # local folder or URI

    @property
    def remote(self) -> bool:
        return is_uri(self.location)

    @property
    def path(self) -> Path:
        if not self.remote:
            return Path(self.location)
        # Per node, so that nodes sharing one machine (tests) still exchange files for real.
        node = ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else "local"
        # Leased by every process that uses it, until it exits, so the bounded node cache
        # (dresd.storage.eviction) never evicts a mirror under a running build.
        return hold_entry(cache_dir() / "scratch" / node / hashlib.sha256(self.location.encode()).hexdigest()[:16])

    def _remote(self, rel: str) -> Location:
        return resolve(self.location).child(rel)

    def push(self, rel: str, last: str | None = None) -> None:
        """Publish the local file or folder `rel` to the scratch URI (no-op when local);
        in a folder, `last` is copied after the others (a completion marker)."""
        if not self.remote:
            return
        local = self.path / rel
        if local.is_dir():
            self._remote(rel).upload(local, last=last)
        else:
            self._remote(rel).upload_file(local)

    def pull(self, rel: str) -> Path:
        """The local path of file or folder `rel`, fetched from the URI when missing or when
        its size differs (folders: their files, not subfolders)."""
        local = self.path / rel
        if not self.remote:
            return local
        src = self._remote(rel)
        info = src.info()
        if info.type == pafs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)
            for entry in src.entries():  # one listing gives every file's size
                if entry.is_file:
                    self._refresh(src.child(entry.base_name), local / entry.base_name, entry.size)
        elif info.type == pafs.FileType.File:
            self._refresh(src, local, info.size)
        return local

    @staticmethod
    def _refresh(src: Location, local: Path, size: int) -> None:
        if not (local.is_file() and local.stat().st_size == size):
            src.download(local)

    def exists(self, rel: str) -> bool:
        return self._remote(rel).exists() if self.remote else (self.path / rel).exists()

    def children(self, rel: str) -> list[str]:
        """Names inside folder `rel`, sorted ([] when absent)."""
        if self.remote:
            return self._remote(rel).children()
        folder = self.path / rel
        return sorted(os.listdir(folder)) if folder.is_dir() else []

    def remove(self) -> None:
        """Delete the scratch folder (and this machine's mirrors of it)."""
        path = self.path
        drop_entry(path)
        shutil.rmtree(path, ignore_errors=True)
        if self.remote:
            # Mirrors of earlier Ray nodes on this machine too: a killed run's node had another id.
            for mirror in (cache_dir() / "scratch").glob(f"*/{self.path.name}"):
                shutil.rmtree(mirror, ignore_errors=True)
            # Lease files of removed mirrors whose holders died: earlier runs' workers, a killed run's.
            for node in (cache_dir() / "scratch").glob("*/"):
                sweep_orphan_leases(node)
            loc = resolve(self.location)
            if loc.exists():
                loc.fs.delete_dir(loc.path)
