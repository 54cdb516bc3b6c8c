"""The version a server follows: CURRENT between calls, a pin (the caller's or the root's
SERVE_PIN file), and a version that cannot open refused while the old one serves. The
Decoder's use of it: test_decoder.py; the HTTP replicas': test_replica.py."""

from __future__ import annotations

import pytest

from dresd.datastore.publish import set_current
from dresd.datastore.store import DatastoreError
from dresd.serving.versions import PIN_FILE, VersionFollower, read_pin, write_pin
from tests_support import publish_for_model


@pytest.fixture
def root(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))  # verification markers
    root = tmp_path / "store"
    publish_for_model(root, tiny_lm, "v1")
    publish_for_model(root, tiny_lm, "v2", seed=1)
    return root


def test_the_pin_file_is_written_checked_and_removed(root):
    assert read_pin(str(root)) is None
    write_pin(str(root), "v1")
    assert (root / PIN_FILE).read_text() == "v1\n" and read_pin(str(root)) == "v1"
    with pytest.raises(DatastoreError):
        write_pin(str(root), "v7")  # a typo pins nothing
    with pytest.raises(DatastoreError):
        write_pin(str(root), "../v1")
    assert read_pin(str(root)) == "v1"
    write_pin(str(root), None)
    assert read_pin(str(root)) is None and not (root / PIN_FILE).exists()


def test_a_follower_builds_over_the_version_it_wants(root, tiny_lm):
    built = []

    def make(store):
        if store.version == "v3":
            raise ValueError("built for another model")
        built.append(store.version)
        return store.version

    follower = VersionFollower(str(root), "t", make, pin_file=True)
    assert follower.current == follower.version == "v2" and not follower.follow()
    write_pin(str(root), "v1")
    assert follower.follow() and follower.current == "v1"
    write_pin(str(root), None)
    set_current(root, "v1")
    assert not follower.follow() and follower.version == "v1"  # unpinned, CURRENT names v1 now
    publish_for_model(root, tiny_lm, "v3", seed=2)
    assert not follower.follow() and follower.version == "v1"
    assert follower.refused == {"v3": "built for another model"}
    follower.pin("v2")
    assert follower.version == "v2" and follower.pinned == "v2" and not follower.follow()
    follower.pin(None)
    assert follower.version == "v2" and follower.pinned is None  # v3 stays refused: v2 stays open
    assert built == ["v2", "v1", "v2"]


def test_a_restarted_follower_starts_on_the_pinned_version(root):
    write_pin(str(root), "v1")
    assert VersionFollower(str(root), "t", lambda store: store.version, pin_file=True).version == "v1"
    assert VersionFollower(str(root), "t", lambda store: store.version).version == "v2"  # the pool's kind
