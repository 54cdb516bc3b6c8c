"""The build's shard fills are waited for a bounded time (issue 25): a stuck fill ends the
build with an error naming the unfinished shards instead of hanging it."""

from __future__ import annotations

import time

import pytest
import ray

import pipelines.index_fill as index_fill


def test_stuck_fills_end_in_a_timeout_naming_the_shards(ray_session, monkeypatch):
    @ray.remote(num_cpus=0.25)
    def stuck_fill(work, sid, tag, first_id):
        time.sleep(300)

    monkeypatch.setattr(index_fill, "fill_shard", stuck_fill)
    monkeypatch.setattr(index_fill, "FILL_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"index fill: 2 shard\(s\) not filled within 1 s .*\['s0', 's1'\]"):
        index_fill.fill_and_merge(None, ["s0", "s1"], "tag", [0, 5])
    assert time.monotonic() - t0 < 30
