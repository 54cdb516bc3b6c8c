"""The ingress's answers to failed decoding calls, without Ray running: which exceptions
mean a dead replica (retried once), and the HTTP status each failure gets. The routes
themselves run over real HTTP in tests/serving/test_app.py."""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from dresd.serving.failover import ReplicaDied
from dresd.serving.ingress import failure, is_replica_death


def test_replica_deaths_are_told_from_other_errors():
    assert is_replica_death(ActorDiedError())
    assert is_replica_death(ActorUnavailableError("gone", None))
    assert is_replica_death(ReplicaUnavailableError("r1"))
    wrapped = RayTaskError("generate", "traceback", ActorDiedError())
    assert is_replica_death(wrapped)
    assert not is_replica_death(ValueError("bad input")) and not is_replica_death(BackPressureError(3, 1))


def test_each_failure_gets_its_status():
    died = failure(ReplicaDied(2, False, ActorDiedError()))
    assert died.status == 503 and "replica" in died.message and "died" in died.message
    assert failure(asyncio.TimeoutError()).status == 504
    full = failure(BackPressureError(3, 1, 503, 1.5))
    assert (full.status, full.headers) == (503, {"Retry-After": "2"})
    assert failure(ValueError("bug")) is None
