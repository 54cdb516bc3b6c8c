"""Tests for dresd.evaluation.compare: methods run on the same prompts interleaved, one summary
row per method (speed against the baseline, losslessness, loop counters) and the table."""

from __future__ import annotations

import math

import pytest

from dresd.config import SpeculativeConfig
from dresd.decoding.engine import Engine
from dresd.decoding.loop import Generation
from dresd.decoding.metrics import DecodeMetrics
from dresd.decoding.budget import CostModel
from dresd.evaluation.compare import (MethodRun, markdown_table, median_ratio, paired_prompt, paired_table, rotated,
                                      run_methods, summarize)
from tests_support import one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

SPECS = {"greedy": SpeculativeConfig(method="greedy"), "pld": SpeculativeConfig(method="pld", budget="off")}
PROMPTS = ["Say hello.", "Count to three."]


def test_methods_run_interleaved_per_prompt_after_a_warm_up(tiny_lm, monkeypatch):
    engine = Engine(tiny_lm)
    calls = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompt, spec, n, sampling=None: calls.append(
        (prompt, spec.method, n)) or generate(prompt, spec, n, sampling))
    runs = run_methods(engine, PROMPTS, SPECS, 10)
    assert calls == [(PROMPTS[0], "greedy", 8), (PROMPTS[0], "pld", 8),  # the warm-up: first prompt, <= 8 tokens
                     (PROMPTS[0], "greedy", 10), (PROMPTS[0], "pld", 10),
                     (PROMPTS[1], "greedy", 10), (PROMPTS[1], "pld", 10)]
    assert list(runs) == ["greedy", "pld"] and runs["pld"].spec is SPECS["pld"]
    for run in runs.values():
        assert [g.token_ids for g in run.generations] == [generate(p, SPECS["greedy"], 10).token_ids for p in PROMPTS]
    calls.clear()
    run_methods(engine, PROMPTS[:1], SPECS, 3, warmup=False)
    assert calls == [(PROMPTS[0], "greedy", 3), (PROMPTS[0], "pld", 3)]


def gen(tokens: list[int], wall_s: float, target_calls: int, drafted: int = 0, accepted: int = 0) -> Generation:
    return Generation(tokens, DecodeMetrics(new_tokens=len(tokens), wall_s=wall_s, target_calls=target_calls,
                                            drafted=drafted, accepted=accepted, verified_positions=target_calls + drafted))


def runs() -> dict[str, MethodRun]:
    """Greedy: 10 tokens per prompt in 1 s. fast: the same tokens in 0.5 s on prompt 0, other
    tokens on prompt 1, 4 calls a prompt verifying 12 drafts of which 6 are accepted. ref: an
    external reference (no loop counters)."""
    a, b = list(range(10)), list(range(10, 20))
    return {
        "greedy": MethodRun("greedy", None, [gen(a, 1.0, 10), gen(b, 1.0, 10)]),
        "fast": MethodRun("fast", None, [gen(a, 0.5, 4, 12, 6), gen(b[:9] + [0], 0.5, 4, 12, 6)]),
        "ref": MethodRun("ref", None, [gen(a, 2.0, 0), gen(b, 2.0, 0)]),
    }


def test_summary_rows_measure_against_the_baseline():
    rows = {r["method"]: r for r in summarize(runs())}
    assert list(rows) == ["greedy", "fast", "ref"]
    greedy, fast, ref = rows["greedy"], rows["fast"], rows["ref"]
    assert greedy["tokens_per_s"] == pytest.approx(10.0) and greedy["speedup"] == pytest.approx(1.0)
    assert fast["tokens_per_s"] == pytest.approx(20.0) and fast["speedup"] == pytest.approx(2.0)
    assert ref["speedup"] == pytest.approx(0.5)
    assert (greedy["identical_to_greedy"], fast["identical_to_greedy"], ref["identical_to_greedy"]) == (2, 1, 2)
    assert fast["acceptance_rate"] == pytest.approx(0.5) and fast["mean_accepted_tokens"] == pytest.approx(2.5)
    assert fast["verified_per_call"] == pytest.approx(4.0) and fast["calls_per_token"] == pytest.approx(0.4)
    assert fast["ms_per_token"] == pytest.approx(50.0) and fast["prompts"] == 2 and fast["new_tokens"] == 20
    assert fast["observable"] and not ref["observable"]  # no target calls seen: an external reference


def test_without_the_baseline_there_is_no_speedup_and_no_losslessness():
    rows = summarize({k: v for k, v in runs().items() if k != "greedy"})
    assert all(math.isnan(r["speedup"]) and r["identical_to_greedy"] is None for r in rows)
    # Another baseline can be named.
    rows = {r["method"]: r for r in summarize(runs(), baseline="fast")}
    assert rows["greedy"]["speedup"] == pytest.approx(0.5) and rows["greedy"]["identical_to_greedy"] == 1


def test_markdown_table_has_a_row_per_method_and_no_loop_figures_for_references():
    lines = markdown_table(summarize(runs())).splitlines()
    assert len(lines) == 2 + 3 and lines[0].count("|") == lines[1].count("|") == 10
    assert all(line.count("|") == 10 for line in lines[2:])
    assert lines[3] == "| fast | 20.00 | 2.00x | 0.500 | 2.50 | 4.0 | 0.400 | 0.0% | 1/2 |"
    assert lines[4] == "| ref | 5.00 | 0.50x | n/a | n/a | n/a | n/a | n/a | 2/2 |"
    no_base = markdown_table(summarize({"fast": runs()["fast"]})).splitlines()[2]
    assert no_base.startswith("| fast | 20.00 | nanx |") and no_base.endswith("| n/a |")


def test_rotated_starts_anywhere_and_keeps_every_item():
    assert rotated([1, 2, 3], 0) == [1, 2, 3]
    assert rotated([1, 2, 3], 4) == [2, 3, 1]


def test_paired_ratios_are_medians_of_ratios_within_a_pass_not_ratios_of_medians():
    passes = [{"a": 2.0, "b": 1.0}, {"a": 3.0, "b": 3.0}, {"a": 10.0, "b": 2.0}]
    assert median_ratio(passes, "a", "b") == 2.0  # ratios 2, 1, 5; medians would give 3 / 2
    assert median_ratio(passes + [{"a": 1.0}], "a", "b") == 2.0  # a pass without the base does not count
    assert median_ratio(passes, "a", "c") is None


def test_paired_table_reads_every_pass_against_plain_and_the_base():
    def m(wall_s: float, calls: int, accepted: int = 0) -> DecodeMetrics:
        return DecodeMetrics(new_tokens=10, wall_s=wall_s, target_calls=calls, drafted=2 * accepted,
                             accepted=accepted, verified_positions=calls + 2 * accepted, model_s=wall_s,
                             accepted_at=[accepted] if accepted else [])  # one accepted token per call

    # Pass 1: fast twice greedy's speed; pass 2: the same speed. Median x plain: 1.5x.
    cell = {"passes": [{"greedy": [m(1.0, 10)], "fast": [m(0.5, 5, 5)]},
                       {"greedy": [m(1.0, 10)], "fast": [m(1.0, 5, 5)]}],
            "identical": {"greedy": 2, "fast": 1}, "runs": {"greedy": 2, "fast": 2}}
    cost = CostModel([1, 2, 3], [0.1, 0.1, 0.1])
    lines = paired_table(cell, ["greedy", "fast"], cost, base="greedy")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    assert rows["greedy"][2] == "1.000x" and rows["greedy"][-1] == "2/2 |"
    assert rows["fast"][2] == "1.500x" and rows["fast"][3] == "1.500x"  # x plain, and x base (greedy here)
    assert rows["fast"][4] == "2.00" and rows["fast"][-1] == "1/2 |"  # MAT: 10 tokens in 5 calls


def test_a_paired_prompt_runs_every_method_in_the_rotated_order_and_counts_equal_outputs():
    M = MethodRun  # anything with a name
    methods = [M("greedy", None, []), M("a", None, []), M("b", None, [])]
    cell = {"passes": [{"greedy": [], "a": [], "b": []}], "identical": dict.fromkeys("greedy a b".split(), 0),
            "runs": dict.fromkeys("greedy a b".split(), 0)}
    ran = []

    def generate(m):
        ran.append(m.name)
        return gen([1, 2, 3] if m.name != "b" else [1, 2, 4], 1.0, 3)

    gens = paired_prompt(cell, methods, 1, generate)
    assert ran == ["a", "b", "greedy"] and list(gens) == ran
    assert [len(cell["passes"][0][n]) for n in ("greedy", "a", "b")] == [1, 1, 1]
    assert cell["runs"] == {"greedy": 1, "a": 1, "b": 1} and cell["identical"] == {"greedy": 1, "a": 1, "b": 0}
