"""Tests for dresd.decoding.batch_plan: the batched cost model, the width choice at each load,
and the batched decoder under the budget (drafts verified only where they pay, outputs
unchanged)."""

from __future__ import annotations

import pytest
import torch

from dresd.config import SpeculativeConfig
from dresd.decoding.batch_plan import BatchCostModel, BatchPlanner, select_width
from dresd.decoding.batch_spec import BatchedSpeculativeDecoder, BatchRequest
from dresd.decoding.budget import STEP_SCALE_RATE, CostModel, DraftPlanner
from dresd.decoding.loop import SpeculativeDecoder
from dresd.decoding.tree import build_tree
from fake_drafters import FakeDrafter, continuation
from tests_support import one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

NEW = 12
B = [1, 2, 4, 8, 16]
K = [1, 2, 4, 8, 16]
# Each position pays its own arithmetic (a small CPU) / the forward is flat until far past
# these sizes (a GPU at small batch).
PER_POSITION = BatchCostModel(B, K, [[0.01 * b * k for k in K] for b in B])
FLAT = BatchCostModel(B, K, [[0.01 * (1 + 0.001 * b * k) for k in K] for b in B])


def test_cost_interpolates_across_batch_and_positions():
    assert PER_POSITION.cost(4, 2) == pytest.approx(0.08)
    assert PER_POSITION.cost(3, 2) == pytest.approx(0.06)  # between batch 2 and 4
    assert PER_POSITION.cost(32, 1) == pytest.approx(0.32)  # beyond the last batch: linear
    assert PER_POSITION.at_batch(4).cost(8) == pytest.approx(0.32)
    assert PER_POSITION.single().seconds == [0.01 * k for k in K]
    derived = BatchCostModel.from_single(CostModel([1, 2, 4], [1.0, 2.0, 4.0]))
    assert derived.cost(4, 1) == pytest.approx(4.0) and derived.cost(2, 2) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="seconds must be 2 rows of 5"):
        BatchCostModel([1, 2], K, [[1.0] * 5])


def test_width_follows_the_load():
    likely = [[0.9, 0.8, 0.7, 0.6]] * 16
    # Flat cost: every likely node pays, at any batch size.
    assert select_width(likely[:1], lambda k: FLAT.cost(1, k), 64)[0] == 5
    assert select_width(likely, lambda k: FLAT.cost(16, k), 64)[0] == 5
    # Per-position cost: a second position doubles the step; a node pays only if certain.
    assert select_width(likely, lambda k: PER_POSITION.cost(16, k), 64)[0] == 1
    # The cap and rows without drafts.
    assert select_width(likely, lambda k: FLAT.cost(16, k), 3)[0] == 3
    assert select_width([[], []], lambda k: FLAT.cost(2, k), 64) == (1, pytest.approx(2 / FLAT.cost(2, 1)))
    # Drafting time spent anyway makes wider steps relatively cheaper.
    half = [[0.5, 0.25]] * 2
    cost = lambda k: 0.01 * (1 + 0.9 * (k - 1))  # noqa: E731
    assert select_width(half, cost, 64)[0] == 1 and select_width(half, cost, 64, overhead_s=0.1)[0] == 3


def test_planner_cuts_every_row_to_one_width():
    planner = BatchPlanner(FLAT, max_width=3)
    trees = {0: build_tree(5, [[1, 2, 3], [4]]), 1: build_tree(6, []), 2: build_tree(7, [[8, 9]])}
    planners = {s: DraftPlanner(FLAT.single()) for s in trees}
    cut, width = planner.plan(trees, planners)
    assert width == 3 and [len(cut[s]) for s in (0, 1, 2)] == [3, 1, 3]
    assert cut[2].tokens == [7, 8, 9]  # a prefix of the likeliest-first order is a subtree
    planner.observe_step(3, 3, 2 * FLAT.cost(3, 3))
    assert planner.step_scale[1] > 1.0 and planner.step_scale[0] == 1.0
    assert planner.row_share(4).cost(1) == pytest.approx(FLAT.cost(4, 1) / 4)


def test_a_load_that_slows_every_step_prices_wide_steps_alike():
    """Wide steps are rare where drafts seldom pay: what one-position steps measure moves the
    price of every width; wide steps' own factor carries only what they cost beyond it."""
    planner = BatchPlanner(PER_POSITION)
    for _ in range(200):
        planner.observe_step(16, 1, 1.8 * PER_POSITION.cost(16, 1))  # the machine got busier
    assert planner.step_cost(16, 2) == pytest.approx(1.8 * PER_POSITION.cost(16, 2), rel=0.01)
    for _ in range(200):
        planner.observe_step(16, 2, 1.8 * 1.2 * PER_POSITION.cost(16, 2))  # and wide steps cost 20% more besides
    assert planner.step_cost(16, 2) == pytest.approx(1.8 * 1.2 * PER_POSITION.cost(16, 2), rel=0.01)
    assert planner.step_cost(16, 1) == pytest.approx(1.8 * PER_POSITION.cost(16, 1), rel=0.01)
    slow = BatchPlanner(PER_POSITION)
    slow.observe_step(1, 4, 10 * PER_POSITION.cost(1, 4))  # one slow first wide step (a cold cache) ...
    assert slow.step_scale[1] < 1.1  # ... barely moves the price of the next ones
    planner.adopt([1.3, 0.9])  # a successor starts from its predecessor's factors
    planner.observe_step(16, 1, 2.0 * PER_POSITION.cost(16, 1))
    assert planner.step_scale[0] == pytest.approx(1.3 + STEP_SCALE_RATE * 0.7)


def test_a_batch_whose_estimates_fell_probes_its_likeliest_nodes_now_and_then():
    """A width of 1 verifies nothing, so fallen estimates would never recover: the batch
    verifies each drafting row's likeliest node after 8, 16, 32 ... quiet steps, but only
    where a node at the estimates' prior would pay at this load."""
    third = BatchCostModel(B, K, [[0.01 * b * (1 + 0.3 * (k - 1)) for k in K] for b in B])  # a node pays above 0.3
    trees = {0: build_tree(5, [[1, 2], [3]]), 1: build_tree(6, [[7]]), 2: build_tree(8, [])}
    planners = {s: DraftPlanner(third.single()) for s in trees}
    for p in planners.values():
        for _ in range(30):  # misses: every estimate far below 0.3
            p.acceptance.update(trees[0], [0])
    planner = BatchPlanner(third)
    plans = [planner.plan(trees, planners) for _ in range(60)]
    assert [i for i, (_, w) in enumerate(plans) if w > 1] == [7, 23, 55] and planner.probes == 3
    cut, _ = plans[7]
    assert [len(cut[s]) for s in (0, 1, 2)] == [2, 2, 1]  # each drafting row's likeliest node
    # Where nodes at the prior's rate would not pay, or barely (two of three rows' nodes at
    # 0.7 for a step 40% dearer: 5% more tokens/s), evidence could change next to nothing.
    near = BatchCostModel(B, K, [[0.01 * b * (1 + 0.4 * (k - 1)) for k in K] for b in B])
    for cost in (PER_POSITION, near):
        busy = BatchPlanner(cost)
        assert all(busy.plan(trees, planners)[1] == 1 for _ in range(60)) and busy.probes == 0


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in (7, 12, 3, 9)]


def _oracle(tiny_lm, prompts):
    """Greedy references and drafters that propose the right continuation of each prompt."""
    dec = SpeculativeDecoder(tiny_lm.model, -1, tiny_lm.max_context, SpeculativeConfig(method="greedy"))
    ref = [dec.generate_ids(p, NEW).token_ids for p in prompts]

    def propose(request):
        for p, r in zip(prompts, ref):
            if request.context[: len(p)] == p:
                return continuation(p + r, 4, strict=False)(request)
        return []

    return ref, lambda: FakeDrafter(propose)


@pytest.mark.parametrize("cost, drafts", [(FLAT, True), (PER_POSITION, False)])
def test_budgeted_batch_verifies_drafts_only_where_they_pay(tiny_lm, prompts, cost, drafts):
    ref, factory = _oracle(tiny_lm, prompts)
    spec = SpeculativeConfig(method="dresd", budget="auto")
    dec = BatchedSpeculativeDecoder(tiny_lm.model, -1, tiny_lm.max_context, spec, factory, cost, max_batch=4)
    out = dec.generate([BatchRequest(p, NEW) for p in prompts])
    assert [g.token_ids for g in out] == ref
    drafted = sum(g.metrics.drafted for g in out)
    if drafts:  # right drafts and a flat cost: verified and accepted, fewer forwards
        assert drafted > 0 and all(g.metrics.target_calls < NEW for g in out)
    else:  # four rows on a per-position cost: the batch stays plain until one row is left
        assert sum(g.metrics.target_calls for g in out) >= 3 * NEW


def test_one_row_runs_the_one_sequence_verifier(tiny_lm, prompts, monkeypatch):
    """A batch of one in a one-row cache verifies through dresd.decoding.verify as the loop
    does (no batch mask, no moves), and a request joining later goes back to batched steps."""
    import dresd.decoding.batch_spec as batch_spec

    calls = {"alone": 0, "rows": 0}
    real_alone, real_rows = batch_spec.verify_token_tree, BatchedSpeculativeDecoder._verify_rows

    def alone(*args, **kwargs):
        calls["alone"] += 1
        return real_alone(*args, **kwargs)

    def rows(self, *args):
        calls["rows"] += 1
        return real_rows(self, *args)

    monkeypatch.setattr(batch_spec, "verify_token_tree", alone)
    monkeypatch.setattr(BatchedSpeculativeDecoder, "_verify_rows", rows)
    ref, factory = _oracle(tiny_lm, prompts)
    dec = BatchedSpeculativeDecoder(tiny_lm.model, -1, tiny_lm.max_context, SpeculativeConfig(method="dresd"),
                                    factory, FLAT, max_batch=4)
    first = dec.submit(BatchRequest(prompts[0], NEW))
    results = {rid: g.token_ids for rid, g in dec.step()}
    assert calls == {"alone": 1, "rows": 0}
    second = dec.submit(BatchRequest(prompts[1], NEW))
    while dec.busy:
        results.update({rid: g.token_ids for rid, g in dec.step()})
    assert calls["rows"] > 0
    assert results == {first: ref[0], second: ref[1]}


def test_the_batch_stops_consulting_while_drafts_do_not_pay():
    planner = BatchPlanner(PER_POSITION)
    consulted = []
    for _ in range(40):
        consulted.append(planner.should_draft())
        if consulted[-1]:
            planner.record_width(1)  # nothing paid at this load
    assert sum(consulted) <= 7 and consulted[:2] == [True, True]  # steps 1, 2, 4, 8, 16, 32, ...
    planner.record_width(3)  # a width that paid: consult every step again
    assert all(planner.should_draft() for _ in range(5))


def test_cheap_consults_go_on_at_every_step_though_nothing_paid():
    planner = BatchPlanner(PER_POSITION)
    step = planner.step_cost(4, 1)
    for _ in range(20):
        assert planner.should_draft()
        planner.record_width(1, rows=4, drafting_s=0.01 * step)  # 1% of a step: not worth skipping
    planner.record_width(1, rows=4, drafting_s=0.5 * step)  # half a step for nothing: back off
    planner.record_width(1, rows=4, drafting_s=0.5 * step)
    assert not planner.should_draft()


def test_cheap_consults_back_off_too_where_drafts_could_not_pay_at_this_load():
    trees = {s: build_tree(5, [[1, 2]]) for s in range(4)}
    planners = {s: DraftPlanner(PER_POSITION.single()) for s in trees}
    for cost, backs_off in ((PER_POSITION, True), (FLAT, False)):  # a second position doubles a step / is free
        planner = BatchPlanner(cost)
        step = planner.step_cost(4, 1)
        for _ in range(2):
            assert planner.should_draft()
            assert planner.plan(trees, planners)[1] == 1 or not backs_off
            planner.record_width(1, rows=4, drafting_s=0.01 * step)  # 1% of a step, nothing verified
        assert planner.should_draft() is not backs_off
