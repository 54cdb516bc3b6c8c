"""Tests for dresd.decoding.verify on a tiny random Llama: tree attention equals per-path
decoding, the KV cache is cut to the accepted path correctly, batch verification keeps the
best row, and the LM head runs only where acceptance reads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from dresd.decoding.kv_cache import GrowingCache
from dresd.decoding.tree import build_tree, tree_attention_mask, tree_position_ids
from dresd.decoding.verify import forward, keep_cache_positions, verify_batch, verify_tree
from tests_support import CASE_TOKENS, TINY_VOCAB, one_torch_thread

VOCAB = TINY_VOCAB
ATOL = 1e-4


single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def model(tiny_lm):
    return tiny_lm.model


def test_greedy_steps_have_clear_margins(tiny_case):
    """Exact token equality below is only meaningful when argmaxes are not near-ties."""
    n = len(tiny_case["prompt"])
    logits = tiny_case["logits"][n - 1 : -1]  # the logits that chose each reference token
    assert logits.argmax(-1).tolist() == tiny_case["ref"]
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    assert gap > 1e-2, f"top-2 logit gap {gap} too small for exact comparisons"
    # The continuation is not a trivial repetition (drafts must discriminate).
    assert len(set(tiny_case["ref"])) > CASE_TOKENS // 2


def prefill(model, prompt: list[int]) -> DynamicCache:
    cache = GrowingCache()  # the decode loop's cache; check_cache_matches compares with a DynamicCache
    forward(model, torch.tensor([prompt[:-1]]), cache)
    return cache


# ------------------------------------------------------------------- tree attention


def test_tree_logits_equal_per_path_runs(model, tiny_case):
    prompt, ref = tiny_case["prompt"], tiny_case["ref"]
    drafts = [
        [ref[0], ref[1], ref[2], 5],
        [ref[0], 7, 8],
        [ref[0], ref[1], 9],
        [11, 12, 13, 14, 15],
        [ref[0], 7, 16],
    ]
    base = prefill(model, prompt)
    prefix = base.get_seq_length()
    tree = build_tree(prompt[-1], drafts)
    assert len(tree) == 1 + 4 + 2 + 1 + 5 + 1
    cache = copy.deepcopy(base)
    hidden, logits = forward(
        model,
        torch.tensor([tree.tokens]),
        cache,
        tree_position_ids(tree, prefix),
        tree_attention_mask(tree, prefix, model.dtype),
    )
    leaves = [i for i in range(len(tree)) if not tree.children[i]]
    assert len(leaves) == len(drafts)
    for leaf in leaves:
        path = tree.path_to(leaf)
        c = copy.deepcopy(base)
        h_ref, l_ref = forward(model, torch.tensor([[tree.tokens[n] for n in path]]), c)
        torch.testing.assert_close(logits[0, path], l_ref[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(hidden[0, path], h_ref[0], atol=ATOL, rtol=0)
    # The root's logits are the reference greedy's first step.
    assert int(logits[0, 0].argmax()) == ref[0]


def check_cache_matches(cache: DynamicCache, model, tokens: list[int]) -> None:
    """`cache` holds exactly the K/V of a plain causal forward over `tokens`."""
    ref_cache = DynamicCache()
    forward(model, torch.tensor([tokens]), ref_cache)
    assert cache.get_seq_length() == len(tokens)
    for got, want in zip(cache.layers, ref_cache.layers):
        assert got.keys.shape == want.keys.shape
        torch.testing.assert_close(got.keys, want.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)


def continue_greedy(model, cache, pending: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        step = verify_tree(model, cache, pending, [])
        assert step.accepted == 0 and step.verified == 1 and step.drafted == 0
        pending = step.new_tokens[0]
        out.append(pending)
    return out


@pytest.mark.parametrize("layout", ["second_branch_of_child", "second_root_child"])
def test_verify_tree_non_first_branch_compacts_cache(model, tiny_case, layout):
    prompt, ref, hidden = tiny_case["prompt"], tiny_case["ref"], tiny_case["hidden"]
    wrong = (ref[1] + 1) % VOCAB
    if layout == "second_branch_of_child":
        drafts = [[ref[0], wrong, 3], [ref[0], ref[1], ref[2], ref[3]]]
        expected_path_len = 5
    else:
        drafts = [[(ref[0] + 1) % VOCAB, 4, 5], [ref[0], ref[1], wrong], [ref[0], ref[1], ref[2]]]
        expected_path_len = 4
    cache = prefill(model, prompt)
    step = verify_tree(model, cache, prompt[-1], drafts)
    accepted = expected_path_len - 1
    assert step.accepted == accepted
    assert step.new_tokens == ref[: accepted + 1]
    assert step.offered_depth == (4 if layout == "second_branch_of_child" else 3)
    assert step.drafted == step.verified - 1
    # The query is the hidden state that produced the bonus token.
    np.testing.assert_allclose(step.query.numpy(), hidden[len(prompt) - 1 + accepted], atol=ATOL)
    # Cache: prompt + accepted tokens (the bonus token is pending, not cached).
    check_cache_matches(cache, model, prompt + ref[:accepted])
    # Decoding on from the compacted cache reproduces greedy.
    more = continue_greedy(model, cache, step.new_tokens[-1], 12)
    assert more == ref[accepted + 1 : accepted + 13]


def test_verify_tree_contiguous_and_rejected(model, tiny_case):
    prompt, ref = tiny_case["prompt"], tiny_case["ref"]
    cache = prefill(model, prompt)
    step = verify_tree(model, cache, prompt[-1], [[ref[0], ref[1], (ref[2] + 1) % VOCAB, 6]])
    assert step.accepted == 2 and step.new_tokens == ref[:3] and step.offered_depth == 4
    check_cache_matches(cache, model, prompt + ref[:2])
    # Nothing accepted: only the root stays in the cache.
    step = verify_tree(model, cache, ref[2], [[(ref[3] + 1) % VOCAB, 1], [(ref[3] + 2) % VOCAB]])
    assert step.accepted == 0 and step.new_tokens == [ref[3]]
    check_cache_matches(cache, model, prompt + ref[:3])


@pytest.mark.parametrize("packed", [True, False])
def test_cpu_greedy_verify_runs_the_head_only_where_acceptance_reads(model, tiny_case, monkeypatch, packed):
    """LazyGreedyTokens: a packed head computes the asked node with the nodes below it
    (breadth-first, ROWS_PER_PASS per product); a stock head only the accepted path + bonus."""
    from dresd.model.fastpath.cpu_linear import ROWS_PER_PASS, DualLayoutLinear

    prompt, ref = tiny_case["prompt"], tiny_case["ref"]
    head = model.get_output_embeddings()
    assert isinstance(head, DualLayoutLinear)
    if not packed:
        stock = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        stock.weight = head.weight
        monkeypatch.setitem(model._modules, "lm_head", stock)  # setattr would delete it on undo
        head = stock
    rows = []
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda x: rows.append(x.shape[-2]) or original(x))
    cache = prefill(model, prompt)
    rows.clear()
    wrong = (ref[1] + 1) % VOCAB
    drafts = [[ref[0], wrong, 3, 4], [ref[0], ref[1], 7], [(ref[0] + 1) % VOCAB, 5, 6]]
    step = verify_tree(model, cache, prompt[-1], drafts)
    assert step.accepted == 2 and step.new_tokens == ref[:3]
    # Packed: root, its 2 children, their 3 children in one product (the path root ->
    # ref[0] -> ref[1] is among them). Stock: root, ref[0], ref[1]: 3 of the 10 positions.
    assert rows == ([ROWS_PER_PASS] if packed else [1, 1, 1])
    # A chain longer than one product: the next product starts where acceptance went on.
    cache = prefill(model, prompt)
    rows.clear()
    step = verify_tree(model, cache, prompt[-1], [ref[:9]])
    assert step.accepted == 9 and step.new_tokens == ref[:10]
    assert rows == ([ROWS_PER_PASS, 10 - ROWS_PER_PASS] if packed else [1] * 10)


@pytest.mark.parametrize("cache_class", [DynamicCache, GrowingCache])
def test_keep_cache_positions_direct(cache_class):
    """Unit check of the cut: prefix kept, then the chosen tree entries in order."""
    cache = cache_class()
    k = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(1, 2, 10, 3).contiguous()
    cache.update(k.clone(), k.clone() + 100, 0)
    keep_cache_positions(cache, 4, [0, 2, 5])
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert cache.layers[0].values[0, 1, :, 0].tolist() == [100, 101, 102, 103, 104, 106, 109]
    cache = cache_class()
    cache.update(k.clone(), k.clone(), 0)
    keep_cache_positions(cache, 4, [0, 1, 2])  # contiguous: a crop
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_verify_batch_picks_longest_row_and_keeps_its_cache(model, tiny_case):
    prompt, ref, hidden = tiny_case["prompt"], tiny_case["ref"], tiny_case["hidden"]
    drafts = [
        [ref[0], (ref[1] + 1) % VOCAB, 3, 4, 5, 6],  # longest row, 1 match
        [ref[0], ref[1], ref[2]],  # 3 matches: the winner (fully accepted)
        [(ref[0] + 1) % VOCAB],
        [ref[0], ref[1], ref[2]],  # tie with row 1: first row wins
    ]
    cache = prefill(model, prompt)
    step = verify_batch(model, cache, prompt[-1], drafts)
    assert step.accepted == 3 and step.new_tokens == ref[:4]
    assert step.offered_depth == 6
    assert step.drafted == 6 + 3 + 1 + 3
    assert step.verified == 4 * 7
    np.testing.assert_allclose(step.query.numpy(), hidden[len(prompt) - 1 + 3], atol=ATOL)
    assert cache.layers[0].keys.shape[0] == 1
    check_cache_matches(cache, model, prompt + ref[:3])
    assert continue_greedy(model, cache, ref[3], 8) == ref[4:12]
    # No drafts: a plain greedy step.
    step = verify_batch(model, cache, ref[11], [])
    assert step.new_tokens == [ref[12]] and step.drafted == 0 and step.verified == 1


def test_verify_batch_logits_equal_per_row(model, tiny_case):
    """Rows padded to the widest draft give the same accepted tokens as separate runs."""
    prompt, ref = tiny_case["prompt"], tiny_case["ref"]
    for drafts in ([[ref[0]], [ref[0], ref[1], ref[2], ref[3], ref[4]]], [[ref[0], ref[1]], [9, 9, 9, 9]]):
        cache = prefill(model, prompt)
        step = verify_batch(model, cache, prompt[-1], drafts)
        best = max(len(d) if d == ref[: len(d)] else 0 for d in drafts)
        assert step.accepted == best
        assert step.new_tokens == ref[: best + 1]
        check_cache_matches(cache, model, prompt + ref[:best])
