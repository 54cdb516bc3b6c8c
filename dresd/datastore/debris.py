"""Debris of killed publishes, and its removal by the next publish.

A publish claims (dresd.storage.claims) each thing it writes before it creates it, and settles
the claim once CURRENT names its version, or once the version is discarded:

    <root>/versions/.claim-<id>     held from before the temporary folder until the CURRENT swap
    <root>/versions/.tmp-<id>/      the version being written
    <root>/versions/<id>/           renamed into place; not current yet while the claim is held
    <cache>/staging/<n>/            URI roots: the local root a version is written in first
    <cache>/uploads/<key>/.claim-<id>  URI roots: an upload of <id> to the root hashed as <key>

(<cache> is dresd.storage.cache.cache_dir().) A publisher killed at any moment leaves claims
whose lock is free. The next publish to the root, before it writes anything, removes:

- a `.tmp-<id>` folder whose claim is free: half written, never listed nor opened;
- a version whose claim is free and that CURRENT does not name: it was killed between its
  rename and the swap, so it was never current and nothing read it. Versions that were once
  current carry no claim (settled at their swap) and stay, for rollback;
- on URI roots, this node's staging folders and uploads of dead publishers (an upload is
  claimed on the publishing node only, so other nodes never remove it);
- `.trash-*` folders: versions moved aside for removal by a cleaner that died mid-way.

CURRENT's own temporary files are removed by dresd.storage.pointer, under the publish lock.
A version is moved aside under the publish lock after checking CURRENT does not name it, so
a removal never races a swap to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from dresd.storage.cache import cache_dir
from dresd.storage.claims import claim, claim_if_free, claimed_names
from dresd.storage.faults import fault_point
from dresd.storage.files import Location, resolve
from dresd.storage.pointer import pointer_lock, read_pointer

TMP = ".tmp-"
TRASH = ".trash-"


def tmp_folder(root: Path, version: str) -> Path:
    """Where `version` is written before its rename into `<root>/versions/`."""
    return Path(root) / "versions" / f"{TMP}{version}"


def publishing(root: str | os.PathLike, version: str):
    """The claim a publisher holds on `version` of local `root` until CURRENT names it."""
    return claim(Path(root) / "versions", version)


def clean_root(root: str | os.PathLike) -> list[str]:
    """Remove the debris of dead publishers under local `root` (see the module docstring);
    returns the names removed, under versions/."""
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    removed = []
    for entry in sorted(vdir.iterdir()):
        if entry.name.startswith(TMP) and entry.is_dir():
            with claim_if_free(vdir, entry.name[len(TMP):], create=True) as held:
                if held is not None:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
    for version in claimed_names(vdir):
        with claim_if_free(vdir, version) as held:
            if held is not None and (vdir / version).is_dir() and _set_aside(root, vdir, version):
                removed.append(version)
    for entry in sorted(vdir.iterdir()):
        if entry.name.startswith(TRASH):
            shutil.rmtree(entry, ignore_errors=True)
    return removed


def _set_aside(root: str | os.PathLike, vdir: Path, version: str) -> bool:
    """Move a never-current version aside and remove it; False when CURRENT names it."""
    trash = vdir / f"{TRASH}{version}-{uuid.uuid4().hex[:6]}"
    with pointer_lock(root):
        if read_pointer(root) == version:
            return False
        os.rename(vdir / version, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return True


@contextlib.contextmanager
def staging_root() -> Iterator[Path]:
    """A fresh local folder, claimed, to write a URI root's version in; removed afterwards."""
    parent, name = cache_dir() / "staging", uuid.uuid4().hex
    with claim(parent, name) as held:
        try:
            yield parent / name
        finally:
            shutil.rmtree(parent / name, ignore_errors=True)
            held.settle()


def uploads_folder(root: str) -> Path:
    """Where this node's claims on uploads to URI `root` live."""
    return cache_dir() / "uploads" / hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:16]


def uploading(root: str, version: str):
    """The claim this node holds on an upload of `version` to URI `root` until CURRENT names it."""
    return claim(uploads_folder(root), version)


def upload_version(vdir: Path, target: Location, last: str) -> None:
    """Copy version folder `vdir` into `target`, file `last` (the manifest) after the others:
    until it lands, the copy is never listed nor readable."""
    for name in sorted(p.name for p in vdir.iterdir() if p.is_file() and p.name != last):
        target.child(name).upload_file(vdir / name)
        fault_point("during_upload")
    target.child(last).upload_file(vdir / last)


def clean_remote(root: str) -> list[str]:
    """Remove this node's staging folders and uploads to URI `root` left by dead publishers;
    returns what was removed."""
    removed = []
    staging = cache_dir() / "staging"
    if staging.is_dir():
        for entry in sorted(staging.iterdir()):
            if not entry.name.startswith("."):
                with claim_if_free(staging, entry.name, create=True) as held:
                    if held is not None:
                        shutil.rmtree(entry, ignore_errors=True)
                        removed.append(str(entry))
        _settle_leftovers(staging)
    folder = uploads_folder(root)
    for version in claimed_names(folder):
        with claim_if_free(folder, version) as held:
            if held is None:
                continue
            target = resolve(root).child("versions", version)
            with pointer_lock(root):
                if read_pointer(root) != version and target.exists():
                    target.fs.delete_dir(target.path)
                    removed.append(target.uri)
    return removed


def _settle_leftovers(parent: Path) -> None:
    """Drop free markers whose thing is gone (a writer killed before creating it)."""
    for name in claimed_names(parent):
        if not (parent / name).exists():
            with claim_if_free(parent, name):
                pass

