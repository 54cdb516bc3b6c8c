"""Tests for dresd.drafters.registry: the method -> drafter mapping, the cached retrieval
indexes derived from a datastore, and the datastore's (prompt, response) pairs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from dresd.config import SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.datastore.publish import publish
from dresd.drafters import DraftRequest
from dresd.drafters import registry as registry_mod
from dresd.drafters.registry import (available_methods, derived_dir, make_drafter, method_entry, register_method,
                                     store_pairs)
from dresd.datastore.formatting import format_prompt_ids
from fake_drafters import FakeDrafter, continuation
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


def text_ids(byte_tokenizer, text: str) -> list[int]:
    return byte_tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def records(byte_tokenizer) -> list[list[int]]:
    eos = byte_tokenizer.eos_token_id
    recs = [format_prompt_ids(byte_tokenizer, p, "chat") + text_ids(byte_tokenizer, r) + [eos] for p, r in PAIRS]
    p, r = TRUNCATED
    recs.append(format_prompt_ids(byte_tokenizer, p, "chat") + text_ids(byte_tokenizer, r))
    return recs


@pytest.fixture(scope="module")
def store(tmp_path_factory, byte_tokenizer, records) -> Datastore:
    """A small published chat-format store over `records` with random 32-d keys."""
    parts = make_parts(records, hidden_dim=HIDDEN, dim=16)
    root = tmp_path_factory.mktemp("ds")
    publish(root, parts, make_manifest(eos=byte_tokenizer.eos_token_id, value_len=VALUE_LEN, dim=16), version="v1")
    return Datastore(root)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test derives its indexes under its own cache folder."""
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make(method: str, store, byte_tokenizer, **kw):
    return make_drafter(SpeculativeConfig(method=method, **kw), store, byte_tokenizer, byte_tokenizer.eos_token_id)


# ------------------------------------------------------------------ method -> drafter


def test_greedy_has_no_drafter(store, byte_tokenizer):
    assert make("greedy", None, byte_tokenizer) is None
    assert make("greedy", store, byte_tokenizer) is None


def test_pld(byte_tokenizer):
    from dresd.drafters.prompt_lookup import PromptLookupDrafter

    d = make("pld", None, byte_tokenizer, pld_max_ngram=3, pld_min_ngram=2, pld_tokens=7, pld_matches=2)
    assert type(d) is PromptLookupDrafter  # no datastore needed
    eos = byte_tokenizer.eos_token_id
    assert (d.max_ngram, d.min_ngram, d.num_tokens, d.max_matches, d.eos_id) == (3, 2, 7, 2, eos)


def test_dresd(store, byte_tokenizer):
    from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter
    from dresd.drafters.hybrid import HybridDrafter

    spec = SpeculativeConfig(method="dresd", top_k=7, context_keys=False)
    d = make_drafter(spec, store, byte_tokenizer, byte_tokenizer.eos_token_id)
    assert type(d) is DenseDrafter and d.store is store and d.spec is spec
    # By default the request's own keys are a second dense source.
    d = make("dresd", store, byte_tokenizer)
    assert type(d) is HybridDrafter and d.name == "dresd"
    assert [type(x) for x in d.drafters] == [DenseDrafter, ContextDenseDrafter]
    assert d.drafters[1].compressor is store.compressor
    # The store's value length limits the drafts.
    with pytest.raises(ValueError, match="len_drafts"):
        make("dresd", store, byte_tokenizer, len_drafts=VALUE_LEN)


@pytest.mark.parametrize("matches, want", [(1, 3), (5, 5)])
def test_hybrid_is_dense_plus_pld(store, byte_tokenizer, matches, want):
    from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter
    from dresd.drafters.hybrid import HybridDrafter
    from dresd.drafters.prompt_lookup import PromptLookupDrafter

    d = make("hybrid", store, byte_tokenizer, pld_matches=matches, pld_tokens=6)
    assert type(d) is HybridDrafter and d.name == "hybrid"
    assert [type(x) for x in d.drafters] == [DenseDrafter, ContextDenseDrafter, PromptLookupDrafter]
    dense, _, pld = d.drafters
    assert dense.store is store
    d = make("hybrid", store, byte_tokenizer, context_keys=False)
    assert [type(x) for x in d.drafters] == [DenseDrafter, PromptLookupDrafter]
    assert pld.max_matches == want and pld.num_tokens == 6 and pld.eos_id == byte_tokenizer.eos_token_id


def test_hybrid_with_suffix_decoding(store, byte_tokenizer):
    from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter
    from dresd.drafters.suffix import SuffixDrafter

    d = make("hybrid", store, byte_tokenizer, hybrid_exact="suffix", suffix_min_prob=0.2)
    assert [type(x) for x in d.drafters] == [DenseDrafter, ContextDenseDrafter, SuffixDrafter]
    sfx = d.drafters[2]
    assert sfx.min_token_prob == 0.2 and sfx.eos_id == byte_tokenizer.eos_token_id
    # Its global tree holds the datastore's responses: a request starting like one of them
    # gets that response's continuation drafted.
    prompt = format_prompt_ids(byte_tokenizer, "Unrelated question?", "chat")
    d.begin(prompt)
    said = text_ids(byte_tokenizer, "The capital of France")
    c = sfx.propose(DraftRequest(context=prompt + said, max_len=8))
    assert any(p == text_ids(byte_tokenizer, " is Paris")[: len(p)] and p for p in c.paths)


RETRIEVAL_METHODS = ("dresd", "rest", "rest-dr", "hybrid")


@pytest.mark.parametrize("method", RETRIEVAL_METHODS)
def test_methods_needing_a_datastore_refuse_none(byte_tokenizer, method, cache_dir):
    with pytest.raises(ValueError, match="needs a datastore"):
        make(method, None, byte_tokenizer)
    assert not cache_dir.exists()  # nothing was built


def test_builtin_methods_and_which_need_a_datastore():
    builtin = ["greedy", "pld", "dresd", "hybrid", "rest", "rest-dr", "suffix", "auto"]
    assert available_methods()[: len(builtin)] == builtin
    assert {m for m in builtin if method_entry(m).needs_datastore} == set(RETRIEVAL_METHODS)


def test_auto_drafts_with_the_best_method_at_hand(store, byte_tokenizer, monkeypatch):
    import dresd.drafters.registry as registry
    from dresd.drafters.registry import auto_spec, resolve_method

    assert resolve_method("auto", True) == "hybrid" and resolve_method("auto", False) == "pld"
    assert resolve_method("dresd", False) == "dresd"  # a named method is never replaced
    named = SpeculativeConfig(method="hybrid", hybrid_exact="pld")
    assert auto_spec(named, True) is named
    assert auto_spec(SpeculativeConfig(method="auto", top_k=7), True) == SpeculativeConfig(
        method="hybrid", hybrid_exact="suffix", top_k=7)  # the user's other settings kept
    assert type(make("auto", None, byte_tokenizer)).__name__ == "PromptLookupDrafter"
    auto = make("auto", store, byte_tokenizer)
    # The dense drafts (the datastore's and the request's own keys) and SuffixDecoding in one tree.
    assert [type(d).__name__ for d in auto.drafters] == ["DenseDrafter", "ContextDenseDrafter", "SuffixDrafter"]
    # Without SuffixDecoding installed, the dense drafts with prompt lookup.
    monkeypatch.setattr(registry, "_installed", lambda settings: settings.get("hybrid_exact") != "suffix")
    assert auto_spec(SpeculativeConfig(method="auto"), True).hybrid_exact == "pld"
    assert type(make("auto", store, byte_tokenizer).drafters[-1]).__name__ == "PromptLookupDrafter"


def test_unknown_method_names_the_known_ones(store, byte_tokenizer):
    with pytest.raises(ValueError, match=r"unknown method 'medusa'; known: greedy, pld, dresd, hybrid, rest"):
        make("medusa", store, byte_tokenizer)


# ------------------------------------------------------------------ derived indexes


def test_derived_dir_is_under_the_cache_and_keyed_by_version_and_tokens(store, cache_dir):
    d = derived_dir(store)
    sha = store.manifest["files"]["tokens.npy"]["sha256"]
    assert d == cache_dir / "derived" / f"v1-{sha[:12]}"


def test_rest_suffix_array_cached_once(store, byte_tokenizer, records, monkeypatch):
    from dresd.drafters.suffix_array import RestSuffixDrafter, SuffixArrayIndex

    spec = SpeculativeConfig(method="rest", max_verify=16)
    d = make_drafter(spec, store, byte_tokenizer, byte_tokenizer.eos_token_id)
    assert type(d) is RestSuffixDrafter
    assert d.eos_id == byte_tokenizer.eos_token_id and d.max_nodes == 4 * 16
    path = derived_dir(store) / "rest_sa.npz"
    assert path.is_file()
    assert d.index.n_records == len(records)
    assert np.array_equal(d.index.tokens, SuffixArrayIndex.from_records(records).tokens)
    stamp = path.stat().st_mtime_ns

    # The second call loads the file: building again would fail.
    def no_build(cls, recs):
        raise AssertionError("the suffix array was built again")

    monkeypatch.setattr(SuffixArrayIndex, "from_records", classmethod(no_build))
    again = make_drafter(spec, store, byte_tokenizer, byte_tokenizer.eos_token_id)
    assert type(again) is RestSuffixDrafter
    assert np.array_equal(again.index.sa, d.index.sa) and np.array_equal(again.index.tokens, d.index.tokens)
    assert path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == ["rest_sa.npz"]  # no temp file left


def test_rest_drafts_a_stored_response(store, byte_tokenizer):
    d = make("rest", store, byte_tokenizer)
    prompt = format_prompt_ids(byte_tokenizer, "Anything", "chat")
    response = text_ids(byte_tokenizer, PAIRS[4][1])
    d.begin(prompt)
    cands = d.propose(DraftRequest(prompt + response[:12], max_len=8))
    assert response[12:20] in cands.paths


def test_rest_dr_builds_its_index_file(store, byte_tokenizer, monkeypatch):
    from dresd.drafters import rest as rest_mod
    from dresd.drafters.rest import RestDrafter

    d = make("rest-dr", store, byte_tokenizer, rest_choices=8)
    path = derived_dir(store) / "rest.idx"
    assert path.is_file() and path.stat().st_size > 8
    assert type(d) is RestDrafter and d.name == "rest-dr" and d.choices == 8 and d.path == path
    assert d.eos_id == byte_tokenizer.eos_token_id
    # An existing file is reused.
    monkeypatch.setattr(rest_mod, "rest_index_from_datastore",
                        lambda *a, **k: pytest.fail("the REST index was built again"))
    assert make("rest-dr", store, byte_tokenizer).path == path


def test_rest_dr_explicit_index_path(store, byte_tokenizer, tmp_path):
    target = tmp_path / "elsewhere" / "my.idx"
    d = make("rest-dr", store, byte_tokenizer, rest_index=str(target))
    assert target.is_file() and d.path == target
    assert not (derived_dir(store) / "rest.idx").exists()


def test_suffix_without_a_datastore_drafts_from_the_request_and_with_sharing_from_served_responses(byte_tokenizer):
    from dresd.drafters.suffix import SuffixDrafter

    prompt = format_prompt_ids(byte_tokenizer, "Anything", "chat")
    response = text_ids(byte_tokenizer, PAIRS[0][1])
    own = make("suffix", None, byte_tokenizer, suffix_min_prob=0.2)
    assert type(own) is SuffixDrafter
    # The request's own text: a phrase it wrote once is drafted when it starts again.
    text = prompt + response[:12] + response[:4]
    own.begin(prompt)
    assert response[4:8] == own.propose(DraftRequest(text, max_len=4)).paths[0]
    own.end(response[:16])
    # A later request quoting the served response: only a drafter that shares responses knows it.
    shared = make("suffix", None, byte_tokenizer, suffix_min_prob=0.2, suffix_share_responses=True,
                  suffix_cached_responses=10)
    shared.begin(prompt)
    shared.end(response)
    for drafter, knows in ((own, False), (shared, True)):
        drafter.begin(prompt)
        paths = drafter.propose(DraftRequest(prompt + response[:10], max_len=10)).paths
        assert (response[10:20] in paths) is knows
        drafter.end(response[:10])


def test_suffix_is_warmed_on_the_store_responses(store, byte_tokenizer):
    from dresd.drafters.suffix import SuffixDrafter

    d = make("suffix", store, byte_tokenizer, suffix_max_depth=32, suffix_spec_factor=2.0, suffix_min_prob=0.2)
    assert type(d) is SuffixDrafter
    eos = byte_tokenizer.eos_token_id
    assert (d.max_tree_depth, d.max_spec_factor, d.min_token_prob, d.eos_id) == (32, 2.0, 0.2, eos)
    # A new request that starts quoting a stored response gets its continuation drafted.
    prompt = format_prompt_ids(byte_tokenizer, "Anything", "chat")
    response = text_ids(byte_tokenizer, PAIRS[0][1])
    d.begin(prompt)
    cands = d.propose(DraftRequest(prompt + response[:10], max_len=10))
    assert cands.paths and cands.paths[0] == response[10:20]
    d.end(response[:10])
    # A cold drafter on the same request does not find it: the draft came from the warm-up.
    cold = SuffixDrafter(max_tree_depth=32, max_spec_factor=2.0, min_token_prob=0.2, eos_id=byte_tokenizer.eos_token_id)
    cold.begin(prompt)
    assert response[10:20] not in cold.propose(DraftRequest(prompt + response[:10], max_len=10)).paths


@pytest.mark.parametrize("method", ["suffix", "hybrid", "dresd", "pld"])
def test_a_batch_factory_warms_once_and_its_slots_draft_each_for_their_own_request(
        method, store, byte_tokenizer, monkeypatch):
    from dresd.drafters.registry import drafter_factory
    from dresd.drafters.suffix import SuffixDrafter

    warms = []
    real_warm = SuffixDrafter.warm
    monkeypatch.setattr(SuffixDrafter, "warm", lambda self, pairs: warms.append(1) or real_warm(self, pairs))
    spec = SpeculativeConfig(method=method, hybrid_exact="suffix")
    make_slot = drafter_factory(spec, store, byte_tokenizer, byte_tokenizer.eos_token_id)
    slots = [make_slot() for _ in range(3)]
    assert len(warms) == (1 if method in ("suffix", "hybrid") else 0)
    # Three requests decode at once, each quoting a different stored response: every slot
    # drafts what a drafter of its own would, so the shared tree does not mix them.
    prompt = format_prompt_ids(byte_tokenizer, "Anything", "chat")
    rng = np.random.default_rng(0)
    for slot in slots:
        slot.begin(prompt)
    for i, slot in enumerate(slots):
        response = text_ids(byte_tokenizer, PAIRS[i][1])
        query = rng.standard_normal(HIDDEN).astype(np.float32)
        request = DraftRequest(prompt + response[:8], max_len=8, query=query)
        alone = make(method, store, byte_tokenizer, hybrid_exact="suffix")
        alone.begin(prompt)
        want = alone.propose(request)
        got = slot.propose(request)
        assert (got.paths, got.sources) == (want.paths, want.sources)
        if method == "suffix":
            assert got.paths and got.paths[0] == response[8:16]
    for slot in slots:
        slot.end([])


# ------------------------------------------------------------------ deletes reach every drafter

SEA = 4  # PAIRS[4]: "The sea is wide and the waves roll ...": "wav" occurs in no other record
QUOTED = 26  # the request's response so far: "The sea is wide and the wa"


def sea_store_root(root, byte_tokenizer, records):
    """A published store (version v1) over `records` whose hidden states are known, so a
    dense query can be the exact hidden state of one of the sea record's keys."""
    n_keys = sum(len(r) - 1 for r in records)
    hidden = np.random.default_rng(1).normal(size=(n_keys, HIDDEN)).astype(np.float32)
    parts = make_parts(records, hidden_dim=HIDDEN, dim=16, hidden=hidden)
    publish(root, parts, make_manifest(eos=byte_tokenizer.eos_token_id, value_len=VALUE_LEN, dim=16), version="v1")
    return hidden


def sea_drafts(method: str, store: Datastore, byte_tokenizer, records, hidden) -> list[list[int]]:
    """What `method` drafts for a request that quotes the sea record's response up to "the wa"."""
    prompt = format_prompt_ids(byte_tokenizer, "Anything", "chat")
    response = text_ids(byte_tokenizer, PAIRS[SEA][1])
    context = prompt + response[:QUOTED]
    # The sea record's key whose value starts with context[-1] (keys: every position but the last).
    own_prompt = len(records[SEA]) - len(response) - 1
    key = sum(len(r) - 1 for r in records[:SEA]) + own_prompt + QUOTED - 2
    spec = {"dresd": dict(context_keys=False)}.get(method, {})
    drafter = make(method, store, byte_tokenizer, **spec)
    drafter.begin(prompt)
    cands = drafter.propose(DraftRequest(context, max_len=8, query=hidden[key]))
    drafter.end(response[:QUOTED])
    return cands.paths


@pytest.mark.parametrize("method", ["dresd", "rest", "rest-dr", "suffix"])
def test_a_delete_reaches_every_drafter_at_once_and_a_rollback_brings_the_record_back(
        method, tmp_path, byte_tokenizer, records):
    from dresd.datastore.publish import set_current
    from pipelines.update import delete_sources

    root = tmp_path / "ds"
    hidden = sea_store_root(root, byte_tokenizer, records)
    cont = text_ids(byte_tokenizer, PAIRS[SEA][1])[QUOTED:]  # "ves roll ..."
    before = sea_drafts(method, Datastore(root), byte_tokenizer, records, hidden)
    assert any(p[:3] == cont[:3] for p in before), before
    delete_sources(root, [f"src-{SEA}"])  # make_parts names record i "src-i"
    deleted = Datastore(root)
    assert deleted.version != "v1" and deleted.deleted_records().tolist() == [i == SEA for i in range(len(records))]
    after = sea_drafts(method, deleted, byte_tokenizer, records, hidden)
    assert not any(p[:2] == cont[:2] for p in after), after  # not even its first two tokens
    set_current(root, "v1")  # rollback to the parent: the record drafts again
    assert any(p[:3] == cont[:3] for p in sea_drafts(method, Datastore(root), byte_tokenizer, records, hidden))


def test_a_delete_gets_fresh_derived_indexes_keyed_by_its_tombstones(tmp_path, byte_tokenizer, records):
    from pipelines.update import delete_sources

    root = tmp_path / "ds"
    sea_store_root(root, byte_tokenizer, records)
    parent = Datastore(root)
    make("rest", parent, byte_tokenizer)
    delete_sources(root, [f"src-{SEA}"])
    child = Datastore(root)
    sha = child.manifest["files"]["deleted.npy"]["sha256"]
    assert derived_dir(child).name == f"{child.version}-{child.manifest['files']['tokens.npy']['sha256'][:12]}-{sha[:12]}"
    assert make("rest", child, byte_tokenizer).index.n_records == len(records) - 1
    assert make("rest", parent, byte_tokenizer).index.n_records == len(records)  # the parent's stays whole
    # A suffix drafter is warmed with the live records only.
    assert len(list(store_pairs(child, byte_tokenizer))) == len(records) - 1
    # The tombstones' checksum comes from the untrusted manifest too: it cannot climb out.
    crafted = SimpleNamespace(path=child.path, version="v2", deleted=child.deleted, manifest={
        "files": {"tokens.npy": {"sha256": "abc"}, "deleted.npy": {"sha256": "/../../x"}}})
    with pytest.raises(ValueError, match=r"derived cache folder name 'v2-abc-/\.\./\.\./x'"):
        derived_dir(crafted)


def test_rest_dr_with_deletes_does_not_use_a_configured_index_file(tmp_path, byte_tokenizer, records):
    from pipelines.update import delete_sources

    root = tmp_path / "ds"
    sea_store_root(root, byte_tokenizer, records)
    mine = tmp_path / "mine.idx"
    assert make("rest-dr", Datastore(root), byte_tokenizer, rest_index=str(mine)).path == mine
    delete_sources(root, [f"src-{SEA}"])
    child = Datastore(root)
    with pytest.warns(UserWarning, match="deleted records"):
        d = make("rest-dr", child, byte_tokenizer, rest_index=str(mine))
    assert d.path == derived_dir(child) / "rest.idx"


def test_suffix_config_sets_the_served_response_cache(store, byte_tokenizer):
    d = make("suffix", store, byte_tokenizer)
    assert (d.share_responses, d.cached_responses) == (False, 0)  # private by default
    d = make("suffix", store, byte_tokenizer, suffix_share_responses=True, suffix_cached_responses=3)
    assert (d.share_responses, d.cached_responses) == (True, 3)


# ------------------------------------------------------------------ store records and pairs


def test_store_records_are_the_stored_records(store, records):
    got = list(store.records())
    assert got == records
    assert all(type(t) is int for t in got[0])


def test_store_pairs_split_after_the_response_header(store, byte_tokenizer):
    pairs = list(store_pairs(store, byte_tokenizer))
    assert len(pairs) == len(PAIRS) + 1
    for (prompt, response), (p, r) in zip(pairs, PAIRS):
        assert prompt == format_prompt_ids(byte_tokenizer, p, "chat")
        assert byte_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
        # The final EOS is dropped; the response is exactly the response text.
        assert response == text_ids(byte_tokenizer, r)
        assert byte_tokenizer.eos_token_id not in response
    # A record without a final EOS (cut at max_tokens) keeps its whole response.
    prompt, response = pairs[-1]
    assert prompt == format_prompt_ids(byte_tokenizer, TRUNCATED[0], "chat")
    assert response == text_ids(byte_tokenizer, TRUNCATED[1])



# ------------------------------------------------------------------ the registry


@pytest.fixture()
def registry(monkeypatch):
    """The registry as it is, restored after the test (plugins rescanned on first use)."""
    monkeypatch.setattr(registry_mod, "_METHODS", dict(registry_mod._METHODS))
    monkeypatch.setattr(registry_mod, "_plugins_loaded", False)
    return registry_mod._METHODS


def test_a_registered_method_decodes_losslessly_with_its_drafts(registry, tiny_lm):
    from dresd.decoding.engine import Engine
    from dresd.serving.decoder import DecodeRequest, check_request

    engine = Engine(tiny_lm)
    prompt = "Say something."
    greedy = engine.generate(prompt, SpeculativeConfig(method="greedy"), 24)
    text = engine.prompt_ids(prompt) + greedy.token_ids
    built = []

    def build(spec, store, tokenizer, eos_id):
        built.append((spec.method, store, eos_id))
        # Drafts the next tokens of the greedy text wherever the context is a prefix of it.
        return FakeDrafter(continuation(text, spec.len_drafts, strict=False), "listed")

    assert check_request(DecodeRequest(prompt, method="listed")) == (
        f"unknown method 'listed'; expected one of {available_methods()}")
    register_method("listed", build)
    assert "listed" in available_methods() and check_request(DecodeRequest(prompt, method="listed")) is None
    spec = SpeculativeConfig(method="listed", budget="off", len_drafts=4)
    gen = engine.generate(prompt, spec, 24)
    assert gen.token_ids == greedy.token_ids
    assert built == [("listed", None, engine.lm.eos_token_id)]
    # Every draft was the true continuation: 4 accepted + the bonus per call, to the budget's end.
    assert gen.metrics.accepted == gen.metrics.drafted > 0
    assert gen.metrics.target_calls < greedy.metrics.target_calls / 3
    with pytest.raises(ValueError, match="already registered"):
        register_method("listed", build)
    register_method("listed", build, replace=True)
    with pytest.raises(ValueError, match="no comma"):
        register_method("a,b", build)


def test_a_registered_method_can_require_a_datastore(registry, byte_tokenizer):
    register_method("needs-store", lambda spec, store, tokenizer, eos_id: None, needs_datastore=True)
    with pytest.raises(ValueError, match="method 'needs-store' needs a datastore"):
        make("needs-store", None, byte_tokenizer)


def write_plugin(folder, module: str, body: str, entry: str) -> None:
    """An installed distribution, as importlib.metadata finds it on sys.path."""
    info = folder / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry_mod.ENTRY_POINT_GROUP}]\n{entry}\n")
    (folder / f"{module}.py").write_text(body)


def test_installed_plugins_register_through_the_entry_point_group(registry, tmp_path, monkeypatch, byte_tokenizer):
    write_plugin(tmp_path, "dresd_plugin_ok", (
        "from dresd.drafters.registry import MethodEntry\n"
        "from dresd.drafters.prompt_lookup import PromptLookupDrafter\n"
        "def build(spec, store, tokenizer, eos_id):\n"
        "    return PromptLookupDrafter(3, 1, 4, 2, eos_id)\n"
        "ENTRY = MethodEntry(build, needs_datastore=False)\n"
        "NOT_A_BUILDER = 42\n"),
        "plugged = dresd_plugin_ok:ENTRY\npld = dresd_plugin_ok:build\nnumber = dresd_plugin_ok:NOT_A_BUILDER")
    write_plugin(tmp_path, "dresd_plugin_broken", "raise ImportError('missing dependency')\n",
                 "broken = dresd_plugin_broken:build")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning) as warned:
        d = make("plugged", None, byte_tokenizer)
    messages = sorted(str(w.message) for w in warned)
    assert len(messages) == 2
    assert "drafter plugin 'broken'" in messages[0] and "missing dependency" in messages[0]
    assert "drafter plugin 'number'" in messages[1] and "neither a builder nor a MethodEntry" in messages[1]
    assert (d.max_ngram, d.min_ngram, d.num_tokens, d.max_matches) == (3, 1, 4, 2)
    assert "plugged" in available_methods() and not {"broken", "number"} & set(available_methods())
    # A plugin never shadows a built-in method of the same name.
    assert make("pld", None, byte_tokenizer).num_tokens == SpeculativeConfig().pld_tokens
