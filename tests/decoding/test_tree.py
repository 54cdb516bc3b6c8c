"""Tests for dresd.decoding.tree: trie construction, tree attention mask, positions, acceptance."""

from __future__ import annotations

import pytest
import torch

from dresd.decoding.tree import (
    TokenTree,
    UnsettledTrees,
    accepted_in,
    ancestor_matrix,
    build_tree,
    greedy_accept,
    subtree,
    tree_attention_mask,
    tree_position_ids,
)


def paths(tree: TokenTree) -> set[tuple[int, ...]]:
    """Token sequences (root excluded) of every root-to-leaf path."""
    leaves = [i for i in range(len(tree)) if not tree.children[i]]
    return {tuple(tree.tokens[n] for n in tree.path_to(leaf)[1:]) for leaf in leaves}


def check_structure(tree: TokenTree) -> None:
    n = len(tree)
    assert len(tree.parents) == len(tree.depths) == len(tree.children) == n
    assert tree.parents[0] == -1 and tree.depths[0] == 0
    for i in range(1, n):
        p = tree.parents[i]
        assert 0 <= p < i, "a parent precedes its children"
        assert tree.depths[i] == tree.depths[p] + 1
        assert tree.children[p][tree.tokens[i]] == i
    for i in range(n):
        assert len(set(tree.children[i])) == len(tree.children[i])


def test_build_tree_merges_shared_prefixes():
    drafts = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
    tree = build_tree(9, drafts)
    check_structure(tree)
    # root 9; 1 -> 2 -> {3, 4}; 1 -> 5; 6: 1 + 6 draft tokens
    assert len(tree) == 7
    assert tree.tokens == [9, 1, 2, 3, 4, 5, 6]
    assert tree.parents == [-1, 0, 1, 2, 2, 1, 0]
    assert tree.depths == [0, 1, 2, 3, 3, 2, 1]
    assert tree.max_depth == 3
    assert paths(tree) == {(1, 2, 3), (1, 2, 4), (1, 5), (6,)}
    assert tree.path_to(4) == [0, 1, 2, 4]


def test_build_tree_dedups_and_handles_prefix_drafts():
    tree = build_tree(0, [[1, 2, 3], [1, 2, 3], [1, 2], []])
    check_structure(tree)
    assert tree.tokens == [0, 1, 2, 3]
    assert paths(tree) == {(1, 2, 3)}
    # A token equal to the root's is just a child (no confusion with the root itself).
    tree = build_tree(7, [[7, 7]])
    assert tree.tokens == [7, 7, 7] and tree.parents == [-1, 0, 1]


def test_build_tree_no_drafts_is_root_only():
    tree = build_tree(5, [])
    assert len(tree) == 1 and tree.max_depth == 0 and tree.children == [{}]


def test_build_tree_accepts_numpy_like_ints():
    import numpy as np

    tree = build_tree(3, [list(np.array([4, 5], dtype=np.int64))])
    assert tree.tokens == [3, 4, 5] and all(type(t) is int for t in tree.tokens)
    assert 4 in tree.children[0]


def test_max_nodes_keeps_higher_ranked_drafts_whole():
    drafts = [[1, 2, 3, 4], [1, 2, 5, 6], [7, 8, 9]]
    tree = build_tree(0, drafts, max_nodes=7)
    check_structure(tree)
    assert len(tree) == 7
    # First draft whole (5 nodes with the root), second gets 5 then stops, third nothing.
    assert paths(tree) == {(1, 2, 3, 4), (1, 2, 5, 6)}
    tree = build_tree(0, drafts, max_nodes=6)
    assert len(tree) == 6
    assert paths(tree) == {(1, 2, 3, 4), (1, 2, 5)}
    # Shared prefixes cost nothing: a duplicate of an existing path is still walked.
    tree = build_tree(0, [[1, 2, 3], [1, 2, 3], [1, 9]], max_nodes=4)
    assert paths(tree) == {(1, 2, 3)}
    # max_nodes=1: only the root.
    assert len(build_tree(0, drafts, max_nodes=1)) == 1
    # A big budget changes nothing.
    assert build_tree(0, drafts, max_nodes=100).tokens == build_tree(0, drafts).tokens


def test_ancestor_matrix():
    tree = build_tree(9, [[1, 2, 3], [1, 5], [6]])
    # nodes: 0:9, 1:1, 2:2, 3:3, 4:5, 5:6
    anc = ancestor_matrix(tree)
    assert anc.dtype == torch.bool and anc.shape == (6, 6)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(anc, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tree_attention_mask(dtype):
    tree = build_tree(9, [[1, 2], [3]])  # nodes 0:9, 1:1, 2:2, 3:3
    prefix = 5
    mask = tree_attention_mask(tree, prefix, dtype)
    assert mask.shape == (1, 1, 4, prefix + 4) and mask.dtype == dtype
    m = mask[0, 0]
    assert (m[:, :prefix] == 0).all(), "every node sees the whole prefix"
    neg = torch.finfo(dtype).min
    allowed = ancestor_matrix(tree)
    tree_part = m[:, prefix:]
    assert (tree_part[allowed] == 0).all()
    assert (tree_part[~allowed] == neg).all()
    # Siblings and a sibling's descendants are hidden: node 3 must not see nodes 1, 2.
    assert tree_part[3, 1] == neg and tree_part[3, 2] == neg
    assert tree_part[2, 3] == neg
    # Without a prefix the mask is just the tree part.
    assert tree_attention_mask(tree, 0, dtype).shape == (1, 1, 4, 4)


def test_tree_position_ids():
    tree = build_tree(9, [[1, 2, 3], [1, 5], [6]])
    pos = tree_position_ids(tree, 10)
    assert pos.shape == (1, 6) and pos.dtype == torch.long
    assert pos[0].tolist() == [10, 11, 12, 13, 12, 11]


def test_greedy_accept_longest_path():
    tree = build_tree(9, [[1, 2, 3], [1, 5], [6]])
    # nodes: 0:9, 1:1, 2:2, 3:3, 4:5, 5:6; predicted[i] = target's argmax after node i.
    # Root predicts 1, then after 1 predicts 2, after 2 predicts 3, after 3 anything.
    assert greedy_accept(tree, [1, 2, 3, 42, 0, 0]) == [0, 1, 2, 3]
    # Partial: after node 2 the target wants 8, not 3.
    assert greedy_accept(tree, [1, 2, 8, 0, 0, 0]) == [0, 1, 2]
    # Nothing matches the root's prediction.
    assert greedy_accept(tree, [4, 2, 3, 0, 0, 0]) == [0]


def test_greedy_accept_non_first_branch():
    tree = build_tree(9, [[1, 2, 3], [1, 5, 7], [6, 8]])
    # nodes: 0:9, 1:1, 2:2, 3:3, 4:5, 5:7, 6:6, 7:8
    assert tree.tokens == [9, 1, 2, 3, 5, 7, 6, 8]
    # After node 1 the target wants 5: second branch, then 7.
    pred = [1, 5, 0, 0, 7, 11, 0, 0]
    assert greedy_accept(tree, pred) == [0, 1, 4, 5]
    # A later root child (third draft).
    pred = [6, 0, 0, 0, 0, 0, 8, 0]
    assert greedy_accept(tree, pred) == [0, 6, 7]


# ------------------------------------------------------------------- weights and subtrees


def test_build_tree_weights_sources_total():
    tree = build_tree(9, [[1, 2], [1, 3], [4], [1, 2]], weights=[2.0, 1.0, 1.0, 0.5],
                      sources=["a", "b", "c", "d"])
    check_structure(tree)
    # nodes: 0:9, 1:1, 2:2, 3:3, 4:4
    assert tree.tokens == [9, 1, 2, 3, 4]
    assert tree.weight == [4.5, 3.5, 2.5, 1.0, 1.0]  # the root holds the sum
    # A node proposed by several drafters is theirs together (sorted, each named once).
    assert tree.source == ["", "a+b+d", "a+d", "b", "c"]
    assert build_tree(0, [[1], [1], [1]], sources=["s", "d", "s"]).source == ["", "d+s"]
    assert tree.support(0) == 1.0
    assert tree.support(1) == pytest.approx(3.5 / 4.5)
    assert tree.support(3) == pytest.approx(1.0 / 4.5)
    # An explicit total: evidence that backs no path lowers every support.
    tree = build_tree(9, [[1, 2], [1, 3], [4], [1, 2]], weights=[2.0, 1.0, 1.0, 0.5],
                      sources=["a", "b", "c", "d"], total=9.0)
    assert tree.weight[0] == 9.0
    assert tree.support(1) == pytest.approx(3.5 / 9.0) and tree.support(0) == 1.0
    # Default weights count the drafts through a node; default sources are "".
    tree = build_tree(0, [[1, 2, 3], [1, 2], [5]])
    assert tree.weight == [3.0, 2.0, 2.0, 1.0, 1.0]
    assert tree.source == [""] * 5
    assert [tree.support(i) for i in range(len(tree))] == pytest.approx([1, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    # No evidence at all: zero support rather than a division by zero.
    assert build_tree(0, [[1]], weights=[0.0]).support(1) == 0.0


def test_support_never_grows_along_a_path():
    import random

    rng = random.Random(0)
    for _ in range(50):
        drafts = [[rng.randint(0, 3) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 8))]
        weights = [rng.uniform(0, 3) for _ in drafts]
        tree = build_tree(0, drafts, weights=weights)
        for i in range(1, len(tree)):
            assert 0 <= tree.support(i) <= tree.support(tree.parents[i]) + 1e-12
            # A node's weight is its own drafts' weight plus at least its children's.
            assert tree.weight[i] + 1e-9 >= sum(tree.weight[c] for c in tree.children[i].values())


def test_max_nodes_still_weighs_the_walked_prefix():
    tree = build_tree(0, [[1, 2, 3], [1, 2, 4]], max_nodes=4, weights=[1.0, 2.0], sources=["a", "b"])
    # The second draft stops before 4, but its weight counts along 1 -> 2.
    assert tree.tokens == [0, 1, 2, 3]
    assert tree.weight == [3.0, 3.0, 3.0, 1.0]


def test_subtree_renumbers_and_keeps_evidence():
    tree = build_tree(9, [[1, 2, 3], [1, 5], [6, 7]], weights=[3.0, 2.0, 1.0], sources=["a", "b", "c"])
    # nodes: 0:9, 1:1, 2:2, 3:3, 4:5, 5:6, 6:7
    sub = subtree(tree, [5, 1, 4, 6, 4])  # order and duplicates do not matter
    check_structure(sub)
    # Kept nodes 1, 4, 5, 6 in their original relative order.
    assert sub.tokens == [9, 1, 5, 6, 7]
    assert sub.parents == [-1, 0, 1, 0, 3]
    assert sub.depths == [0, 1, 2, 1, 2]
    assert sub.children == [{1: 1, 6: 3}, {5: 2}, {}, {7: 4}, {}]
    assert sub.weight == [6.0, 5.0, 2.0, 1.0, 1.0]
    assert sub.source == ["", "a+b", "b", "c", "c"]
    # Supports are still measured against the original total.
    assert [sub.support(i) for i in range(len(sub))] == [tree.support(i) for i in (0, 1, 4, 5, 6)]
    # Root only.
    root = subtree(tree, [])
    assert root.tokens == [9] and root.weight == [6.0] and root.children == [{}]
    # Keeping everything is a copy.
    full = subtree(tree, list(range(1, len(tree))))
    assert (full.tokens, full.parents, full.weight, full.source) == (tree.tokens, tree.parents, tree.weight, tree.source)


def test_subtree_needs_parents():
    tree = build_tree(9, [[1, 2, 3], [1, 5]])
    with pytest.raises(ValueError, match="without its parent"):
        subtree(tree, [1, 3])  # 3's parent 2 is missing
    with pytest.raises(ValueError, match="parent"):
        subtree(tree, [2])  # 2's parent 1 is missing


def test_accepted_in_follows_the_true_tokens_until_the_tree_leaves_them():
    tree = build_tree(7, [[1, 2, 3], [1, 5], [4]])
    assert [tree.tokens[n] for n in accepted_in(tree, [1, 2, 9, 3])] == [7, 1, 2]
    assert [tree.tokens[n] for n in accepted_in(tree, [1, 5, 6])] == [7, 1, 5]
    assert accepted_in(tree, [9]) == [0] and accepted_in(tree, []) == [0]


def test_unsettled_trees_wait_until_the_text_leaves_them_and_keep_their_tags():
    tree = build_tree(7, [[1, 2, 3], [4]])
    pending = UnsettledTrees()
    pending.add(tree, "a")
    pending.add(build_tree(7, [[9]]), "b")
    # 1, 2 stay inside the first tree; the second is left at once (9 is not 1).
    assert [(tag, [tree.tokens[n] for n in path]) for t, tag, path in pending.emitted([1, 2])] == [("b", [7])]
    assert pending.emitted([3]) == [(tree, "a", [0, 1, 2, 3])]  # a leaf: nothing deeper to learn
    pending.add(tree, "c")
    assert pending.emitted([1]) == []
    assert pending.drain() == [(tree, "c", [0, 1])] and pending.drain() == []  # the text ended inside it
