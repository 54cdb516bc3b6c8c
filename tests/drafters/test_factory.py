"""Tests for dresd.drafters.factory: the method -> drafter mapping, the cached retrieval
indexes derived from a datastore, and the datastore's (prompt, response) pairs."""

from __future__ import annotations

import numpy as np
import pytest

from dresd.config import SpeculativeConfig
from dresd.datastore import Datastore, publish
from dresd.drafters import DraftRequest
from dresd.drafters.factory import NEEDS_DATASTORE, derived_dir, make_drafter, store_pairs, store_records
from dresd.formatting import format_prompt_ids
from dresd.models import make_byte_tokenizer
from tests_support import make_manifest, make_parts

HIDDEN = 32
VALUE_LEN = 12  # > the default len_drafts (10)
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("Name a colour.", "Blue is a colour of the sky on a clear day."),
    ("Count to five.", "one two three four five"),
    ("Say hi", "hi"),
    ("Write a line about the sea.", "The sea is wide and the waves roll in all day long."),
]
# A record cut at max_tokens: no final EOS, its response is kept whole.
TRUNCATED = ("Tell me a story.", "Once upon a time there")


@pytest.fixture(scope="module")
def tok():
    return make_byte_tokenizer()


def text_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def records(tok) -> list[list[int]]:
    eos = tok.eos_token_id
    recs = [format_prompt_ids(tok, p, "chat") + text_ids(tok, r) + [eos] for p, r in PAIRS]
    p, r = TRUNCATED
    recs.append(format_prompt_ids(tok, p, "chat") + text_ids(tok, r))
    return recs


@pytest.fixture(scope="module")
def store(tmp_path_factory, tok, records) -> Datastore:
    """A small published chat-format store over `records` with random 32-d keys."""
    parts = make_parts(records, hidden_dim=HIDDEN, dim=16)
    root = tmp_path_factory.mktemp("ds")
    publish(root, parts, make_manifest(eos=tok.eos_token_id, value_len=VALUE_LEN, dim=16), version="v1")
    return Datastore(root)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test derives its indexes under its own cache folder."""
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make(method: str, store, tok, **kw):
    return make_drafter(SpeculativeConfig(method=method, **kw), store, tok, tok.eos_token_id)


# ------------------------------------------------------------------ method -> drafter


def test_greedy_has_no_drafter(store, tok):
    assert make("greedy", None, tok) is None
    assert make("greedy", store, tok) is None


def test_pld(tok):
    from dresd.drafters.prompt_lookup import PromptLookupDrafter

    d = make("pld", None, tok, pld_max_ngram=3, pld_min_ngram=2, pld_tokens=7, pld_matches=2)
    assert type(d) is PromptLookupDrafter  # no datastore needed
    assert (d.max_ngram, d.min_ngram, d.num_tokens, d.max_matches, d.eos_id) == (3, 2, 7, 2, tok.eos_token_id)


def test_dresd(store, tok):
    from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter
    from dresd.drafters.hybrid import HybridDrafter

    spec = SpeculativeConfig(method="dresd", top_k=7, context_keys=False)
    d = make_drafter(spec, store, tok, tok.eos_token_id)
    assert type(d) is DenseDrafter and d.store is store and d.spec is spec
    # By default the request's own keys are a second dense source.
    d = make("dresd", store, tok)
    assert type(d) is HybridDrafter and d.name == "dresd"
    assert [type(x) for x in d.drafters] == [DenseDrafter, ContextDenseDrafter]
    assert d.drafters[1].compressor is store.compressor
    # The store's value length limits the drafts.
    with pytest.raises(ValueError, match="len_drafts"):
        make("dresd", store, tok, len_drafts=VALUE_LEN)


@pytest.mark.parametrize("matches, want", [(1, 3), (5, 5)])
def test_hybrid_is_dense_plus_pld(store, tok, matches, want):
    from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter
    from dresd.drafters.hybrid import HybridDrafter
    from dresd.drafters.prompt_lookup import PromptLookupDrafter

    d = make("hybrid", store, tok, pld_matches=matches, pld_tokens=6)
    assert type(d) is HybridDrafter and d.name == "hybrid"
    assert [type(x) for x in d.drafters] == [DenseDrafter, ContextDenseDrafter, PromptLookupDrafter]
    dense, _, pld = d.drafters
    assert dense.store is store
    d = make("hybrid", store, tok, context_keys=False)
    assert [type(x) for x in d.drafters] == [DenseDrafter, PromptLookupDrafter]
    assert pld.max_matches == want and pld.num_tokens == 6 and pld.eos_id == tok.eos_token_id


def test_hybrid_with_suffix_decoding(store, tok):
    from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter
    from dresd.drafters.suffix import SuffixDrafter

    d = make("hybrid", store, tok, hybrid_exact="suffix", suffix_min_prob=0.2)
    assert [type(x) for x in d.drafters] == [DenseDrafter, ContextDenseDrafter, SuffixDrafter]
    sfx = d.drafters[2]
    assert sfx.min_token_prob == 0.2 and sfx.eos_id == tok.eos_token_id
    # Its global tree holds the datastore's responses: a request starting like one of them
    # gets that response's continuation drafted.
    prompt = format_prompt_ids(tok, "Unrelated question?", "chat")
    d.begin(prompt)
    said = text_ids(tok, "The capital of France")
    c = sfx.propose(DraftRequest(context=prompt + said, max_len=8))
    assert any(p == text_ids(tok, " is Paris")[: len(p)] and p for p in c.paths)


@pytest.mark.parametrize("method", NEEDS_DATASTORE)
def test_methods_needing_a_datastore_refuse_none(tok, method, cache_dir):
    with pytest.raises(ValueError, match="needs a datastore"):
        make(method, None, tok)
    assert not cache_dir.exists()  # nothing was built


def test_needs_datastore_lists_every_retrieval_method():
    assert set(NEEDS_DATASTORE) == {"dresd", "rest", "rest-dr", "suffix", "hybrid"}


def test_unknown_method(store, tok):
    with pytest.raises(ValueError, match="unknown method 'medusa'"):
        make("medusa", store, tok)


# ------------------------------------------------------------------ derived indexes


def test_derived_dir_is_under_the_cache_and_keyed_by_version_and_tokens(store, cache_dir):
    d = derived_dir(store)
    sha = store.manifest["files"]["tokens.npy"]["sha256"]
    assert d == cache_dir / "derived" / f"v1-{sha[:12]}"


def test_rest_suffix_array_cached_once(store, tok, records, monkeypatch):
    from dresd.drafters.suffix_array import RestSuffixDrafter, SuffixArrayIndex

    spec = SpeculativeConfig(method="rest", max_verify=16)
    d = make_drafter(spec, store, tok, tok.eos_token_id)
    assert type(d) is RestSuffixDrafter
    assert d.eos_id == tok.eos_token_id and d.max_nodes == 4 * 16
    path = derived_dir(store) / "rest_sa.npz"
    assert path.is_file()
    assert d.index.n_records == len(records)
    assert np.array_equal(d.index.tokens, SuffixArrayIndex.from_records(records).tokens)
    stamp = path.stat().st_mtime_ns

    # The second call loads the file: building again would fail.
    def no_build(cls, recs):
        raise AssertionError("the suffix array was built again")

    monkeypatch.setattr(SuffixArrayIndex, "from_records", classmethod(no_build))
    again = make_drafter(spec, store, tok, tok.eos_token_id)
    assert type(again) is RestSuffixDrafter
    assert np.array_equal(again.index.sa, d.index.sa) and np.array_equal(again.index.tokens, d.index.tokens)
    assert path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == ["rest_sa.npz"]  # no temp file left


def test_rest_drafts_a_stored_response(store, tok):
    d = make("rest", store, tok)
    prompt = format_prompt_ids(tok, "Anything", "chat")
    response = text_ids(tok, PAIRS[4][1])
    d.begin(prompt)
    cands = d.propose(DraftRequest(prompt + response[:12], max_len=8))
    assert response[12:20] in cands.paths


def test_rest_dr_builds_its_index_file(store, tok, monkeypatch):
    from dresd.drafters import rest as rest_mod
    from dresd.drafters.rest import RestDrafter

    d = make("rest-dr", store, tok, rest_choices=8)
    path = derived_dir(store) / "rest.idx"
    assert path.is_file() and path.stat().st_size > 8
    assert type(d) is RestDrafter and d.name == "rest-dr" and d.choices == 8 and d.path == path
    assert d.eos_id == tok.eos_token_id
    # An existing file is reused.
    monkeypatch.setattr(rest_mod, "rest_index_from_datastore",
                        lambda *a, **k: pytest.fail("the REST index was built again"))
    assert make("rest-dr", store, tok).path == path


def test_rest_dr_explicit_index_path(store, tok, tmp_path):
    target = tmp_path / "elsewhere" / "my.idx"
    d = make("rest-dr", store, tok, rest_index=str(target))
    assert target.is_file() and d.path == target
    assert not (derived_dir(store) / "rest.idx").exists()


def test_suffix_is_warmed_on_the_store_responses(store, tok):
    from dresd.drafters.suffix import SuffixDrafter

    d = make("suffix", store, tok, suffix_max_depth=32, suffix_spec_factor=2.0, suffix_min_prob=0.2)
    assert type(d) is SuffixDrafter
    assert (d.max_tree_depth, d.max_spec_factor, d.min_token_prob, d.eos_id) == (32, 2.0, 0.2, tok.eos_token_id)
    # A new request that starts quoting a stored response gets its continuation drafted.
    prompt = format_prompt_ids(tok, "Anything", "chat")
    response = text_ids(tok, PAIRS[0][1])
    d.begin(prompt)
    cands = d.propose(DraftRequest(prompt + response[:10], max_len=10))
    assert cands.paths and cands.paths[0] == response[10:20]
    d.end(response[:10])
    # A cold drafter on the same request does not find it: the draft came from the warm-up.
    cold = SuffixDrafter(max_tree_depth=32, max_spec_factor=2.0, min_token_prob=0.2, eos_id=tok.eos_token_id)
    cold.begin(prompt)
    assert response[10:20] not in cold.propose(DraftRequest(prompt + response[:10], max_len=10)).paths


# ------------------------------------------------------------------ store records and pairs


def test_store_records_are_the_stored_records(store, records):
    got = list(store_records(store))
    assert got == records
    assert all(type(t) is int for t in got[0])


def test_store_pairs_split_after_the_response_header(store, tok):
    pairs = list(store_pairs(store, tok))
    assert len(pairs) == len(PAIRS) + 1
    for (prompt, response), (p, r) in zip(pairs, PAIRS):
        assert prompt == format_prompt_ids(tok, p, "chat")
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
        # The final EOS is dropped; the response is exactly the response text.
        assert response == text_ids(tok, r)
        assert tok.eos_token_id not in response
    # A record without a final EOS (cut at max_tokens) keeps its whole response.
    prompt, response = pairs[-1]
    assert prompt == format_prompt_ids(tok, TRUNCATED[0], "chat")
    assert response == text_ids(tok, TRUNCATED[1])

