"""The app's metrics hub: the latest metrics snapshot of every replica, in one place.

`MetricsHub` is a Serve deployment of the app itself (one replica, no CPU), so deleting the
app (`dresd serve` exiting, `serve delete`, `serve shutdown`) removes it with the rest:
nothing outlives the app. Each replica runs a `Reporter` thread that sends its cumulative
snapshot (dresd.serving.metrics.ServeMetrics.snapshot) every REPORT_EVERY_S; GET /metrics
renders the sum of what the hub holds, and GET /health counts the decoding replicas that
reported lately. A decoding replica that dies keeps its last snapshot in the hub, so the
app's counters survive replica restarts; a restarted hub refills from the next reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable

from ray import serve

log = logging.getLogger(__name__)

# Seconds between a replica's metric reports to the hub (what /metrics sums).
REPORT_EVERY_S = 1.0
# A decoding replica that reported within this many seconds counts as up for GET /health.
HEALTHY_WITHIN_S = 3 * REPORT_EVERY_S
# Seconds a report may take before the reporter gives up on it (the next one follows).
REPORT_TIMEOUT_S = 5.0


# No access log: every replica reports each second, which would bury the app's own lines.
@serve.deployment(name="MetricsHub", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class MetricsHub:
    """Every replica's latest metrics snapshot, keyed by replica name."""

    def __init__(self):
        self.snapshots: dict[str, dict] = {}

    def report(self, snapshot: dict) -> None:
        self.snapshots[snapshot["replica"]] = snapshot

    def collect(self) -> list[dict]:
        return list(self.snapshots.values())


class Reporter:
    """A daemon thread that sends `snapshot()` to the hub now and every REPORT_EVERY_S."""

    def __init__(self, hub, snapshot: Callable[[], dict], name: str):
        self.hub, self.snapshot, self.name = hub, snapshot, name
        self._stop = threading.Event()
        threading.Thread(target=self._run, name=f"{name}-metrics-report", daemon=True).start()

    def _run(self) -> None:
        failing = False
        while True:
            try:
                # A handle call from this plain thread: Serve's router runs on its own loop.
                self.hub.report.remote(self.snapshot()).result(timeout_s=REPORT_TIMEOUT_S)
                failing = False
            except Exception as exc:  # noqa: BLE001 - a hub restarting loses reports, not the replica
                if not failing:  # once per outage, not every second of it
                    log.warning("%s: metrics report failed (%s: %s); retrying every %ss", self.name,
                                type(exc).__name__, exc, REPORT_EVERY_S)
                failing = True
            if self._stop.wait(REPORT_EVERY_S):
                return

    def stop(self) -> None:
        self._stop.set()


def live_decoders(snapshots: list[dict], now: float | None = None) -> dict[str, str | None]:
    """{replica: datastore version} of the decoding replicas that reported within
    HEALTHY_WITHIN_S (the ingress's own snapshots are not decoders)."""
    now = time.time() if now is None else now
    return {s["replica"]: s.get("version") for s in snapshots
            if s.get("decodes", True) and now - s["time"] <= HEALTHY_WITHIN_S}


def main_version(decoders: dict[str, str | None]) -> str | None:
    """The datastore version most live decoders serve (None: none is up)."""
    counts = Counter(v for v in decoders.values() if v is not None)
    return max(counts, key=lambda v: (counts[v], v)) if counts else None
