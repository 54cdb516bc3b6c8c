"""Which datastore version a server decodes with: CURRENT followed between requests, a pin
that freezes it, and versions that fail to open refused while the old one keeps serving.

One implementation for the Ray actor pool's decoders (dresd.serving.decoder) and the HTTP
replicas (dresd.serving.replica). `VersionFollower` holds what is built over the open
version (an Engine, a set of batched decoders) and rebuilds it through `make(store)` when
the version changes; a version is verified in full (every file's sha256, once per node:
dresd.datastore.integrity.verify_once) before it serves.

A pin is either the caller's (the pool sends its own with each request, and records it in
the root as `pins/pool-<id>` so that pruning and node caches keep the version) or the root's
`SERVE_PIN` (written by `write_pin`): every replica that reads the root follows it between
requests, and a restarted replica starts pinned. Both live in the root: dresd.storage.pins.
"""

from __future__ import annotations

import logging
from typing import Callable, Generic, TypeVar

from dresd.datastore.integrity import MANIFEST, verify_once
from dresd.datastore.store import Datastore, DatastoreError, check_version_id, read_current
from dresd.storage.files import resolve
from dresd.storage.pointer import pointer_lock
from dresd.storage.pins import PIN_FILE, read_pin  # noqa: F401  (the pin file is the root's: dresd.storage.pins)

log = logging.getLogger(__name__)

T = TypeVar("T")

def verified(root: str, version: str | None = None) -> Datastore:
    """`root`'s version opened, then verified in full unless this node already did (or found
    it damaged): a server switches to it only after every byte matches its manifest."""
    store = Datastore(root, version)
    verify_once(store)
    return store


def write_pin(root: str, version: str | None) -> None:
    """Pin every server reading `root` to `version` (None: unpin, follow CURRENT again).
    The version must exist and open (DatastoreError otherwise), so a typo pins nothing."""
    loc = resolve(root).child(PIN_FILE)
    if version is None:
        if loc.exists():
            loc.fs.delete_file(loc.path)
        return
    check_version_id(version, str(root))
    Datastore(root, version)  # raises DatastoreError for a missing or incomplete version
    # Under the lock a prune holds (dresd.datastore.prune): it sees this pin, or removed the
    # version before it was written, which is then refused here.
    with pointer_lock(root):
        if not resolve(root).child("versions", version, MANIFEST).is_file():
            raise DatastoreError(f"{root}: version {version!r} was removed while it was being pinned")
        loc.write_bytes(f"{version}\n".encode())


class VersionFollower(Generic[T]):
    """The open version of `root` and `current = make(store)` built over it.

    `follow()` moves to the version wanted (the pin, else CURRENT) when it changed; call it
    between requests, never during one. Not thread-safe: the owner serialises calls.
    `pin_file`: read the root's pin file (HTTP replicas); otherwise only `pin()` pins.
    """

    def __init__(self, root: str | None, name: str, make: Callable[[Datastore | None], T],
                 pin_file: bool = False):
        self.root = str(root) if root else None
        self.name = name
        self.make = make
        self.pin_file = pin_file and self.root is not None
        self.pinned: str | None = None  # set by pin(); the pin file is read at each follow()
        self.refused: dict[str, str] = {}  # version -> why it could not be opened
        self.store: Datastore | None = None
        first = self.wanted() if self.pin_file else None
        self.current: T = self._build(verified(self.root, first) if self.root else None)

    @property
    def version(self) -> str | None:
        return self.store.version if self.store is not None else None

    def _build(self, store: Datastore | None) -> T:
        built = self.make(store)
        self.store = store
        return built

    def open(self, version: str) -> None:
        """Serve `version` now; DatastoreError (or the builder's error) leaves the old one."""
        self.current = self._build(verified(self.root, version))
        log.info("%s: now serving datastore version %s", self.name, version)

    def wanted(self) -> str | None:
        """The version this server should serve now (None: keep what is open)."""
        if self.root is None:
            return None
        if self.pinned is not None:
            return self.pinned
        if self.pin_file:
            pin = read_pin(self.root)
            if pin is not None:
                return pin
        return read_current(self.root)  # None: a bare version folder, or a transient read failure

    def follow(self) -> bool:
        """Switch to the wanted version if it moved; True when it switched. A version that
        cannot be opened is refused once (logged, kept in `refused`) and the old one serves."""
        want = self.wanted()
        if not want or want == self.version or want in self.refused:
            return False
        try:
            self.open(want)
        except Exception as exc:  # incompatible or broken version: keep serving the old one
            self.refused[want] = str(exc)
            log.error("%s: cannot open datastore version %s, staying on %s: %s", self.name, want, self.version, exc)
            return False
        return True

    def pin(self, version: str | None) -> None:
        """Serve `version` until unpinned (None: follow again). Raises when it cannot open."""
        if version is None:
            self.pinned = None
            self.follow()
            return
        if self.root is None:
            raise DatastoreError("this server has no datastore root to pin a version of")
        if version != self.version:
            self.open(version)
        self.pinned = version
