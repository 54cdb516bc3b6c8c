"""Names from untrusted places checked before they become paths.

A datastore may come from anyone: its CURRENT file names a version folder, its manifest
lists file names, and a URI's last part names a cache folder. Each such name must be one
plain entry of its folder, so that joining it to a trusted folder stays inside that folder;
and what it names must not be a symlink that leads out of the tree it belongs to.
"""

from __future__ import annotations

import os
from pathlib import Path


def name_problem(name: object) -> str | None:
    """Why `name` is not one plain file or folder name, or None when it is."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "climbs out of its folder ('..')"
    if "/" in name or "\\" in name or os.sep in name:
        return "contains a path separator"
    if name == ".":
        return "is '.', the folder itself"
    return None


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when `path`, every symlink followed, lies in `root` (itself resolved) or is it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def escape_problem(path: str | os.PathLike, root: str | os.PathLike) -> str | None:
    """Why `path` leads outside `root` (naming the symlink's target), or None when it does not."""
    if is_inside(path, root):
        return None
    kind = "is a symlink leading" if Path(path).is_symlink() else "leads"
    return f"{kind} outside {root} (to {os.path.realpath(path)})"
