"""Stage 5 (pipelines/merge.py), no Ray: the codec's fingerprint; the merge of encoded shards
equals one index filled with every key in order (flat, refine, compact, on disk); codes
numbered from another first key id are encoded again from the stored keys."""

from __future__ import annotations

from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import ray

from dresd.config import IndexConfig
from dresd.datastore.compression import compress, fit_compressor
from dresd.datastore.index import add_keys, is_on_disk, search, serialize, train_index
from encoded_shards import SIZES, code_all, make_codec, random_states, write_all
from pipelines.merge import clear_block_padding, compressor_fingerprint, index_fingerprint, load_trained, merge_shards
from pipelines.scratch import Scratch
from pipelines.shards import codes_name, first_key_ids


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-a"))


def _direct(work, tag, hidden, comp) -> faiss.Index:
    """Every key (float16-rounded, as stored) of every shard added in shard order to the trained index."""
    index = load_trained(work, tag)
    keys = np.concatenate([compress(comp, hidden[s]) for s in sorted(hidden)]).astype(np.float16)
    add_keys(index, keys.astype(np.float32))
    return index


def _queries(dim, n=40):
    q = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_the_fingerprints_follow_the_compressor_and_training(tmp_path):
    work, hidden = Scratch(str(tmp_path)), random_states()
    comp, params, ctag, tag = make_codec(work, hidden, IndexConfig(dim=16, kind="ivfpq", pq_m=8, nlist=4))
    trained = load_trained(work, tag)
    assert index_fingerprint(comp, trained) == tag and len(tag) == 12
    assert compressor_fingerprint(comp) == ctag != tag
    sample = compress(comp, np.concatenate(list(hidden.values())))
    assert index_fingerprint(comp, train_index(params, sample, seed=5)) != tag  # other centroids
    other = fit_compressor(np.concatenate(list(hidden.values()))[::2], 16)
    assert compressor_fingerprint(other) != ctag and index_fingerprint(other, trained) != tag
    assert (work.path / f"compressor-{ctag}.npz").is_file() and (work.path / f"trained-{tag}.faiss").is_file()


@pytest.mark.parametrize("cfg", [IndexConfig(dim=16, kind="flat"), IndexConfig(dim=16, kind="ivfpq", pq_m=8, nlist=4),
                                 IndexConfig(dim=16, kind="ivfpq", pq_m=8, nlist=4, refine=False),
                                 # 8-bit PQ's polysemous training costs ~1 s per sub-quantizer: few of them.
                                 IndexConfig(dim=8, kind="ivfpq", pq_m=2, nlist=4, on_disk=True)],
                         ids=["flat", "refine", "compact", "on-disk"])
def test_the_merge_equals_one_index_filled_in_order(tmp_path, cfg):
    work, hidden = Scratch(str(tmp_path)), random_states()
    comp, params, ctag, tag = make_codec(work, hidden, cfg)
    firsts = write_all(work, hidden, comp, ctag)
    if params.kind != "flat":
        code_all(work, ctag, tag, firsts)
    merged = merge_shards(work, sorted(SIZES), ctag, tag, firsts, on_disk=params.on_disk)
    assert is_on_disk(merged) == cfg.on_disk
    direct = _direct(work, tag, hidden, comp)
    assert merged.ntotal == direct.ntotal == 350
    q = np.concatenate([_queries(cfg.dim), compress(comp, hidden["00001-000000"][:10])])
    d_m, i_m = search(merged, q, 20)
    d_d, i_d = search(direct, q, 20)
    np.testing.assert_array_equal(i_m, i_d)
    np.testing.assert_allclose(d_m, d_d, rtol=1e-6)
    if not cfg.on_disk:  # byte for byte, once the unused slots of fast-scan blocks are zeroed
        clear_block_padding(direct)
        np.testing.assert_array_equal(serialize(merged), serialize(direct))


def test_codes_the_code_pass_left_out_or_numbered_otherwise_are_encoded_at_the_merge(tmp_path):
    """An update whose parent moved numbers its keys from another first id: the merge encodes
    the codes again from each shard's stored keys, and nothing is embedded. (Compact layout:
    a refine stage's rows would need the parent's 1000 keys in front.)"""
    work, hidden = Scratch(str(tmp_path)), random_states()
    comp, params, ctag, tag = make_codec(work, hidden, IndexConfig(dim=16, kind="ivfpq", pq_m=8, nlist=4, refine=False))
    code_all(work, ctag, tag, write_all(work, hidden, comp, ctag, base=0))
    moved = first_key_ids(SIZES, sorted(SIZES), base=1000)
    merged = merge_shards(work, sorted(SIZES), ctag, tag, moved)
    assert (work.path / "shards" / "00001-000000" / codes_name(tag, 1200)).is_file()
    ids = search(merged, _queries(16), 50)[1]
    assert ids.min() >= 1000 and ids.max() < 1350
