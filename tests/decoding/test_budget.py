"""Tests for dresd.decoding.budget: the forward-cost model, acceptance calibration, node selection
and the planner's back-off (pure: the budget in the decoding loop is tested in test_loop.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

import dresd.decoding.budget as budget
from dresd.decoding.budget import AcceptanceModel, CostModel, DraftPlanner, select_nodes, support_bin
from dresd.decoding.tree import TokenTree, accepted_in, build_tree, offered_nodes, subtree


def smol_cpu_cost() -> CostModel:
    """Roughly SmolLM2-135M on 2 CPU cores, stock layout: k=1 0.11 s, k=2 1.16x, k=4 1.47x ... k=64 0.55 s."""
    return CostModel([1, 8, 16, 32, 64], [0.11, 0.23, 0.29, 0.40, 0.55])


def is_subtree(tree: TokenTree, keep: list[int]) -> bool:
    """Every kept node's parent is the root or kept too."""
    kept = set(keep) | {0}
    return all(tree.parents[i] in kept for i in keep)


def chain(probs: list[float]) -> tuple[list[float], list[int]]:
    """probs/depths of a single chain root -> 1 -> 2 ... (root probability 1)."""
    return [1.0, *probs], list(range(len(probs) + 1))


# ------------------------------------------------------------------------- CostModel


def test_cost_interpolates_and_extrapolates():
    c = smol_cpu_cost()
    # Exact at the measurements.
    for k, t in zip(c.positions, c.seconds):
        assert c.cost(k) == pytest.approx(t)
    # Below the first measurement: the first cost.
    assert c.cost(0) == pytest.approx(0.11)
    assert c.cost(-3) == pytest.approx(0.11)
    # Linear in between: k=12 is half-way from 8 (0.23) to 16 (0.29).
    assert c.cost(12) == pytest.approx(0.26)
    assert c.cost(2) == pytest.approx(0.11 + 0.12 / 7)
    assert c.cost(48) == pytest.approx(0.475)
    # Beyond the last: the last segment's slope (0.15 s per 32 positions).
    assert c.cost(96) == pytest.approx(0.55 + 0.15)
    assert c.cost(100) == pytest.approx(0.55 + 0.15 * 36 / 32)
    # One measurement: constant.
    one = CostModel([1], [0.2])
    assert one.cost(1) == one.cost(50) == pytest.approx(0.2)
    # Relative to a one-token forward.
    rel = c.relative()
    assert list(rel) == c.positions
    assert rel[1] == pytest.approx(1.0) and rel[64] == pytest.approx(5.0)


def is_monotone(c: CostModel) -> bool:
    costs = [c.cost(k) for k in range(0, 200)]
    return all(b >= a - 1e-12 for a, b in zip(costs, costs[1:]))


def test_cost_is_monotone_where_the_measurements_are():
    for c in (smol_cpu_cost(), CostModel([1, 2, 64], [0.1, 1.0, 30.0]), CostModel([1, 64], [0.1, 0.1])):
        assert is_monotone(c)
    # The cost follows the measurements as they are, without smoothing: a measured dip (noise
    # in a calibration) stays a dip, and the check above sees it.
    dip = CostModel([1, 8, 16], [0.2, 0.1, 0.3])
    assert not is_monotone(dip)
    assert dip.cost(8) < dip.cost(1) < dip.cost(16)
    # A last segment that falls extrapolates downwards: the check sees that too.
    assert not is_monotone(CostModel([1, 8], [0.2, 0.1]))


# ---------------------------------------------------------------------- select_nodes


def test_select_confident_chain_stops_where_positions_stop_paying():
    cost = smol_cpu_cost()
    probs, depths = chain([0.9, 0.8, 0.7, 0.3, 0.1])
    # By hand, cost(k) = 0.11 + (k - 1) * 0.12 / 7 for k <= 8, rate(k) = (1 + sum p) / cost(k + 1):
    #   k=0: 1.0 / 0.11      =  9.09
    #   k=1: 1.9 / 0.12714   = 14.94
    #   k=2: 2.7 / 0.14429   = 18.71
    #   k=3: 3.4 / 0.16143   = 21.06   <- best
    #   k=4: 3.7 / 0.17857   = 20.72
    #   k=5: 3.8 / 0.19571   = 19.42
    keep, rate = select_nodes(probs, depths, cost, max_nodes=64)
    assert keep == [1, 2, 3]
    assert rate == pytest.approx(3.4 / (0.11 + 3 * 0.12 / 7))
    # The same by brute force over every prefix of the chain.
    rates = [(1 + sum(probs[1 : k + 1])) / cost.cost(k + 1) for k in range(len(probs))]
    assert int(np.argmax(rates)) == 3
    # A large fixed overhead per step (e.g. slow retrieval) makes extra positions relatively
    # cheap: all five pay (3.8 / 1.1957 = 3.18 > 3.7 / 1.1786 = 3.14).
    keep, rate = select_nodes(probs, depths, cost, max_nodes=64, overhead_s=1.0)
    assert keep == [1, 2, 3, 4, 5]
    assert rate == pytest.approx(3.8 / (cost.cost(6) + 1.0))


def test_select_nothing_when_probabilities_are_low():
    cost = smol_cpu_cost()
    probs, depths = chain([0.05, 0.04, 0.03, 0.02])
    keep, rate = select_nodes(probs, depths, cost, max_nodes=64)
    assert keep == []
    assert rate == pytest.approx(1 / 0.11)
    # A root-only tree: nothing to select.
    assert select_nodes([1.0], [0], cost, 64) == ([], pytest.approx(1 / 0.11))
    # Steep costs: even certain drafts do not pay.
    steep = CostModel([1, 2, 64], [0.1, 1.0, 30.0])
    assert select_nodes(*chain([1.0, 1.0]), steep, 64)[0] == []


def test_select_respects_max_nodes():
    flat = CostModel([1, 64], [0.1, 0.1])  # every positive-probability node pays
    probs, depths = chain([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert select_nodes(probs, depths, flat, 64)[0] == [1, 2, 3, 4, 5, 6]
    for max_nodes in (0, 1, 2, 4, 7, 8):
        keep, _ = select_nodes(probs, depths, flat, max_nodes)
        assert len(keep) + 1 <= max(max_nodes, 1)  # the root counts towards max_nodes
        assert keep == [1, 2, 3, 4, 5, 6][: max(0, max_nodes - 1)]


def test_select_orders_by_probability_then_depth():
    # root -> 1 (0.9) -> 2 (0.5); root -> 3 (0.5) -> 4 (0.5); root -> 5 (0.6)
    probs = [1.0, 0.9, 0.5, 0.5, 0.5, 0.6]
    depths = [0, 1, 2, 1, 2, 1]
    flat = CostModel([1, 64], [0.1, 0.1])
    keep, _ = select_nodes(probs, depths, flat, max_nodes=4)
    assert keep == [1, 5, 3]  # the 0.5 tie goes to the shallower node 3
    keep, _ = select_nodes(probs, depths, flat, max_nodes=5)
    assert keep == [1, 5, 3, 2] and is_subtree_parents(keep, [-1, 0, 1, 0, 3, 0])


def is_subtree_parents(keep: list[int], parents: list[int]) -> bool:
    kept = set(keep) | {0}
    return all(parents[i] in kept for i in keep)


def random_tree(rng: random.Random) -> TokenTree:
    n = rng.randint(0, 12)
    drafts = [[rng.randint(0, 3) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    weights = [rng.uniform(0.1, 5.0) for _ in drafts]
    sources = [rng.choice(["a", "b"]) for _ in drafts]
    total = sum(weights) * rng.choice([1.0, 1.5]) if drafts else None
    return build_tree(rng.randint(0, 3), drafts, None, weights, sources, total)


def random_path(tree: TokenTree, rng: random.Random) -> list[int]:
    """A root path the target 'accepted' (random walk that stops at random)."""
    path = [0]
    while tree.children[path[-1]] and rng.random() < 0.6:
        path.append(rng.choice(list(tree.children[path[-1]].values())))
    return path


@pytest.mark.parametrize("seed", range(5))
def test_selection_is_always_a_subtree(seed):
    rng = random.Random(seed)
    acc = AcceptanceModel()
    costs = [smol_cpu_cost(), CostModel([1, 64], [0.1, 0.1]), CostModel([1, 4, 64], [0.1, 0.12, 0.5])]
    for _ in range(60):
        tree = random_tree(rng)
        probs = acc.node_probs(tree)
        for i in range(1, len(tree)):
            assert 0.0 <= probs[i] <= probs[tree.parents[i]] <= 1.0
        max_nodes = rng.randint(1, 20)
        cost, overhead = rng.choice(costs), rng.choice([0.0, 0.05])
        keep, rate = select_nodes(probs, tree.depths, cost, max_nodes, overhead)
        assert len(set(keep)) == len(keep) and 0 not in keep
        assert len(keep) + 1 <= max_nodes
        assert is_subtree(tree, keep)
        # The rate is the kept nodes' expected tokens per second, and no worse than not drafting.
        assert rate == pytest.approx((1 + sum(probs[i] for i in keep)) / (cost.cost(len(keep) + 1) + overhead))
        assert rate >= 1 / (cost.cost(1) + overhead) - 1e-12
        sub = subtree(tree, keep)  # does not raise
        assert len(sub) == len(keep) + 1
        acc.update(tree, random_path(tree, rng))


# ------------------------------------------------------------------- AcceptanceModel


def test_support_bins():
    assert [support_bin(x) for x in (0.0, 0.1, 0.11, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_acceptance_priors_and_cells():
    acc = AcceptanceModel()
    tree = build_tree(0, [[1, 2], [3]], weights=[3.0, 1.0], sources=["s", "s"])
    # node 1: depth 1, share 0.75 of the root -> bin 3; node 2: share 1.0 of node 1 -> bin 4;
    # node 3: share 0.25 -> bin 1.
    assert acc.cell(tree, 1) == ("s", 1, 3)
    assert acc.cell(tree, 2) == ("s", 2, 4)
    assert acc.cell(tree, 3) == ("s", 1, 1)
    assert acc.rate(("any", 1, 0)) == pytest.approx(0.7)  # the optimistic prior
    assert acc.node_probs(tree) == pytest.approx([1.0, 0.7, 0.49, 0.7])
    deep = build_tree(0, [list(range(1, 13))], sources=["d"])
    assert acc.cell(deep, 12)[1] == 8  # deep nodes share a depth bucket


def test_acceptance_update_moves_rates_toward_observed():
    tree = build_tree(0, [[1, 2], [3]], weights=[3.0, 1.0], sources=["s", "s"])
    acc = AcceptanceModel(shrink=False)  # each cell on its own, with the constant prior
    acc.update(tree, [0, 1])  # node 1 accepted, node 2 (its child) and node 3 rejected
    assert acc.rate(("s", 1, 3)) == pytest.approx((1 + 1.4) / (1 + 2))
    assert acc.rate(("s", 2, 4)) == pytest.approx((0 + 1.4) / (1 + 2))
    assert acc.rate(("s", 1, 1)) == pytest.approx(1.4 / 3)
    assert acc.rate(("other", 1, 3)) == pytest.approx(0.7)  # other sources untouched
    full = build_tree(0, [[1, 2, 3]], sources=["c"])
    acc = AcceptanceModel()
    for _ in range(300):
        acc.update(full, [0, 1, 2, 3])
    assert acc.node_probs(full)[3] == pytest.approx(1.0, abs=0.02)
    acc = AcceptanceModel()
    for _ in range(300):
        acc.update(full, [0])
    assert acc.node_probs(full)[1] < 0.05


def test_acceptance_only_counts_nodes_whose_parent_was_accepted():
    tree = build_tree(0, [[1, 2, 3]], sources=["s"])
    acc = AcceptanceModel()
    acc.update(tree, [0])  # the first node rejected: deeper nodes had no chance
    assert acc.offered[("s", 1, 4)] == pytest.approx(1.0) and acc.accepted[("s", 1, 4)] == 0.0
    assert acc.offered.get(("s", 2, 4), 0.0) == 0.0 and acc.offered.get(("s", 3, 4), 0.0) == 0.0
    acc.update(tree, [0, 1])  # second node rejected: depth 3 says nothing
    assert acc.offered[("s", 2, 4)] == pytest.approx(1.0) and acc.accepted[("s", 2, 4)] == 0.0
    assert acc.offered.get(("s", 3, 4), 0.0) == 0.0
    # Decay: older evidence weighs less.
    assert acc.offered[("s", 1, 4)] == pytest.approx(acc.decay * 1.0 + 1.0)
    assert acc.accepted[("s", 1, 4)] == pytest.approx(1.0)


def test_node_probs_are_products_down_the_path():
    acc = AcceptanceModel()
    tree = build_tree(0, [[5, 6, 7]], sources=["x"])
    for _ in range(100):
        acc.update(tree, [0, 1])  # depth 1 always accepted, depth 2 never
    probs = acc.node_probs(tree)
    assert probs[1] > 0.95 and probs[2] < 0.05 * probs[1] + 1e-9
    assert probs[3] <= probs[2] <= probs[1] <= 1.0


# ---------------------------------------------------------------------- DraftPlanner


def test_planner_without_budget_verifies_everything_up_to_max_nodes():
    tree = build_tree(0, [[1, 2, 3], [4, 5], [6]])
    planner = DraftPlanner(None, max_nodes=64)
    out = planner.plan(tree)
    assert out.tokens == tree.tokens and out.parents == tree.parents
    # A cap keeps the best-supported nodes (shallower first on ties): a top-k tree.
    small = DraftPlanner(None, max_nodes=4).plan(tree)
    assert small.tokens == [0, 1, 4, 6] and small.parents == [-1, 0, 0, 0]
    weighted = build_tree(0, [[1, 2, 3], [4, 5], [6]], weights=[1.0, 5.0, 0.5])
    top = DraftPlanner(None, max_nodes=4).plan(weighted)
    assert top.tokens == [0, 1, 4, 5] and top.parents == [-1, 0, 0, 2]  # nodes keep their order
    # Root-only trees pass through.
    root = build_tree(7, [])
    assert DraftPlanner(smol_cpu_cost()).plan(root) is root
    # No budget never backs off.
    for _ in range(5):
        assert planner.should_draft()
        planner.record(tree, [0], True, 0.01)


def consult_steps(planner: DraftPlanner, steps: int, tree: TokenTree, success_at: set[int] = frozenset(),
                  retrieval_share: float = 0.1) -> list[int]:
    """The steps at which the planner lets the drafter run; every draft fails unless listed.
    Each consult costs `retrieval_share` of a plain step (default: enough to back off after)."""
    out = []
    for step in range(steps):
        if planner.should_draft():
            out.append(step)
            planner.record(tree, [0, 1] if step in success_at else [0], True, retrieval_share * planner.cost.cost(1))
    return out


def test_planner_backoff_doubles_and_caps():
    declined = build_tree(0, [])  # the budget found nothing worth verifying: a failure
    planner = DraftPlanner(smol_cpu_cost(), max_backoff=16)
    # Skips after consecutive failures: 0, 1, 3, 7, 15, then capped at 16.
    steps = consult_steps(planner, 70, declined)
    assert steps == [0, 1, 3, 7, 15, 31, 48, 65]
    gaps = [b - a - 1 for a, b in zip(steps, steps[1:])]
    assert gaps == [0, 1, 3, 7, 15, 16, 16]
    planner = DraftPlanner(smol_cpu_cost(), max_backoff=4)
    assert consult_steps(planner, 20, declined) == [0, 1, 3, 7, 12, 17]


def test_planner_keeps_drafting_after_misses_of_trees_it_chose():
    tree = build_tree(0, [[1, 2, 3]])
    # The budget chose these trees knowing their cost and learns from each miss: neither a
    # GPU's flat cost curve nor the CPU's (4 positions: 1.47x a plain step) stops drafting.
    assert consult_steps(DraftPlanner(CostModel([1, 64], [0.030, 0.0303])), 20, tree) == list(range(20))
    assert consult_steps(DraftPlanner(smol_cpu_cost()), 20, tree) == list(range(20))
    # ... unless drafting itself (retrieval) costs a good part of a step for nothing.
    slow = DraftPlanner(CostModel([1, 64], [0.030, 0.0303]))
    for _ in range(3):
        slow.record(tree, [0], True, 0.01)
    assert not slow.should_draft()
    # Nothing worth verifying (root only) is a failure when the consult cost something ...
    assert consult_steps(DraftPlanner(CostModel([1, 64], [0.030, 0.0303])), 8, build_tree(0, [])) == [0, 1, 3, 7]
    # ... but a cheap consult (under CHEAP_CONSULT of a step) is repeated at every step.
    cheap = budget.CHEAP_CONSULT / 2
    assert consult_steps(DraftPlanner(smol_cpu_cost()), 8, build_tree(0, []), retrieval_share=cheap) == list(range(8))


def test_a_probe_that_misses_keeps_backing_off():
    probs_low = build_tree(0, [[1, 2, 3]], weights=[1.0])
    planner = DraftPlanner(smol_cpu_cost())
    planner.acceptance.prior_rate = 0.01  # estimates that say nothing pays: the budget declines
    declined = planner.plan(probs_low)
    assert len(declined) == 1
    for step in range(2):  # failures at steps 0 and 1 (consults costing 10% of a step): skip one step
        assert planner.should_draft()
        planner.record(declined, [0], True, 0.011)
    assert not planner.should_draft()
    assert planner.should_draft()  # the retry after the back-off ...
    probe = planner.plan(probs_low)
    assert len(probe) == 1 + planner.probe_nodes  # ... verifies a probe anyway
    planner.record(probe, [0], True, 0.0)  # which missed (however cheap): the back-off goes on (3 steps)
    assert [planner.should_draft() for _ in range(4)] == [False, False, False, True]


def test_a_cheap_drafter_the_budget_gave_up_on_drafts_again_once_the_text_confirms_its_drafts():
    tree = build_tree(0, [[1, 2, 3], [4]], sources=["s", "s"])
    cheap = budget.CHEAP_CONSULT / 4 * smol_cpu_cost().cost(1)
    planner = DraftPlanner(smol_cpu_cost())
    planner.acceptance.prior_rate = 0.01  # estimates that say nothing pays: plans are cut to the root
    kept = []
    for _ in range(12):
        assert planner.should_draft()  # a cheap consult never backs off ...
        kept.append(len(planner.plan(tree)) - 1)
        planner.record(build_tree(0, []), [0], True, cheap)
        planner.emitted([1])  # ... and the text goes on as its unverified chain said
        planner.emitted([2])
        planner.emitted([3, 9])
    # Nothing was verified, yet the estimates learnt the chain is right: the budget drafts it again.
    assert kept[0] == 0 and kept[-1] >= 3


def test_drafted_trees_are_scored_once_the_text_leaves_them():
    planner = DraftPlanner(smol_cpu_cost())
    tree = build_tree(0, [[1, 2, 3], [1, 5], [4]], sources=["s", "s", "s"])
    planner.drafted(tree)
    before = dict(planner.acceptance.offered)
    planner.emitted([1, 2])  # still inside the tree: node 3 (after 1, 2) is unsettled
    assert dict(planner.acceptance.offered) == before
    planner.emitted([7])  # the text left the tree after 1, 2
    offered, accepted = planner.acceptance.offered, planner.acceptance.accepted
    # Children of the path's nodes were offered: 1 and 4 (root), 2 and 5 (after 1), 3 (after 2).
    assert sum(v for k, v in offered.items() if len(k) == 1) == pytest.approx(5)
    assert sum(v for k, v in accepted.items() if len(k) == 1) == pytest.approx(2)
    assert planner._unsettled.drain() == []  # nothing left waiting
    # A request that ends inside a tree: the children of its last node say nothing.
    planner.drafted(tree)
    planner.emitted([1])
    planner.begin(sampled=False)
    offered = planner.acceptance.offered
    assert sum(v for k, v in offered.items() if len(k) == 1) == pytest.approx(5 * planner.acceptance.decay + 2)  # 1 and 4


def test_planner_success_resets_backoff():
    declined = build_tree(0, [])
    planner = DraftPlanner(smol_cpu_cost())
    # Fail at 0, 1, 3, succeed at 7: the next failure starts the sequence again.
    steps = consult_steps(planner, 20, declined, success_at={7})
    assert steps[:5] == [0, 1, 3, 7, 8]
    assert steps[5:] == [9, 11, 15]
    # A step that did not draft changes nothing.
    tree = build_tree(0, [[1, 2, 3]])
    planner = DraftPlanner(smol_cpu_cost())
    planner.record(tree, [0], False, 5.0)
    assert planner.retrieval_ema == 0.0 and planner.should_draft()
    planner.record(tree, [0], True, 0.2)
    assert planner.retrieval_ema == pytest.approx(0.2)
    planner.record(tree, [0], True, 0.0)  # EMA: 0.9 * 0.2
    assert planner.retrieval_ema == pytest.approx(0.18)


def test_plan_returns_valid_subtree():
    rng = random.Random(3)
    for cost in (smol_cpu_cost(), CostModel([1, 64], [0.1, 0.1])):
        planner = DraftPlanner(cost, max_nodes=10)
        for _ in range(40):
            tree = random_tree(rng)
            out = planner.plan(tree)
            assert 1 <= len(out) <= 10
            assert out.tokens[0] == tree.tokens[0] and out.parents[0] == -1
            for i in range(1, len(out)):
                p = out.parents[i]
                assert 0 <= p < i and out.depths[i] == out.depths[p] + 1
                assert out.children[p][out.tokens[i]] == i
            # Every kept path is a path of the original tree, with the same weight.
            for i in range(len(out)):
                node = 0
                for n in out.path_to(i)[1:]:
                    node = tree.children[node][out.tokens[n]]
                assert out.weight[i] == pytest.approx(tree.weight[node])
                assert out.source[i] == tree.source[node]
            planner.record(out, random_path(out, rng), True, 0.001)
    # Confident drafts are kept on a flat cost, nothing is kept on a steep one.
    tree = build_tree(0, [[1, 2, 3]], sources=["s"])
    assert len(DraftPlanner(CostModel([1, 64], [0.1, 0.1])).plan(tree)) == 4
    assert len(DraftPlanner(CostModel([1, 2, 64], [0.1, 1.0, 30.0])).plan(tree)) == 1


def test_measured_steps_correct_the_calibrated_cost():
    tree = build_tree(0, [[1, 2, 3]], sources=["s"])
    planner = DraftPlanner(CostModel([1, 2, 4], [0.1, 0.11, 0.13]))
    assert len(planner.plan(tree)) == 4  # as calibrated, the whole chain pays (prior 0.7 per node)
    # Trees measure twice their calibrated cost (3x is clipped to 2x): drafting stops paying.
    for _ in range(100):
        planner.observe_step(3, 0.12 * 3)
    assert planner.step_scale[1] == pytest.approx(2.0, rel=0.01) and planner.step_scale[0] == 1.0
    assert len(planner.plan(tree)) == 1
    # Plain steps turn out slow as well: relative to them, trees pay again.
    for _ in range(100):
        planner.observe_step(1, 0.2)
    assert planner.step_scale[0] == pytest.approx(2.0, rel=0.01)
    assert len(planner.plan(tree)) == 4
    # One outlier moves the factor by at most STEP_SCALE_RATE x the clip.
    planner.observe_step(1, 100.0)
    assert planner.step_scale[0] <= 2.0 + budget.STEP_SCALE_RATE * 2.0
    # Without a budget there is nothing to correct.
    free = DraftPlanner(None)
    free.observe_step(3, 1.0)
    assert free.step_scale == [1.0, 1.0]


def test_a_rare_cell_leans_on_its_source_and_support():
    """With shrinkage, a cell never seen starts from what its source showed for nodes with
    that support (at any depth), then from the source's whole record, not from the
    optimistic constant."""
    acc = AcceptanceModel()
    weak = build_tree(0, [[1], [2], [3]], weights=[1.0, 1.0, 1.0], sources=["s", "s", "s"])  # bin 2 each
    strong = build_tree(0, [[4, 5]], weights=[1.0], sources=["s"])  # bin 4 (all the parent's evidence)
    for _ in range(20):
        acc.update(weak, [0])  # weak nodes always missed
        acc.update(strong, [0, 1, 2])  # strong ones always accepted
    assert acc.rate(("s", 1, 2)) < 0.1 and acc.rate(("s", 1, 4)) > 0.9
    assert acc.rate(("s", 6, 2)) < 0.15  # unseen depth: what weak nodes of "s" showed
    assert acc.rate(("s", 6, 4)) > 0.85  # ... and strong ones
    assert 0.2 < acc.rate(("s", 1, 0)) < 0.7  # unseen support: the source's record
    assert acc.rate(("other", 1, 4)) == pytest.approx(0.7)  # other sources untouched
    flat = AcceptanceModel(shrink=False)
    for _ in range(20):
        flat.update(weak, [0])
    assert flat.rate(("s", 6, 2)) == pytest.approx(0.7)  # the constant prior: still optimistic


def test_sampled_requests_learn_in_cells_of_their_own():
    """Under sampling a node is accepted with the target's probability of its token, so sampled
    outcomes must not drag down (or lift) what greedy requests expect, and the reverse; an
    unseen sampled cell starts from the greedy source's record, not from the constant."""
    acc = AcceptanceModel()
    chain = build_tree(0, [[1, 2]], sources=["s"])
    for _ in range(30):
        acc.update(chain, [0, 1, 2])  # greedy: always accepted
    greedy_before = acc.rate(("s", 1, 4))
    sampled_unseen = acc.rate(("s", 1, 4), sampled=True)
    assert greedy_before > 0.9 and sampled_unseen > 0.8  # the greedy record is the sampled prior
    for _ in range(30):
        acc.update(chain, [0], sampled=True)  # sampled: always rejected
    assert acc.rate(("s", 1, 4)) == pytest.approx(greedy_before, rel=0.2)  # greedy cells untouched (only decayed)
    assert acc.rate(("s", 1, 4), sampled=True) < 0.1
    assert acc.node_probs(chain, sampled=True)[1] < 0.1 < 0.9 < acc.node_probs(chain)[1]
    assert ("sampled", "s", 1, 4) in acc.offered and acc.offered[("s", 1, 4)] < 31


def test_the_planner_prices_nodes_by_the_request_it_serves():
    planner = DraftPlanner(CostModel([1, 64], [0.01, 0.01]))
    chain = build_tree(0, [[1, 2]], sources=["s"])
    planner.begin(sampled=True)
    for _ in range(30):
        planner.record(planner.plan(chain), [0], True, 0.0)  # sampled requests miss
        planner.emitted([9])
    assert planner.acceptance.node_probs(chain, sampled=True)[1] < 0.1
    assert planner.acceptance.node_probs(chain)[1] > 0.6  # greedy still at its prior
    planner.begin(sampled=False)
    assert len(planner.plan(chain)) == 3  # a flat cost: greedy verifies the chain at its prior's rate


def test_decayed_counts_equal_decaying_every_cell_at_every_update_across_rescales(monkeypatch):
    """The model stores counts against a growing scale instead of decaying each cell: what it
    reads must be what decaying every cell at every update gives, also after the stored
    figures are brought back to plain counts."""
    monkeypatch.setattr(budget, "RESCALE_AT", 1.5)  # rescale every ~80 updates at decay 0.995
    rng = random.Random(0)
    acc = AcceptanceModel()
    want_offered: dict = {}
    want_accepted: dict = {}
    for _ in range(400):
        tree = build_tree(0, [[rng.randrange(4) for _ in range(rng.randrange(1, 4))] for _ in range(3)],
                          sources=[rng.choice("ab") for _ in range(3)])
        path = accepted_in(tree, [rng.randrange(4) for _ in range(3)])
        for key in want_offered:
            want_offered[key] *= acc.decay
            want_accepted[key] *= acc.decay
        for i, accepted in offered_nodes(tree, path):
            for key in acc._levels(acc.cell(tree, i)):
                want_offered[key] = want_offered.get(key, 0.0) + 1.0
                want_accepted[key] = want_accepted.get(key, 0.0) + float(accepted)
        acc.update(tree, path)
    assert acc._scale < 1.5  # it did rescale
    assert acc.offered == pytest.approx(want_offered) and acc.accepted == pytest.approx(want_accepted)
    for key in want_offered:
        if len(key) == 3 and key[1] != "bin":
            prior = acc.prior_rate
            for level in acc._levels(key):
                prior = (want_accepted[level] + prior * acc.prior_weight) / (want_offered[level] + acc.prior_weight)
            assert acc.rate(key) == pytest.approx(prior)
