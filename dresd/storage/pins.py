"""Pins recorded in a datastore root: versions that servers keep serving, so that pruning
(`dresd datastore prune`) never removes them and no node's cache evicts its copy of them.

    <root>/SERVE_PIN        one line: the version every HTTP replica reading the root serves
                            (dresd.serving.versions.write_pin; absent: replicas follow CURRENT)
    <root>/pins/<holder>    one line each: the version one holder keeps serving (a Ray decoder
                            pool records its pin as `pool-<id>`), then a note saying who wrote it

A pin lives in the root, not in the holder's memory, because the processes that must
respect it (a prune, another node's cache) cannot ask every holder. A holder that dies
without unpinning leaves its file: the version stays kept (the safe side) until the file is
removed (`unpin(root, holder)`, or deleting the file), and the prune report names it.
"""

from __future__ import annotations

import os
import socket
import time

from dresd.storage.files import resolve
from dresd.storage.names import name_problem
from dresd.storage.pointer import pointer_lock

# The file in a datastore root that pins the HTTP servers to one version (absent: follow CURRENT).
PIN_FILE = "SERVE_PIN"
# The folder of a root holding one file per other holder's pin.
PINS_DIR = "pins"


def _first_word(text: str) -> str | None:
    words = text.split()
    return words[0] if words else None


def read_pin(root: str) -> str | None:
    """The version the root's SERVE_PIN names, or None (no pin, or an unreadable file)."""
    try:
        return _first_word(resolve(root).child(PIN_FILE).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def pin(root: str, holder: str, version: str | None) -> None:
    """Record that `holder` keeps serving `version` of `root` (None: remove its pin). The
    version is not checked here: the holder opened it before pinning."""
    if problem := name_problem(holder):
        raise ValueError(f"pin holder {holder!r}, which {problem}; it names a file of {root}/{PINS_DIR}")
    loc = resolve(root).child(PINS_DIR, holder)
    if version is None:
        if loc.exists():
            loc.fs.delete_file(loc.path)
        return
    note = f"pid {os.getpid()} on {socket.gethostname()} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
    with pointer_lock(root):  # a prune holds it: it sees this pin, or is done before it lands
        loc.write_bytes(f"{version}\n{note}\n".encode())


def unpin(root: str, holder: str) -> None:
    """Remove `holder`'s pin from `root` (nothing when it has none)."""
    pin(root, holder, None)


def root_pins(root: str) -> dict[str, str]:
    """Every pin recorded in `root`: {where it is recorded ("SERVE_PIN", "pins/<holder>"):
    version}. Unreadable pin files are left out; a root that cannot be listed raises OSError."""
    out = {}
    if (serve := read_pin(root)) is not None:
        out[PIN_FILE] = serve
    folder = resolve(root).child(PINS_DIR)
    for holder in folder.children():
        if holder.startswith("."):  # a pin being written (Location.write_bytes' temporary name)
            continue
        try:
            version = _first_word(folder.child(holder).read_text())
        except (OSError, UnicodeDecodeError):
            continue
        if version is not None:
            out[f"{PINS_DIR}/{holder}"] = version
    return out
