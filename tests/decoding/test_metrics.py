"""Tests for dresd.decoding.metrics: what one verification step counts, the rates derived from
the counters, sums over requests, and the summary that results files carry."""

from __future__ import annotations

import json

import pytest

from dresd.decoding.metrics import DecodeMetrics, aggregate


def four_steps() -> DecodeMetrics:
    """A plain step, then three steps offering depth-3 trees: nothing, 2 and all 3 accepted."""
    m = DecodeMetrics()
    m.record_step(accepted=0, drafted=0, verified=1, offered_depth=0, new_tokens=1)
    m.record_step(accepted=0, drafted=3, verified=4, offered_depth=3, new_tokens=1)
    m.record_step(accepted=2, drafted=5, verified=6, offered_depth=3, new_tokens=3)
    m.record_step(accepted=3, drafted=3, verified=4, offered_depth=3, new_tokens=4)
    return m


def test_steps_are_counted_and_classified():
    m = four_steps()
    assert (m.target_calls, m.new_tokens, m.verified_positions) == (4, 9, 15)
    # The plain step drafted nothing: it is no drafted step, and offered no depth.
    assert (m.drafted_steps, m.drafted, m.accepted) == (3, 11, 5)
    assert (m.rejects, m.partial_accepts, m.full_accepts) == (1, 1, 1)
    assert m.offered_at == [3, 3, 3]
    assert m.accepted_at == [2, 2, 1]  # depth 1 and 2 accepted twice, depth 3 once
    assert m.acceptance_rate == pytest.approx(5 / 11)
    assert m.mean_accepted_tokens == pytest.approx(9 / 4)  # bonus tokens included
    assert m.per_position_acceptance == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    # A deeper offer later grows the per-depth lists; earlier steps offered nothing there.
    m.record_step(accepted=4, drafted=5, verified=6, offered_depth=5, new_tokens=5)
    assert m.offered_at == [4, 4, 4, 1, 1] and m.accepted_at == [3, 3, 2, 1, 0]
    assert m.partial_accepts == 2


def test_rates_of_nothing_are_zero():
    m = DecodeMetrics()
    assert (m.acceptance_rate, m.mean_accepted_tokens, m.tokens_per_s, m.retrieval_share) == (0.0, 0.0, 0.0, 0.0)
    assert m.per_position_acceptance == []


def test_time_split_and_the_loops_own_time():
    m = DecodeMetrics(new_tokens=20, wall_s=2.0, prefill_s=0.25, model_s=1.0, retrieval_s=0.5)
    assert m.tokens_per_s == pytest.approx(10.0)
    assert m.retrieval_share == pytest.approx(0.25)
    assert m.other_s == pytest.approx(0.25)
    # Timers that overlap (or a clock that went backwards) never give negative time.
    assert DecodeMetrics(wall_s=1.0, model_s=0.9, retrieval_s=0.3).other_s == 0.0


def test_merge_sums_counters_and_per_depth_lists_of_any_length():
    a, b = DecodeMetrics(), four_steps()
    a.record_step(accepted=1, drafted=1, verified=2, offered_depth=1, new_tokens=2)
    a.wall_s = 0.5
    both = a.merge(b)
    assert both.offered_at == [4, 3, 3] and both.accepted_at == [3, 2, 1]
    assert (both.target_calls, both.new_tokens, both.accepted, both.full_accepts) == (5, 11, 6, 2)
    assert both.wall_s == pytest.approx(0.5)
    assert a.offered_at == [1] and b.offered_at == [3, 3, 3]  # the inputs are unchanged
    assert aggregate([a, b, DecodeMetrics()]) == both
    assert aggregate([]) == DecodeMetrics()


def test_summary_carries_the_rates_and_gives_the_counters_back():
    m = four_steps()
    m.wall_s, m.model_s = 1.5, 1.0
    summary = json.loads(json.dumps(m.summary()))  # JSON-ready
    assert summary["acceptance_rate"] == pytest.approx(5 / 11)
    assert summary["mean_accepted_tokens"] == pytest.approx(9 / 4)
    assert summary["per_position_acceptance"] == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert summary["other_s"] == pytest.approx(0.5)
    assert summary["new_tokens"] == 9 and summary["offered_at"] == [3, 3, 3]
    assert DecodeMetrics.from_summary(summary) == m
