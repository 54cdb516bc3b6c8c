"""Tests for dresd.evaluation.reliability: the planner's predicted acceptance against what was accepted."""

from __future__ import annotations

import copy

import pytest

from dresd.config import SpeculativeConfig
from dresd.decoding.budget import CostModel, DraftPlanner
from dresd.decoding.engine import Engine
from dresd.decoding.tree import build_tree
from dresd.evaluation.reliability import (P_BINS, RecordingPlanner, ReliabilityLog, depth_table, p_bin,
                                          plot_reliability, pooled, report_lines, source_totals, watch)
from tests_support import one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

COST = CostModel([1, 2, 4, 8, 16], [1.0, 1.1, 1.3, 1.6, 2.2])


def test_log_counts_per_cell_and_round_trips():
    log = ReliabilityLog()
    log.add("dresd", 1, 0.72, True)
    log.add("dresd", 1, 0.78, False)
    log.add("dresd", 9, 0.05, False)
    log.add("", 2, 1.0, True)
    assert p_bin(0.0) == 0 and p_bin(0.999) == P_BINS - 1 and p_bin(1.0) == P_BINS - 1
    rows = log.rows()
    assert rows == [["dresd", 1, 7, 2, 1.5, 1], ["dresd", 9, 0, 1, 0.05, 0], ["unnamed", 2, 9, 1, 1.0, 1]]
    twice = ReliabilityLog.from_rows(rows + rows)
    assert twice.rows()[0] == ["dresd", 1, 7, 4, 3.0, 2]
    assert log.take() == rows and log.rows() == []
    # Depths from DEPTH_CAP share a row; most-logged sources first.
    assert depth_table(twice)[:2] == [["dresd", "1", "4", "0.750", "0.500", "-0.250"],
                                      ["dresd", "8+", "2", "0.050", "0.000", "-0.050"]]
    assert list(source_totals(twice)) == ["dresd", "unnamed"]
    assert depth_table(twice, ["unnamed"]) == [["unnamed", "2", "2", "1.000", "1.000", "+0.000"]]


def tree():
    """Two sources: dresd drafts 5-6-7 (weight 3) and 5-8 (weight 1), suffix drafts 9."""
    return build_tree(1, [[5, 6, 7], [5, 8], [9]], None, [3.0, 1.0, 1.0], ["dresd", "dresd", "suffix"])


def test_recording_planner_plans_and_learns_exactly_like_the_planner():
    plain, wrapped_inner = DraftPlanner(COST), DraftPlanner(COST)
    log = ReliabilityLog()
    wrapped = RecordingPlanner(wrapped_inner, log)
    for step in range(12):
        t = tree()
        a, b = plain.plan(t), wrapped.plan(t)
        assert (a.tokens, a.parents) == (b.tokens, b.parents)
        predicted = wrapped_inner.acceptance.node_probs(b)
        before = copy.deepcopy(dict(wrapped_inner.acceptance.offered))
        path = [0, 1, 2] if len(b) > 2 and step % 2 else [0]  # accepts 5-6 on odd steps
        plain.record(a, path, True, 0.0)
        wrapped.record(b, path, True, 0.0)
        emitted = [b.tokens[n] for n in path[1:]] + [0]  # the accepted tokens, then a bonus no draft holds
        plain.emitted(emitted)
        wrapped.emitted(emitted)
        assert dict(plain.acceptance.offered) == dict(wrapped_inner.acceptance.offered) != before
        if step == 0:
            # The first step's nodes, with the prediction made before its outcome was learnt.
            expected = ReliabilityLog()
            for i in range(1, len(b)):
                expected.add(b.source[i], b.depths[i], predicted[i], i in path)
            assert log.rows() == expected.rows()
    assert wrapped.max_nodes == plain.max_nodes  # everything else reads through to the planner
    nodes = sum(n for _, _, _, n, _, _ in log.rows())
    assert nodes >= 12 and {r[0] for r in log.rows()} <= {"dresd", "suffix"}


def test_watch_logs_every_verified_node_of_a_real_decoder(tiny_lm):
    engine = Engine(tiny_lm, cost=COST)
    log = ReliabilityLog()
    prompt = "abcabcabcabcabcabc abcabcabc"
    for spec in (SpeculativeConfig(method="pld", budget="off"), SpeculativeConfig(method="pld")):
        decoder = engine.decoder(spec)
        watch(decoder, log)
        watch(decoder, log)  # once per decoder: no second wrapper
        assert isinstance(decoder.planner, RecordingPlanner)
        assert not isinstance(decoder.planner._planner, RecordingPlanner)
        gen = engine.generate(prompt, spec, 24)
        rows = log.take()
        assert sum(r[3] for r in rows) == gen.metrics.drafted  # every verified draft position, once
        assert sum(r[5] for r in rows) == gen.metrics.accepted
        assert all(0.0 <= r[4] <= r[3] for r in rows)
    assert gen.metrics.drafted > 0


def test_report_section_and_diagram(tmp_path):
    a, b = ReliabilityLog(), ReliabilityLog()
    for i in range(40):
        a.add("dresd", 1 + i % 3, i / 40, i % 3 == 0)
        b.add("dresd+suffix", 1, 0.9, i % 4 != 0)
    logs = {"dresd": a, "hybrid": b}
    assert plot_reliability(pooled(logs), tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
    assert not plot_reliability(ReliabilityLog(), tmp_path / "none.png")
    text = "\n".join(report_lines(logs, "r.png"))
    assert "| dresd | dresd | 40 | 0.487 | 0.350 |" in text
    assert "| hybrid | dresd+suffix | 40 | 0.900 | 0.750 |" in text
    assert "| dresd+suffix | 1 | 40 | 0.900 | 0.750 | -0.150 |" in text
    assert "![reliability](r.png)" in text
    assert "No drafted node" in "\n".join(report_lines({}, None))
