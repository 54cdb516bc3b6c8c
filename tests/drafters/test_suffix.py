"""Tests for dresd.drafters.suffix: SuffixDecoding through arctic-inference's suffix trees."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dresd.drafters import DraftRequest
from dresd.drafters.suffix import SuffixDrafter, tree_to_candidates

EOS = 2
RESPONSE = list(range(100, 140))  # a 40-token corpus response


def tree_prefixes(token_ids: list[int], parents: list[int]) -> set[tuple[int, ...]]:
    """Every root-to-node token sequence of a (token_ids, parents) tree."""
    seqs: list[tuple[int, ...]] = []
    for tok, par in zip(token_ids, parents):
        seqs.append((seqs[par] if par >= 0 else ()) + (tok,))
    return set(seqs)


def test_import_pulls_in_neither_torch_nor_vllm():
    code = (
        "import sys; from arctic_inference.suffix_decoding import SuffixDecodingCache; "
        "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_warm_then_speculation_continues_a_warmed_response():
    drafter = SuffixDrafter()
    assert drafter.warm([([1, 2, 3], RESPONSE), ([4, 5], [7, 8, 9])]) == 2
    prompt = [50, 51, 52]
    drafter.begin(prompt)
    cands = drafter.propose(DraftRequest(prompt + RESPONSE[:10], max_len=30))
    assert cands.sources and set(cands.sources) == {"suffix"}
    # max_spec_factor=1: at most as many tokens as matched (10).
    assert cands.paths[0] == RESPONSE[10:20]
    assert cands.total == pytest.approx(1.0) and 0 < cands.weights[0] <= 1
    drafter.end(RESPONSE[:10])


def test_prompt_and_own_generation_are_used_without_any_warm():
    drafter = SuffixDrafter()
    prompt = [9, 60, 61, 62, 63, 64, 65, 66, 67, 9]
    drafter.begin(prompt)
    # The response starts quoting the prompt: the local tree continues the quote (the
    # match "9 60 61 62" is 4 tokens long, so 4 tokens are drafted).
    cands = drafter.propose(DraftRequest(prompt + [60, 61, 62], max_len=20))
    assert cands.paths[0] == [63, 64, 65, 66]
    # Self-repetition: a phrase generated in this request is drafted again.
    generated = [60, 61, 62, 70, 71, 72, 73, 74, 75, 80, 70, 71, 72]
    cands = drafter.propose(DraftRequest(prompt + generated, max_len=20))
    assert cands.paths[0][:3] == [73, 74, 75]
    drafter.end(generated)


def test_end_puts_the_response_into_the_global_tree():
    drafter = SuffixDrafter()
    drafter.begin([1, 2])
    drafter.propose(DraftRequest([1, 2, 200], max_len=10))  # the cache saw one token so far
    drafter.end([200, *RESPONSE])  # the rest arrives only with end()
    drafter.begin([3, 4])  # unrelated prompt: only the global tree can help
    cands = drafter.propose(DraftRequest([3, 4, *RESPONSE[:8]], max_len=30))
    assert cands.paths[0] == RESPONSE[8:16]
    drafter.end(RESPONSE[:8])
    # A fresh drafter (nothing cached) has nothing to say about that context.
    fresh = SuffixDrafter()
    fresh.begin([3, 4])
    assert len(fresh.propose(DraftRequest([3, 4, *RESPONSE[:8]], max_len=30))) == 0


def test_paths_are_root_to_leaf_chains_of_the_draft_tree():
    drafter = SuffixDrafter(max_spec_factor=4.0, min_token_prob=0.05)
    # Three continuations of the same 6-token stem: a branching tree.
    stem = [10, 11, 12, 13, 14, 15]
    drafter.warm([([], stem + [20, 21, 22]), ([], stem + [20, 21, 23]), ([], stem + [30, 31, 32])] * 2)
    drafter.begin([1])
    context = [1, *stem]
    cands = drafter.propose(DraftRequest(context, max_len=10))
    assert len(cands) >= 2
    draft = drafter.cache.speculate(
        drafter._active, context, max_spec_tokens=10, max_spec_factor=4.0, min_token_prob=0.05, use_tree_spec=True
    )
    nodes = tree_prefixes(draft.token_ids, draft.parents)
    for path in cands.paths:
        assert all(tuple(path[:i]) in nodes for i in range(1, len(path) + 1))
        assert not any(q != path and q[: len(path)] == path for q in cands.paths)  # leaves only
    assert [20, 21, 22] in cands.paths and [30, 31, 32] in cands.paths
    assert cands.weights == sorted(cands.weights, reverse=True)
    assert sum(cands.weights) <= 1.0 + 1e-6


def test_max_len_and_eos_respected():
    drafter = SuffixDrafter(eos_id=EOS)
    drafter.warm([([], RESPONSE[:20] + [EOS] + RESPONSE[20:])])
    drafter.begin([0])
    context = [0, *RESPONSE[:15]]
    for max_len in (1, 3, 5):
        cands = drafter.propose(DraftRequest(context, max_len=max_len))
        assert cands.paths and all(len(p) <= max_len for p in cands.paths)
        assert cands.paths[0] == RESPONSE[15 : 15 + max_len]
    assert len(drafter.propose(DraftRequest(context, max_len=0))) == 0
    # The warmed response has an EOS after token 20: nothing is drafted past it.
    cands = drafter.propose(DraftRequest(context, max_len=15))
    assert cands.paths[0] == RESPONSE[15:20] + [EOS]


def test_linear_mode_gives_one_path():
    drafter = SuffixDrafter(use_tree_spec=False)
    drafter.warm([([], RESPONSE)])
    drafter.begin([0])
    cands = drafter.propose(DraftRequest([0, *RESPONSE[:5]], max_len=30))
    assert cands.paths == [RESPONSE[5:10]]


def test_request_lifecycle():
    drafter = SuffixDrafter()
    with pytest.raises(RuntimeError):
        drafter.propose(DraftRequest([1, 2], max_len=5))
    drafter.end([1, 2])  # nothing active: no-op
    drafter.begin([1, 2, 3])
    drafter.propose(DraftRequest([1, 2, 3, 4, 5], max_len=5))
    with pytest.raises(ValueError):
        drafter.propose(DraftRequest([1, 2, 3, 4], max_len=5))  # the context shrank
    drafter.begin([7, 8])  # a second begin closes the open request
    assert len(drafter.cache.active_requests) == 1
    drafter.end([])
    assert len(drafter.cache.active_requests) == 0


def test_tree_to_candidates():
    # Tree: 1 -> {2 -> 4, 3}, and a second root 5.
    cands = tree_to_candidates([1, 2, 3, 4, 5], [-1, 0, 0, 1, -1], [1.0, 0.6, 0.3, 0.5, 0.1], 2.5, 10, None, "s")
    assert cands.paths == [[1, 2, 4], [1, 3], [5]]
    assert cands.weights == [0.5, 0.3, 0.1] and cands.total == 1.0
    # Cut at max_len 1: paths through 1 merge, their weights add up.
    cands = tree_to_candidates([1, 2, 3, 4, 5], [-1, 0, 0, 1, -1], [1.0, 0.6, 0.3, 0.5, 0.1], 2.5, 1, None, "s")
    assert cands.paths == [[1], [5]] and cands.weights == pytest.approx([0.8, 0.1])
    # Cut after EOS; no probabilities: the score weighs every path, total left unset.
    cands = tree_to_candidates([1, EOS, 3], [-1, 0, 1], None, 2.0, 10, EOS, "s")
    assert cands.paths == [[1, EOS]] and cands.weights == [2.0] and cands.total is None
    assert len(tree_to_candidates([], [], [], 0.0, 5, EOS, "s")) == 0
    with pytest.raises(ValueError):
        tree_to_candidates([1, 2], [-1, 1], None, 1.0, 5, None, "s")
