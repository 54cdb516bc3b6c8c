"""Named fault-injection points: tests stop or kill a process at a chosen moment.

`DRESD_FAULT=<point>:<action>[@<n>]` arms one point (several: comma-separated); with `@<n>`
the action runs the n-th time this process reaches the point (default: the first). Unset, a
point costs one environment lookup. Actions:

    kill   the process ends at once (os._exit(FAULT_EXIT_CODE)), as `kill -9` would end it. In a
           Ray worker of a job started by pipelines.runtime.ensure_ray, the job's driver is
           killed too (SIGKILL, when on the same machine): a crash takes the whole job down,
           not one worker that Ray would restart
    wait   the process writes `<release file>.reached` (holding its pid), then blocks until the
           file named by DRESD_FAULT_RELEASE exists; after DRESD_FAULT_TIMEOUT seconds
           (default 60) it raises FaultTimeout instead, so a forgotten release fails a test
           rather than hanging it

With DRESD_FAULT_LOG set, an armed point appends `<point> <action> <pid>` to that file before
acting, so a harness can tell a planned kill from any other death.

Points (POINTS) and where they sit:

    embed_before_shard_rename  pipelines.shards.write_shard (embed actor): some of a shard's files
                               are in its temporary folder; not renamed into place yet
    embed_after_shard_rename   pipelines.embed.Embed: a shard was renamed into place (not yet
                               pushed to a URI scratch)
    during_index_fill          pipelines.index_fill.fill_shard (Ray task): a shard's compressed
                               keys are written; its index file (the completion marker) is not
    during_merge               pipelines.index_fill.fill_and_merge (driver): the first shard index
                               is merged, the others are not
    after_version_rename       dresd.datastore.publish.publish: the version folder is complete and
                               renamed into place; CURRENT has not moved (URI roots: the copy in
                               the local staging root, before the upload)
    before_current_swap        dresd.storage.pointer.swap_pointer: the publish lock is held and the
                               parent checked; CURRENT has not moved yet
    during_current_write       dresd.storage.pointer._write_pointer: the new pointer is in its
                               temporary file, not renamed over CURRENT (URI roots: not written)
    during_upload              dresd.datastore.debris.upload_version (URI roots): after each data
                               file uploaded; the manifest (uploaded last) is not
    during_add                 pipelines.update.update_datastore: the added corpus is embedded and
                               filled; nothing is published
    during_delete              pipelines.update: a delete's new version is computed, not published
    during_compact             pipelines.update: a compact's new version is computed, not published
    during_reindex             pipelines.update: a reindex's new version is computed, not published
    during_part_write          pipelines.decode.DecodeChunks (decode actor): a part file is written
                               under its temporary name, not renamed into place
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

POINTS = ("embed_before_shard_rename", "embed_after_shard_rename", "during_index_fill", "during_merge",
          "after_version_rename", "before_current_swap", "during_current_write", "during_upload",
          "during_add", "during_delete", "during_compact", "during_reindex", "during_part_write")
FAULT_EXIT_CODE = 70  # distinct from Python's own exit codes, so a test can tell a planned kill
DEFAULT_TIMEOUT_S = 60.0
_hits: dict[str, int] = {}  # times this process reached each armed point


class FaultTimeout(RuntimeError):
    """A `wait` fault point was never released."""


def parse_faults(spec: str) -> dict[str, tuple[str, int]]:
    """`"point:action[@n],..."` -> {point: (action, n)}; ValueError naming an unknown point,
    action or count."""
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.partition(":")
        action, _, nth = action.partition("@")
        if point not in POINTS:
            raise ValueError(f"DRESD_FAULT: unknown point {point!r} (known: {', '.join(POINTS)})")
        if action not in ("kill", "wait"):
            raise ValueError(f"DRESD_FAULT: point {point!r} has action {action!r}; use kill or wait")
        if nth and not (nth.isdigit() and int(nth) >= 1):
            raise ValueError(f"DRESD_FAULT: point {point!r} has count {nth!r}; use @1, @2, ...")
        faults[point] = (action, int(nth or 1))
    return faults


def fault_point(point: str) -> None:
    """Run the fault armed at `point` by DRESD_FAULT, if any."""
    spec = os.environ.get("DRESD_FAULT")
    if not spec:
        return
    armed = parse_faults(spec).get(point)
    if armed is None:
        return
    action, nth = armed
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != nth:
        return
    if log := os.environ.get("DRESD_FAULT_LOG"):
        with open(log, "a") as fh:
            fh.write(f"{point} {action} {os.getpid()}\n")
    if action == "kill":
        _kill_job()
        os._exit(FAULT_EXIT_CODE)
    _wait(point)


def job_env() -> dict[str, str]:
    """The DRESD_FAULT* variables of this process, plus this process as the job's driver, for
    the Ray workers of a job it starts ({} when no fault is armed: then nothing is passed)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("DRESD_FAULT") and k != "DRESD_FAULT_JOB"}
    if env.get("DRESD_FAULT"):
        env["DRESD_FAULT_JOB"] = f"{socket.gethostname()} {os.getpid()}"
        return env
    return {}


def _kill_job() -> None:
    host, _, pid = os.environ.get("DRESD_FAULT_JOB", "").partition(" ")
    if pid.isdigit() and host == socket.gethostname() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(point: str) -> None:
    release = os.environ.get("DRESD_FAULT_RELEASE")
    if not release:
        raise ValueError(f"DRESD_FAULT: point {point!r} waits, but DRESD_FAULT_RELEASE names no file")
    timeout = float(os.environ.get("DRESD_FAULT_TIMEOUT", DEFAULT_TIMEOUT_S))
    Path(release + ".reached").write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + timeout
    while not Path(release).exists():
        if time.monotonic() > deadline:
            raise FaultTimeout(f"fault point {point!r}: {release} did not appear within {timeout:g} s")
        time.sleep(0.02)
