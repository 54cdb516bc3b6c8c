"""Where batch decoding's part files live: a local folder or a storage URI (s3://, gs://,
file://, ...), read and written the same way from the driver and from any node's actors.

A part becomes visible only when complete: it is written under a temporary name beside its
final one and moved into place (a rename on a filesystem; on an object store the final
object appears whole). Parts whose chunk is outside the current plan (left by an earlier
`limit` or `chunk_rows`) are removed by the run that plans without them, so the folder holds
exactly the plan's rows. One run at a time per output: a run holds a lock named after the
output on its driver's node (jobs' drivers run on the head), and a second run is refused
naming the holder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from dresd.storage.cache import cache_dir
from dresd.storage.faults import fault_point
from dresd.storage.files import Location, is_uri, resolve
from dresd.storage.locks import LockTimeout, file_lock

META_KEY = b"dresd_chunk"
PART = re.compile(r"^part-(\d{6})\.parquet$")
TMP = re.compile(r"^\.part-\d{6}\.parquet\.tmp-")


class OutputBusy(RuntimeError):
    """Another decoding run holds the output."""


class Parts:
    """The part files of one decoding output (local folder or storage URI)."""

    def __init__(self, output: str):
        self.output = output
        self.loc: Location = resolve(output)

    def name(self, chunk: int) -> str:
        return f"part-{chunk:06d}.parquet"

    def location(self, chunk: int) -> Location:
        return self.loc.child(self.name(chunk))

    def prepare(self) -> list[str]:
        """Create the output folder and remove temporary files of crashed writers; returns
        the part names found (complete parts only)."""
        self.loc.fs.create_dir(self.loc.path, recursive=True)
        names = []
        for entry in self.loc.entries():
            if TMP.match(entry.base_name):
                self.loc.fs.delete_file(entry.path)
            elif PART.match(entry.base_name):
                names.append(entry.base_name)
        return sorted(names)

    def meta(self, chunk: int) -> dict | None:
        """The chunk record stored in a part's parquet metadata (None if missing or unreadable)."""
        import pyarrow.parquet as pq

        loc = self.location(chunk)
        try:
            return json.loads(pq.read_schema(loc.path, filesystem=loc.fs).metadata[META_KEY])
        except Exception:  # noqa: BLE001 - a missing, torn or foreign file is simply "not done"
            return None

    def exists(self, chunk: int) -> bool:
        return self.location(chunk).exists()

    def read(self, chunk: int, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        loc = self.location(chunk)
        return pq.read_table(loc.path, filesystem=loc.fs, columns=columns)

    def write(self, chunk: int, table) -> None:
        """Write `table` as chunk's part: whole or not at all, for any reader on any node."""
        import pyarrow.parquet as pq

        final = self.location(chunk)
        tmp = self.loc.child(f".{self.name(chunk)}.tmp-{uuid.uuid4().hex[:8]}")
        self.loc.fs.create_dir(self.loc.path, recursive=True)
        try:
            if is_uri(self.output):
                pq.write_table(table, tmp.path, filesystem=tmp.fs)
            else:
                pq.write_table(table, tmp.path)
                with open(tmp.path, "rb") as fh:
                    os.fsync(fh.fileno())
            fault_point("during_part_write")
            self.loc.fs.move(tmp.path, final.path)  # readers see the old part or the whole new one
        finally:
            if tmp.info().type != pafs.FileType.NotFound:
                tmp.fs.delete_file(tmp.path)

    def remove_outside(self, found: list[str], planned: set[int]) -> list[str]:
        """Remove parts whose chunk is not in `planned`; returns their names."""
        gone = [n for n in found if int(PART.match(n).group(1)) not in planned]
        for n in gone:
            self.loc.fs.delete_file(self.loc.child(n).path)
        return gone

    def write_text_file(self, dest: str, lines: Iterator[str]) -> None:
        """Write `lines` to file `dest` (local or URI), visible only when complete."""
        loc = resolve(dest)
        loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
        tmp = loc.path.rsplit("/", 1)
        tmp = f"{tmp[0]}/.{tmp[1]}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with loc.fs.open_output_stream(tmp) as fh:
                for line in lines:
                    fh.write(line.encode("utf-8"))
            loc.fs.move(tmp, loc.path)
        finally:
            if loc.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                loc.fs.delete_file(tmp)


def _lock_path(output: str) -> Path:
    """This node's lock file for `output` (a resolved path or a URI), in the cache: the
    output folder holds part files only."""
    return cache_dir() / "decode-locks" / (hashlib.sha256(output.encode()).hexdigest()[:16] + ".lock")


@contextmanager
def exclusive_run(output: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold `output` for one decoding run; OutputBusy when another run holds it past `wait_s`."""
    path = _lock_path(output)
    held = ExitStack()
    try:
        held.enter_context(file_lock(path, wait_s, f"decoding into {output}"))
    except LockTimeout as exc:
        raise OutputBusy(f"{output}: another decoding run is writing this output ({exc}); wait for it to finish, "
                         "or choose another output") from None
    with held:
        yield
