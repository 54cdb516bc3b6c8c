"""Storage locations: a local path, or any pyarrow filesystem URI (s3://, gs://, hdfs://,
file://, ...; schemes pyarrow does not know go through fsspec, e.g. memory://).

Corpora and datastore roots may live behind a URI so that every node of a cluster sees the
same data. The code that reads them stays local-file code: a remote file or folder is
fetched into a local cache first (`fetch`), keyed by its URI, size and modification time,
so a changed source is fetched again and an unchanged one once per node. Datastore
versions are immutable, so their cache never goes stale.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_uri(location: str | os.PathLike) -> bool:
    """True for "<scheme>://..." locations (file:// included); plain paths are local."""
    return "://" in str(location)


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem: `fs` + `path` inside it, `uri` as the user wrote it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def child(self, *names: str) -> "Location":
        """The location `names` below this one."""
        sub = "/".join(n.strip("/") for n in names)
        return Location(self.fs, self.path.rstrip("/") + "/" + sub, self.uri.rstrip("/") + "/" + sub)

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def entries(self) -> list[pafs.FileInfo]:
        """What is directly inside this folder (name, type, size), by name; one listing call
        ([] when the folder does not exist)."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(infos, key=lambda i: i.base_name)

    def children(self) -> list[str]:
        """Names directly inside this folder, sorted ([] when it does not exist)."""
        return [i.base_name for i in self.entries()]

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as fh:
            return fh.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file; a reader sees the old content or the new, never a part.

        Written under a temporary name and moved where the filesystem can move (local,
        HDFS); object stores (S3, GCS) make a single put visible atomically anyway.
        """
        parent = self.path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{self.path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        try:
            self.fs.move(tmp, self.path)
        except (NotImplementedError, OSError):
            with self.fs.open_output_stream(self.path) as fh:
                fh.write(data)
            self.fs.delete_file(tmp)

    def upload_file(self, local: Path) -> None:
        """Copy local file `local` to this location."""
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local), self.path, destination_filesystem=self.fs)

    def upload(self, local: Path, last: str | None = None) -> None:
        """Copy the files of local folder `local` into this folder; `last` (a file name) is
        copied after all others, so its presence marks a complete copy."""
        names = sorted(p.name for p in local.iterdir() if p.is_file())
        if last in names:
            names.remove(last)
            names.append(last)
        for name in names:
            self.child(name).upload_file(local / name)

    def download(self, local: Path) -> Path:
        """Copy this file or folder to local path `local`, atomically (temp name + rename)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".{local.name}.{uuid.uuid4().hex[:8]}.tmp"
        if self.is_dir():
            tmp.mkdir()
        pafs.copy_files(self.path, str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        if local.is_dir():  # a folder fetched before (or by a concurrent fetch): replace it
            shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
        return local


def resolve(location: str | os.PathLike) -> Location:
    """The filesystem and inner path of a local path or URI (clear error for unknown schemes)."""
    text = str(location)
    if not is_uri(text):
        return Location(pafs.LocalFileSystem(), os.path.abspath(text), text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
        return Location(fs, path, text)
    except Exception as arrow_err:  # pyarrow does not know the scheme: try fsspec
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        scheme, _, rest = text.partition("://")
        try:
            fs = fsspec.filesystem(scheme)
        except (ImportError, ValueError) as err:
            raise ValueError(f"{text}: no filesystem for scheme {scheme!r} (pyarrow: {arrow_err}; fsspec: {err})") from err
        return Location(PyFileSystem(FSSpecHandler(fs)), fs._strip_protocol(text), text)


def file_stamp(location: str | os.PathLike) -> list:
    """[location, size, mtime_ns]: what identifies a corpus file's content for resumability."""
    info = resolve(location).info()
    return [str(location), info.size, info.mtime_ns]
