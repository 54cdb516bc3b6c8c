"""Tests for dresd.drafters.prompt_lookup: n-gram lookup in the request's own context."""

from __future__ import annotations

import numpy as np
import pytest

from dresd.drafters import DraftRequest
from dresd.drafters.prompt_lookup import PromptLookupDrafter, lookup_drafts

EOS = 2


def lookup(context, max_ngram=2, min_ngram=1, num_tokens=10, max_matches=5):
    return lookup_drafts(np.asarray(context, dtype=np.int64), max_ngram, min_ngram, num_tokens, max_matches)


def propose(drafter, context, max_len=20):
    return drafter.propose(DraftRequest(list(context), max_len))


def test_longer_ngram_preferred():
    # Last 2-gram (1, 2) occurs at 0; the last 1-gram (2) also occurs at 1 and 5.
    ctx = [1, 2, 3, 4, 9, 2, 7, 1, 2]
    assert lookup(ctx, num_tokens=3) == [([3, 4, 9], 2)]
    # Shorter n-grams only when the longer found nothing, even with room for more matches.
    assert lookup(ctx, num_tokens=3, max_matches=10) == [([3, 4, 9], 2)]
    # Restricted to 1-grams: every occurrence of 2, in order.
    assert lookup(ctx, max_ngram=1, num_tokens=3) == [([3, 4, 9], 1), ([7, 1, 2], 1)]


def test_falls_back_to_shorter_ngram_in_occurrence_order():
    ctx = [2, 3, 4, 5, 2, 6, 9, 2]  # (9, 2) never occurred before: 1-gram 2 at 0 and 4
    assert lookup(ctx, num_tokens=3) == [([3, 4, 5], 1), ([6, 9, 2], 1)]
    assert lookup(ctx, num_tokens=3, max_matches=1) == [([3, 4, 5], 1)]
    # A longer maximum n-gram changes nothing when it has no match.
    assert lookup(ctx, max_ngram=4, num_tokens=3) == [([3, 4, 5], 1), ([6, 9, 2], 1)]
    # min_ngram=2: no 1-gram fallback.
    assert lookup(ctx, min_ngram=2) == []


def test_max_matches_and_duplicates():
    ctx = [1, 5, 6, 1, 7, 8, 1, 5, 6, 1, 9, 9, 1]
    assert lookup(ctx, max_ngram=1, num_tokens=2, max_matches=2) == [([5, 6], 1), ([7, 8], 1)]
    # The repeated continuation [5, 6] (at 6) is not drafted twice.
    assert lookup(ctx, max_ngram=1, num_tokens=2, max_matches=10) == [([5, 6], 1), ([7, 8], 1), ([9, 9], 1)]


def test_no_match_is_empty():
    assert lookup([1, 2, 3, 4]) == []
    assert lookup([7]) == []  # too short for any n-gram before the tail
    assert lookup([]) == []
    assert lookup([5, 5]) == [([5], 1)]  # the only earlier occurrence


def test_drafts_never_pass_the_context_end():
    ctx = [7, 1, 2, 7]
    assert lookup(ctx, num_tokens=10) == [([1, 2, 7], 1)]
    # Overlapping the tail: (4, 4) at 0 and 1, continuations reach the last token only.
    assert lookup([4, 4, 4, 4], num_tokens=10) == [([4, 4], 2), ([4], 2)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        ctx = rng.integers(0, 4, rng.integers(1, 15)).tolist()
        for draft, n in lookup(ctx, max_ngram=3, num_tokens=6, max_matches=4):
            assert 1 <= len(draft) <= 6 and 1 <= n <= 3
            # The draft is a real continuation of an earlier occurrence of the tail n-gram.
            starts = [s for s in range(len(ctx) - n) if ctx[s : s + n] == ctx[-n:]
                      and ctx[s + n : s + n + len(draft)] == draft]
            assert starts, (ctx, draft, n)


def test_drafter_sources_weights_and_cuts():
    pld = PromptLookupDrafter(max_ngram=2, min_ngram=1, num_tokens=4, max_matches=3, eos_id=EOS)
    assert pld.name == "pld"
    two = propose(pld, [1, 2, 3, 4, 5, 6, 7, 1, 2])
    assert two.paths == [[3, 4, 5, 6]] and two.sources == ["pld:2"] and two.weights == [2.0]
    one = propose(pld, [2, 3, 4, 5, 2, 6, 9, 2])
    assert one.paths == [[3, 4, 5, 2], [6, 9, 2]]
    assert one.sources == ["pld:1", "pld:1"] and one.weights == [1.0, 1.0]
    assert one.total is None
    # max_len below num_tokens cuts every draft.
    assert propose(pld, [1, 2, 3, 4, 5, 6, 7, 1, 2], max_len=2).paths == [[3, 4]]
    assert len(propose(pld, [1, 2, 3, 4, 1, 2], max_len=0)) == 0
    # A draft ends at its first EOS (kept).
    assert propose(pld, [1, 2, 3, EOS, 5, 6, 1, 2]).paths == [[3, EOS]]
    # No match: no candidates.
    assert len(propose(pld, [1, 2, 3, 4])) == 0
    # Per-request hooks are no-ops; a custom name prefixes the sources.
    named = PromptLookupDrafter(num_tokens=2, name="lookup")
    named.begin([1, 2])
    named.end([3])
    assert propose(named, [1, 2, 3, 1, 2]).sources == ["lookup:2"]


def test_hf_default_is_one_first_occurrence():
    pld = PromptLookupDrafter()  # max_matches=1, num_tokens=10: HF's prompt_lookup_num_tokens
    c = propose(pld, [5, 1, 2, 3, 1, 4, 4, 1])
    assert c.paths == [[2, 3, 1, 4, 4, 1]] and c.sources == ["pld:1"]


def test_bad_ngram_config():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=2, min_ngram=0)
