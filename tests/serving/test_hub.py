"""The metrics hub without Ray: replicas' latest snapshots kept by name, which decoding
replicas count as up for /health, and the version most of them serve."""

from __future__ import annotations

from dresd.serving.hub import HEALTHY_WITHIN_S, MetricsHub, live_decoders, main_version
from dresd.serving.metrics import ServeMetrics


def test_the_hub_keeps_each_replicas_latest_snapshot():
    hub = MetricsHub.func_or_class()
    a = ServeMetrics("a").snapshot()
    hub.report(a)
    hub.report({**a, "version": "v2"})
    hub.report(ServeMetrics("b").snapshot())
    assert sorted((s["replica"], s["version"]) for s in hub.collect()) == [("a", "v2"), ("b", None)]


def test_live_decoders_leave_out_the_ingress_and_the_silent():
    now = 1000.0
    snaps = [{**ServeMetrics("a").snapshot(), "time": now, "version": "v1"},
             {**ServeMetrics("b").snapshot(), "time": now - HEALTHY_WITHIN_S - 1, "version": "v1"},
             {**ServeMetrics("ingress", decodes=False).snapshot(), "time": now},
             {**ServeMetrics("c").snapshot(), "time": now, "version": "v2"},
             {**ServeMetrics("d").snapshot(), "time": now, "version": "v2"}]
    live = live_decoders(snaps, now)
    assert live == {"a": "v1", "c": "v2", "d": "v2"}
    assert main_version(live) == "v2" and main_version({}) is None
