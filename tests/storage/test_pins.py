"""Tests for dresd.storage.pins: the root's SERVE_PIN and its holders' pins, on a path and a URI."""

from __future__ import annotations

import uuid

import pytest

from dresd.storage.pins import PIN_FILE, pin, read_pin, root_pins, unpin


@pytest.mark.parametrize("kind", ["path", "uri"])
def test_pins_are_recorded_in_the_root_and_listed(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))  # a URI root's lock lives there
    root = str(tmp_path / "root") if kind == "path" else f"memory://pins-{uuid.uuid4().hex}"
    assert read_pin(root) is None and root_pins(root) == {}
    pin(root, "pool-a", "v1")
    pin(root, "pool-b", "v2")
    pin(root, "pool-a", "v3")  # a holder has one pin: the latest
    assert root_pins(root) == {"pins/pool-a": "v3", "pins/pool-b": "v2"}
    unpin(root, "pool-b")
    unpin(root, "pool-b")  # nothing left: nothing done
    assert root_pins(root) == {"pins/pool-a": "v3"}
    if kind == "path":
        (tmp_path / "root" / PIN_FILE).write_text("v9\n")
        text = (tmp_path / "root" / "pins" / "pool-a").read_text().splitlines()
        assert text[0] == "v3" and text[1].startswith("pid ")  # who wrote it, for the operator
        assert read_pin(root) == "v9" and root_pins(root) == {"SERVE_PIN": "v9", "pins/pool-a": "v3"}


def test_a_pin_holder_is_one_plain_name(tmp_path):
    with pytest.raises(ValueError, match="pin holder '../x'"):
        pin(str(tmp_path), "../x", "v1")


def test_empty_and_temporary_pin_files_are_not_pins(tmp_path):
    (tmp_path / "pins").mkdir()
    (tmp_path / "pins" / "empty").write_text("\n")
    (tmp_path / "pins" / ".half.1234.tmp").write_text("v1\n")
    (tmp_path / PIN_FILE).write_text("")
    assert root_pins(str(tmp_path)) == {}
