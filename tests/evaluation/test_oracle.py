"""Tests for dresd.evaluation.oracle: the speed a method would reach verifying only what it accepts."""

from __future__ import annotations

import pytest

from dresd.config import SpeculativeConfig
from dresd.decoding.budget import CostModel
from dresd.decoding.engine import Engine
from dresd.decoding.loop import Generation
from dresd.decoding.metrics import DecodeMetrics
from dresd.evaluation.compare import MethodRun, markdown_table, summarize
from dresd.evaluation.oracle import (accepted_histogram, oracle_forward_s, oracle_tokens_per_s, oracle_wall_s,
                                     plain_step_s)
from tests_support import one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

COST = CostModel([1, 2, 4, 8], [1.0, 1.5, 2.5, 4.0])


def stepped(steps: list[tuple[int, int]], wall_s: float, model_s: float) -> DecodeMetrics:
    """Metrics of steps given as (accepted, offered depth), accounted by the loop's own record_step."""
    m = DecodeMetrics(wall_s=wall_s, model_s=model_s)
    for accepted, depth in steps:
        m.record_step(accepted, depth, depth + 1, depth, accepted + 1)
    return m


def test_histogram_counts_steps_by_accepted_tokens():
    # A plain step, a rejected draft, 2 of 4 accepted, 3 of 3 accepted.
    m = stepped([(0, 0), (0, 2), (2, 4), (3, 3)], wall_s=10.0, model_s=6.0)
    assert accepted_histogram(m) == [2, 0, 1, 1, 0]  # one entry per offered depth
    assert sum(accepted_histogram(DecodeMetrics())) == 0


def test_inconsistent_metrics_are_an_error():
    with pytest.raises(ValueError, match="inconsistent"):
        accepted_histogram(DecodeMetrics(target_calls=2, accepted=5, accepted_at=[1]))


def test_the_bound_replaces_forwards_by_accepted_positions():
    m = stepped([(0, 0), (0, 2), (2, 4), (3, 3)], wall_s=10.0, model_s=6.0)
    # Two 1-position forwards, one over 3 positions (1.5 + (2.5 - 1.5) / 2) and one over 4.
    assert oracle_forward_s(m, COST) == pytest.approx(2 * 1.0 + 2.0 + 2.5)
    # Taken at a measured plain step of 0.5 s: every forward scales by 0.5 / cost(1).
    assert oracle_forward_s(m, COST, step_s=0.5) == pytest.approx(0.5 * 6.5)
    # The rest of the request (drafting, loop, prefill) stays as measured.
    assert oracle_wall_s(m, COST, 0.5) == pytest.approx(10.0 - 6.0 + 3.25)
    assert oracle_tokens_per_s(m, COST, 0.5) == pytest.approx(m.new_tokens / 7.25)
    assert m.new_tokens == 1 + 1 + 3 + 4


def test_plain_decoding_sits_at_its_own_bound():
    greedy = stepped([(0, 0)] * 20, wall_s=3.0, model_s=2.0)
    step = plain_step_s(greedy)
    assert step == pytest.approx(0.1)
    assert oracle_tokens_per_s(greedy, COST, step) == pytest.approx(greedy.tokens_per_s)
    assert plain_step_s(DecodeMetrics()) is None
    assert oracle_tokens_per_s(DecodeMetrics(new_tokens=5, wall_s=1.0), COST) == 0.0  # an external reference


def test_summary_rows_and_table_carry_the_bound():
    greedy = stepped([(0, 0)] * 10, wall_s=1.0, model_s=0.8)
    # Verifies 8 positions a step (cost 4 steps each) and accepts 1: the bound is far above it.
    spec = stepped([(1, 7)] * 5, wall_s=2.0 + 0.2, model_s=5 * 4 * 0.08)
    runs = {"greedy": MethodRun("greedy", None, [Generation([1] * 10, greedy)]),
            "spec": MethodRun("spec", None, [Generation([1] * 10, spec)])}
    rows = {r["method"]: r for r in summarize(runs, cost=COST)}
    assert rows["greedy"]["of_oracle"] == pytest.approx(1.0)
    expected = 10 / (2.2 - 1.6 + 5 * 0.08 * COST.cost(2))
    assert rows["spec"]["oracle_tokens_per_s"] == pytest.approx(expected)
    assert rows["spec"]["oracle_speedup"] == pytest.approx(expected / 10.0)
    assert rows["spec"]["of_oracle"] == pytest.approx((10 / 2.2) / expected)
    table = markdown_table(list(rows.values()))
    assert "| oracle tokens/s | oracle speedup | measured / oracle |" in table
    assert f"| spec | 4.55 | 0.45x | {expected:.2f} | {expected / 10:.2f}x |" in table
    assert "oracle" not in markdown_table(summarize(runs))  # without a cost model, no bound


def test_real_decoding_metrics_give_a_consistent_bound(tiny_lm):
    engine = Engine(tiny_lm)
    prompt = "abcabcabcabcabcabc abcabcabc"
    gen = engine.generate(prompt, SpeculativeConfig(method="pld", budget="off"), 24)
    hist = accepted_histogram(gen.metrics)
    assert sum(hist) == gen.metrics.target_calls and gen.metrics.drafted > 0
    assert sum(a * n for a, n in enumerate(hist)) == gen.metrics.accepted
    assert oracle_tokens_per_s(gen.metrics, COST) > 0
