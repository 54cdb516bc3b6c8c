"""Incremental updates: add with a frozen compressor, delete by source id, compact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dresd.config import BuildConfig, CorpusConfig, IndexConfig, ModelConfig, SpeculativeConfig
from dresd.datastore.compression import compress, fit_compressor
from dresd.datastore.store import Datastore, DatastoreError, list_versions
from dresd.drafters.dense import DenseDrafter
from dresd.datastore.index import search
from pipelines.build import build_datastore
from pipelines.update import compact, delete_sources, update_datastore


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _states(model_dir, store: Datastore, records) -> np.ndarray:
    """The model's states at every key position of `records` of `store`, embedded here."""
    from pipelines.embed import Embed

    pos, offsets = np.asarray(store.key_positions), store.record_offsets
    seqs, starts = [], []
    for r in records:
        lo, hi = offsets[r], offsets[r + 1]
        seqs.append(np.asarray(store.tokens[lo:hi]))
        starts.append(int(pos[(pos >= lo) & (pos < hi)].min() - lo))
    return Embed(str(model_dir), "cpu", 1, 8).embed_keys(seqs, starts)


def test_add_delete_compact(ray_session, tiny_model_dir, tmp_path):
    base_rows = [{"id": f"a{i}", "prompt": f"q{i}?", "response": f"base answer {i} " + "xy " * (i % 5 + 2)} for i in range(24)]
    new_rows = [{"id": f"b{i}", "prompt": f"new q{i}?", "response": f"fresh reply {i} " + "zw " * (i % 4 + 2)} for i in range(8)]
    model = ModelConfig(path=str(tiny_model_dir))
    index = IndexConfig(dim=16, flat_below=10_000)
    root = tmp_path / "store"
    base_cfg = BuildConfig(model=model, corpus=CorpusConfig(paths=[_write(tmp_path / "a.jsonl", base_rows)], id_field="id"),
                           index=index, output=str(root), value_len=8, shard_rows=10)
    build_datastore(base_cfg)
    base = Datastore(root)

    add_cfg = BuildConfig(model=model, corpus=CorpusConfig(paths=[_write(tmp_path / "b.jsonl", new_rows + [{"id": "bad"}])],
                                                          id_field="id"), output=str(root), value_len=8, shard_rows=10)
    report = update_datastore(add_cfg)
    added = Datastore(root)
    assert added.manifest["parent"] == base.version and added.manifest["change"]["kind"] == "add"
    assert report.rows_read == 9 and report.rejected == {"missing_field": 1} and report.examples_added == 8
    assert added.num_keys == base.num_keys + report.keys_added
    assert added.sources == base.sources + [r["id"] for r in new_rows]
    # The old part is untouched; the compressor is frozen (identical arrays).
    assert np.array_equal(np.asarray(added.tokens[: len(base.tokens)]), np.asarray(base.tokens))
    assert np.array_equal(added.compressor.components, base.compressor.components)
    # ... and it made the new keys: the parent's compressor applied to the new records' states.
    hidden = _states(tiny_model_dir, added, range(len(base.sources), len(added.sources)))
    new_keys = added.index.reconstruct_n(base.num_keys, added.num_keys - base.num_keys)
    np.testing.assert_allclose(new_keys, compress(base.compressor, hidden), atol=2e-3)  # stored as float16
    refit = fit_compressor(hidden, 16)
    assert np.abs(new_keys - compress(refit, hidden)).max() > 0.1  # a compressor fitted on them differs
    assert report.drift["base_error"] > 0 and report.drift["new_error"] > 0
    assert report.layout == f"Flat, what the index settings choose for {added.num_keys} keys"
    assert report.lines()[-1] == f"index layout: {report.layout}"
    # New keys are searchable: each finds itself (or an identical duplicate) first.
    new_ids = np.arange(base.num_keys, added.num_keys)
    vecs = added.index.reconstruct_n(0, added.num_keys)[new_ids]
    scores, got = search(added.index, vecs, 1)
    assert (scores[:, 0] > 0.999).all() and (got[:, 0] == new_ids).mean() > 0.8

    delete_sources(root, ["b3", "a0"])
    deleted = Datastore(root)
    b3 = deleted.sources.index("b3")
    lo, hi = deleted.record_offsets[b3], deleted.record_offsets[b3 + 1]
    pos = np.asarray(deleted.key_positions)
    assert deleted.deleted is not None and deleted.deleted[(pos >= lo) & (pos < hi)].all()
    # The drafter never proposes a deleted key's continuation.
    drafter = DenseDrafter(deleted, SpeculativeConfig(top_k=50, len_drafts=4))
    dead = np.nonzero(deleted.deleted)[0]
    q = deleted.index.reconstruct_n(0, deleted.num_keys)[dead[0]]
    _, ids = search(deleted.index, q, 50)
    assert dead[0] in ids[0]  # it is in the raw neighbours ...
    assert dead[0] not in drafter.neighbours(q) and len(drafter.neighbours(q)) > 0  # ... but never drafted
    with pytest.raises(DatastoreError, match="unknown source"):
        delete_sources(root, ["nope"])

    compact(root)
    small = Datastore(root)
    assert small.deleted is None and "b3" not in small.sources and "a0" not in small.sources
    assert small.num_keys == int((~deleted.deleted).sum())
    assert len(small.sources) == len(deleted.sources) - 2
    # Values of kept keys are unchanged by compaction.
    keep = np.nonzero(~deleted.deleted)[0]
    assert np.array_equal(small.values(np.arange(small.num_keys), 6), deleted.values(keep, 6))
    assert len(list_versions(root)) == 4
    assert small.key_dtype == "float32"  # kept through add, delete and compact

    # Keys made in another dtype may join (decoding in one is allowed too): the record says both.
    more = [{"id": f"c{i}", "prompt": f"other q{i}?", "response": f"late reply {i} " + "uv " * 3} for i in range(4)]
    update_datastore(BuildConfig(model=ModelConfig(path=str(tiny_model_dir), dtype="bfloat16"), output=str(root),
                                 corpus=CorpusConfig(paths=[_write(tmp_path / "c.jsonl", more)], id_field="id"),
                                 value_len=8, shard_rows=10))
    assert Datastore(root).key_dtype == "bfloat16+float32"


def test_a_damaged_parent_is_refused_before_any_change(tmp_path, monkeypatch):
    """Every change verifies its parent in full first: a child re-checksummed from damaged
    bytes would pass every later check."""
    from dresd.datastore.publish import publish
    from tests_support import make_manifest, make_parts

    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "store"
    publish(root, make_parts(), make_manifest(), version="v1")
    tokens = root / "versions" / "v1" / "tokens.npy"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 0xFF  # same size: opening alone would not notice
    tokens.write_bytes(bytes(data))
    add = BuildConfig(corpus=CorpusConfig(paths=[str(tmp_path / "never-read.jsonl")]), output=str(root))
    for change in (lambda: update_datastore(add), lambda: delete_sources(root, ["src-1"]), lambda: compact(root)):
        with pytest.raises(DatastoreError, match=r"full verification failed, so this version is not used: "
                                                 r"tokens\.npy checksum mismatch"):
            change()
    assert list_versions(root) == ["v1"]
    tokens.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 0xFF])))  # repaired: the change goes through
    delete_sources(root, ["src-1"])
    assert len(list_versions(root)) == 2


def test_an_add_that_grows_a_store_past_its_layout_says_how_to_reach_the_one_chosen_now():
    from dresd.datastore.index import IndexParams
    from pipelines.update import _layout_advice

    flat = IndexParams(kind="flat", dim=16, nlist=0, nprobe=0, pq_m=0, refine=False, refine_k_factor=1.0)
    advice = _layout_advice("/data/s", flat, 2000, IndexConfig(flat_below=1000, pq_m=8))
    assert advice.startswith("Flat kept; for 2000 keys the index settings choose IVF") and advice.endswith(
        "`dresd update reindex --datastore /data/s` lays the keys out so")
    assert "a rebuild gives it" in _layout_advice("/data/s", flat, 2000, IndexConfig(flat_below=1000, pq_m=8, on_disk=True))


def test_reindex_lays_the_same_keys_out_as_the_settings_choose_now(tmp_path, capsys):
    from dresd.cli.main import main
    from dresd.datastore.index import IndexParams, exact_topk
    from dresd.datastore.publish import publish
    from pipelines.update import reindex
    from tests_support import make_manifest, make_parts

    rng = np.random.default_rng(0)
    records = [rng.integers(3, 259, 101).tolist() for _ in range(20)]  # 2,000 keys
    root = tmp_path / "store"
    publish(root, make_parts(records, hidden_dim=32, dim=16), make_manifest(dim=16))
    delete_sources(root, ["src-3"])  # tombstones survive a reindex
    flat = Datastore(root)
    assert flat.manifest["index"]["params"]["kind"] == "flat"

    # The command line, as a user would: the layout IVF-PQ takes for 2,000 keys below flat_below 1,000.
    assert main(["update", "reindex", "--datastore", str(root), "--set", "index.flat_below=1000",
                 "--set", "index.pq_m=8"]) == 0
    assert "published" in capsys.readouterr().out
    ivf = Datastore(root)
    params = IndexParams(**ivf.manifest["index"]["params"])
    assert params.kind == "ivfpq" and params.refine and params.dim == 16 and ivf.manifest["index"]["factory"] == params.factory
    assert ivf.manifest["parent"] == flat.version
    assert ivf.manifest["change"] == {"kind": "reindex", "from": "Flat", "to": params.factory}
    assert np.array_equal(np.asarray(ivf.tokens), np.asarray(flat.tokens)) and ivf.sources == flat.sources
    assert np.array_equal(np.asarray(ivf.key_positions), np.asarray(flat.key_positions))
    assert np.array_equal(ivf.deleted, flat.deleted) and ivf.deleted.any()
    # Ids are still key numbers: the new index finds what exact search over the same keys finds.
    keys = flat.index.reconstruct_n(0, flat.num_keys)
    queries = keys[rng.choice(len(keys), 50, replace=False)]
    truth = exact_topk([(0, keys)], queries, 10)
    _, got = search(ivf.index, queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)]) > 0.9
    assert (got[:, 0] == truth[:, 0]).mean() > 0.9
    # The intrinsic check is made on the new index (this parent has none to carry over).
    assert "check" not in flat.manifest and 0.5 < ivf.manifest["check"]["recall@50"] <= 1.0
    assert 0.5 < ivf.manifest["check"]["self_mrr@50"] <= 1.0

    with pytest.raises(DatastoreError, match="already in the layout"):
        reindex(root, IndexConfig(flat_below=1000, pq_m=8))
    # The update job's reindex step says so and moves on.
    from jobs.update import main as update_job

    config = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "update.yaml"
    assert update_job(["--config", str(config), "--output", str(root), "--set", "reindex=true", "--set", "index.flat_below=1000",
                       "--set", "index.pq_m=8"]) == 0
    assert f"reindex: skipped, the store already has the layout {params.factory}" in capsys.readouterr().out
    reindex(root, IndexConfig(flat_below=1000, pq_m=8, refine=False))  # the compact layout
    with pytest.raises(DatastoreError, match="PQ-only index keeps no exact vectors; rebuild instead of reindexing"):
        reindex(root, IndexConfig(kind="flat"))
    assert len(list_versions(root)) == 4  # built, delete, two reindexes: the refused ones published nothing
