"""Stages 4-5 (pipelines/index_fill.py): one shard's fill called directly (no Ray) equals a
direct faiss add; fills are named by what they depend on and reused only then; the Ray
fill + merge equals one index filled with every key in order."""

from __future__ import annotations

import os
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dresd.config import IndexConfig
from dresd.datastore.compression import compress, fit_compressor
from dresd.datastore.index import add_keys, choose_index_params, is_on_disk, search, train_index
from pipelines.index_fill import fill_and_merge, fill_names, fill_shard, index_fingerprint, node_round_robin, save_trained
from pipelines.scratch import Scratch
from pipelines.shards import ShardData, first_key_ids, shard_hidden, write_shard

HIDDEN = 64
# 350 keys: enough to train the on-disk layout's 8-bit PQ (256 centroids).
SIZES = {"00000-000000": 200, "00000-000001": 0, "00001-000000": 150}  # an all-rejected shard holds no keys
fill_one = fill_shard._function  # the task's Python function, run in this process


@pytest.fixture(autouse=True)
def node_id(request, monkeypatch):
    """Fill tasks report their node (a Ray call that would start a local Ray outside one):
    answered here for the tests that run fills in this process."""
    if "ray_session" not in request.fixturenames:
        monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-a"))


def _work(folder) -> tuple[Scratch, dict, list[int]]:
    """Three embedded shards with random hidden states; (scratch, hidden by shard, first key ids)."""
    rng = np.random.default_rng(0)
    work, hidden, metas = Scratch(str(folder)), {}, {}
    for sid, n in SIZES.items():
        h = (rng.normal(size=(n, HIDDEN)) * np.linspace(0.2, 3, HIDDEN)).astype(np.float16)
        write_shard(folder / "shards" / sid, ShardData(np.zeros(n + 1, np.int32), np.array([0, n + 1]),
                                                       np.array([0], np.int32), h, ["s"]), {"keys": n, "tokens": n + 1})
        hidden[sid], metas[sid] = h, {"keys": n}
    return work, hidden, first_key_ids(metas, sorted(SIZES))


def _train(work, hidden, cfg: IndexConfig):
    sample = np.concatenate([h.astype(np.float32) for h in hidden.values()])
    comp = fit_compressor(sample, cfg.dim)
    params = choose_index_params(len(sample), cfg)
    trained = train_index(params, compress(comp, sample))
    return comp, params, save_trained(work, comp, trained)


def _direct(work, tag, comp, hidden) -> faiss.Index:
    """Every key of every shard added, in shard order, to the trained index: the reference."""
    index = faiss.read_index(str(work.path / f"trained-{tag}.faiss"))
    add_keys(index, compress(comp, np.concatenate([hidden[s].astype(np.float32) for s in sorted(hidden)])))
    return index


def _queries(dim, n=40):
    q = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.mark.parametrize("cfg", [IndexConfig(dim=16, kind="flat"), IndexConfig(dim=16, kind="ivfpq", pq_m=8, nlist=4)],
                         ids=["flat", "ivfpq"])
def test_one_shard_fill_equals_a_direct_add_with_global_ids(tmp_path, cfg):
    work, hidden, firsts = _work(tmp_path)
    comp, params, tag = _train(work, hidden, cfg)
    sid, first = "00001-000000", firsts[2]
    assert first == 200 and fill_one(work, sid, tag, first) == "node-a"

    index_rel, keys_rel = fill_names(sid, tag, first)
    keys = np.load(work.path / keys_rel)
    np.testing.assert_array_equal(keys, compress(comp, hidden[sid].astype(np.float32)))
    got = faiss.read_index(str(work.path / index_rel))
    direct = faiss.read_index(str(work.path / f"trained-{tag}.faiss"))
    add_keys(direct, keys, first)
    assert got.ntotal == 150
    np.testing.assert_array_equal(faiss.serialize_index(got), faiss.serialize_index(direct))
    if params.kind == "flat":
        np.testing.assert_array_equal(got.reconstruct_n(0, 150), keys)  # rows in shard order
    else:  # ids are global key numbers: this shard's keys follow the first 200
        ivf = faiss.extract_index_ivf(got)
        ids = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i))
                              for i in range(ivf.nlist)])
        assert sorted(ids.tolist()) == list(range(200, 350))
    assert sorted(os.listdir(work.path / "shards" / sid)) == sorted(  # no temp files left behind
        ["tokens.npy", "offsets.npy", "key_starts.npy", "hidden.npy", "sources.json", "meta.json",
         os.path.basename(index_rel), os.path.basename(keys_rel)])


def test_a_finished_fill_is_reused_and_an_unfinished_one_redone(tmp_path):
    work, hidden, firsts = _work(tmp_path)
    comp, _, tag = _train(work, hidden, IndexConfig(dim=16, kind="flat"))
    sid = "00000-000000"
    fill_one(work, sid, tag, 0)
    index_path, keys_path = (work.path / p for p in fill_names(sid, tag, 0))
    stamp = index_path.stat().st_mtime_ns
    fill_one(work, sid, tag, 0)
    assert index_path.stat().st_mtime_ns == stamp  # the index file marks a finished fill
    # Keys written but the index never was (a crash between them): the fill runs again.
    index_path.unlink()
    keys_path.write_bytes(b"torn")
    fill_one(work, sid, tag, 0)
    assert faiss.read_index(str(index_path)).ntotal == 200
    np.testing.assert_array_equal(np.load(keys_path), compress(comp, hidden[sid].astype(np.float32)))
    # Another compressor/training or another first id names other files: nothing stale is reused.
    assert fill_names(sid, "othertag", 0) != fill_names(sid, tag, 0)
    assert fill_names(sid, tag, 7)[0] != fill_names(sid, tag, 0)[0]


def test_the_fingerprint_follows_the_compressor_and_training(tmp_path):
    work, hidden, _ = _work(tmp_path)
    comp, params, tag = _train(work, hidden, IndexConfig(dim=16, kind="ivfpq", pq_m=8, nlist=4))
    trained = faiss.read_index(str(work.path / f"trained-{tag}.faiss"))
    assert index_fingerprint(comp, trained) == tag and len(tag) == 12
    sample = compress(comp, np.concatenate([h.astype(np.float32) for h in hidden.values()]))
    assert index_fingerprint(comp, train_index(params, sample, seed=5)) != tag  # other centroids
    other = fit_compressor(np.concatenate([h.astype(np.float32) for h in hidden.values()])[::2], 16)
    assert index_fingerprint(other, trained) != tag
    assert (work.path / f"compressor-{tag}.npz").is_file()


def test_fills_go_round_robin_over_nodes_with_cpus(monkeypatch):
    a, b, c, dead, gpu = (ch * 56 for ch in "abcde")  # node ids are 28-byte hex strings
    nodes = [{"NodeID": c, "Alive": True, "Resources": {"CPU": 4.0}},
             {"NodeID": a, "Alive": True, "Resources": {"CPU": 2.0}},
             {"NodeID": dead, "Alive": False, "Resources": {"CPU": 8.0}},
             {"NodeID": gpu, "Alive": True, "Resources": {"GPU": 1.0}},
             {"NodeID": b, "Alive": True, "Resources": {"CPU": 1.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    places = node_round_robin(5)
    assert all(isinstance(p, NodeAffinitySchedulingStrategy) and p.soft for p in places)
    assert [p.node_id for p in places] == [a, b, c, a, b]
    monkeypatch.setattr(ray, "nodes", lambda: nodes[:1] + nodes[2:4])  # one usable node
    assert node_round_robin(3) == ["DEFAULT"] * 3


@pytest.mark.parametrize("cfg", [IndexConfig(dim=16, kind="ivfpq", pq_m=8, nlist=4),
                                 # 8-bit PQ's polysemous training costs ~1 s per sub-quantizer: few of them.
                                 IndexConfig(dim=8, kind="ivfpq", pq_m=2, nlist=4, on_disk=True)],
                         ids=["in-ram", "on-disk"])
def test_ray_fill_and_merge_equals_one_index_filled_in_order(ray_session, tmp_path, cfg):
    work, hidden, firsts = _work(tmp_path)
    comp, params, tag = _train(work, hidden, cfg)
    shard_ids = sorted(SIZES)
    merged, nodes = fill_and_merge(work, shard_ids, tag, firsts, on_disk=params.on_disk)
    assert nodes == [ray.get_runtime_context().get_node_id()] * 3 and is_on_disk(merged) == cfg.on_disk
    direct = _direct(work, tag, comp, hidden)
    assert merged.ntotal == direct.ntotal == 350
    q = np.concatenate([_queries(cfg.dim), compress(comp, np.asarray(shard_hidden(work, shard_ids[2])[:10], np.float32))])
    d_m, i_m = search(merged, q, 20)
    d_d, i_d = search(direct, q, 20)
    np.testing.assert_array_equal(i_m, i_d)
    np.testing.assert_allclose(d_m, d_d, rtol=1e-6)
    # A rerun reuses every fill (same files) and merges to the same index.
    stamps = {p: p.stat().st_mtime_ns for p in (work.path / "shards").glob("*/index-*.faiss")}
    assert len(stamps) == 3
    again, _ = fill_and_merge(work, shard_ids, tag, firsts, on_disk=params.on_disk)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    np.testing.assert_array_equal(search(again, q, 20)[1], i_m)
