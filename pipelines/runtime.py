"""Connecting to Ray: an existing cluster when an address is given, else a local one."""

from __future__ import annotations

import os

import ray

from dresd.storage.faults import job_env


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if set, else start an embedded local Ray; reuse a live one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # An armed fault point (dresd.storage.faults) must fire inside the job's actors and tasks too,
    # on every node: workers of a cluster do not inherit this process's environment.
    faults = {"runtime_env": {"env_vars": env}} if (env := job_env()) else {}
    if address:
        ray.init(address=address, **faults)
    else:
        ray.init(include_dashboard=False, **faults)
