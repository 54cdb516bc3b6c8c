"""Fault-injection points: free when unset, checked when set, `wait` bounded."""

from __future__ import annotations

import os

import pytest

from dresd.storage.faults import FaultTimeout, fault_point, parse_faults


def test_fault_specs_are_checked_and_free_when_unset(monkeypatch, tmp_path):
    monkeypatch.delenv("DRESD_FAULT", raising=False)
    fault_point("before_current_swap")  # unset: nothing happens
    assert parse_faults("before_current_swap:wait") == {"before_current_swap": "wait"}
    with pytest.raises(ValueError, match="unknown point 'before_swap'"):
        parse_faults("before_swap:kill")
    with pytest.raises(ValueError, match="action 'stop'; use kill or wait"):
        parse_faults("before_current_swap:stop")
    monkeypatch.setenv("DRESD_FAULT", "before_current_swap:wait")
    monkeypatch.setenv("DRESD_FAULT_RELEASE", str(tmp_path / "go"))
    monkeypatch.setenv("DRESD_FAULT_TIMEOUT", "0.2")
    with pytest.raises(FaultTimeout, match="did not appear within 0.2 s"):
        fault_point("before_current_swap")
    assert (tmp_path / "go.reached").read_text().strip() == str(os.getpid())
    (tmp_path / "go").touch()
    fault_point("before_current_swap")  # released: returns at once
