"""Fault-injection points: free when unset, checked when set, `wait` bounded, `kill` at the
n-th hit, and a kill inside a job's worker takes the whole job down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from dresd.storage.faults import FAULT_EXIT_CODE, FaultTimeout, fault_point, job_env, parse_faults


def test_fault_specs_are_checked_and_free_when_unset(monkeypatch, tmp_path):
    monkeypatch.delenv("DRESD_FAULT", raising=False)
    fault_point("before_current_swap")  # unset: nothing happens
    assert parse_faults("before_current_swap:wait") == {"before_current_swap": ("wait", 1)}
    assert parse_faults("during_merge:kill@3, during_add:wait") == {"during_merge": ("kill", 3),
                                                                    "during_add": ("wait", 1)}
    with pytest.raises(ValueError, match="count '0'; use @1, @2"):
        parse_faults("during_merge:kill@0")
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


COUNTER = r"""
import sys
from dresd.storage.faults import fault_point
for i in range(3):
    print(i, flush=True)
    fault_point("during_merge")
"""

# A stand-in for a job: the "driver" starts a "worker" that holds DRESD_FAULT_JOB (as
# pipelines.runtime.ensure_ray hands it to Ray's workers) and dies at a kill point.
DRIVER = r"""
import os, subprocess, sys
from dresd.storage.faults import job_env
env = {**os.environ, **job_env()}
worker = "from dresd.storage.faults import fault_point; fault_point('during_add')"
subprocess.run([sys.executable, "-c", worker], env=env)
print("the driver outlived its worker's kill", flush=True)
"""


def _env(tmp_path, spec: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRESD_FAULT")}
    return {**env, "DRESD_FAULT": spec, "DRESD_FAULT_LOG": str(tmp_path / "log")}


def test_kill_at_the_nth_hit_logs_the_point_and_exits_with_the_fault_code(tmp_path):
    out = subprocess.run([sys.executable, "-c", COUNTER], env=_env(tmp_path, "during_merge:kill@2"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == FAULT_EXIT_CODE and out.stdout.split() == ["0", "1"], out.stderr
    point, action, pid = (tmp_path / "log").read_text().split()
    assert (point, action) == ("during_merge", "kill") and int(pid) > 0


def test_a_worker_killed_at_a_point_takes_its_jobs_driver_down(tmp_path, monkeypatch):
    monkeypatch.delenv("DRESD_FAULT", raising=False)
    assert job_env() == {}  # nothing armed: nothing handed to Ray
    out = subprocess.run([sys.executable, "-c", DRIVER], env=_env(tmp_path, "during_add:kill"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL and "outlived" not in out.stdout, out.stderr
    assert (tmp_path / "log").read_text().split()[:2] == ["during_add", "kill"]
