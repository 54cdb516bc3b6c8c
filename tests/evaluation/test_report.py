"""Tests for dresd.evaluation.report: per-prompt results -> summary rows, goal checks and the written report."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from dresd.decoding.budget import CostModel
from dresd.decoding.metrics import DecodeMetrics
from dresd.evaluation.report import FULL_PROMPTS, goal_lines, profile_lines, summarize_results, write_report
from dresd.evaluation.results import add_result, from_json, render_sections

GREEDY_TOKENS = {0: [5, 6, 7, 2], 1: [8, 9, 2], 2: [10, 11, 12, 13]}


def metrics(new_tokens: int, wall_s: float, target_calls: int = 0, drafted: int = 0, accepted: int = 0,
            retrieval_s: float = 0.0) -> dict:
    """A DecodeMetrics summary (the stored results format)."""
    m = DecodeMetrics(new_tokens=new_tokens, wall_s=wall_s, target_calls=target_calls, drafted=drafted,
                      accepted=accepted, retrieval_s=retrieval_s)
    if drafted:
        m.drafted_steps = target_calls
        # Consistent per-step counts: `accepted` spread over the calls as evenly as it goes.
        q, r = divmod(accepted, target_calls)
        steps = [q + 1] * r + [q] * (target_calls - r)
        depth = max(steps)
        m.offered_at = [target_calls] * depth
        m.accepted_at = [sum(a > d for a in steps) for d in range(depth)]
    return m.summary()


def record(tokens: list[int], **kw) -> dict:
    return {"token_ids": list(tokens), "metrics": metrics(len(tokens), **kw)}


@pytest.fixture()
def results() -> dict:
    """Set "id": greedy, dresd and hf-greedy on prompts 0..2, pld only on 0..1 (unfinished);
    dresd differs from greedy on prompt 1. Set "ood": greedy and dresd on prompt 0 only."""
    res = {}
    for i, toks in GREEDY_TOKENS.items():
        res[("id", "greedy", i)] = record(toks, wall_s=1.0, target_calls=len(toks))
        dresd = toks if i != 1 else [8, 9, 9, 2]
        res[("id", "dresd", i)] = record(dresd, wall_s=0.5, target_calls=2, drafted=6, accepted=4, retrieval_s=0.05)
        res[("id", "hf-greedy", i)] = record(toks, wall_s=0.8)  # external reference: no loop internals
    for i in (0, 1):
        res[("id", "pld", i)] = record(GREEDY_TOKENS[i], wall_s=0.9, target_calls=3, drafted=3, accepted=1)
    res[("ood", "greedy", 0)] = record([1, 2], wall_s=1.0, target_calls=2)
    res[("ood", "dresd", 0)] = record([1, 2], wall_s=0.25, target_calls=1, drafted=1, accepted=1)
    return res


NAMES = ["greedy", "dresd", "pld", "rest", "hf-greedy"]


# ------------------------------------------------------------------ summarize_results


def test_only_prompts_every_method_finished_are_aggregated(results):
    tables = summarize_results(results, NAMES)
    assert list(tables) == ["id", "ood"]
    rows = {r["method"]: r for r in tables["id"]}
    # Methods in `names` order; "rest" has no result at all and is left out (not a 0-prompt row).
    assert [r["method"] for r in tables["id"]] == ["greedy", "dresd", "pld", "hf-greedy"]
    # pld did not finish prompt 2: every method is summarised over prompts 0 and 1 only.
    assert {r["prompts"] for r in tables["id"]} == {2}
    assert rows["greedy"]["new_tokens"] == len(GREEDY_TOKENS[0]) + len(GREEDY_TOKENS[1])
    assert rows["dresd"]["new_tokens"] == 4 + 4
    assert rows["greedy"]["tokens_per_s"] == pytest.approx(7 / 2.0)
    assert rows["dresd"]["speedup"] == pytest.approx((8 / 1.0) / (7 / 2.0))
    # The other set is summarised on its own prompts and methods.
    assert [(r["method"], r["prompts"]) for r in tables["ood"]] == [("greedy", 1), ("dresd", 1)]
    assert tables["ood"][1]["speedup"] == pytest.approx(4.0)


def test_unfinished_prompt_of_greedy_drops_it_for_everyone(results):
    del results[("id", "greedy", 0)]
    rows = {r["method"]: r for r in summarize_results(results, NAMES)["id"]}
    assert {r["prompts"] for r in rows.values()} == {1}  # only prompt 1 is common to all four
    assert rows["greedy"]["new_tokens"] == len(GREEDY_TOKENS[1])


def test_identical_to_greedy_counts(results):
    rows = {r["method"]: r for r in summarize_results(results, NAMES)["id"]}
    assert rows["greedy"]["identical_to_greedy"] == 2
    assert rows["dresd"]["identical_to_greedy"] == 1  # differs on prompt 1
    assert rows["pld"]["identical_to_greedy"] == 2
    assert rows["hf-greedy"]["identical_to_greedy"] == 2
    # With every prompt finished by the methods asked for, dresd matches 2 of 3.
    rows = {r["method"]: r for r in summarize_results(results, ["greedy", "dresd"])["id"]}
    assert rows["dresd"]["prompts"] == 3 and rows["dresd"]["identical_to_greedy"] == 2


def test_no_greedy_run_means_no_losslessness_or_speedup(results):
    rows = summarize_results(results, ["dresd", "pld"])["id"]
    assert all(r["identical_to_greedy"] is None for r in rows)
    assert all(math.isnan(r["speedup"]) for r in rows)


def test_observable_false_without_target_calls(results):
    rows = {r["method"]: r for r in summarize_results(results, NAMES)["id"]}
    assert rows["hf-greedy"]["observable"] is False
    assert rows["hf-greedy"]["mean_accepted_tokens"] == 0.0
    assert rows["greedy"]["observable"] is True and rows["dresd"]["observable"] is True
    assert rows["dresd"]["mean_accepted_tokens"] == pytest.approx(8 / 4)
    assert rows["dresd"]["acceptance_rate"] == pytest.approx(8 / 12)


def test_metrics_summary_extras_are_ignored(results):
    """The stored summary carries derived keys (tokens_per_s, other_s...): they are not fields."""
    key = ("id", "greedy", 0)
    results[key]["metrics"]["some_future_key"] = 1
    assert summarize_results(results, NAMES)["id"][0]["method"] == "greedy"


# ------------------------------------------------------------------ goal_lines


def row(method: str, tps: float, *, identical: int = 5, prompts: int = 5, speedup: float = 1.0, mat: float = 1.0,
        share: float = 0.0, ms: float | None = None) -> dict:
    return {"method": method, "prompts": prompts, "identical_to_greedy": identical, "tokens_per_s": tps,
            "speedup": speedup, "mean_accepted_tokens": mat, "retrieval_share": share,
            "ms_per_token": ms if ms is not None else (1000 / tps if tps else 0.0)}


def synthetic_table() -> list[dict]:
    return [
        row("greedy", 10.0, ms=100.0),
        row("hf-greedy", 12.0, ms=80.0),
        row("dresd", 25.0, speedup=2.5, mat=3.5, share=0.15),
        row("rest", 15.0),
        row("rest+budget", 22.0),
        row("pld", 30.0),
        row("suffix", 20.0, identical=4),
    ]


def test_goal_lines_met_and_missed_with_gaps():
    lines = goal_lines("id", synthetic_table())
    assert lines == [
        "- id: outputs identical to our greedy loop: NOT for suffix",
        "- id: DReSD (ID) speedup over our greedy loop: 2.50x vs goal >= 2.00x: met",
        "- id: DReSD (ID) mean accepted tokens per call: 3.50 vs goal >= 4.00: MISSED (missed by 0.50)",
        # Each peer as published, and with our draft budget applied to it where it ran.
        "- id: DReSD / rest as published, tokens/s: 1.67x vs goal >= 1.25x: met",
        "- id: DReSD / rest+budget (our budget on the peer), tokens/s: 1.14x vs goal >= 1.25x: MISSED (missed by 0.11x)",
        "- id: DReSD / pld as published, tokens/s: 0.83x vs goal >= 1.25x: MISSED (missed by 0.42x)",
        "- id: DReSD / suffix as published, tokens/s: 1.25x vs goal >= 1.25x: met",
        "- id: DReSD (ID) retrieval share of decode time: 15.0% vs goal <= 10.0%: MISSED (missed by 5.0%)",
        "- id: our greedy ms/token / HF generate() greedy ms/token: 1.25x vs goal <= 0.90x: MISSED (missed by 0.35x)",
    ]


def test_goal_lines_all_met():
    table = [
        row("greedy", 10.0, ms=100.0),
        row("hf-greedy", 8.0, ms=125.0),
        row("dresd", 50.0, speedup=5.0, mat=4.5, share=0.05),
        row("pld", 20.0),
    ]
    lines = goal_lines("ood", table)
    assert lines[0] == "- ood: outputs identical to our greedy loop: all methods"
    assert all(line.endswith(": met") for line in lines[1:]), lines
    assert not any("MISSED" in line for line in lines)
    assert len(lines) == 1 + 3 + 1 + 1  # lossless, 3 dresd goals + 1 peer, hf ratio
    assert "0.80x vs goal <= 0.90x: met" in lines[-1]


def test_goal_lines_lossless_lists_every_differing_method_and_skips_unknown():
    table = [row("greedy", 10.0), row("dresd", 20.0, identical=3, speedup=2.0, mat=4.0),
             row("pld", 12.0, identical=0), row("hf-greedy", 11.0, identical=None)]
    table[-1]["ms_per_token"] = 0.0  # no timing: no HF ratio line
    lines = goal_lines("id", table)
    assert lines[0] == "- id: outputs identical to our greedy loop: NOT for dresd, pld"
    assert not any("HF generate()" in line for line in lines)


def test_goal_lines_without_dresd_or_hf():
    lines = goal_lines("id", [row("greedy", 10.0), row("pld", 12.0, identical=2)])
    assert lines == ["- id: outputs identical to our greedy loop: NOT for pld"]


# ------------------------------------------------------------------ write_report


def args(quick: bool = False, prompts: int = FULL_PROMPTS) -> SimpleNamespace:
    return SimpleNamespace(quick=quick, prompts=prompts, max_new_tokens=16)


MANIFESTS = {"id": {"counts": {"keys": 123, "tokens": 456, "records": 7}}, "ood": {}}
COST = CostModel([1, 8, 16], [0.1, 0.2, 0.25])


def test_write_report_files(tmp_path, results):
    path = write_report(tmp_path, results, NAMES, args(prompts=3), COST, MANIFESTS)
    assert path == tmp_path / "report.md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acceptance.png", "report.md", "spec_bench.json", "speedup.png",
                                                          "summary.json"]
    # The json is the same report, ready for benchmarks/make_docs.py --add (images beside it).
    saved = from_json((tmp_path / "spec_bench.json").read_text())
    assert render_sections(saved.sections).splitlines()[0] == path.read_text().splitlines()[0]
    assert add_result(tmp_path / "spec_bench.json", tmp_path / "results").is_file()
    for png in ("speedup.png", "acceptance.png"):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    text = path.read_text()
    assert text.splitlines()[0] == (f"# DReSD side-by-side benchmark: REDUCED RUN (3 prompts per set; "
                                    f"the full benchmark uses {FULL_PROMPTS})")
    assert "16 new tokens, up to 3 prompts per set" in text
    assert "- id: 123 keys, 456 tokens, 7 records" in text
    assert "- ood: ? keys, ? tokens, ? records" in text
    assert "k=1: 1.00x, k=8: 2.00x, k=16: 2.50x" in text
    assert "## id (2 prompts)" in text and "## ood (1 prompts)" in text
    assert "| hf-greedy |" in text and "| n/a | n/a | n/a | n/a | n/a |" in text
    assert "## Goals" in text
    assert "- id: outputs identical to our greedy loop: NOT for dresd" in text
    assert "- ood: outputs identical to our greedy loop: all methods" in text
    assert "HF generate()" in text  # greedy and hf-greedy both ran in "id"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(summarize_results(results, NAMES, COST)))
    assert [r["method"] for r in summary["id"]] == ["greedy", "dresd", "pld", "hf-greedy"]


@pytest.mark.parametrize("quick, prompts, header", [
    (True, 3, "SMOKE RUN (quick mode: a few prompts, not the full benchmark)"),
    (True, FULL_PROMPTS, "SMOKE RUN (quick mode: a few prompts, not the full benchmark)"),
    (False, FULL_PROMPTS - 1,
     f"REDUCED RUN ({FULL_PROMPTS - 1} prompts per set; the full benchmark uses {FULL_PROMPTS})"),
    (False, FULL_PROMPTS, "full run"),
    (False, FULL_PROMPTS + 5, "full run"),
])
def test_write_report_header(tmp_path, quick, prompts, header):
    # One set, two methods: quick enough to write for every header case.
    small = {
        ("id", "greedy", 0): record([1, 2], wall_s=1.0, target_calls=2),
        ("id", "dresd", 0): record([1, 2], wall_s=0.5, target_calls=1, drafted=1, accepted=1),
    }
    text = write_report(tmp_path, small, ["greedy", "dresd"], args(quick, prompts), COST, {}).read_text()
    assert text.splitlines()[0] == f"# DReSD side-by-side benchmark: {header}"


def test_write_report_without_results(tmp_path):
    """No finished prompt at all: a report and an empty summary, no plots."""
    path = write_report(tmp_path, {}, NAMES, args(quick=True), COST, {})
    assert path.read_text().startswith("# DReSD side-by-side benchmark: SMOKE RUN")
    assert json.loads((tmp_path / "summary.json").read_text()) == {}
    assert not (tmp_path / "speedup.png").exists()


# ------------------------------------------------------------------ profile_lines


def timed_row(method: str, calls: int, tokens: int, wall: float, prefill: float, model: float,
              retrieval: float = 0.0, verified: float = 1.0) -> dict:
    return {"method": method, "target_calls": calls, "mean_accepted_tokens": tokens / calls, "wall_s": wall,
            "prefill_s": prefill, "model_s": model, "retrieval_s": retrieval,
            "other_s": max(wall - prefill - model - retrieval, 0.0), "verified_per_call": verified, "observable": True}


def test_profile_lines_split_calls_and_turn_goals_into_mat():
    # Greedy: 100 calls of 10 ms after a 0.1 s prefill. DReSD: 40 calls for 100 tokens, each
    # 12 ms forward + 1 ms drafting + 0.5 ms loop = 1.35 plain steps.
    rows = [timed_row("greedy", 100, 100, 1.1, 0.1, 1.0),
            timed_row("dresd", 40, 100, 0.64, 0.1, 0.48, 0.04, verified=3.0),
            timed_row("suffix", 50, 100, 0.6, 0.1, 0.5)]
    cost = CostModel([1, 2, 3, 4], [0.010, 0.011, 0.012, 0.013])
    lines = profile_lines("id", rows, cost)
    assert lines[0] == "### id"
    assert "| dresd | 2.50 | 3.0 | 1.20 + 0.10 + 0.05 = 1.35 | 1.85x | 15.6% |" in lines
    assert "| suffix | 2.00 | 1.0 | 1.00 + 0.00 + 0.00 = 1.00 | 2.00x | 16.7% |" in lines
    assert lines[8] == "- DReSD spends 1.35 plain steps per call for 2.50 tokens. At that cost 2.0x needs MAT 2.70."
    # Routes: k positions need 2 * (cost(k) / cost(1) + 0.15) <= k: k = 2 needs 2.5 > 2, k = 3 needs 2.7.
    assert lines[9].startswith("- Cheapest route on the measured cost curve: MAT 2.70 from 3 verified positions")
    assert "1.70 of 2 drafted tokens accepted per call, where DReSD accepts 1.50" in lines[9]
    assert "- 1.25x suffix (decode speedup 2.00x) needs MAT 3.38 at DReSD's call cost." in lines


def test_profile_lines_without_a_route_or_timings():
    rows = [timed_row("greedy", 10, 10, 0.2, 0.1, 0.1), timed_row("dresd", 10, 10, 0.35, 0.1, 0.2, 0.05)]
    lines = profile_lines("id", rows, CostModel([1, 2, 4], [0.01, 0.02, 0.04]))
    assert any("No number of verified positions reaches it" in line for line in lines)
    assert profile_lines("id", [timed_row("greedy", 10, 10, 0.2, 0.1, 0.1)], COST) == []


def test_report_shows_the_oracle_bound_and_the_calibration(tmp_path, results):
    results[("id", "dresd", 0)]["reliability"] = [["dresd", 1, 7, 4, 3.0, 3], ["dresd", 2, 3, 2, 0.7, 0]]
    results[("ood", "dresd", 0)]["reliability"] = [["dresd", 1, 7, 2, 1.5, 1]]
    text = write_report(tmp_path, results, NAMES, args(prompts=3), COST, MANIFESTS).read_text()
    assert "| method | tokens/s | speedup vs greedy | oracle tokens/s | oracle speedup | measured / oracle |" in text
    rows = {r["method"]: r for r in summarize_results(results, NAMES, COST)["id"]}
    assert rows["dresd"]["oracle_tokens_per_s"] > 0 and rows["hf-greedy"]["oracle_tokens_per_s"] == 0.0
    assert f"oracle bound (only accepted positions verified): {rows['dresd']['oracle_speedup']:.2f}x greedy" in text
    # Calibration pooled over sets: 6 depth-1 nodes predicted 0.75 on average, 4 accepted.
    assert "## Calibration: predicted against observed acceptance" in text
    assert "| dresd | dresd | 8 | 0.650 | 0.500 |" in text
    assert "| dresd | 1 | 6 | 0.750 | 0.667 | -0.083 |" in text
    assert "![reliability](reliability.png)" in text
    assert (tmp_path / "reliability.png").read_bytes().startswith(b"\x89PNG")
