"""Fixtures of the datastore tests."""

from __future__ import annotations

import pytest

from dresd.datastore.publish import publish
from tests_support import make_manifest, make_parts


@pytest.fixture
def root(tmp_path):
    """A local datastore root with one published version, v1, of the three test records."""
    r = tmp_path / "store"
    publish(r, make_parts(), make_manifest(), version="v1")
    return r
