"""Tests for dresd.drafters.suffix_array: the suffix array, its search and the REST drafter."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dresd.drafters import DraftRequest
from dresd.drafters.suffix_array import (
    SEPARATOR,
    RestSuffixDrafter,
    SuffixArrayIndex,
    build_suffix_array,
    find_range,
)
from dresd.decoding.tree import build_tree

EOS = 2


def brute_sa(tokens: np.ndarray) -> list[int]:
    return sorted(range(len(tokens)), key=lambda i: tokens[i:].tolist())


def brute_range(tokens: np.ndarray, query: list[int]) -> list[int]:
    """Positions where `query` occurs, in suffix order."""
    m = len(query)
    return [i for i in brute_sa(tokens) if tokens[i : i + m].tolist() == query]


def propose(drafter: RestSuffixDrafter, context: list[int], max_len: int = 50):
    return drafter.propose(DraftRequest(context, max_len))


def drafter_for(records, **kw) -> RestSuffixDrafter:
    return RestSuffixDrafter(SuffixArrayIndex.from_records(records), EOS, **kw)


# ------------------------------------------------------------------ suffix array


@pytest.mark.parametrize("seed", range(5))
def test_suffix_array_matches_brute_force(seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        n, vocab = int(rng.integers(0, 60)), int(rng.integers(1, 6))  # small vocab: many repeats
        tokens = rng.integers(-1, vocab, n).astype(np.int32)
        sa = build_suffix_array(tokens)
        assert sa.dtype == np.int32
        assert sa.tolist() == brute_sa(tokens)


def test_suffix_array_long_repeats_and_int64_input():
    for tokens in (np.zeros(200, dtype=np.int64), np.tile(np.arange(7), 40), np.array([5, 5, 5, 1] * 30 + [5])):
        assert build_suffix_array(tokens).tolist() == brute_sa(np.asarray(tokens))
    assert build_suffix_array(np.zeros(0, dtype=np.int32)).tolist() == []


@pytest.mark.parametrize("seed", range(3))
def test_find_range_matches_brute_force(seed: int):
    rng = np.random.default_rng(100 + seed)
    tokens = rng.integers(-1, 4, 300).astype(np.int32)
    sa = build_suffix_array(tokens)
    for _ in range(200):
        m = int(rng.integers(1, 6))
        # Half the queries are taken from the array (hits, some at its very end).
        if rng.random() < 0.5:
            start = int(rng.integers(0, len(tokens)))
            query = tokens[start : start + m].tolist()
        else:
            query = rng.integers(0, 4, m).tolist()
        lo, hi = find_range(tokens, sa, query)
        assert sorted(sa[lo:hi].tolist()) == sorted(brute_range(tokens, query))
        assert sa[lo:hi].tolist() == brute_range(tokens, query)  # and in suffix order


def test_find_range_misses_and_the_end():
    tokens = np.array([3, 1, 2, 3, 1], dtype=np.int32)
    sa = build_suffix_array(tokens)
    assert find_range(tokens, sa, [3, 1]) == (3, 5)
    lo, hi = find_range(tokens, sa, [3, 1, 2])
    assert sa[lo:hi].tolist() == [0]  # the suffix [3, 1] at the end is too short to match
    lo, hi = find_range(tokens, sa, [9])
    assert lo == hi
    lo, hi = find_range(tokens, sa, [0])
    assert lo == hi == 0


# ------------------------------------------------------------------ index


def test_separator_joins_records():
    index = SuffixArrayIndex.from_records([[5, 6], np.array([7], dtype=np.uint16), []])
    assert index.tokens.tolist() == [5, 6, SEPARATOR, 7, SEPARATOR, SEPARATOR]
    assert index.n_records == 3 and len(index) == 6
    assert index.sa.tolist() == brute_sa(index.tokens)
    with pytest.raises(ValueError):
        SuffixArrayIndex.from_records([[1, -3]])


def test_save_load_round_trip(tmp_path: Path):
    index = SuffixArrayIndex.from_records([[5, 6, 7], [6, 7, 8]])
    path = index.save(tmp_path / "sub" / "rest_sa.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["rest_sa.npz"]  # no temp file left
    back = SuffixArrayIndex.load(path)
    assert back.tokens.tolist() == index.tokens.tolist() and back.sa.tolist() == index.sa.tolist()
    assert back.n_records == 2 and back.tokens.dtype == np.int32
    c1, c2 = propose(RestSuffixDrafter(index, EOS), [5, 6]), propose(RestSuffixDrafter(back, EOS), [5, 6])
    assert c1.paths == c2.paths == [[7]]


def test_cached_builds_once(tmp_path: Path):
    path = tmp_path / "rest_sa.npz"
    calls = []

    def records():
        calls.append(1)
        return [[1, 2, 3]]

    a = SuffixArrayIndex.cached(path, records)
    b = SuffixArrayIndex.cached(path, records)
    assert len(calls) == 1 and path.is_file()
    assert a.tokens.tolist() == b.tokens.tolist()


def test_load_refuses_other_npz(tmp_path: Path):
    np.savez(tmp_path / "x.npz", tokens=np.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError):
        SuffixArrayIndex.load(tmp_path / "x.npz")


def test_from_datastore_reads_live_records():
    store = SimpleNamespace(live_records=lambda: iter([[10, 11, 12], [20, 21]]))  # as Datastore.live_records() does
    index = SuffixArrayIndex.from_datastore(store)
    assert index.tokens.tolist() == [10, 11, 12, SEPARATOR, 20, 21, SEPARATOR]
    assert index.n_records == 2


# ------------------------------------------------------------------ drafter


def test_no_match_across_records_or_into_the_next():
    d = drafter_for([[1, 5, 6], [7, 8, 9]])
    assert len(propose(d, [5, 6])) == 0  # 5 6 ends its record: nothing follows it
    assert len(propose(d, [6, 7])) == 0  # 6 7 only exists across the boundary
    d = drafter_for([[1, 5, 6, 3], [7, 8, 9]])
    assert propose(d, [5, 6]).paths == [[3]]  # continuation stops at the record's end


def test_longest_suffix_wins():
    # [30, 31] occurs twice -> 40 and once (after 29) -> 50; the 3-token suffix wins.
    d = drafter_for([[1, 30, 31, 40, 41], [2, 30, 31, 40, 42], [29, 30, 31, 50, 51]])
    cands = propose(d, [29, 30, 31])
    assert d.last_suffix == 3 and cands.paths == [[50, 51]]
    cands = propose(d, [28, 30, 31])  # no 3-token match: falls back to [30, 31]
    assert d.last_suffix == 2
    assert sorted(cands.paths) == [[40, 41], [40, 42], [50, 51]]


def test_longest_suffix_equals_descending_loop():
    """The binary search over n gives REST's n = max_suffix -> min_suffix loop."""
    rng = np.random.default_rng(7)
    records = [rng.integers(3, 8, int(rng.integers(5, 40))).tolist() for _ in range(30)]
    index = SuffixArrayIndex.from_records(records)
    d = RestSuffixDrafter(index, None, max_suffix=16)
    for _ in range(200):
        context = rng.integers(3, 8, int(rng.integers(1, 25))).tolist()
        expected = 0
        for n in range(min(16, len(context)), 1, -1):
            q = context[-n:]
            hits = [i for i in range(len(index.tokens) - n) if index.tokens[i : i + n].tolist() == q
                    and index.tokens[i + n] >= 0]
            if hits:
                expected = n
                break
        assert d.match(context)[0] == expected


def test_max_suffix_caps_the_query():
    phrase = list(range(10, 40))  # 30 tokens
    d = drafter_for([phrase + [7]], max_suffix=16)
    cands = propose(d, phrase)
    assert d.last_suffix == 16 and cands.paths == [[7]]


def test_weights_are_occurrence_counts_and_support():
    records = [[9, 1, 2, 3, 4, 5]] * 5 + [[8, 1, 2, 3, 6]] * 2 + [[7, 1, 2, 4]]
    d = drafter_for(records)
    cands = propose(d, [0, 1, 2])
    got = dict(zip(map(tuple, cands.paths), cands.weights))
    assert got == {(3, 4, 5): 5.0, (3, 6): 2.0, (4,): 1.0}
    assert cands.total == 8.0 and cands.sources == ["rest"] * 3
    assert cands.weights == sorted(cands.weights, reverse=True)  # most frequent first
    tree = build_tree(2, cands.paths, None, cands.weights, cands.sources, cands.total)
    node3 = tree.children[0][3]
    assert tree.support(node3) == pytest.approx(7 / 8)
    assert tree.support(tree.children[node3][4]) == pytest.approx(5 / 8)
    best = max(range(1, len(tree)), key=lambda i: (tree.weight[i], -tree.depths[i]))
    assert tree.tokens[best] == 3  # the first token of the most frequent continuation


def test_propose_matches_brute_force():
    """Random corpus with EOS inside records: longest suffix, cuts and counts by brute force."""
    rng = np.random.default_rng(3)
    records = [rng.integers(2, 7, int(rng.integers(1, 60))).tolist() for _ in range(25)]
    d = drafter_for(records, long=5)
    for _ in range(150):
        context = rng.integers(2, 7, int(rng.integers(1, 8))).tolist()
        max_len = int(rng.integers(1, 8))
        expected: Counter = Counter()
        for n in range(min(16, len(context)), 1, -1):
            for r in records:
                for i in range(len(r) - n):
                    if r[i : i + n] == context[-n:]:
                        cont = r[i + n : i + n + min(5, max_len)]
                        if EOS in cont:
                            cont = cont[: cont.index(EOS) + 1]
                        expected[tuple(cont)] += 1
            if expected:
                break
        cands = propose(d, context, max_len)
        assert dict(zip(map(tuple, cands.paths), cands.weights)) == dict(expected)
        assert (cands.total or 0) == sum(expected.values())


def test_max_matches_takes_the_first_in_suffix_order():
    records = [[1, 2, 3 + i] for i in range(10)]
    d = drafter_for(records, max_matches=4)
    cands = propose(d, [1, 2])
    assert sorted(cands.paths) == [[3], [4], [5], [6]]  # suffix order = smallest continuations
    assert cands.total == 4


def test_max_len_and_eos_cut_and_merge():
    records = [[1, 2, 10, 11, 12, 13], [1, 2, 10, 11, 14], [1, 2, 10, EOS, 15, 16], [1, 2, 10, EOS, 17]]
    d = drafter_for(records)
    cands = propose(d, [1, 2], max_len=2)
    assert dict(zip(map(tuple, cands.paths), cands.weights)) == {(10, 11): 2.0, (10, EOS): 2.0}
    cands = propose(d, [1, 2], max_len=10)
    assert dict(zip(map(tuple, cands.paths), cands.weights)) == {
        (10, EOS): 2.0, (10, 11, 12, 13): 1.0, (10, 11, 14): 1.0}
    d = drafter_for(records, long=3)
    assert max(map(len, propose(d, [1, 2]).paths)) == 3
    assert len(propose(d, [1, 2], max_len=0)) == 0


def test_short_context_returns_nothing():
    d = drafter_for([[1, 2, 3, 4]])
    assert len(propose(d, [2])) == 0 and d.last_suffix == 0
    assert len(propose(d, [])) == 0
    assert propose(d, [1, 2]).paths == [[3, 4]]
    d1 = drafter_for([[1, 2, 3, 4]], min_suffix=1)
    assert propose(d1, [2]).paths == [[3, 4]]
    with pytest.raises(ValueError):
        drafter_for([[1]], min_suffix=0)


def test_empty_index():
    d = drafter_for([])
    assert len(propose(d, [1, 2, 3])) == 0


def test_max_nodes_keeps_the_top_nodes_with_full_counts():
    rng = np.random.default_rng(11)
    records = [[1, 2] + rng.integers(3, 6, 6).tolist() for _ in range(300)]
    full = propose(drafter_for(records), [1, 2])
    tree = build_tree(2, full.paths, None, full.weights, full.sources, full.total)
    by_path = {tuple(tree.tokens[j] for j in tree.path_to(i)[1:]): tree.weight[i] for i in range(1, len(tree))}
    for k in (1, 5, 20, 63):
        cut = propose(drafter_for(records, max_nodes=k), [1, 2])
        assert cut.total == full.total and len(cut) <= k
        small = build_tree(2, cut.paths, None, cut.weights, cut.sources, cut.total)
        assert len(small) == k + 1
        kept = {tuple(small.tokens[j] for j in small.path_to(i)[1:]): small.weight[i] for i in range(1, len(small))}
        for path, w in kept.items():
            assert by_path[path] == w  # every kept node has its full count
        # ... and they are the k best-supported nodes (ties may swap at the cut).
        threshold = sorted(by_path.values(), reverse=True)[k - 1]
        assert min(kept.values()) == threshold
        assert all(w <= threshold for p, w in by_path.items() if p not in kept)
