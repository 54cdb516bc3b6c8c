"""Tests for dresd.drafters.hybrid: several drafters' candidates merged into one tree."""

from __future__ import annotations

import pytest

from dresd.drafters import DraftRequest
from dresd.drafters.hybrid import HybridDrafter
from dresd.decoding.tree import build_tree
from fake_drafters import FakeDrafter, candidates


def fake(name, paths=(), weights=(), sources=None, total=None) -> FakeDrafter:
    """A drafter proposing these candidates at every call (sources default to its name)."""
    return FakeDrafter(candidates(paths, weights, name if sources is None else sources, total), name)


def request():
    return DraftRequest([4, 5, 6], 8)


def test_weights_normalised_per_source():
    a = fake("a", [[1, 2], [3]], [3.0, 1.0])  # total None: the sum of weights (4)
    b = fake("b", [[1, 5]], [2.0], total=4.0)  # half its evidence backs no path
    out = HybridDrafter([a, b]).propose(request())
    assert out.paths == [[1, 2], [3], [1, 5]]
    assert out.weights == pytest.approx([0.75, 0.25, 0.5])
    assert out.sources == ["a", "a", "b"]
    assert out.total == 1.0


def test_sources_preserved_and_defaulted_to_drafter_name():
    pld = fake("pld", [[1], [2]], [2.0, 1.0], sources=["pld:2", "pld:1"])
    anon = fake("dense", [[3]], [5.0], sources=[""])
    out = HybridDrafter([pld, anon]).propose(request())
    assert out.sources == ["pld:2", "pld:1", "dense"]
    assert out.weights == pytest.approx([2 / 3, 1 / 3, 1.0])


def test_empty_results_skipped():
    empty = fake("empty")
    zero = fake("zero", [[9]], [0.0])  # no evidence at all
    b = fake("b", [[1, 2]], [7.0])
    hybrid = HybridDrafter([empty, zero, b])
    out = hybrid.propose(request())
    assert out.paths == [[1, 2]] and out.weights == pytest.approx([1.0]) and out.sources == ["b"]
    # Every drafter is still consulted, with the same request.
    req = request()
    hybrid.propose(req)
    assert all(d.requests[-1] is req for d in (empty, zero, b))
    # Nothing from anyone: no candidates.
    assert len(HybridDrafter([fake("x"), fake("y")]).propose(request())) == 0


def test_begin_and_end_forwarded():
    a, b = fake("a"), fake("b")
    hybrid = HybridDrafter([a, b], name="mix")
    assert hybrid.name == "mix"
    hybrid.begin([1, 2, 3])
    hybrid.end([4, 5])
    assert a.begun == b.begun == [[1, 2, 3]]
    assert a.ended == b.ended == [[4, 5]]
    with pytest.raises(ValueError, match="at least one"):
        HybridDrafter([])


def test_shared_node_support_is_sum_of_sources():
    a = fake("a", [[1, 2], [3]], [3.0, 1.0])
    b = fake("b", [[1, 5], [3, 7]], [2.0, 1.0], total=4.0)
    merged = HybridDrafter([a, b]).propose(request())
    tree = build_tree(6, merged.paths, None, merged.weights, merged.sources, merged.total)
    alone = {d.name: build_tree(6, d.draft.paths, None, d.draft.weights, d.draft.sources, d.draft.total)
             for d in (a, b)}

    def support(t, tokens):
        node = 0
        for tok in tokens:
            if tok not in t.children[node]:
                return 0.0
            node = t.children[node][tok]
        return t.support(node)

    for tokens in ([1], [3], [1, 2], [1, 5], [3, 7]):
        want = support(alone["a"], tokens) + support(alone["b"], tokens)
        assert support(tree, tokens) == pytest.approx(want), tokens
    assert support(tree, [1]) == pytest.approx(0.75 + 0.5)
    assert support(tree, [3]) == pytest.approx(0.25 + 0.25)
    # A shared node belongs to both sources: the budget calibrates agreement apart.
    assert tree.source[tree.children[0][1]] == "a+b"
    assert tree.source[tree.children[tree.children[0][1]][5]] == "b"
