"""Connecting to Ray: an existing cluster when an address is given, else a local one."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if set, else start an embedded local Ray; reuse a live one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
