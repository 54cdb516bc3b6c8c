"""Connecting to Ray: an existing cluster when an address is given, else a local one; and
checking that a local folder the job's workers write into is one that every node sees."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dresd.storage.eviction import cache_env
from dresd.storage.faults import job_env


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if set, else start an embedded local Ray; reuse a live one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # An armed fault point (dresd.storage.faults) must fire inside the job's actors and tasks too,
    # on every node, and the cache's bound (dresd.storage.eviction) holds there: workers of a
    # cluster do not inherit this process's environment.
    faults = {"runtime_env": {"env_vars": env}} if (env := {**cache_env(), **job_env()}) else {}
    if address:
        ray.init(address=address, **faults)
    else:
        ray.init(include_dashboard=False, **faults)


class NotShared(RuntimeError):
    """A local folder that the job's workers write into is not the same folder on every node."""


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return os.path.exists(path)


def check_shared_folder(folder: Path, what: str, timeout_s: float = 120.0) -> None:
    """Refuse a local `folder` (a build's scratch, a decode output) that some alive node of a
    multi-node cluster does not see: workers there would write where the driver never reads.
    A probe file written here is looked for by one task on every node (a shared mount passes)."""
    if not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".node-probe-{uuid.uuid4().hex[:8]}"
    probe.touch()
    try:
        refs = {n["NodeID"]: _sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe)) for n in nodes}
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    finally:
        probe.unlink(missing_ok=True)
    if blind := [node[:12] for node, ok in seen.items() if not ok]:
        raise NotShared(f"{what} {folder} is a local folder that {len(blind)} of the cluster's {len(nodes)} nodes "
                        f"({', '.join(blind)}) do not share: their workers would write where this driver never "
                        "reads. Use a storage URI (s3://, gs://, file:// on a shared mount) or a mount every node has")
