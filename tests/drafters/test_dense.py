"""Tests for dresd.drafters.dense: value filtering and cutting, and the dense drafters (the
datastore's keys, the request's own keys)."""

from __future__ import annotations

import numpy as np
import pytest

from dresd.config import SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.datastore.publish import publish
from dresd.drafters import Drafter, DraftRequest
from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter, drafts_from_values
from tests_support import identity_compressor, make_manifest, make_parts

EOS = 2


def paths_of(*args, **kwargs):
    return drafts_from_values(*args, **kwargs).paths


def propose(drafter, query, last_token, max_len):
    return drafter.propose(DraftRequest([1, last_token], max_len, query)).paths

# ------------------------------------------------------------------ drafts_from_values


def test_filters_on_last_token_and_cuts_at_len():
    values = np.array(
        [
            [5, 10, 11, 12, 13],
            [6, 20, 21, 22, 23],  # predicts 6: dropped
            [5, 30, 31, 32, 33],
        ]
    )
    assert paths_of(values, 5, num_drafts=10, len_drafts=3, eos_id=EOS) == [[10, 11, 12], [30, 31, 32]]
    assert paths_of(values, 6, 10, 4, EOS) == [[20, 21, 22, 23]]
    assert paths_of(values, 7, 10, 4, EOS) == []
    # len_drafts longer than the values: the whole tail.
    assert paths_of(values, 6, 10, 9, EOS) == [[20, 21, 22, 23]]
    assert paths_of(values, 5, 10, 1, EOS) == [[10], [30]]


def test_cuts_after_first_eos_keeping_it():
    values = np.array(
        [
            [5, 10, EOS, EOS, EOS],
            [5, 11, 12, EOS, 13],
            [5, EOS, 14, 15, 16],
        ]
    )
    assert paths_of(values, 5, 10, 4, EOS) == [[10, EOS], [11, 12, EOS], [EOS]]
    # The cut happens within len_drafts only: an EOS beyond it does not matter.
    assert paths_of(values, 5, 10, 1, EOS) == [[10], [11], [EOS]]


def test_drops_duplicates_keeping_rank_order():
    values = np.array(
        [
            [5, 9, 8, 7],
            [5, 1, 3, 3],
            [5, 9, 8, 7],  # duplicate of rank 0
            [5, 1, 3, 4],  # differs only after the cut: a duplicate at len 2
            [5, 4, 4, 4],
        ]
    )
    assert paths_of(values, 5, 10, 3, EOS) == [[9, 8, 7], [1, 3, 3], [1, 3, 4], [4, 4, 4]]
    assert paths_of(values, 5, 10, 2, EOS) == [[9, 8], [1, 3], [4, 4]]
    # Duplicates after the EOS cut too.
    values = np.array([[5, 3, EOS, 7], [5, 3, EOS, 8]])
    assert paths_of(values, 5, 10, 3, EOS) == [[3, EOS]]


def test_caps_num_drafts_after_filtering_and_dedup():
    rows = [[5, i, i + 1] for i in range(10, 30)]
    rows.insert(1, [5, 10, 11])  # duplicate: does not use up a slot
    rows.insert(0, [6, 99, 99])  # filtered: does not use up a slot
    values = np.array(rows)
    drafts = paths_of(values, 5, num_drafts=3, len_drafts=2, eos_id=EOS)
    assert drafts == [[10, 11], [11, 12], [12, 13]]
    assert paths_of(values, 5, num_drafts=1, len_drafts=2, eos_id=EOS) == [[10, 11]]


def test_weights_count_neighbours_and_total_counts_all():
    values = np.array([[5, 9, 8], [6, 1, 1], [5, 9, 8], [5, 4, 4], [5, 9, 8]])
    c = drafts_from_values(values, 5, 10, 2, EOS)
    assert c.paths == [[9, 8], [4, 4]]
    assert c.weights == [3.0, 1.0]
    assert c.total == 5.0  # the neighbour that predicted 6 backs no path
    assert c.sources == ["dense", "dense"]


def test_empty_values():
    assert paths_of(np.zeros((0, 4), dtype=np.int64), 5, 10, 3, EOS) == []


# ------------------------------------------------------------------ DenseDrafter

HIDDEN = 32
VALUE_LEN = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small published store: 6 records of random tokens (3..99), 32-d random hidden states."""
    rng = np.random.default_rng(0)
    records = [rng.integers(3, 100, size=n).astype(np.int32) for n in (30, 12, 25, 4, 40, 18)]
    n_keys = sum(len(r) - 1 for r in records)
    hidden = rng.normal(size=(n_keys, HIDDEN)).astype(np.float32) * rng.uniform(0.1, 10, HIDDEN)
    root = tmp_path_factory.mktemp("ds")
    publish(root, make_parts(records, dim=16, hidden=hidden), make_manifest(eos=EOS, value_len=VALUE_LEN, dim=16),
            version="v1")
    return Datastore(root), hidden


def expected_draft(tokens, offsets, pos, length):
    """Tokens after the key's predicted token, cut at the record end (then one EOS)."""
    end = offsets[np.searchsorted(offsets, pos, side="right")]
    after = tokens[pos + 2 : min(pos + 2 + length, end)].tolist()
    if len(after) < length and pos + 2 + len(after) >= end:
        after.append(EOS)
    return after[:length]


def test_dense_drafter_has_the_drafter_signature(store):
    import inspect

    ds, _ = store
    drafter = DenseDrafter(ds, SpeculativeConfig(len_drafts=4))
    want = list(inspect.signature(Drafter.propose).parameters)[1:]
    assert list(inspect.signature(drafter.propose).parameters) == want


@pytest.mark.parametrize("key", [0, 5, 27, 28, 40, 63, 66, 100, 120])
def test_query_with_stored_hidden_returns_its_continuation_first(store, key):
    ds, hidden = store
    drafter = DenseDrafter(ds, SpeculativeConfig(top_k=20, num_drafts=5, len_drafts=4))
    tokens, offsets = np.asarray(ds.tokens), ds.record_offsets
    pos = int(ds.key_positions[key])
    last_token = int(tokens[pos + 1])  # the token this key predicts
    drafts = propose(drafter, hidden[key], last_token, max_len=10)
    assert drafts, "the key itself always survives the filter"
    assert drafts[0] == expected_draft(tokens, offsets, pos, 4)
    assert drafts[0] == ds.values(np.array([key]), 5)[0, 1:].tolist()[: len(drafts[0])]
    assert 1 <= len(drafts) <= 5
    assert all(1 <= len(d) <= 4 for d in drafts)
    assert len({tuple(d) for d in drafts}) == len(drafts)
    # max_len shortens drafts below len_drafts.
    short = propose(drafter, hidden[key], last_token, max_len=2)
    assert short[0] == drafts[0][:2] and all(len(d) <= 2 for d in short)
    assert propose(drafter, hidden[key], last_token, max_len=0) == []


def test_wrong_last_token_gives_no_draft(store):
    ds, hidden = store
    key = 7
    pos = int(ds.key_positions[key])
    last_token = int(np.asarray(ds.tokens)[pos + 1])
    # top_k=1: only the key itself is retrieved, and it predicts another token.
    one = DenseDrafter(ds, SpeculativeConfig(top_k=1, num_drafts=5, len_drafts=4))
    assert propose(one, hidden[key], last_token, 10)
    assert propose(one, hidden[key], (last_token + 1) % 100 + 3, 10) == []
    # A token absent from the corpus is never predicted by any neighbour.
    many = DenseDrafter(ds, SpeculativeConfig(top_k=50, num_drafts=10, len_drafts=4))
    assert propose(many, hidden[key], 200, 10) == []


def test_top_k_above_store_size(store):
    ds, hidden = store
    drafter = DenseDrafter(ds, SpeculativeConfig(top_k=10_000, num_drafts=1000, len_drafts=3))
    pos = int(ds.key_positions[3])
    last_token = int(np.asarray(ds.tokens)[pos + 1])
    drafts = propose(drafter, hidden[3], last_token, 10)
    # Every key predicting last_token contributes (up to duplicates).
    n_match = int((np.asarray(ds.tokens)[ds.key_positions + 1] == last_token).sum())
    assert 1 <= len(drafts) <= n_match


def test_len_drafts_must_fit_values(store):
    ds, _ = store
    DenseDrafter(ds, SpeculativeConfig(len_drafts=VALUE_LEN - 1))
    with pytest.raises(ValueError, match=f"len_drafts={VALUE_LEN}"):
        DenseDrafter(ds, SpeculativeConfig(len_drafts=VALUE_LEN))


# ------------------------------------------------------------------ ContextDenseDrafter


def context_request(drafter, context, keys, max_len=10, new_from=0):
    """Hand keys[new_from:] over as the newly committed positions and ask for drafts."""
    return drafter.propose(DraftRequest(list(context), max_len, keys[-1], keys[new_from:]))


def test_context_drafter_copies_after_the_closest_matching_position():
    rng = np.random.default_rng(1)
    # Positions 0..11; keys[i] predicts context[i + 1]. The query (last key, position 11)
    # equals position 3's key, so context[5:] is the draft when context[4] == context[12].
    context = [40, 41, 42, 43, 7, 50, 51, 52, 53, 7, 60, 61, 7]
    keys = rng.normal(size=(len(context) - 1, 8)).astype(np.float32)
    keys[-1] = keys[3]
    keys[8] = keys[3] + 0.3 * rng.normal(size=8)  # second closest, also predicts 7
    drafter = ContextDenseDrafter(identity_compressor(8), SpeculativeConfig(len_drafts=4, top_k=50), EOS)
    drafter.begin(context[:5])
    c = context_request(drafter, context, keys)
    assert c.paths[0] == [50, 51, 52, 53]
    assert [60, 61, 7] in c.paths  # position 8's continuation runs into the text's end
    assert set(c.sources) == {"dense-ctx"}
    assert c.weights[0] > c.weights[c.paths.index([60, 61, 7])]
    # Only positions predicting the token just emitted count: change it and 3 drops out.
    other = context[:-1] + [99]
    drafter.begin(other)
    assert [50, 51, 52, 53] not in context_request(drafter, other, keys).paths


def test_context_drafter_keeps_keys_across_calls_and_resets_per_request():
    rng = np.random.default_rng(2)
    context = [5, 6, 7, 8, 6, 9, 10, 6]
    keys = rng.normal(size=(len(context) - 1, 4)).astype(np.float32)
    keys[-1] = keys[0]  # position 0 predicts 6, continues 7, 8
    drafter = ContextDenseDrafter(identity_compressor(4), SpeculativeConfig(len_drafts=2), EOS)
    drafter.begin(context[:3])
    # The first call hands over positions 0..3; the second only the 3 committed since.
    first = drafter.propose(DraftRequest(context[:5], 10, keys[3], keys[:4]))
    assert all(len(p) <= 2 for p in first.paths)
    assert context_request(drafter, context, keys, new_from=4).paths[0] == [7, 8]
    # A new request starts with no keys: the old ones are out of step with its text.
    drafter.begin([1, 2])
    assert context_request(drafter, context, keys, new_from=4).paths == []
    # Keys that do not cover the context (out of step) give no drafts rather than wrong ones.
    drafter.begin(context)
    assert context_request(drafter, context + [3], keys).paths == []


def test_both_dense_drafters_of_a_step_compress_the_query_once(store, monkeypatch):
    import dresd.datastore.compression as compression

    store = store[0]
    calls = []
    real = compression.compress
    monkeypatch.setattr(compression, "compress", lambda comp, rows: calls.append(len(np.atleast_2d(rows))) or real(comp, rows))
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(4, store.compressor.in_dim)).astype(np.float32)
    request = DraftRequest([1, 2, 3, 4, 5], 4, keys[-1], keys)
    spec = SpeculativeConfig(len_drafts=2, top_k=4)
    dense, ctx = DenseDrafter(store, spec), ContextDenseDrafter(store.compressor, spec, EOS)
    ctx.begin([1, 2])
    dense.propose(request)
    ctx.propose(request)
    assert calls == [4]  # the new keys once; the query's key is their last row
