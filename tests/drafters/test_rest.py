"""Tests for dresd.drafters.rest: the REST datastore build and the draftretriever drafter."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dresd.drafters import DraftRequest
from dresd.drafters.rest import RestDrafter, TrigramTable, build_rest_index, rest_index_from_datastore

EOS = 2
VOCAB = 200
PHRASE = list(range(20, 36))  # 16 tokens that always follow each other


def records_with_phrase() -> list[list[int]]:
    """Five records with PHRASE inside varied noise, and one with a rarer branch 20 21 -> 90."""
    recs = [[100 + i, 101 + i, *PHRASE, 150 + i, 151 + i] for i in range(5)]
    recs.append([60, 20, 21, 90, 91, 92, 93, 94])
    return recs


@pytest.fixture()
def index(tmp_path: Path) -> Path:
    path = tmp_path / "rest.idx"
    build_rest_index(path, records_with_phrase(), VOCAB)
    return path


def propose(drafter: RestDrafter, context: list[int], max_len: int = 50):
    return drafter.propose(DraftRequest(context, max_len))


# ------------------------------------------------------------------ building


def test_build_counts_and_atomic_file(tmp_path: Path):
    recs = records_with_phrase()
    path = tmp_path / "sub" / "rest.idx"
    counts = build_rest_index(path, iter(recs), VOCAB)
    assert counts == {"records": len(recs), "tokens": sum(map(len, recs)), "bytes": path.stat().st_size}
    assert counts["bytes"] > 8
    assert sorted(p.name for p in path.parent.iterdir()) == ["rest.idx"]  # no temp file left


def test_build_accepts_numpy_records_and_empty_input(tmp_path: Path):
    counts = build_rest_index(tmp_path / "a.idx", [np.array(PHRASE, dtype=np.uint16)], VOCAB)
    assert counts["records"] == 1 and counts["tokens"] == len(PHRASE)
    empty = build_rest_index(tmp_path / "b.idx", [], VOCAB)
    assert empty == {"records": 0, "tokens": 0, "bytes": 8}
    assert len(RestDrafter(tmp_path / "b.idx", EOS).propose(DraftRequest([20, 21], 5))) == 0


def test_build_failure_leaves_no_file_and_keeps_the_old_one(tmp_path: Path):
    path = tmp_path / "rest.idx"
    build_rest_index(path, [PHRASE], VOCAB)
    old = path.read_bytes()

    def failing():
        yield PHRASE
        raise RuntimeError("corpus read failed")

    with pytest.raises(RuntimeError, match="corpus read failed"):
        build_rest_index(path, failing(), VOCAB)
    # A token outside the vocabulary (e.g. vocab_size without the added tokens) is refused.
    with pytest.raises(ValueError, match="len\\(tokenizer\\)"):
        build_rest_index(path, [PHRASE, [5, VOCAB]], VOCAB)
    with pytest.raises(ValueError):
        build_rest_index(tmp_path / "new.idx", [[-1, 3, 4]], VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rest.idx"]
    assert path.read_bytes() == old


def test_table_holds_trigram_frequencies_within_records(index: Path):
    table = TrigramTable(index)
    expected: dict[tuple[int, int], Counter] = defaultdict(Counter)
    for rec in records_with_phrase():
        for a, b, c in zip(rec, rec[1:], rec[2:]):
            expected[(a, b)][c] += 1
    assert len(table) == len(expected)
    for (a, b), counter in expected.items():
        total = sum(counter.values())
        assert table.next_probs(a, b) == pytest.approx({t: n / total for t, n in counter.items()})
    assert table.next_probs(20, 21) == pytest.approx({22: 5 / 6, 90: 1 / 6})
    assert table.next_probs(151, 100) == {}  # records are not glued together
    assert table.prob(20, 21, 22) == pytest.approx(5 / 6)
    assert table.prob(20, 21, 23) == 0.0 and table.prob(151, 100, 101) == 0.0
    for junk in (b"\x05" * 12, b"\x01" + b"\x00" * 7 + b"\x07" * 16, b"\x00" * 6):
        (index.parent / "junk.idx").write_bytes(junk)
        with pytest.raises(ValueError):
            TrigramTable(index.parent / "junk.idx")


def test_index_from_datastore_uses_its_live_records(tmp_path: Path):
    recs = records_with_phrase()
    offsets = np.cumsum([0] + [len(r) for r in recs]).astype(np.int64)
    store = SimpleNamespace(live_records=lambda: iter(recs))  # as Datastore.live_records() gives them
    counts = rest_index_from_datastore(store, tmp_path / "ds.idx", VOCAB)
    assert counts["records"] == len(recs) and counts["tokens"] == int(offsets[-1])
    direct = tmp_path / "direct.idx"
    build_rest_index(direct, recs, VOCAB)
    a, b = TrigramTable(tmp_path / "ds.idx"), TrigramTable(direct)
    for rec in recs:
        for x, y in zip(rec, rec[1:]):
            assert a.next_probs(x, y) == b.next_probs(x, y)
    assert a.next_probs(recs[0][-1], recs[1][0]) == {}


# ------------------------------------------------------------------ drafting


def test_context_ending_in_phrase_start_continues_the_phrase(index: Path):
    drafter = RestDrafter(index, EOS)
    cands = propose(drafter, [7, 8, 20, 21])
    assert cands.sources == ["rest"] * len(cands)
    # draftretriever 0.1.1 drafts at most 4 tokens; the likelier branch comes first.
    assert cands.paths[0] == PHRASE[2:6]
    assert [90, 91, 92, 93] in cands.paths
    w = dict(zip(map(tuple, cands.paths), cands.weights))
    assert w[tuple(PHRASE[2:6])] == pytest.approx(5 / 6)  # 5/6 * 1 * 1 * 1
    assert w[(90, 91, 92, 93)] == pytest.approx(1 / 6)
    assert cands.total == pytest.approx(1.0)  # weights are probabilities
    # Only leaves: no path is a prefix of another.
    for p in cands.paths:
        assert not any(q != p and q[: len(p)] == p for q in cands.paths)
    # Mid-phrase: a single chain.
    cands = propose(drafter, [1, 2, 3, 24, 25])
    assert cands.paths == [PHRASE[6:10]] and cands.weights == [pytest.approx(1.0)]


def test_only_the_last_two_tokens_matter_in_0_1_1(index: Path):
    drafter = RestDrafter(index, EOS)
    assert propose(drafter, [24, 25]).paths == propose(drafter, [199, 198, 24, 25]).paths == [PHRASE[6:10]]


def test_max_len_cuts_and_merges(index: Path):
    drafter = RestDrafter(index, EOS)
    cands = propose(drafter, [20, 21], max_len=1)
    assert sorted(cands.paths) == [[22], [90]]
    cands = propose(drafter, [24, 25], max_len=2)
    assert cands.paths == [PHRASE[6:8]]
    assert len(propose(drafter, [24, 25], max_len=0)) == 0


def test_cut_after_eos(tmp_path: Path):
    path = tmp_path / "eos.idx"
    build_rest_index(path, [[10, 11, 12, EOS, 13, 14]] * 3, VOCAB)
    cands = propose(RestDrafter(path, EOS), [10, 11])
    assert cands.paths == [[12, EOS]]
    assert propose(RestDrafter(path, None), [10, 11]).paths == [[12, EOS, 13, 14]]


def test_short_context_returns_nothing_without_searching(index: Path):
    drafter = RestDrafter(index, EOS)

    class Exploding:
        def search(self, *args, **kwargs):
            raise AssertionError("search must not be called with < 2 tokens")

    drafter.reader = Exploding()
    assert len(propose(drafter, [21])) == 0
    assert len(propose(drafter, [])) == 0
    with pytest.raises(ValueError):
        drafter.search([21])  # refused before reaching the library (which would abort)


def test_unmatched_context_gives_no_candidates(index: Path):
    drafter = RestDrafter(index, EOS)
    assert len(propose(drafter, [20, 199])) == 0
    assert len(propose(drafter, [3, 4, 5, 6])) == 0
    assert len(propose(drafter, [150, 151])) == 0  # last two tokens of a record: nothing follows


def test_begin_end_are_noops_and_arguments_checked(index: Path, tmp_path: Path):
    drafter = RestDrafter(index, EOS)
    drafter.begin([1, 2, 3])
    drafter.end([4, 5])
    assert propose(drafter, [24, 25]).paths == [PHRASE[6:10]]
    with pytest.raises(ValueError):
        RestDrafter(index, EOS, min_suffix=1)
    with pytest.raises(ValueError):
        RestDrafter(index, EOS, choices=1)
    with pytest.raises(FileNotFoundError):
        RestDrafter(tmp_path / "missing.idx", EOS)
