"""Named fault-injection points: tests stop or kill a process at a chosen moment.

`DRESD_FAULT=<point>:<action>` arms one point (several: comma-separated). Unset, a point
costs one environment lookup. Actions:

    kill   the process ends at once (os._exit(FAULT_EXIT_CODE)), as `kill -9` would end it
    wait   the process writes `<release file>.reached` (holding its pid), then blocks until the
           file named by DRESD_FAULT_RELEASE exists; after DRESD_FAULT_TIMEOUT seconds
           (default 60) it raises FaultTimeout instead, so a forgotten release fails a test
           rather than hanging it

Points (POINTS) and where they sit:

    before_current_swap   dresd.storage.pointer.swap_pointer: the publish lock is held and the
                          parent checked; CURRENT has not moved yet
"""

from __future__ import annotations

import os
import time
from pathlib import Path

POINTS = ("before_current_swap",)
FAULT_EXIT_CODE = 70  # distinct from Python's own exit codes, so a test can tell a planned kill
DEFAULT_TIMEOUT_S = 60.0


class FaultTimeout(RuntimeError):
    """A `wait` fault point was never released."""


def parse_faults(spec: str) -> dict[str, str]:
    """`"point:action,..."` -> {point: action}; ValueError naming an unknown point or action."""
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.partition(":")
        if point not in POINTS:
            raise ValueError(f"DRESD_FAULT: unknown point {point!r} (known: {', '.join(POINTS)})")
        if action not in ("kill", "wait"):
            raise ValueError(f"DRESD_FAULT: point {point!r} has action {action!r}; use kill or wait")
        faults[point] = action
    return faults


def fault_point(point: str) -> None:
    """Run the fault armed at `point` by DRESD_FAULT, if any."""
    spec = os.environ.get("DRESD_FAULT")
    if not spec:
        return
    action = parse_faults(spec).get(point)
    if action == "kill":
        os._exit(FAULT_EXIT_CODE)
    if action == "wait":
        _wait(point)


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
