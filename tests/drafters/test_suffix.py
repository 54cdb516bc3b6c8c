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


def test_end_puts_the_response_into_the_global_tree_when_shared():
    drafter = SuffixDrafter(share_responses=True, cached_responses=4)
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


OTHER = list(range(150, 190))  # another request's distinctive response


def served(drafter: SuffixDrafter, prompt: list[int], response: list[int]) -> None:
    """One request through the drafter: begin, a proposal per token, end."""
    drafter.begin(prompt)
    for i in range(1, len(response) + 1):
        drafter.propose(DraftRequest(prompt + response[:i], max_len=8))
    drafter.end(response)


def drafts_after(drafter: SuffixDrafter, prompt: list[int], quoted: list[int]) -> list[list[int]]:
    """The paths drafted for a new request whose response so far is `quoted`."""
    drafter.begin(prompt)
    paths = drafter.propose(DraftRequest(prompt + quoted, max_len=30)).paths
    drafter.end(quoted)
    return paths


def test_responses_are_private_to_their_request_by_default():
    drafter = SuffixDrafter()
    drafter.warm([([1], RESPONSE)])
    served(drafter, [5, 6], OTHER)  # request A
    # Request B quotes the start of A's response: nothing of A's text is drafted for it ...
    paths = drafts_after(drafter, [7, 8], OTHER[:10])
    assert not any(set(p) & set(OTHER[10:]) for p in paths)
    assert drafter.served_cached == 0 and len(drafter.cache.cached_requests) == 1  # the warmed corpus only
    # ... while the warmed corpus still drafts, and A's text drafted for A itself.
    assert drafts_after(drafter, [7, 8], RESPONSE[:10])[0] == RESPONSE[10:20]
    drafter.begin([5, 6])
    drafter.propose(DraftRequest([5, 6, *OTHER, 9, *OTHER[:10]], max_len=30))  # A's own text repeats
    assert drafter.propose(DraftRequest([5, 6, *OTHER, 9, *OTHER[:10]], max_len=30)).paths[0] == OTHER[10:20]
    drafter.end([*OTHER, 9, *OTHER[:10]])


def test_shared_responses_draft_for_later_requests_within_their_bound():
    drafter = SuffixDrafter(share_responses=True, cached_responses=2)
    drafter.warm([([1], RESPONSE)])
    served(drafter, [5, 6], OTHER)  # request A
    assert drafts_after(drafter, [7, 8], OTHER[:10])[0] == OTHER[10:20]  # B gets A's text
    # Never more served responses than the bound, the request in progress included, and
    # the oldest leaves first; the warmed corpus stays.
    for i in range(5):
        drafter.begin([9, i])
        assert len(drafter.cache.cached_requests) - 1 <= 2
        drafter.end([200 + i] * 5)
        assert drafter.served_cached <= 2 and len(drafter.cache.cached_requests) - 1 <= 2
    assert not any(set(p) & set(OTHER[10:]) for p in drafts_after(drafter, [7, 8], OTHER[:10]))
    assert drafts_after(drafter, [7, 8], RESPONSE[:10])[0] == RESPONSE[10:20]
    # A bound of 0 keeps nothing, whatever share_responses says.
    none = SuffixDrafter(share_responses=True, cached_responses=0)
    served(none, [5, 6], OTHER)
    assert none.served_cached == 0 and len(none.cache.cached_requests) == 0
    with pytest.raises(ValueError, match="cached_responses"):
        SuffixDrafter(cached_responses=-1)


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
