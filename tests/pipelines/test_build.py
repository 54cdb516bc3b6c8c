"""The Ray Data build pipeline on a tiny model: counts, rejects, manifest, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dresd.config import BuildConfig, CorpusConfig, IndexConfig, ModelConfig
from dresd.datastore.corpus import CorpusError
from dresd.datastore.store import Datastore, DatastoreError
from pipelines.build import build_datastore
from tests_support import write_small_corpus

WIDE = 512  # the build's model's hidden size


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory):
    from tests_support import TINY_VOCAB
    from tiny_models import make_tiny_llama

    tmp = tmp_path_factory.mktemp("build")
    path, good = write_small_corpus(tmp)
    # Wide states (512 floats, 1 KiB a key in float16) that the build must never write to scratch.
    # Small weights keep this random model's keys as distinct as the 64-wide one's, which the
    # on-disk checks' self-retrieval thresholds assume.
    wide = make_tiny_llama(tmp / "wide", vocab_size=TINY_VOCAB, hidden_size=WIDE, init_std=0.05)
    cfg = BuildConfig(
        model=ModelConfig(path=str(wide)),
        corpus=CorpusConfig(paths=[str(path)], max_tokens=256),
        index=IndexConfig(dim=16, pq_m=8, flat_below=1000),  # force IVF-PQ + refine on a small store
        output=str(tmp / "store"),
        value_len=8,
        shard_rows=5,  # 45 rows -> 9 shards
    )
    return cfg, build_datastore(cfg), good


def test_counts_add_up(built):
    cfg, report, good = built
    assert report.rows_read == len(good) + 5
    assert report.examples_embedded == len(good)
    assert report.rejected == {"missing_field": 1, "bad_json": 1, "empty_text": 1, "not_string": 1, "too_long": 1}
    assert report.rows_read == report.examples_embedded + sum(report.rejected.values())
    assert any("row 6" in m and "'response'" in m for m in report.reject_examples)


def test_store_layout_and_values(built):
    cfg, report, good = built
    from dresd.datastore.formatting import record_ids, shared_prefix_len
    from dresd.datastore.corpus import Example
    from dresd.model.loading import load_model

    store = Datastore(cfg.output)
    store.verify()
    lm = load_model(cfg.model)
    prefix = shared_prefix_len(lm.tokenizer, "chat")
    expected = [record_ids(lm.tokenizer, Example("s", r["prompt"], r["response"]), "chat", 256, lm.eos_token_id) for r in good]
    # The token stream is every record in corpus order; keys skip the shared template head.
    assert np.array_equal(store.tokens, np.concatenate(expected))
    assert store.num_keys == sum(len(e) - 1 - prefix for e in expected) == report.keys
    assert store.manifest["index"]["params"]["kind"] == "ivfpq"
    assert store.manifest["index"]["layout"].startswith("in RAM: 0.00 GiB in RAM for")  # chosen, and why
    assert report.index_layout.startswith(store.manifest["index"]["factory"] + ": in RAM")
    assert store.manifest["key_dtype"] == "float32" == store.key_dtype  # the CPU default
    assert store.manifest["prompt_format"]["shared_prefix_len"] == prefix
    assert report.check["recall@50"] > 0.8
    # value of key 0 = the tokens after position prefix of record 0
    assert store.values(np.array([0]), 4)[0].tolist() == expected[0][prefix + 1 : prefix + 5]


def test_scratch_holds_compressed_keys_and_codes_never_full_hidden_states(built):
    """Issue 24: at most 300 B of scratch a key whatever the model's width; here a 512-wide
    model, whose float16 states alone would be 1,024 B a key."""
    cfg, report, _ = built
    assert 0 < report.scratch_bytes_per_key <= 300 < 2 * WIDE
    assert f"{report.scratch_bytes_per_key:.1f} B per key" in "\n".join(report.lines())
    # The fit embedded its sample (every key: the corpus is below index.sample_size), not more,
    # and the stream pass compressed those states instead of embedding the corpus again.
    assert report.fit == {"mode": "sample", "sample_keys": report.keys, "sample_records": report.examples_embedded,
                          "sample_tokens": report.tokens, "explained_variance": report.fit["explained_variance"],
                          "embedded_once": True}
    assert "nothing embedded twice" in "\n".join(report.lines())
    assert Datastore(cfg.output).manifest["index"]["fit"] == "sample"


def test_refuses_other_models_root(built, tmp_path):
    from tiny_models import make_tiny_llama

    cfg, _, _ = built
    other = make_tiny_llama(tmp_path / "other", vocab_size=272, seed=1)
    cfg2 = BuildConfig(model=ModelConfig(path=str(other)), corpus=cfg.corpus, output=cfg.output)
    with pytest.raises(DatastoreError, match="built for model"):
        build_datastore(cfg2)
    # ... and decoding with that model refuses the store too.
    from dresd.decoding.engine import Engine

    with pytest.raises(DatastoreError, match="built for model"):
        Engine.open(ModelConfig(path=str(other)), cfg.output)


def test_fail_mode_names_file_row_field(built, tmp_path):
    cfg, _, _ = built
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    cfg2 = BuildConfig(model=cfg.model, corpus=CorpusConfig(paths=[str(bad)], on_error="fail"), output=str(tmp_path / "s"))
    with pytest.raises(Exception, match=r"bad.jsonl: row 2: field 'response'"):
        build_datastore(cfg2)
    with pytest.raises(CorpusError, match="nowhere.jsonl"):
        build_datastore(BuildConfig(model=cfg.model, corpus=CorpusConfig(paths=[str(tmp_path / "nowhere.jsonl")]),
                                    output=str(tmp_path / "s2")))


def test_interrupted_build_resumes_to_the_same_datastore(built, tmp_path, monkeypatch):
    import shutil

    import pipelines.build as build_mod
    from dresd.datastore.index import search

    cfg, first, _ = built
    out = tmp_path / "resumed"
    cfg2 = BuildConfig(model=cfg.model, corpus=cfg.corpus, index=cfg.index, value_len=cfg.value_len,
                       shard_rows=cfg.shard_rows, output=str(out))

    def crash(*a, **k):
        raise KeyboardInterrupt("killed after the streaming pass")

    monkeypatch.setattr(build_mod, "train_on_keys", crash)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(cfg2)
    monkeypatch.undo()
    shard_root = next((out / ".build").iterdir()) / "shards"
    shards = sorted(shard_root.iterdir())
    assert len(shards) == 9 and not (out / "CURRENT").exists()
    for d in shards[::2]:  # as if the kill had come mid-pass: only some shards finished
        shutil.rmtree(d)
    # Those shards were compressed from the fit's states; the resumed run embeds them (the fit is
    # read back, so no states are held), and the datastore is the same bit for bit.
    damaged = next(shards[1].glob("keys-*.npy"))  # a finished shard damaged on disk: embedded again
    damaged.write_bytes(damaged.read_bytes()[:200])
    # The counts and the fit are read back from the work folder: neither pass runs again.
    monkeypatch.setattr(build_mod.passes, "count_pass", crash)
    monkeypatch.setattr(build_mod.passes, "fit_pass", crash)
    resumed = build_datastore(cfg2)
    assert resumed.shards == 9 and resumed.shards_reused == 3 and not resumed.fit["embedded_once"]
    assert not (out / ".build").exists() or not any((out / ".build").iterdir())
    a, b = Datastore(cfg.output), Datastore(out)
    assert (resumed.rows_read, resumed.examples_embedded, resumed.rejected) == (first.rows_read, first.examples_embedded, first.rejected)
    # The same datastore, byte for byte: token stream, compressor, index.
    for name in ("tokens.npy", "compressor.npz", "index.faiss"):
        assert a.manifest["files"][name]["sha256"] == b.manifest["files"][name]["sha256"], name
    assert np.array_equal(a.key_positions, b.key_positions)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(20, cfg.index.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert np.array_equal(search(a.index, queries, 10)[1], search(b.index, queries, 10)[1])


def test_build_and_update_with_uri_corpus_and_uri_output(built, tmp_path):
    """Corpus behind file:// (read by Ray tasks), datastore root behind memory:// (an
    fsspec store without renames): the same datastore as a local build, then an update."""
    import uuid

    from dresd.datastore.store import list_versions
    from pipelines.update import update_datastore

    cfg, first, _ = built
    root = f"memory://dresd-test-{uuid.uuid4().hex}/store"
    uri_cfg = BuildConfig(model=cfg.model, corpus=CorpusConfig(paths=[f"file://{cfg.corpus.paths[0]}"], max_tokens=256),
                          index=cfg.index, value_len=cfg.value_len, shard_rows=cfg.shard_rows, output=root,
                          work_dir=str(tmp_path / "work"))
    report = build_datastore(uri_cfg)
    assert str(report.version_dir).startswith(f"{root}/versions/")
    assert (report.rows_read, report.examples_embedded, report.rejected) == (first.rows_read, first.examples_embedded, first.rejected)
    local, remote = Datastore(cfg.output), Datastore(root, verify=True)
    assert remote.manifest["files"]["tokens.npy"]["sha256"] == local.manifest["files"]["tokens.npy"]["sha256"]
    assert np.array_equal(local.key_positions, remote.key_positions)
    assert not any((tmp_path / "work").iterdir())  # work folder removed after publishing

    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"prompt": f"new {i}?", "response": f"fresh {i} " * 3}) + "\n" for i in range(4)))
    add = BuildConfig(model=cfg.model, corpus=CorpusConfig(paths=[f"file://{extra}"]), output=root,
                      value_len=cfg.value_len, work_dir=str(tmp_path / "work"))
    upd = update_datastore(add)
    child = Datastore(root)
    assert child.manifest["parent"] == remote.version and len(list_versions(root)) == 2
    assert child.num_keys == remote.num_keys + upd.keys_added and upd.examples_added == 4


def test_on_disk_index_build_and_update(built, tmp_path):
    """index.on_disk: shard fills merged into index.ivfdata (never all in RAM), published
    next to index.faiss; an update writes a new file and leaves the parent's intact."""
    from dresd.datastore.index import is_on_disk, search
    from pipelines.update import update_datastore

    cfg, first, _ = built
    disk_cfg = BuildConfig(model=cfg.model, corpus=cfg.corpus, value_len=cfg.value_len, shard_rows=cfg.shard_rows,
                           index=IndexConfig(dim=16, pq_m=8, flat_below=1000, on_disk=True), output=str(tmp_path / "disk"))
    report = build_datastore(disk_cfg)
    store = Datastore(disk_cfg.output, verify=True)
    assert "index.ivfdata" in store.manifest["files"] and is_on_disk(store.index)
    assert store.manifest["index"]["factory"].endswith(",PQ8") and report.keys == first.keys
    assert report.check["self_mrr@50"] > 0.5  # stored keys find themselves through the file
    assert np.array_equal(store.key_positions, Datastore(cfg.output).key_positions)

    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"prompt": f"more {i}?", "response": f"new words {i} " * 4}) + "\n" for i in range(5)))
    upd = update_datastore(BuildConfig(model=cfg.model, corpus=CorpusConfig(paths=[str(extra)]), output=disk_cfg.output))
    child = Datastore(disk_cfg.output)
    assert is_on_disk(child.index) and child.num_keys == store.num_keys + upd.keys_added
    Datastore(disk_cfg.output, version=store.version, verify=True)  # parent's files unchanged
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(200, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, got = search(child.index, queries, 20)
    assert got.max() < child.num_keys and (got >= store.num_keys).any()  # the new keys are searchable


def test_a_store_too_large_for_its_ram_share_gets_on_disk_lists(built, tmp_path):
    """Nothing forces on-disk lists here: the in-RAM layout would pass index.ram_share of
    index.ram_bytes, so the build picks them and records why."""
    from dresd.datastore.index import is_on_disk

    cfg, first, _ = built
    auto = BuildConfig(model=cfg.model, corpus=cfg.corpus, value_len=cfg.value_len, shard_rows=cfg.shard_rows,
                       index=IndexConfig(dim=16, pq_m=8, flat_below=1000, ram_bytes=100_000), output=str(tmp_path / "s"))
    report = build_datastore(auto)
    store = Datastore(auto.output, verify=True)
    assert is_on_disk(store.index) and not store.manifest["index"]["params"]["refine"]
    layout = store.manifest["index"]["layout"]
    assert layout.startswith(f"on-disk inverted lists: the in-RAM layout would take 0.00 GiB in RAM for {first.keys} keys")
    assert layout.endswith("against 25% of 0.0 GiB (index.ram_share)") and layout in report.index_layout
    assert report.check["self_mrr@50"] > 0.5


def test_unreadable_corpus_file_is_counted_in_skip_mode_and_named_in_fail_mode(built, tmp_path):
    cfg, first, _ = built
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    skip = BuildConfig(model=cfg.model, corpus=CorpusConfig(paths=[cfg.corpus.paths[0], str(broken)], max_tokens=256),
                       index=cfg.index, value_len=cfg.value_len, shard_rows=cfg.shard_rows, output=str(tmp_path / "s"))
    report = build_datastore(skip)
    assert report.rejected == {**first.rejected, "unreadable_file": 1}
    assert report.rows_read == first.rows_read + 1 == report.examples_embedded + sum(report.rejected.values())
    skip.corpus.paths, skip.corpus.on_error, skip.output = [str(broken)], "fail", str(tmp_path / "f")
    with pytest.raises(Exception, match="broken.parquet"):
        build_datastore(skip)


def test_a_fit_pass_of_several_shards_a_call_returns_what_one_shard_a_call_does(built):
    """The fit pass groups shards into an actor call when it samples a few records of each
    (fit.shards_per_call): a real Ray Data stage of several rows a batch, split back by shard."""
    from dresd.model.resolve import model_facts
    from pipelines import passes
    from pipelines.work import tokenize_args

    cfg, _, _ = built
    facts = model_facts(cfg.model.path)
    tokenize = tokenize_args(cfg, facts, cfg.corpus.prompt_format)
    select = {f"00000-{i:06d}": np.array([0, 3]) for i in range(0, 8, 2)}  # 4 of the 9 shards
    one = passes.fit_pass(cfg, tokenize, facts.identity, select, per_call=1)
    grouped = passes.fit_pass(cfg, tokenize, facts.identity, select, per_call=3)
    assert list(grouped) == list(one) == sorted(select)
    for sid in select:
        assert grouped[sid].states.shape == (2, WIDE)
        np.testing.assert_allclose(grouped[sid].states, one[sid].states, atol=1e-4)
