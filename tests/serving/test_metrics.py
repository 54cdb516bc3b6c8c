"""Prometheus text of the serve metrics: vLLM's counter names, replicas summed, stale
replicas out of the gauges but not out of the counters."""

from __future__ import annotations

from dresd.decoding.metrics import DecodeMetrics
from dresd.serving.metrics import ServeMetrics, render


def values(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def replica(name: str, accepted_at: list[int], version: str) -> ServeMetrics:
    m = ServeMetrics(name)
    m.finished(DecodeMetrics(new_tokens=10, drafted_steps=3, drafted=8, accepted=sum(accepted_at),
                             accepted_at=accepted_at, retrieval_s=0.5), prompt_tokens=7)
    m.outcome("success")
    m.outcome("bad_request")
    m.observe("dresd:e2e_request_latency_seconds", 0.3)
    m.gauges["dresd:num_requests_waiting"] = 2
    m.version = version
    return m


def test_one_scrape_sums_every_replica():
    a, b = replica("a", [3, 1], "v1"), replica("b", [2, 0, 1], "v2")
    out = values(render([a.snapshot(), b.snapshot()]))
    assert out["dresd:spec_decode_num_drafts_total"] == 6
    assert out["dresd:spec_decode_num_draft_tokens_total"] == 16
    assert out["dresd:spec_decode_num_accepted_tokens_total"] == 7
    per_pos = [out[f'dresd:spec_decode_num_accepted_tokens_per_pos_total{{position="{d}"}}'] for d in range(3)]
    assert per_pos == [5, 1, 1]
    assert out['dresd:requests_total{outcome="success"}'] == 2 and out['dresd:requests_total{outcome="bad_request"}'] == 2
    assert out["dresd:generation_tokens_total"] == 20 and out["dresd:prompt_tokens_total"] == 14
    assert out['dresd:e2e_request_latency_seconds_bucket{le="0.25"}'] == 0
    assert out['dresd:e2e_request_latency_seconds_bucket{le="0.5"}'] == 2
    assert out['dresd:e2e_request_latency_seconds_bucket{le="+Inf"}'] == 2
    assert out["dresd:e2e_request_latency_seconds_count"] == 2
    assert out["dresd:num_requests_waiting"] == 4
    assert out['dresd:datastore_version_info{replica="a",version="v1"}'] == 1
    assert out['dresd:datastore_version_info{replica="b",version="v2"}'] == 1


def test_a_silent_replica_leaves_the_gauges_but_keeps_its_counts():
    a, b = replica("a", [1], "v1").snapshot(), replica("b", [1], "v1").snapshot()
    b["time"] -= 3600
    out = values(render([a, b]))
    assert out["dresd:num_requests_waiting"] == 2 and out["dresd:spec_decode_num_accepted_tokens_total"] == 2
    assert not any("replica=\"b\"" in k for k in out)
