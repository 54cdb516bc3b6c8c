"""The dtype a datastore's keys were made in: recorded in the manifest, read as float32 for
stores written before the record, and a decoding model in another dtype warned about (not
refused)."""

from __future__ import annotations

import json
import logging

from dresd.datastore.publish import publish
from dresd.datastore.store import Datastore
from tests_support import IDENTITY, make_manifest, make_parts


def test_recorded_key_dtype_is_read_back(tmp_path):
    publish(tmp_path / "s", make_parts(), {**make_manifest(), "key_dtype": "bfloat16"}, version="v1")
    store = Datastore(tmp_path / "s")
    assert store.manifest["key_dtype"] == "bfloat16" and store.key_dtype == "bfloat16"


def test_a_store_without_the_record_opens_as_float32(root):
    manifest = json.loads((root / "versions" / "v1" / "manifest.json").read_text())
    assert "key_dtype" not in manifest  # what every store written before the record looks like
    assert Datastore(root).key_dtype == "float32"


def test_decoding_in_another_dtype_warns_and_goes_on(root, caplog):
    store = Datastore(root)
    with caplog.at_level(logging.WARNING, logger="dresd.datastore.store"):
        store.check_compatible(IDENTITY, dtype="float32")
        store.check_compatible(IDENTITY)  # callers that do not say their dtype: nothing to compare
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="dresd.datastore.store"):
        store.check_compatible(IDENTITY, dtype="bfloat16")
    (record,) = caplog.records
    assert "keys made in float32 but the model decodes in bfloat16" in record.getMessage()
    assert str(store.path) in record.getMessage()
