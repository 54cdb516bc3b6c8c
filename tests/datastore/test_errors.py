"""DatastoreError is one class wherever it is raised, so one `except` catches every refusal."""

from __future__ import annotations

import pytest

import dresd.datastore.errors as errors
import dresd.datastore.integrity as integrity
import dresd.datastore.publish as publish
import dresd.datastore.store as store


def test_every_refusal_is_one_datastore_error():
    assert store.DatastoreError is errors.DatastoreError is integrity.DatastoreError
    assert publish.DatastoreError is errors.DatastoreError
    assert issubclass(publish.PublishConflict, errors.DatastoreError)
    with pytest.raises(store.DatastoreError, match="here holds"):
        integrity.parse_current("a b c", "here")
